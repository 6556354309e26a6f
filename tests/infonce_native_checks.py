"""Checks shared by the native backend's CPU and CUDA test files (tests/test_infonce_native_*.py):
the fused InfoNCE op and the contrastive losses against the float64 reference on a device."""
import torch

from pnr_kernels import native, reference
from pnr_kernels.ops import backend_ops
from pnr_kernels.registry import LOSSES
from pnr_kernels.testing import TOLERANCES, make_inputs, relative_error

PUBLIC = {name: spec.function for name, spec in LOSSES.items() if spec.family == "infonce"}


def infonce_op():
    """The fused InfoNCE custom op over the native kernels."""
    return backend_ops("native", "infonce", native.kernels)


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


def check_losses_nonfinite(loss, dtype, device):
    """NaN or Inf in any input of any contrastive loss gives a non-finite loss."""
    args, kwargs = make_inputs(loss, 5, 6, dtype, queue_size=11, device=device)
    for position in range(len(args)):
        for value in (float("nan"), float("inf")):
            poisoned = [a.clone() for a in args]
            poisoned[position][(1,) * poisoned[position].dim()] = value
            got = PUBLIC[loss](*poisoned, **kwargs, backend="native")
            assert not torch.isfinite(got), (loss, position, value)
