"""The fast paths of the native CPU InfoNCE kernels (csrc/infonce_cpu.cpp): precision at N = 4096
rows against float64 with the float32 products and with the bf16 / fp16 products (forced with
PNR_KERNELS_CPU_PRODUCTS=half, so that they run here even where the automatic choice keeps float32
products), the logits stash that lets backward skip the recomputation (used, exact, bounded by its
budget, taken once), the frozen key blocks folded into forward (see folded_blocks), non-finite propagation through the vectorised element-wise passes, and the
ATen fallback of the BLAS calls."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pnr_kernels import losses, native, reference
from pnr_kernels.ops import backend_ops
from pnr_kernels.registry import LOSSES
from pnr_kernels.testing import TOLERANCES, make_inputs, relative_error


def _op():
    """The native backend's fused InfoNCE custom op."""
    return backend_ops("native", "infonce", native.kernels)

pytestmark = pytest.mark.skipif(
    native.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"native backend unavailable: {native.unavailable_reason(torch.device('cpu'), torch.float32)}",
)

@pytest.fixture
def env(monkeypatch):
    """Sets variables the kernels read on every call."""
    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_


@pytest.fixture(scope="module")
def simclr_pnr_4096():
    """SimCLR-PNR at B = 2048 (N = 4096 rows), D = 128: inputs, fp64 loss and gradients."""
    torch.manual_seed(0)
    args, kwargs = make_inputs("simclr_pnr", 2048, 128, torch.float64, requires_grad=True)
    want = reference.simclr_pnr_loss(*args, **kwargs)
    want_grads = torch.autograd.grad(want, [a for a in args if a.requires_grad])
    return args, kwargs, want.detach(), want_grads


@pytest.mark.parametrize("dtype,products", [(torch.float32, "auto"), (torch.bfloat16, "half"),
                                            (torch.bfloat16, "float"), (torch.float16, "half"),
                                            (torch.float16, "float")],
                         ids=["float32", "bfloat16-half", "bfloat16-float", "float16-half", "float16-float"])
def test_simclr_pnr_4096_rows_within_tolerance(simclr_pnr_4096, env, dtype, products):
    env(PNR_KERNELS_CPU_PRODUCTS=products)
    args, kwargs, want, want_grads = simclr_pnr_4096
    inputs = [a.detach().to(dtype).requires_grad_(a.requires_grad) for a in args]
    got = losses.simclr_pnr_loss(*inputs, **kwargs, backend="native")
    grads = torch.autograd.grad(got, [a for a in inputs if a.requires_grad])
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(got, want) <= loss_tol
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert relative_error(g, w) <= grad_tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_products_match_float_products_on_the_op(env, dtype):
    """The op's lse and gradients with half products against float64 on the same rounded inputs,
    with a row set, frozen keys, a strided queue and row weights of very different sizes (fp16
    must keep the small upstream gradients)."""
    torch.manual_seed(1)
    m, d = 700, 40
    rows = [torch.nn.functional.normalize(torch.randn(m, d)).to(dtype) for _ in range(2)]
    queue = torch.nn.functional.normalize(torch.randn(d, 900), dim=0).to(dtype).t()
    weights = torch.logspace(-6, 0, 2 * m, dtype=torch.float64).view(2, m)
    exact_rows = [r.double().requires_grad_() for r in rows]
    exact_keys = [exact_rows[0], queue.double().requires_grad_()]
    want = reference.infonce_lse(exact_rows, exact_keys, [True, False], [5.0, 2.0])
    want_grads = torch.autograd.grad((want * weights).sum(), exact_rows + exact_keys[1:])
    env(PNR_KERNELS_CPU_PRODUCTS="half")
    got_rows = [r.clone().requires_grad_() for r in rows]
    got_keys = [got_rows[0], queue.clone().requires_grad_()]
    got = _op()(got_rows, got_keys, [True, False], [5.0, 2.0])
    grads = torch.autograd.grad((got * weights.float()).sum(), got_rows + got_keys[1:])
    assert relative_error(got, want) <= 1e-5
    for g, w in zip(grads, want_grads):
        assert relative_error(g, w) <= 2e-2


def _gradient_after_hidden_change(op, budget, env, fold=0):
    """Forward, then rows changed behind the version counter, then backward: the gradient is
    computed from the forward's logits if they were stashed, from the changed rows otherwise.
    With ``fold=0`` (the logits stash alone) the frozen block f is stashed too; with ``fold=1``
    forward accumulates f's part of the row gradient instead (see folded_blocks)."""
    env(PNR_KERNELS_CPU_LOGITS_BUDGET_MB=budget, PNR_KERNELS_CPU_FOLD=fold)
    torch.manual_seed(2)
    z = torch.nn.functional.normalize(torch.randn(600, 32)).requires_grad_()
    f = torch.randn(600, 32)
    lse = op([z], [z, f], [True, False], [5.0])
    z.data.mul_(0.5)
    grad = torch.autograd.grad(lse.sum(), [z])[0]
    z.data.mul_(2.0)
    return grad


def test_logits_stash_is_used_within_its_budget(env):
    op = _op()
    stashed = _gradient_after_hidden_change(op, 16, env)
    recomputed = _gradient_after_hidden_change(op, 0, env)
    too_small = _gradient_after_hidden_change(op, 1, env)  # 600 x 1200 float32 logits are 2.7 MiB
    assert not torch.allclose(stashed, recomputed)
    torch.testing.assert_close(too_small, recomputed, rtol=0, atol=0)


def test_folded_block_gradient_comes_from_forward(env):
    """With the frozen block folded, its part of the row gradient is the forward's (rows before
    the hidden change) even without any logits stash; the z block is recomputed from the changed
    rows. Stashing z as well then gives the forward's gradient exactly as the plain stash does."""
    op = _op()
    recomputed = _gradient_after_hidden_change(op, 0, env)
    folded = _gradient_after_hidden_change(op, 0, env, fold=1)
    assert not torch.allclose(folded, recomputed)
    stashed = _gradient_after_hidden_change(op, 16, env)
    torch.testing.assert_close(_gradient_after_hidden_change(op, 16, env, fold=1), stashed, rtol=1e-5,
                               atol=1e-5 * stashed.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_folded_blocks_match_the_reference(env, dtype):
    """Two row sets against a symmetric block, a key block that needs a gradient and two frozen
    ones (folded, one strided like a queue, one with its diagonal excluded): every need pattern of
    the folding, against float64, and a second backward (the folded part taken by the first)
    recomputes the same."""
    env(PNR_KERNELS_CPU_FOLD=1, PNR_KERNELS_CPU_LOGITS_BUDGET_MB=0)
    torch.manual_seed(4)
    m, d = 300, 20
    z, p = (torch.randn(m, d, dtype=dtype).requires_grad_() for _ in range(2))
    trained = torch.randn(m + 30, d, dtype=dtype).requires_grad_()
    frozen, queue = torch.randn(m, d, dtype=dtype), torch.randn(d, 1100, dtype=dtype).t()
    rows, keys = [z, p], [z, trained, frozen, queue]
    exclude, scales = [True, False, True, False], [1.5, 0.8]
    lse = _op()(rows, keys, exclude, scales)
    weights = torch.rand(lse.shape, dtype=torch.float64)
    got = torch.autograd.grad((lse * weights.to(lse.dtype)).sum(), [z, p, trained], retain_graph=True)
    again = torch.autograd.grad((lse * weights.to(lse.dtype)).sum(), [z, p, trained])
    exact_rows = [t.detach().double().requires_grad_() for t in rows]
    exact_keys = [exact_rows[0]] + [t.detach().double().requires_grad_(t.requires_grad) for t in keys[1:]]
    want_lse = reference.infonce_lse(exact_rows, exact_keys, exclude, scales)
    want = torch.autograd.grad((want_lse * weights).sum(), exact_rows + exact_keys[1:2])
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(lse, want_lse) <= loss_tol
    for g, h, w in zip(got, again, want):
        assert relative_error(g, w) <= grad_tol
        assert relative_error(h, w) <= grad_tol


def test_stash_budget_counts_live_stashes_only(env):
    """The budget (3 MiB) holds one stash of 2.7 MiB: while a forward's lse is alive its stash
    keeps the next forward from stashing; once that lse is freed, its stash goes too."""
    op = _op()
    recomputed = _gradient_after_hidden_change(op, 0, env)
    z = torch.randn(600, 32, requires_grad=True)
    env(PNR_KERNELS_CPU_LOGITS_BUDGET_MB=3, PNR_KERNELS_CPU_FOLD=0)
    alive = op([z], [z, torch.randn(600, 32)], [True, False], [5.0])
    torch.testing.assert_close(_gradient_after_hidden_change(op, 3, env), recomputed, rtol=0, atol=0)
    del alive
    assert not torch.allclose(_gradient_after_hidden_change(op, 3, env), recomputed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("loss", ["simclr_pnr", "nt_xent", "moco_pnr", "moco", "cassle_simclr"])
def test_stashed_and_recomputed_gradients_agree(env, loss, dtype):
    args, kwargs = make_inputs(loss, 300, 24, dtype, requires_grad=True, queue_size=700)
    trainable = [a for a in args if a.requires_grad]
    results = []
    for budget, fold in ((16, 1), (0, 1), (16, 0), (0, 0)):  # stash / recompute, folded or not
        env(PNR_KERNELS_CPU_LOGITS_BUDGET_MB=budget, PNR_KERNELS_CPU_FOLD=fold)
        value = LOSSES[loss].function(*args, **kwargs, backend="native")
        results.append((value.detach(), torch.autograd.grad(value, trainable)))
    (v0, g0), *others = results
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for v1, g1 in others:
        torch.testing.assert_close(v0, v1, rtol=0, atol=0)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def _aliased_and_copied_keys(dtype, exclude_self):
    """Row sets [z, p] against key blocks [z, f] (block 0 is row set 0 itself), and the same with
    a copy of z as block 0; sizes cross the row tile (256) and key tile (512)."""
    torch.manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(600, 24, dtype=dtype))
    p, f = torch.randn(600, 24, dtype=dtype) / 5, torch.randn(530, 24, dtype=dtype) / 5
    exclude, scales = [exclude_self, False], [2.5, 1.5]
    return [z, p], [z, f], [z.clone(), f], exclude, scales


@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
def test_key_block_that_is_its_row_set_agrees_with_a_copy_of_it(dtype, exclude_self):
    """Key block 0 is row set 0 itself (same tensor: symmetric logits, visited from each unit's
    own rows on, csrc/infonce_cpu.cpp) or a copy of it (every tile visited): the same LSE and, with
    the row and key slots of that tensor added as autograd adds them, the same gradients."""
    rows, keys, copied, exclude, scales = _aliased_and_copied_keys(dtype, exclude_self)
    forward, backward = torch.ops.pnr_kernels.infonce_lse_forward, torch.ops.pnr_kernels.infonce_lse_backward
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    lse = forward(rows, keys, exclude, scales)
    torch.testing.assert_close(lse, forward(rows, copied, exclude, scales), rtol=tol, atol=tol)
    grad = torch.rand_like(lse) - 0.3
    need_rows, need_keys = [True, True], [True, False]
    dz_rows, dp, dz_keys = backward(grad, lse, rows, keys, exclude, scales, need_rows, need_keys)
    two_rows, two_p, two_keys = backward(grad, lse, rows, copied, exclude, scales, need_rows, need_keys)
    torch.testing.assert_close(dz_rows + dz_keys, two_rows + two_keys, rtol=tol,
                               atol=tol * two_rows.abs().max().item())
    torch.testing.assert_close(dp, two_p, rtol=0, atol=0)


@pytest.mark.parametrize("budget", [16, 0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d)[6:])
def test_key_block_that_is_its_row_set_matches_the_reference(env, dtype, budget):
    """The one-product path through autograd, from the stash (16 MiB) and recomputed (0), against
    float64 (row set 0 is also the key block of row set 1, whose key gradient adds to it)."""
    env(PNR_KERNELS_CPU_LOGITS_BUDGET_MB=budget)
    rows, keys, _, exclude, scales = _aliased_and_copied_keys(dtype, True)
    z, p = (r.clone().requires_grad_() for r in rows)
    lse = _op()([z, p], [z, keys[1]], exclude, scales)
    weights = torch.rand(lse.shape, dtype=torch.float64)
    got = torch.autograd.grad((lse * weights.to(lse.dtype)).sum(), [z, p])
    exact = [r.double().requires_grad_() for r in rows]
    want_lse = reference.infonce_lse(exact, [exact[0], keys[1].double()], exclude, scales)
    want = torch.autograd.grad((want_lse * weights).sum(), exact)
    _, grad_tol = TOLERANCES[dtype]
    for g, w in zip(got, want):
        assert relative_error(g, w) <= grad_tol


def test_second_backward_recomputes(env):
    env(PNR_KERNELS_CPU_LOGITS_BUDGET_MB=16)
    z = torch.randn(300, 16, requires_grad=True)
    lse = _op()([z], [z], [True], [2.0])
    first = torch.autograd.grad(lse.sum(), [z], retain_graph=True)[0]
    second = torch.autograd.grad(lse.sum(), [z])[0]
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("where", [0, 15, 16, 517, 1023, 1029])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_keys_propagate(where, value):
    """A NaN in any key reaches every row's LSE, wherever it falls in the vector loops (first
    element, tail of a 16-wide vector, a later key tile); an Inf gives +inf or NaN logits (a
    non-finite LSE) or -inf ones (a term of 0), exactly where float64 does."""
    rows = torch.randn(40, 8)
    keys = torch.randn(1030, 8)
    keys[where, 3] = value
    lse = _op()([rows], [keys], [False], [1.0])
    want = reference.infonce_lse([rows.double()], [keys.double()], [False], [1.0])
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want))
    if value != value:
        assert not torch.isfinite(lse).any()


def test_non_finite_row_gives_non_finite_lse_only_there():
    rows = torch.randn(40, 8)
    rows[7, 0] = float("nan")
    lse = _op()([rows], [torch.randn(100, 8)], [False], [1.0])
    assert not torch.isfinite(lse[0, 7]) and torch.isfinite(lse[0, :7]).all()


def test_row_without_keys_has_minus_inf_lse_and_zero_gradient():
    z = torch.randn(1, 8, requires_grad=True)
    lse = _op()([z], [z], [True], [1.0])
    assert lse.item() == float("-inf")
    assert torch.equal(torch.autograd.grad(lse.sum(), [z])[0], torch.zeros(1, 8))


@pytest.mark.parametrize("variables", [["PNR_KERNELS_CPU_ATEN_BLAS"], ["PNR_KERNELS_CPU_NO_AVX512"],
                                       ["PNR_KERNELS_CPU_NO_AVX512", "PNR_KERNELS_CPU_NO_AVX2"]],
                         ids=["aten-blas", "avx2", "scalar"])
def test_fallbacks_match_reference(variables):
    """The paths of other machines, forced by variables read once per process:
    PNR_KERNELS_CPU_ATEN_BLAS=1 takes the products through ATen (torch builds without the Fortran
    BLAS symbols), PNR_KERNELS_CPU_NO_AVX512=1 the AVX2 element-wise loops, with
    PNR_KERNELS_CPU_NO_AVX2=1 as well the scalar ones; here with float64, float32 and the bf16 /
    fp16 products, at tau = 0.05 so that many weights underflow."""
    script = textwrap.dedent("""
        import itertools, os, torch
        from pnr_kernels.registry import LOSSES
        from pnr_kernels.testing import TOLERANCES, make_inputs
        os.environ["PNR_KERNELS_CPU_PRODUCTS"] = "half"
        options = {"moco_pnr": dict(temperature=0.05, distill_temperature=0.075),
                   "simclr_pnr": dict(temperature=0.05)}  # simclr_pnr: the one-product z-z block
        for (dtype, (loss_tol, grad_tol)), loss in itertools.product(TOLERANCES.items(), options):
            args, kwargs = make_inputs(loss, 133, 37, dtype, requires_grad=True, queue_size=517,
                                       options=options[loss])
            got = LOSSES[loss].function(*args, **kwargs, backend="native")
            exact = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
            want = LOSSES[loss].reference(*exact, **kwargs)
            assert abs(got.item() - want.item()) <= loss_tol * abs(want.item()), (dtype, got, want)
            grads = torch.autograd.grad(got, [a for a in args if a.requires_grad])
            want_grads = torch.autograd.grad(want, [a for a in exact if a.requires_grad])
            for g, w in zip(grads, want_grads):
                error = ((g.double() - w).norm() / w.norm()).item()
                assert error <= grad_tol, (dtype, error)
        print("ok")
    """)
    environment = dict(os.environ, **{variable: "1" for variable in variables})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_bad_product_choice_is_refused(env):
    env(PNR_KERNELS_CPU_PRODUCTS="tf32")
    z = torch.randn(10, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="PNR_KERNELS_CPU_PRODUCTS must be auto, half or float"):
        _op()([z], [z], [True], [1.0])


@pytest.mark.parametrize("layout", ["row-major", "column-major", "expanded", "one-column"])
def test_key_layouts(layout):
    """Keys are read in place when row- or column-major (a queue slice of a (D, K) buffer), copied
    otherwise (stride 0); a single column is row- and column-major at once."""
    dim = 1 if layout == "one-column" else 12
    rows = torch.randn(50, dim, dtype=torch.float64, requires_grad=True)
    base = torch.randn(dim, 530, dtype=torch.float64)
    if layout != "expanded":
        keys = {"row-major": base.t().contiguous(), "column-major": base.t(),
                "one-column": base.t()}[layout].detach().requires_grad_()
    if layout == "expanded":
        keys = base[:, :1].t().detach().requires_grad_()
        keys_in = keys.expand(530, dim)
    else:
        keys_in = keys
    got = _op()([rows], [keys_in], [False], [0.7])
    want = reference.infonce_lse([rows], [keys_in], [False], [0.7])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    weights = torch.rand_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), [rows, keys]),
                               torch.autograd.grad((want * weights).sum(), [rows, keys]), rtol=1e-10, atol=1e-12)
