"""The native regulariser kernels (csrc/regularizers_*) against the float64 reference: loss and the
gradients of p1 and p2 for every dtype (float64 on CPU), odd shapes and strided inputs, on CPU and,
where a GPU and the extension's CUDA part are present (benchmarks/gpu_check.sh), on CUDA. Here the
CUDA sources are at least compiled: the extension build runs nvcc whenever it finds one."""
import pytest
import torch

import pnr_kernels
from pnr_kernels import native
from pnr_kernels.ops import backend_ops
from pnr_kernels.registry import LOSSES as REGISTRY
from pnr_kernels.testing import (TOLERANCES, check_against_reference, fused_losses, make_inputs, op_calls,
                                 relative_error, restride)

REASON = native.unavailable_reason(torch.device("cpu"), torch.float32)
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native backend unavailable: {REASON}")

WEIGHTS = {
    "byol_pnr": dict(distill_weight=1.0, negative_weight=0.5),
    "vicreg_pnr": dict(distill_weight=25.0, negative_weight=23.0),
    "barlow_pnr": dict(distill_weight=1.0, negative_weight=1.0, off_diagonal_weight=5e-3, scale=0.1),
}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.cuda.is_available() and native.unavailable_reason(torch.device("cuda"), torch.float32) is None
CASES = [("cpu", dtype) for dtype in DTYPES] + [("cuda", dtype) for dtype in DTYPES[1:] if CUDA]


def _losses():
    """The regularisers composed over the native ops (the kernels, without the public layer)."""
    return fused_losses("regularizers", backend_ops("native", "regularizers", native.kernels))


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("device,dtype", CASES, ids=str)
@pytest.mark.parametrize("batch,dim", [(1, 5), (7, 70), (37, 530), (70, 66)])
def test_matches_reference(loss, device, dtype, batch, dim):
    args, kwargs = make_inputs(loss, batch, dim, dtype, device=device, requires_grad=True, options=WEIGHTS[loss])
    check_against_reference(loss, "native", args, kwargs)


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.bfloat16)]
                         + [("cuda", torch.float32)] * CUDA, ids=str)
def test_strided_inputs(loss, device, dtype):
    args, kwargs = make_inputs(loss, 6, 33, dtype, device=device, options=WEIGHTS[loss])
    args = [restride(a, "transposed").requires_grad_(i < 2) for i, a in enumerate(args)]
    assert args[0].stride(0) == 1
    check_against_reference(loss, "native", args, kwargs)


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_public_api_dispatches_to_native(loss):
    p1, p2 = (torch.randn(5, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    f1, f2 = (torch.randn(5, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    public = getattr(pnr_kernels.losses, loss.replace("_pnr", "_pnr_regularizer"))
    got = public(p1, p2, f1, f2, backend="native")
    want = public(p1, p2, f1, f2, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    got_grads = torch.autograd.grad(got, [p1, p2])
    want_grads = torch.autograd.grad(want, [p1, p2])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("batch,dim", [(16, 8), (5, 40)])  # Barlow: B > D saves the (D, D) correlation
def test_stashed_gradients_survive_retained_graphs_and_in_place_edits(loss, batch, dim):
    """The forward stashes the gradients and a backward of gradient 1 may hand the stash itself
    to autograd: repeated backwards over a retained graph, with the accumulated .grad edited in
    place between them (as clipping does), must still give the reference's sum."""
    public = getattr(pnr_kernels.losses, loss.replace("_pnr", "_pnr_regularizer"))
    grads = {}
    for backend in ("reference", "native"):
        gen = torch.Generator().manual_seed(0)
        p1, p2 = (torch.randn(batch, dim, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
        f1, f2 = (torch.randn(batch, dim, generator=gen, dtype=torch.float64) for _ in range(2))
        out = public(p1, p2, f1, f2, backend=backend, **WEIGHTS[loss])
        for _ in range(3):
            out.backward(retain_graph=True)
        p1.grad.mul_(0.5)
        p2.grad.zero_()
        out.backward()
        grads[backend] = (p1.grad, p2.grad)
    for got, want in zip(grads["native"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- Barlow-PNR in one call on the CPU (csrc/regularizers_cpu.cpp, barlow_pnr_loss_forward_cpu) -----

@pytest.mark.parametrize("batch,dim", [(6, 20), (20, 6)])  # Gram and correlation forms
def test_barlow_pnr_is_one_fused_call_on_the_cpu(batch, dim):
    """The public Barlow-PNR regulariser on the CPU makes exactly one kernel call, forward and
    backward together: its two Barlow terms, their gradients and the cosine negatives' are all
    computed in it (no barlow_gram / paired_loss / correlation-loss calls). Outside tracing that
    call is the op with its own autograd node, which runs the kernel without redispatch."""
    p1, p2 = (torch.randn(batch, dim, requires_grad=True) for _ in range(2))
    f1, f2 = torch.randn(batch, dim), torch.randn(batch, dim)

    def step():
        pnr_kernels.barlow_pnr_regularizer(p1, p2, f1, f2, backend="native").backward()
    assert op_calls(step) == {"pnr_kernels::barlow_pnr_loss_autograd": 1}


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,dim", [(9, 31), (45, 13)])  # Gram and correlation forms
def test_barlow_pnr_gradient_of_either_view(needs, dtype, batch, dim):
    """Only the gradients asked for are computed (the other view's terms still count in the loss),
    and they are the reference's."""
    args, kwargs = make_inputs("barlow_pnr", batch, dim, dtype, options=WEIGHTS["barlow_pnr"])
    args = [a.requires_grad_(i < 2 and needs[i]) for i, a in enumerate(args)]
    if any(needs):
        check_against_reference("barlow_pnr", "native", args, kwargs)
    else:
        got = pnr_kernels.barlow_pnr_regularizer(*args, **kwargs, backend="native")
        want = REGISTRY["barlow_pnr"].reference(*[a.double() for a in args], **kwargs)
        assert relative_error(got, want) <= TOLERANCES[dtype][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch,dim", [(2100, 128), (160, 200)])
def test_barlow_pnr_over_several_row_chunks_and_column_stripes(dtype, batch, dim):
    """Sizes whose gradient row sums are taken in several chunks (merged in order) and whose column
    statistics take several stripes (of 64 columns), against the float64 reference."""
    args, kwargs = make_inputs("barlow_pnr", batch, dim, dtype, requires_grad=True, options=WEIGHTS["barlow_pnr"])
    check_against_reference("barlow_pnr", "native", args, kwargs)


def test_barlow_pnr_backward_scales_by_the_incoming_gradient():
    p1, p2 = (torch.randn(30, 10, dtype=torch.float64, requires_grad=True) for _ in range(2))
    f1, f2 = torch.randn(30, 10, dtype=torch.float64), torch.randn(30, 10, dtype=torch.float64)
    got = torch.autograd.grad(-2.5 * pnr_kernels.barlow_pnr_regularizer(p1, p2, f1, f2, backend="native"), [p1, p2])
    want = torch.autograd.grad(-2.5 * pnr_kernels.barlow_pnr_regularizer(p1, p2, f1, f2, backend="reference"),
                               [p1, p2])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_kernel_ops_refuse_bad_arguments():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="kind must be 'cosine' or 'squared_distance'"):
        torch.ops.pnr_kernels.paired_terms_forward(x, x, x, x, "dot")
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.pnr_kernels.paired_terms_forward(x, x, x, torch.randn(3, 5), "cosine")
    with pytest.raises(RuntimeError, match="stats must have shape"):
        torch.ops.pnr_kernels.barlow_gram_backward(torch.ones(()), x, x, torch.ones(4, 4), torch.ones(3, 3),
                                                   5e-3, 0.1)


def test_cuda_sources_compiled_when_nvcc_is_present():
    result, _ = native.load()
    if not result.cuda:
        pytest.skip(f"CUDA part not built: {result.cuda_skipped}")
    compiled = " ".join(" ".join(command) for command in result.manifest["commands"])
    assert "regularizers_cuda.cu" in compiled and "regularizers_binding.cpp" in compiled


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_traces_under_torch_compile(loss):
    """The custom ops' fake and autograd registrations let torch.compile capture one graph."""
    fn = torch.compile(_losses()[loss], backend="aot_eager", fullgraph=True)
    p1, p2 = (torch.randn(8, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    f1, f2 = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    got = fn(p1, p2, f1, f2, **WEIGHTS[loss])
    want = REGISTRY[loss].reference(p1, p2, f1, f2, **WEIGHTS[loss])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, [p1, p2]), torch.autograd.grad(want, [p1, p2])):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)


def _kwargs(loss):
    return WEIGHTS[loss]


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_kernels_ignore_autocast(loss):
    """Under torch.autocast("cpu", bfloat16) the kernels compute exactly what they compute outside
    it (the Barlow kernel's at::mm used to be autocast: "expected scalar type Float but found
    BFloat16")."""
    p1, p2 = (torch.randn(8, 16, requires_grad=True) for _ in range(2))
    f1, f2 = torch.randn(8, 16), torch.randn(8, 16)
    want = _losses()[loss](p1, p2, f1, f2, **_kwargs(loss))
    want_grads = torch.autograd.grad(want, [p1, p2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _losses()[loss](p1, p2, f1, f2, **_kwargs(loss))
        got_grads = torch.autograd.grad(got, [p1, p2])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_value, stats, gram = torch.ops.pnr_kernels.barlow_gram_forward(p1, f1, 5e-3, 0.1)
    assert loss_value.dtype == stats.dtype == gram.dtype == torch.float32


# --- Non-finite inputs (issue 9, item 1) -----------------------------------------------------------

def check_nonfinite(loss, dtype, device):
    """NaN or Inf in any element position of any input gives a non-finite loss, and a NaN upstream
    gradient non-finite input gradients, wherever the float64 reference has them."""
    for position in range(4):
        for value in (float("nan"), float("inf"), float("-inf")):
            x = [torch.randn(6, 10, dtype=dtype, device=device) for _ in range(4)]
            x[position][2, 3] = value
            x = [t.requires_grad_(i < 2) for i, t in enumerate(x)]
            got = _losses()[loss](*x, **_kwargs(loss))
            exact = [t.detach().double().requires_grad_(t.requires_grad) for t in x]
            want = REGISTRY[loss].reference(*exact, **_kwargs(loss))
            assert not torch.isfinite(want)
            assert not torch.isfinite(got), (loss, dtype, position, value)
    x = [torch.randn(6, 10, dtype=dtype, device=device).requires_grad_(i < 2) for i in range(4)]
    got = _losses()[loss](*x, **_kwargs(loss))
    for g in torch.autograd.grad(got, x[:2], torch.tensor(float("nan"), dtype=got.dtype, device=device)):
        assert torch.isnan(g).all()


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("device,dtype", CASES, ids=str)
def test_nonfinite_inputs_propagate(loss, device, dtype):
    check_nonfinite(loss, dtype, device)


# --- Huge finite magnitudes (issue 9, item 2) ------------------------------------------------------

SCALED = ["byol_pnr", "barlow_pnr"]  # scale-invariant losses (VICReg grows with the scale squared)


def check_scaled(loss, dtype, device, scale):
    """Inputs multiplied by ``scale`` (1e19 to 1e30: their squares overflow float32) give the loss
    of the unit-scale inputs and gradients 1/scale times theirs, as the float64 reference does."""
    torch.manual_seed(1)
    unit = [torch.randn(7, 12, dtype=torch.float64) for _ in range(4)]
    x = [(t * scale).to(dtype).to(device).requires_grad_(i < 2) for i, t in enumerate(unit)]
    got = _losses()[loss](*x, **_kwargs(loss))
    exact = [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in x]
    want = REGISTRY[loss].reference(*exact, **_kwargs(loss))
    assert torch.isfinite(want)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(got, want) <= loss_tol, (got.item(), want.item())
    for g, w in zip(torch.autograd.grad(got, x[:2]), torch.autograd.grad(want, exact[:2])):
        assert torch.isfinite(g).all()
        assert relative_error(g, w) <= grad_tol


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e-20], ids=str)
@pytest.mark.parametrize("loss", SCALED)
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16)]
                         + [("cuda", torch.float32)] * CUDA, ids=str)
def test_huge_magnitudes_give_the_unit_scale_loss(loss, device, dtype, scale):
    check_scaled(loss, dtype, device, scale)


def test_paired_terms_of_huge_rows():
    """The cosine terms of rows scaled by 1e30 are those of the unit rows; the saved norms scale."""
    x = [torch.randn(5, 33) for _ in range(4)]
    terms, norms = torch.ops.pnr_kernels.paired_terms_forward(*x, "cosine")
    big_terms, big_norms = torch.ops.pnr_kernels.paired_terms_forward(*[t * 1e30 for t in x], "cosine")
    torch.testing.assert_close(big_terms, terms, rtol=1e-5, atol=0)
    torch.testing.assert_close(big_norms, norms * 1e30, rtol=1e-5, atol=0)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs and the CUDA part")
@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_runs_on_a_device_other_than_the_current_one(loss):
    """Every regulariser binding holds a DeviceGuard: tensors on cuda:1 while cuda:0 is current."""
    x = [torch.randn(9, 40, device="cuda:0").requires_grad_(i < 2) for i in range(4)]
    moved = [t.detach().to("cuda:1").requires_grad_(t.requires_grad) for t in x]
    with torch.cuda.device(0):
        want = _losses()[loss](*x, **_kwargs(loss))
        got = _losses()[loss](*moved, **_kwargs(loss))
        want_grads = torch.autograd.grad(want, x[:2])
        got_grads = torch.autograd.grad(got, moved[:2])
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0)


# --- Large gradients from the output pool (csrc/output_pool_cpu.cpp) --------------------------------

POOLED = (4096, 2048)  # a float32 gradient of exactly 32 MiB, the pool's smallest block


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_large_gradients_reuse_the_blocks_of_freed_ones(loss):
    """A step after the previous step's gradients were freed gets their memory again (no fresh
    mapping to fault in); a gradient still held is never handed out, and keeps its values."""
    native.release_cpu_output_pool()
    gen = torch.Generator().manual_seed(0)
    p1, p2 = (torch.randn(*POOLED, generator=gen, requires_grad=True) for _ in range(2))
    f1, f2 = (torch.randn(*POOLED, generator=gen) for _ in range(2))
    public = getattr(pnr_kernels.losses, loss.replace("_pnr", "_pnr_regularizer"))

    def step():
        p1.grad = p2.grad = None
        public(p1, p2, f1, f2, backend="native", **WEIGHTS[loss]).backward()
        return p1.grad, p2.grad

    first = step()
    kept = [g.clone() for g in first]
    first_pointers = {g.data_ptr() for g in first}
    second = step()  # the first gradients are still held by `first`: fresh blocks
    assert first_pointers.isdisjoint(g.data_ptr() for g in second)
    assert all(torch.equal(g, k) for g, k in zip(first, kept))  # untouched by the second step
    assert all(torch.equal(g, k) for g, k in zip(second, kept))  # same inputs, same values
    del first, second
    third = step()  # the freed blocks come back
    assert {g.data_ptr() for g in third} == first_pointers
    assert native.release_cpu_output_pool() == 2 * 32 * 2 ** 20  # the second step's blocks


@pytest.mark.parametrize("loss", ["byol_pnr", "vicreg_pnr"])
def test_pooled_and_streamed_gradients_match_the_reference(loss):
    """Gradients of 32 MiB: written with non-temporal stores, into pooled blocks from the second
    step on."""
    args, kwargs = make_inputs(loss, *POOLED, torch.float32, requires_grad=True, options=WEIGHTS[loss])
    for _ in range(2):  # the second step's gradients come from the first's blocks
        for a in args:
            a.grad = None
        check_against_reference(loss, "native", args, kwargs)


def test_the_pool_can_be_turned_off_and_emptied():
    """PNR_KERNELS_CPU_POOL=0: plain allocations (a freed block is not reused by address, nor kept);
    release_cpu_output_pool() gives back what the pool holds and reports its bytes."""
    code = """
import torch, pnr_kernels
from pnr_kernels import native
x = [torch.randn(4096, 2048, requires_grad=i < 2) for i in range(4)]
for _ in range(2):
    for t in x[:2]:
        t.grad = None
    pnr_kernels.byol_pnr_regularizer(*x, backend="native").backward()
for t in x[:2]:
    t.grad = None
print(native.release_cpu_output_pool())
"""
    import os
    import subprocess
    import sys
    for setting, held in (("1", 2 * 32 * 2 ** 20), ("0", 0)):
        env = {**os.environ, "PNR_KERNELS_CPU_POOL": setting}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        # the second step reuses the first step's blocks; freeing its gradients leaves two blocks
        assert int(out.stdout.split()[-1]) == held, (setting, out.stdout, out.stderr)


# --- The eager autograd node in C++ (csrc/regularizers_binding.cpp, SavedGradientLoss) -------------

def _loss_op_calls():
    """(op, its arguments but the needs flags) of the two native ops with their own autograd node."""
    ops = backend_ops("native", "regularizers", native.kernels)
    weights = [0.3, -0.2, 0.7, -1.1]
    return [(ops.paired_loss, ("squared_distance", weights, 0.5)), (ops.paired_loss, ("cosine", weights, 0.0)),
            (ops.barlow_pnr_loss, (1.0, 0.5, 5e-3, 0.1))]


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=str)
@pytest.mark.parametrize("incoming", [1.0, -2.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_eager_node_in_cpp_gives_the_custom_ops_results_bitwise(needs, incoming, dtype):
    """Outside tracing, the CPU paired_loss and barlow_pnr_loss ops record the C++ node (no Python
    in the backward) with the registered custom op's loss and gradients, bitwise: for either view's
    gradient alone, and for an incoming gradient of 1 (the stash itself) or not."""
    gen = torch.Generator().manual_seed(1)
    for op, options in _loss_op_calls():
        inputs, results = [torch.randn(7, 12, generator=gen).to(dtype) for _ in range(4)], []
        for fn in (op, op.custom_op):
            p1, p2, f1, f2 = (x.clone() for x in inputs)
            p1.requires_grad_(needs[0])
            p2.requires_grad_(needs[1])
            loss = fn(p1, p2, f1, f2, *options, *needs)[0]
            if fn is op:
                assert "SavedGradientLoss" in loss.grad_fn.name()
            trainable = [p for p, need in zip((p1, p2), needs) if need]
            results.append((loss.detach(), torch.autograd.grad(loss * incoming if incoming != 1 else loss, trainable)))
        (eager, eager_grads), (custom, custom_grads) = results
        assert torch.equal(eager, custom)
        assert all(g.dtype == dtype and torch.equal(e, g) for e, g in zip(eager_grads, custom_grads))


def test_eager_node_in_cpp_under_create_graph_gives_first_order_and_refuses_second_order():
    """Under create_graph the first-order gradient is the plain backward's, and a second
    differentiation reaches the fused backends' refusal, also through the incoming gradient alone
    (a weight of the loss that requires a gradient), as on the Python path."""
    for op, options in _loss_op_calls():
        p1, p2, f1, f2 = (torch.randn(5, 6, dtype=torch.float64) for _ in range(4))
        p1.requires_grad_(True)
        weight = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(weight * op(p1, p2, f1, f2, *options, True, False)[0], [p1], create_graph=True)
        (plain,) = torch.autograd.grad(2.0 * op(p1, p2, f1, f2, *options, True, False)[0], [p1])
        assert torch.equal(grad, plain)
        with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
            torch.autograd.grad(grad.sum(), [weight])


def test_eager_node_in_cpp_records_nothing_without_grad():
    for op, options in _loss_op_calls():
        p1, p2, f1, f2 = (torch.randn(5, 6, requires_grad=True) for _ in range(4))
        with torch.no_grad():
            loss, g1, g2 = op(p1, p2, f1, f2, *options, False, False)
        assert loss.grad_fn is None and not loss.requires_grad and g1.shape == g2.shape == (0, 6)
