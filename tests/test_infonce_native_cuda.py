"""The native backend's CUDA kernels against the fp64 reference (SPEC.md section 6). Runs where a
GPU and the CUDA part of the extension are present (the GPU check script); skipped elsewhere."""
import pytest
import torch

from pnr_kernels import native

from .helpers import make_inputs
from .test_infonce_native_cpu import PUBLIC, check_against_reference, check_op_against_reference

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or native.unavailable_reason(CUDA, torch.float32) is not None,
    reason="needs a GPU and the CUDA part of the native extension",
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("loss", sorted(PUBLIC))
@pytest.mark.parametrize("batch,dim,queue", [(3, 5, 7), (133, 37, 517), (300, 128, 4099)])
def test_losses_match_reference(loss, dtype, batch, dim, queue):
    args, kwargs = make_inputs(loss, batch, dim, dtype, requires_grad=True, queue_size=queue, device="cuda")
    check_against_reference(loss, args, kwargs, dtype)


@pytest.mark.parametrize("loss", ["simclr_pnr", "moco_pnr"])
def test_low_temperature_stays_finite_and_exact(loss):
    args, kwargs = make_inputs(loss, 70, 16, torch.float32, requires_grad=True, queue_size=300,
                               temperature=0.01, device="cuda")
    check_against_reference(loss, args, kwargs, torch.float32)


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
