"""The native backend's CPU kernels against the fp64 reference (docs/losses.md, "Precision"): every
contrastive loss through the public API, loss and every input gradient, over odd shapes that
cross the kernels' row tile (256) and key tile (512); the op itself with several row sets and key
blocks; frozen inputs; and the no rows x keys allocation rule."""
import subprocess
import sys
import textwrap

import pytest
import torch

from pnr_kernels import native
from pnr_kernels.registry import LOSSES
from pnr_kernels.testing import check_against_reference, make_inputs

from .infonce_native_checks import (PUBLIC, check_losses_nonfinite, check_nonfinite_grad_propagates,
                                    check_nonfinite_inputs_propagate, check_op_against_reference, op_inputs)

pytestmark = pytest.mark.skipif(
    native.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"native backend unavailable: {native.unavailable_reason(torch.device('cpu'), torch.float32)}",
)

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


# The losses' fused row normalisation (pnr_kernels/ops/infonce.py, "Unit rows"; csrc/unit_rows_cpu.cpp).
UNIT_ROWS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _unit_rows_inputs(rows, dim, dtype):
    """Random rows with an all-zero row, a row below the norm's eps (clamped: no projection in the
    gradient) and, where the dtype holds them, rows above reference.HUGE (scaled down first)."""
    torch.manual_seed(rows * 31 + dim)
    x = torch.randn(rows, dim, dtype=torch.float64)
    if rows >= 3 and dtype != torch.float16:  # fp16 can hold neither 1e-14 nor the 1e12 gradients
        x[1] = 0
        x[2] *= 1e-14
    if rows >= 5 and dtype in (torch.float64, torch.float32):
        x[3] *= 1e20
        x[4] *= 1e30
    return x.to(dtype), torch.randn(rows, dim, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("rows,dim", [(0, 4), (1, 1), (7, 3), (37, 19), (1100, 131)])  # 1100 x 131: several tasks
def test_unit_rows_kernels_match_reference(rows, dim, dtype):
    """y and dx of the fused normalisation against the fp64 reference (autograd through
    reference.normalize) of the same input values, relative to the largest reference value."""
    from pnr_kernels.reference import HUGE, NORMALIZE_EPS, normalize
    x, grad = _unit_rows_inputs(rows, dim, dtype)
    y = torch.ops.pnr_kernels.unit_rows_forward(x, HUGE, NORMALIZE_EPS)
    dx = torch.ops.pnr_kernels.unit_rows_backward(grad, x, HUGE, NORMALIZE_EPS)
    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x.shape
    exact = x.double().requires_grad_()
    want = normalize(exact)
    want.backward(grad.double())
    for got, ref in ((y, want.detach()), (dx, exact.grad)):
        scale = ref.abs().max().item() if ref.numel() else 1.0
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=UNIT_ROWS_TOLERANCE[dtype] * scale)


def test_unit_rows_kernels_take_strided_inputs_and_propagate_nonfinite():
    from pnr_kernels.reference import HUGE, NORMALIZE_EPS, normalize
    x = torch.randn(9, 12, dtype=torch.float64)[:, ::2]  # not contiguous
    x[2, 3], x[5, 0] = float("nan"), float("inf")
    grad = torch.randn(12, 9, dtype=torch.float64).T[:, :6]
    grad[7, 1] = float("nan")
    y = torch.ops.pnr_kernels.unit_rows_forward(x, HUGE, NORMALIZE_EPS)
    dx = torch.ops.pnr_kernels.unit_rows_backward(grad, x, HUGE, NORMALIZE_EPS)
    exact = x.clone().requires_grad_()
    want = normalize(exact)
    want.backward(grad)
    torch.testing.assert_close(y, want.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(dx, exact.grad, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert y[2].isnan().all() and y[5].isnan().all() and dx[7].isnan().all()


@pytest.mark.parametrize("loss", sorted(PUBLIC))
def test_losses_normalise_with_the_fused_kernel(loss, monkeypatch):
    """The native backend's contrastive losses normalise CPU rows with the fused kernels (the
    PyTorch composition, reference.normalize, is not called), and still match the reference."""
    from pnr_kernels.ops import infonce
    if LOSSES[loss].family != "infonce":
        pytest.skip("not a contrastive loss")

    def refuse(x):
        raise AssertionError("reference.normalize called")
    monkeypatch.setattr(infonce, "normalize", refuse)
    args, kwargs = make_inputs(loss, 21, 9, torch.float32, requires_grad=True, queue_size=40)
    check_against_reference(loss, "native", args, kwargs)
