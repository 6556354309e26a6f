"""The native regulariser kernels (csrc/regularizers_*) against the float64 reference: loss and the
gradients of p1 and p2 for every dtype (float64 on CPU), odd shapes and strided inputs, on CPU and,
where a GPU and the extension's CUDA part are present (benchmarks/gpu_check.sh), on CUDA. Here the
CUDA sources are at least compiled: the extension build runs nvcc whenever it finds one."""
import pytest
import torch

import pnr_kernels
from pnr_kernels import native, reference

from .test_regularizers_op import check_against_reference

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
    return native.losses()


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("device,dtype", CASES, ids=str)
@pytest.mark.parametrize("batch,dim", [(1, 5), (7, 70), (37, 530), (70, 66)])
def test_matches_reference(loss, device, dtype, batch, dim):
    check_against_reference(_losses(), loss, batch, dim, dtype, device=device, **WEIGHTS[loss])


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.bfloat16)]
                         + [("cuda", torch.float32)] * CUDA, ids=str)
def test_strided_inputs(loss, device, dtype):
    check_against_reference(_losses(), loss, 6, 33, dtype, device=device, transposed=True, **WEIGHTS[loss])


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
    want = reference.LOSSES[loss](p1, p2, f1, f2, **WEIGHTS[loss])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, [p1, p2]), torch.autograd.grad(want, [p1, p2])):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
