"""The custom-op glue of ops/infonce.py, driven by a materialising torch kernel pair, against the
reference losses. Kernel backends test their own kernels in their own files; this file checks
that the composition (positives, masks, logaddexp, means) and the autograd wiring are right."""
import pytest
import torch

from pnr_kernels import reference
from pnr_kernels.ops import infonce
from pnr_kernels.registry import LOSSES as REGISTRY
from pnr_kernels.testing import TOLERANCES, assert_close_relative, fused_losses, make_inputs

LOSS_TOL, GRAD_TOL = TOLERANCES[torch.float64]


def _torch_forward(rows, keys, exclude_diagonal, scales):
    return reference.infonce_lse(rows, keys, exclude_diagonal, scales)


def _torch_backward(grad_lse, lse, rows, keys, exclude_diagonal, scales, rows_need_grad, keys_need_grad):
    """The op's gradient formulas (module docstring of ops/infonce.py), materialised."""
    rows_grad = [torch.zeros_like(r) for r in rows]
    keys_grad = [torch.zeros_like(k) for k in keys]
    for r, (row, scale) in enumerate(zip(rows, scales)):
        for k, (key, exclude) in enumerate(zip(keys, exclude_diagonal)):
            logits = scale * row @ key.T
            if exclude:
                logits.fill_diagonal_(float("-inf"))
            weights = grad_lse[r, :, None] * torch.exp(logits - lse[r, :, None])
            rows_grad[r] += scale * weights @ key
            keys_grad[k] += scale * weights.T @ row
    return [g for g, need in zip(rows_grad + keys_grad, list(rows_need_grad) + list(keys_need_grad)) if need]


OP = infonce.define_infonce_op("test_torch", infonce.InfoNCEKernels(_torch_forward, _torch_backward))
LOSSES = fused_losses("infonce", OP)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("batch,dim", [(1, 3), (5, 7)])
def test_composition_matches_reference(loss, batch, dim):
    args, kwargs = make_inputs(loss, batch, dim, torch.float64, requires_grad=True)
    fused = LOSSES[loss](*args, **kwargs)
    expected = REGISTRY[loss].reference(*args, **kwargs)
    assert_close_relative(fused, expected, LOSS_TOL, loss)
    trainable = [a for a in args if a.requires_grad]
    got = torch.autograd.grad(fused, trainable)
    want = torch.autograd.grad(expected, trainable)
    for g, w in zip(got, want):
        assert_close_relative(g, w, GRAD_TOL, f"{loss} gradient")


def test_frozen_inputs_get_no_backward_work():
    calls = []

    def backward(grad_lse, lse, rows, keys, exclude_diagonal, scales, rows_need_grad, keys_need_grad):
        calls.append((list(rows_need_grad), list(keys_need_grad)))
        return _torch_backward(grad_lse, lse, rows, keys, exclude_diagonal, scales, rows_need_grad, keys_need_grad)

    op = infonce.define_infonce_op("test_flags", infonce.InfoNCEKernels(_torch_forward, backward))
    rows = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    frozen = torch.randn(6, 3, dtype=torch.float64)
    op([rows], [rows, frozen], [True, False], [2.0]).sum().backward()
    assert calls == [([True], [True, False])]


def test_flop_model_matches_simclr_pnr_count():
    """Every logit once with one product per gradient side (the full blocks: 20 N^2 D); the
    excluded diagonals and the symmetric z . z block's pairs once: 17 N (N - 1) D."""
    n, d = 64, 16
    assert infonce.infonce_flops([n, n], [n, n], d, [True, True], [True, False]) == 20 * n * n * d
    flops = infonce.infonce_flops([n, n], [n, n], d, [True, True], [True, False], [True, True], symmetric=[(0, 0)])
    assert flops == 17 * n * (n - 1) * d


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_composition_traces_under_torch_compile(loss):
    """The op's fake and autograd registrations let torch.compile capture the loss in one graph,
    forward and backward."""
    args, kwargs = make_inputs(loss, 4, 5, torch.float64, requires_grad=True)
    compiled = torch.compile(LOSSES[loss], backend="aot_eager", fullgraph=True)
    got = compiled(*args, **kwargs)
    want = REGISTRY[loss].reference(*args, **kwargs)
    assert_close_relative(got, want, LOSS_TOL, loss)
    trainable = [a for a in args if a.requires_grad]
    for g, w in zip(torch.autograd.grad(got, trainable), torch.autograd.grad(want, trainable)):
        assert_close_relative(g, w, GRAD_TOL, f"{loss} gradient")


def _op_step(op, rows, keys):
    lse = op(rows, keys, [True, False], [2.0, 0.5])
    weights = torch.arange(lse.numel(), dtype=lse.dtype).reshape(lse.shape)
    return lse, torch.autograd.grad((lse * weights).sum(), [rows[0], rows[1], keys[1]])


def test_eager_calls_take_the_autograd_function_with_the_custom_ops_results():
    """Outside tracing the op runs as the eager autograd.Function of ops/_common.py (its node in
    the graph says so), and gives bitwise the loss and gradients of the registered custom op."""
    torch.manual_seed(0)
    rows = [torch.randn(6, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    keys = [rows[0], torch.randn(7, 3, dtype=torch.float64, requires_grad=True)]
    eager_lse, eager_grads = _op_step(OP, rows, keys)
    custom_lse, custom_grads = _op_step(OP.custom_op, rows, keys)
    assert type(eager_lse.grad_fn).__name__ == "_EagerBackward"
    assert eager_lse.grad_fn.call.layout == (2, 2, ("constant", [True, False]), ("constant", [2.0, 0.5]))
    assert "pnr_kernels" in type(custom_lse.grad_fn).__name__
    assert torch.equal(eager_lse, custom_lse)
    for e, c in zip(eager_grads, custom_grads):
        assert torch.equal(e, c)


def test_fake_tensors_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        rows = [torch.empty(6, 3), torch.empty(6, 3)]
        lse = OP(rows, [rows[0], torch.empty(9, 3)], [True, False], [2.0, 0.5])
    assert lse.shape == (2, 6)


def test_first_order_gradients_with_create_graph_match_and_second_order_is_refused():
    """create_graph=True: the first-order gradients are the same; differentiating them raises
    the fused backends' clear error, on the eager path as on the custom op."""
    rows = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True)]
    for op in (OP, OP.custom_op):
        lse = op(rows, [rows[0]], [True], [2.0])
        (grad,) = torch.autograd.grad(lse.sum(), rows, create_graph=True)
        (plain,) = torch.autograd.grad(op(rows, [rows[0]], [True], [2.0]).sum(), rows)
        assert torch.equal(grad, plain)
        with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
            torch.autograd.grad(grad.square().sum(), rows)
