"""The native backend's CUDA kernels against the fp64 reference (docs/losses.md, "Precision"). Runs where a
GPU and the CUDA part of the extension are present (the GPU check script); skipped elsewhere."""
import pytest
import torch

from pnr_kernels import native
from pnr_kernels.registry import LOSSES

from pnr_kernels.testing import check_against_reference, make_inputs

from .infonce_native_checks import (PUBLIC, check_losses_nonfinite, check_nonfinite_grad_propagates,
                                    check_nonfinite_inputs_propagate, check_op_against_reference, op_inputs)

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or native.unavailable_reason(CUDA, torch.float32) is not None,
    reason="needs a GPU and the CUDA part of the native extension",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PUBLIC_OPTIONS = {name: LOSSES[name].options for name in PUBLIC}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("loss", sorted(PUBLIC))
@pytest.mark.parametrize("batch,dim,queue", [(3, 5, 7), (133, 37, 517), (300, 128, 4099)])
def test_losses_match_reference(loss, dtype, batch, dim, queue):
    args, kwargs = make_inputs(loss, batch, dim, dtype, requires_grad=True, queue_size=queue, device="cuda")
    check_against_reference(loss, "native", args, kwargs)


@pytest.mark.parametrize("loss", ["simclr_pnr", "moco_pnr"])
def test_low_temperature_stays_finite_and_exact(loss):
    tiny = {name: 0.01 for name in PUBLIC_OPTIONS[loss] if name.endswith("temperature")}
    args, kwargs = make_inputs(loss, 70, 16, torch.float32, requires_grad=True, queue_size=300, options=tiny,
                               device="cuda")
    check_against_reference(loss, "native", args, kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_op_matches_reference_infonce_lse(dtype):
    check_op_against_reference(dtype, "cuda")


def test_kernels_run_on_the_current_stream():
    args, kwargs = make_inputs("simclr_pnr", 200, 64, torch.float32, device="cuda")
    expected = PUBLIC["simclr_pnr"](*args, **kwargs, backend="native")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = PUBLIC["simclr_pnr"](*args, **kwargs, backend="native")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected)


def test_float64_is_refused_with_a_reason():
    assert "float64" in native.unavailable_reason(CUDA, torch.float64)


NONFINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NONFINITE, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_nonfinite_inputs_propagate(dtype, value):
    """A NaN anywhere used to be skipped by fmaxf (a NaN row gave lse = -inf)."""
    check_nonfinite_inputs_propagate(dtype, "cuda", value)


@pytest.mark.parametrize("value", NONFINITE, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_nonfinite_grad_propagates(dtype, value):
    """A NaN in grad_lse used to be dropped from the tile's g_max (and its gradients with it)."""
    check_nonfinite_grad_propagates(dtype, "cuda", value)


@pytest.mark.parametrize("loss", sorted(PUBLIC))
def test_losses_nonfinite_inputs(loss):
    check_losses_nonfinite(loss, torch.float32, "cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_backward_is_deterministic(dtype):
    """The backward owns what it writes (no atomics): two runs agree bit for bit."""
    rows, keys, exclude, scales = op_inputs(dtype, "cuda")
    lse = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
    grad = torch.rand_like(lse)
    runs = [torch.ops.pnr_kernels.infonce_lse_backward(grad, lse, rows, keys, exclude, scales, [True] * 3, [True] * 3)
            for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_kernels_ignore_autocast():
    rows, keys, exclude, scales = op_inputs(torch.float32, "cuda")
    want = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
    with torch.autocast("cuda", dtype=torch.float16):
        got = torch.ops.pnr_kernels.infonce_lse_forward(rows, keys, exclude, scales)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_device_other_than_the_current_one():
    """The binding's DeviceGuard: tensors on cuda:1 while cuda:0 is current give cuda:0's results."""
    args, kwargs = make_inputs("simclr_pnr", 70, 32, torch.float32, requires_grad=True, device="cuda:0")
    moved = [a.detach().to("cuda:1").requires_grad_(a.requires_grad) for a in args]
    with torch.cuda.device(0):
        want = PUBLIC["simclr_pnr"](*args, **kwargs, backend="native")
        got = PUBLIC["simclr_pnr"](*moved, **kwargs, backend="native")
        want_grads = torch.autograd.grad(want, [a for a in args if a.requires_grad])
        got_grads = torch.autograd.grad(got, [a for a in moved if a.requires_grad])
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.cpu(), w.cpu(), rtol=0, atol=0)
