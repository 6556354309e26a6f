"""The Triton regulariser kernels against the float64 reference: loss and the gradients of p1 and
p2, odd shapes (not multiples of the blocks, several row tiles and D chunks), each dtype, strided
inputs. On CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
TRITON_INTERPRET=0 on a CUDA machine (benchmarks/gpu_check.sh) the compiled kernels run on CUDA
tensors."""
import pytest
import torch

pytest.importorskip("triton")

from pnr_kernels.registry import LOSSES  # noqa: E402
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


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numpy (the interpreter) warns about the NaNs and overflows these tests make on purpose
NON_FINITE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


@NON_FINITE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("place", ["p1", "p2", "f1", "f2"])
@pytest.mark.parametrize("loss", sorted(WEIGHTS))
def test_nan_in_any_input_gives_a_nan_loss(loss, place, dtype):
    """A NaN in any input makes the loss NaN, and exactly the gradients the reference poisons
    non-finite."""
    args, options = make_inputs(loss, 5, 7, dtype, device=DEVICE, options=WEIGHTS[loss])
    args[["p1", "p2", "f1", "f2"].index(place)][2, 3] = float("nan")
    args = [a.requires_grad_(i < 2) for i, a in enumerate(args)]
    got = LOSSES[loss].function(*args, **options, backend="triton")
    exact = [a.detach().double().requires_grad_(i < 2) for i, a in enumerate(args)]
    want = LOSSES[loss].function(*exact, **options, backend="reference")
    assert torch.isnan(got) and torch.isnan(want)
    for name, g, w in zip(("p1", "p2"), torch.autograd.grad(got, args[:2]), torch.autograd.grad(want, exact[:2])):
        assert bool(torch.isfinite(g).all()) == bool(torch.isfinite(w).all()), name


# row scales from tiny to past float32's square root (1.8e19): sums of squares of the raw rows
# overflow, the rows themselves and the gradients (about 1 / scale) are normal float32 numbers
ROW_SCALES = [1.0, 3e19, 1e30, 2e25, 1e-5]


@NON_FINITE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", ["byol_pnr", "barlow_pnr"])
def test_huge_rows_match_the_reference(loss, dtype):
    """Rows scaled by up to 1e30 (each row of each input its own scale): the cosines are
    scale-invariant and Barlow standardises its columns, so nothing overflows in exact arithmetic;
    the kernels give the loss and gradients of the reference (float64)."""
    args, options = make_inputs(loss, 5, 7, torch.float64, device=DEVICE, options=WEIGHTS[loss])
    scales = torch.tensor(ROW_SCALES, dtype=torch.float64, device=DEVICE)[:, None]
    args = [(a * scales.roll(i, 0)).to(dtype).requires_grad_(i < 2) for i, a in enumerate(args)]
    check_against_reference(loss, "triton", args, options)


@NON_FINITE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_columns_match_the_reference(dtype):
    """Every input scaled by 1e25: Barlow's column variances (1e50) overflow float32 unless the
    kernel scales the centred values first."""
    args, options = make_inputs("barlow_pnr", 5, 7, torch.float64, device=DEVICE, options=WEIGHTS["barlow_pnr"])
    check_against_reference("barlow_pnr", "triton", [(a * 1e25).to(dtype).requires_grad_(i < 2)
                                                     for i, a in enumerate(args)], options)


@pytest.mark.parametrize("loss", ["byol_pnr", "barlow_pnr"])
def test_zero_and_tiny_rows_match_the_reference(loss):
    """Norms clamped at eps (an all-zero row, rows of 1e-10 and 1e-35): cosines and gradients as
    torch.nn.functional.cosine_similarity's."""
    args, options = make_inputs(loss, 5, 7, torch.float64, device=DEVICE, options=WEIGHTS[loss])
    for i, a in enumerate(args):
        a[i % 5] = 0.0
        a[(i + 1) % 5] *= 1e-10
        a[(i + 2) % 5] *= 1e-35
    args = [a.float().requires_grad_(i < 2) for i, a in enumerate(args)]
    check_against_reference(loss, "triton", args, options)
