"""The Triton regulariser kernels against the float64 reference: loss and the gradients of p1 and
p2, odd shapes (not multiples of the blocks, several row tiles and D chunks), each dtype, strided
inputs. On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
TRITON_INTERPRET=0 on a CUDA machine (benchmarks/gpu_check.sh) the compiled kernels run on CUDA
tensors."""
import pytest
import torch

pytest.importorskip("triton")

from pnr_kernels.triton import interpreting  # noqa: E402
from pnr_kernels.triton import regularizers as triton_regularizers  # noqa: E402

from .test_regularizers_op import check_against_reference  # noqa: E402

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover - misconfigured run
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

LOSSES = triton_regularizers.LOSSES
WEIGHTS = {
    "byol_pnr": dict(distill_weight=1.0, negative_weight=0.5),
    "vicreg_pnr": dict(distill_weight=25.0, negative_weight=23.0),
    "barlow_pnr": dict(distill_weight=1.0, negative_weight=1.0, off_diagonal_weight=5e-3, scale=0.1),
}


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("batch,dim", [(1, 5), (7, 70), (37, 530), (70, 66)])
def test_float32_matches_reference(loss, batch, dim):
    check_against_reference(LOSSES, loss, batch, dim, torch.float32, device=DEVICE, **WEIGHTS[loss])


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_matches_reference(loss, dtype):
    check_against_reference(LOSSES, loss, 9, 70, dtype, device=DEVICE, **WEIGHTS[loss])


@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_strided_inputs(loss):
    check_against_reference(LOSSES, loss, 6, 33, torch.float32, device=DEVICE, transposed=True,
                            **WEIGHTS[loss])
