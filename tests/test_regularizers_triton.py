"""The Triton regulariser kernels against the float64 reference: loss and the gradients of p1 and
p2, odd shapes (not multiples of the blocks, several row tiles and D chunks), each dtype, strided
inputs. On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
TRITON_INTERPRET=0 on a CUDA machine (benchmarks/gpu_check.sh) the compiled kernels run on CUDA
tensors."""
import pytest
import torch

pytest.importorskip("triton")

from pnr_kernels.testing import check_against_reference, make_inputs, restride  # noqa: E402
from pnr_kernels.triton import interpreting  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover - misconfigured run
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

WEIGHTS = {
    "byol_pnr": dict(distill_weight=1.0, negative_weight=0.5),
    "vicreg_pnr": dict(distill_weight=25.0, negative_weight=23.0),
    "barlow_pnr": dict(distill_weight=1.0, negative_weight=1.0, off_diagonal_weight=5e-3, scale=0.1),
}


def _check(loss, batch, dim, dtype, *, transposed=False):
    """Loss and the gradients of p1, p2 on ``dtype`` inputs against the reference on the same
    values in float64; ``transposed``: p1 and f2 are column-major views."""
    args, options = make_inputs(loss, batch, dim, dtype, requires_grad=True, device=DEVICE, options=WEIGHTS[loss])
    if transposed:
        args[0] = restride(args[0].detach(), "transposed").requires_grad_()
        args[3] = restride(args[3], "transposed")
    comparison = check_against_reference(loss, "triton", args, options)
    assert sorted(comparison.gradients) == ["p1", "p2"]


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("batch,dim", [(1, 5), (7, 70), (37, 530), (70, 66)])
def test_float32_matches_reference(loss, batch, dim):
    _check(loss, batch, dim, torch.float32)


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_reference(loss, dtype):
    _check(loss, 9, 70, dtype)


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_strided_inputs(loss):
    _check(loss, 6, 33, torch.float32, transposed=True)
