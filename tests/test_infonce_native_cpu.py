"""The native backend's CPU kernels against the fp64 reference (SPEC.md section 6): every
contrastive loss through the public API, loss and every input gradient, over odd shapes that
cross the kernels' row tile (256) and key tile (512); the op itself with several row sets and key
blocks; frozen inputs; and the no rows x keys allocation rule."""
import subprocess
import sys
import textwrap

import pytest
import torch

from pnr_kernels import native, reference
from pnr_kernels.ops import backend_ops
from pnr_kernels.registry import LOSSES
from pnr_kernels.testing import TOLERANCES, check_against_reference, make_inputs, relative_error

pytestmark = pytest.mark.skipif(
    native.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"native backend unavailable: {native.unavailable_reason(torch.device('cpu'), torch.float32)}",
)

PUBLIC = {name: spec.function for name, spec in LOSSES.items() if spec.family == "infonce"}


def infonce_op():
    """The fused InfoNCE custom op over the native kernels."""
    return backend_ops("native", "infonce", native.kernels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("loss", sorted(PUBLIC))
@pytest.mark.parametrize("batch,dim,queue", [(3, 5, 7), (133, 37, 517)])
def test_losses_match_reference(loss, dtype, batch, dim, queue):
    args, kwargs = make_inputs(loss, batch, dim, dtype, requires_grad=True, queue_size=queue)
    check_against_reference(loss, "native", args, kwargs)


@pytest.mark.parametrize("loss", ["simclr_pnr", "moco_pnr"])
def test_low_temperature_stays_finite_and_exact(loss):
    """No NaN or Inf down to tau = 0.01 with unit rows (docs/losses.md, Precision)."""
    tiny = {name: 0.01 for name in LOSSES[loss].options if name.endswith("temperature")}
    args, kwargs = make_inputs(loss, 70, 16, torch.float32, requires_grad=True, queue_size=300, options=tiny)
    check_against_reference(loss, "native", args, kwargs)


def op_inputs(dtype, device="cpu"):
    """Three row sets, three key blocks of different sizes (one strided like a queue slice)."""
    m, d = 300, 19
    rows = [torch.randn(m, d, dtype=dtype, device=device) for _ in range(3)]
    queue = torch.randn(d, 700, dtype=dtype, device=device).t()  # (700, d) with strides (1, 700)
    keys = [rows[0], torch.randn(m + 5, d, dtype=dtype, device=device), queue]
    return rows, keys, [True, True, False], [2.0, 0.5, 1.3]


def check_op_against_reference(dtype, device="cpu"):
    rows, keys, exclude, scales = op_inputs(dtype, device)
    rows[0].requires_grad_()
    rows[2].requires_grad_()
    keys[2].requires_grad_()  # rows[1] and keys[1] stay frozen; keys[0] is rows[0]
    got = infonce_op()(rows, keys, exclude, scales)
    exact_rows = [r.detach().double().requires_grad_(r.requires_grad) for r in rows]
    exact_keys = [exact_rows[0]] + [k.detach().double().requires_grad_(k.requires_grad) for k in keys[1:]]
    want = reference.infonce_lse(exact_rows, exact_keys, exclude, scales)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert got.dtype == reference.compute_dtype(dtype) and got.shape == (3, 300)
    assert relative_error(got, want) <= loss_tol
    weights = torch.rand(3, 300, dtype=torch.float64, device=device)
    grads = torch.autograd.grad((got * weights.to(got.dtype)).sum(), [rows[0], rows[2], keys[2]])
    want_grads = torch.autograd.grad((want * weights).sum(), [exact_rows[0], exact_rows[2], exact_keys[2]])
    for g, w in zip(grads, want_grads):
        assert g.dtype == dtype
        assert relative_error(g, w) <= grad_tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
def test_op_matches_reference_infonce_lse(dtype):
    check_op_against_reference(dtype)


def test_backward_returns_only_the_needed_gradients():
    """The kernel is told which inputs need a gradient and computes only those."""
    rows, keys, exclude, scales = op_inputs(torch.float32)
    lse = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
    grad = torch.ones_like(lse)
    backward = torch.ops.pnr_kernels.infonce_lse_backward
    assert backward(grad, lse, rows, keys, exclude, scales, [False] * 3, [False] * 3) == []
    only_key = backward(grad, lse, rows, keys, exclude, scales, [False] * 3, [False, False, True])
    assert len(only_key) == 1 and only_key[0].shape == keys[2].shape
    every = backward(grad, lse, rows, keys, exclude, scales, [True] * 3, [True] * 3)
    torch.testing.assert_close(only_key[0], every[5])


def test_frozen_inputs_get_no_gradient():
    args, kwargs = make_inputs("simclr_pnr", 20, 8, torch.float32, requires_grad=True)
    PUBLIC["simclr_pnr"](*args, **kwargs, backend="native").backward()
    for arg, trainable in zip(args, [True, True, True, True, False, False]):
        assert (arg.grad is not None) == trainable


def test_bad_op_arguments_are_refused():
    rows, keys, exclude, scales = op_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="scales has 2 entries for 3 row sets"):
        torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales[:2])
    with pytest.raises(RuntimeError, match=r"keys\[1\] has 5 columns"):
        torch.ops.pnr_kernels.infonce_lse_forward(rows, [keys[0], torch.randn(4, 5)], exclude[:2], scales)


def test_no_rows_by_keys_allocation():
    """nt_xent over N = 8192 rows: its N x N float32 logits alone would be 256 MiB; the peak RSS of
    a fresh process may grow by at most 48 MiB over forward + backward."""
    script = textwrap.dedent("""
        import resource, torch
        from pnr_kernels import losses
        def step(batch):
            z1, z2 = (torch.randn(batch, 16, requires_grad=True) for _ in range(2))
            losses.nt_xent_loss(z1, z2, backend="native").backward()
        step(300)  # loads the library, starts the threads
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(4096)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth_mib = float(result.stdout.strip().splitlines()[-1])
    assert growth_mib < 48, f"peak RSS grew by {growth_mib:.1f} MiB"


# --- Non-finite inputs (issue 9, item 1) -----------------------------------------------------------
# Every NaN or Inf in any row set, key block or grad_lse entry gives exactly the non-finite pattern of
# the float64 reference: a fused kernel must never skip a NaN (fmaxf does) or drop a gradient.

def _nonfinite_op_inputs(dtype, device):
    """Two row sets and two key blocks (one strided like a queue), unit-scale values."""
    m, d = 70, 9
    rows = [torch.randn(m, d, dtype=dtype, device=device) / 3 for _ in range(2)]
    keys = [torch.randn(m, d, dtype=dtype, device=device) / 3,
            (torch.randn(d, 90, dtype=dtype, device=device) / 3).t()]
    return rows, keys, [True, False], [2.0, 0.5]


def _positions():
    return [("rows", 0), ("rows", 1), ("keys", 0), ("keys", 1)]


def check_nonfinite_inputs_propagate(dtype, device, value):
    for operand, index in _positions():
        rows, keys, exclude, scales = _nonfinite_op_inputs(dtype, device)
        target = (rows if operand == "rows" else keys)[index]
        poisoned = target.clone()
        poisoned[5, 3] = value
        (rows if operand == "rows" else keys)[index] = poisoned
        got = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
        want = reference.infonce_lse([r.double() for r in rows], [k.double() for k in keys], exclude, scales)
        assert (~torch.isfinite(want)).any(), "the case must poison the reference"
        assert torch.equal(torch.isfinite(got).cpu(), torch.isfinite(want).cpu()), (operand, index, value)


def check_nonfinite_grad_propagates(dtype, device, value):
    rows, keys, exclude, scales = _nonfinite_op_inputs(dtype, device)
    lse = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
    for r in range(2):
        grad = torch.rand_like(lse)
        grad[r, 5] = value
        got = torch.ops.pnr_kernels.infonce_lse_backward(grad, lse, rows, keys, exclude, scales, [True] * 2, [True] * 2)
        exact_rows = [x.detach().double().requires_grad_() for x in rows]
        exact_keys = [x.detach().double().requires_grad_() for x in keys]
        want_lse = reference.infonce_lse(exact_rows, exact_keys, exclude, scales)
        want = torch.autograd.grad((want_lse * grad.double()).sum(), exact_rows + exact_keys)
        assert not all(torch.isfinite(w).all() for w in want), "the case must poison the reference"
        for index, (g, w) in enumerate(zip(got, want)):
            # every gradient entry the reference makes non-finite is non-finite here too (the
            # CPU kernel folds grad_lse into the key-gradient operand, so a masked pair's weight 0
            # times a non-finite grad_lse gives NaN where the reference's masked_fill backward
            # gives 0: more non-finite entries, never fewer)
            dropped = torch.isfinite(g).cpu() & ~torch.isfinite(w).cpu()
            assert not dropped.any(), (r, index, value, dropped.nonzero()[:5].tolist())


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NONFINITE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[1])
def test_nonfinite_inputs_propagate(dtype, value):
    check_nonfinite_inputs_propagate(dtype, "cpu", value)


@pytest.mark.parametrize("value", NONFINITE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[1])
def test_nonfinite_grad_propagates(dtype, value):
    check_nonfinite_grad_propagates(dtype, "cpu", value)


def check_losses_nonfinite(loss, dtype, device):
    """NaN or Inf in any input of any contrastive loss gives a non-finite loss."""
    args, kwargs = make_inputs(loss, 5, 6, dtype, queue_size=11, device=device)
    for position in range(len(args)):
        for value in (float("nan"), float("inf")):
            poisoned = [a.clone() for a in args]
            poisoned[position][(1,) * poisoned[position].dim()] = value
            got = PUBLIC[loss](*poisoned, **kwargs, backend="native")
            assert not torch.isfinite(got), (loss, position, value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("loss", sorted(PUBLIC))
def test_losses_nonfinite_inputs(loss, dtype):
    check_losses_nonfinite(loss, dtype, "cpu")


def test_kernels_ignore_autocast():
    """Under torch.autocast the kernels compute exactly what they compute outside it."""
    rows, keys, exclude, scales = op_inputs(torch.float32)
    want = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
    grad = torch.rand_like(want)
    want_grads = torch.ops.pnr_kernels.infonce_lse_backward(grad, want, rows, keys, exclude, scales,
                                                            [True] * 3, [True] * 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
        got_grads = torch.ops.pnr_kernels.infonce_lse_backward(grad, want, rows, keys, exclude, scales,
                                                               [True] * 3, [True] * 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)
