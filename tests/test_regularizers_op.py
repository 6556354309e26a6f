"""The custom-op glue of ops/regularizers.py, driven by kernels written as plain torch from the
formulas in its module docstring, against the reference regularisers (float64). Kernel backends
test their own kernels in their own files; this file checks the formulas, the composition and the
autograd wiring."""
import pytest
import torch

from pnr_kernels import reference
from pnr_kernels.ops import regularizers
from pnr_kernels.registry import LOSSES as REGISTRY
from pnr_kernels.testing import TOLERANCES, assert_close_relative, fused_losses, make_inputs

LOSS_TOL, GRAD_TOL = TOLERANCES[torch.float64]

PAIRS = ((0, 2), (1, 3), (0, 3), (1, 2))  # (p index, f index) in [p1, p2, f1, f2] per terms column
EPS = reference.COSINE_EPS


def _paired_forward(p1, p2, f1, f2, kind):
    x = [p1, p2, f1, f2]
    if kind == "squared_distance":
        terms = torch.stack([((x[i] - x[j]) ** 2).sum(1) for i, j in PAIRS], 1)
        return terms, terms.new_empty((p1.shape[0], 0))
    norms = torch.stack([t.norm(dim=1) for t in x], 1)
    clamped = norms.clamp_min(EPS)
    terms = torch.stack([(x[i] * x[j]).sum(1) / (clamped[:, i] * clamped[:, j]) for i, j in PAIRS], 1)
    return terms, norms


def _paired_backward(grad_terms, terms, norms, p1, p2, f1, f2, kind, p1_needs_grad, p2_needs_grad):
    x = [p1, p2, f1, f2]
    grads = [torch.zeros_like(p1), torch.zeros_like(p2)]
    for k, (i, j) in enumerate(PAIRS):
        g = grad_terms[:, k, None]
        if kind == "squared_distance":
            grads[i] += 2 * g * (x[i] - x[j])
        else:
            inv = 1 / norms.clamp_min(EPS)
            unit = torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))
            grads[i] += g * inv[:, i, None] * (x[j] * inv[:, j, None] - terms[:, k, None] * x[i] * unit[:, i, None])
    return [g for g, need in zip(grads, (p1_needs_grad, p2_needs_grad)) if need]


def _standardise(x):
    mean = x.mean(0)
    rstd = 1 / torch.sqrt(x.var(0, unbiased=False) + reference.BARLOW_VARIANCE_EPS)
    return (x - mean) * rstd, mean, rstd


def _barlow_forward(a, b, l, s):
    n = a.shape[0]
    sa, mean_a, rstd_a = _standardise(a)
    sb, mean_b, rstd_b = _standardise(b)
    diag = (sa * sb).sum(0) / n
    gram_b = sb @ sb.T
    loss = s * (((diag - 1) ** 2).sum() + l * (((sa @ sa.T) * gram_b).sum() / n ** 2 - (diag ** 2).sum()))
    return loss, torch.stack([mean_a, rstd_a, mean_b, rstd_b, diag]), gram_b


def _barlow_backward(grad_loss, a, b, stats, gram_b, l, s):
    n = a.shape[0]
    mean_a, rstd_a, mean_b, rstd_b, diag = stats
    sa, sb = (a - mean_a) * rstd_a, (b - mean_b) * rstd_b
    g = grad_loss * s * ((2 * (diag - 1) - 2 * l * diag) / n * sb + 2 * l / n ** 2 * gram_b @ sa)
    return rstd_a * (g - g.mean(0) - sa * (g * sa).mean(0))


def _correlation_loss_forward(c, l, s):
    weights = torch.full_like(c, l).fill_diagonal_(1.0)
    target = torch.eye(*c.shape, dtype=c.dtype)
    return s * (weights * (c - target) ** 2).sum()


def _correlation_loss_backward(grad_loss, c, l, s):
    weights = torch.full_like(c, l).fill_diagonal_(1.0)
    return grad_loss * s * 2 * weights * (c - torch.eye(*c.shape, dtype=c.dtype))


OPS = regularizers.define_regularizer_ops("test_torch", regularizers.RegularizerKernels(
    _paired_forward, _paired_backward, _barlow_forward, _barlow_backward,
    _correlation_loss_forward, _correlation_loss_backward))
LOSSES = fused_losses("regularizers", OPS)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("batch,dim", [(1, 3), (5, 7), (9, 4)])
def test_composition_matches_reference(loss, batch, dim):
    args, kwargs = make_inputs(loss, batch, dim, torch.float64, requires_grad=True)
    fused = LOSSES[loss](*args, **kwargs)
    expected = REGISTRY[loss].reference(*args, **kwargs)
    assert_close_relative(fused, expected, LOSS_TOL, loss)
    trainable = [a for a in args if a.requires_grad]
    for g, w in zip(torch.autograd.grad(fused, trainable), torch.autograd.grad(expected, trainable)):
        assert_close_relative(g, w, GRAD_TOL, f"{loss} gradient")


def test_cosine_gradient_of_zero_and_tiny_rows_matches_torch():
    """Norms clamped at eps: the gradient follows torch.nn.functional.cosine_similarity."""
    p1 = torch.randn(3, 5, dtype=torch.float64)
    p1[0] = 0
    p1[1] *= 1e-10
    p1.requires_grad_(True)
    p2 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    f1, f2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    fused = LOSSES["byol_pnr"](p1, p2, f1, f2, distill_weight=1.0, negative_weight=0.5)
    expected = reference.byol_pnr_regularizer(p1, p2, f1, f2)
    assert_close_relative(fused, expected, LOSS_TOL, "byol_pnr")
    torch.testing.assert_close(torch.autograd.grad(fused, p1)[0], torch.autograd.grad(expected, p1)[0],
                               rtol=1e-10, atol=1e-6)


def test_only_trainable_inputs_get_gradients():
    p1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    p2, f1, f2 = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    for loss, fn in LOSSES.items():
        (grad,) = torch.autograd.grad(fn(p1, p2, f1, f2, **REGISTRY[loss].defaults), [p1])
        assert grad.shape == p1.shape and torch.isfinite(grad).all()


def test_ops_trace_under_torch_compile_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p1, p2, f1, f2 = (torch.empty(6, 5) for _ in range(4))
        terms, norms = OPS.paired_terms(p1, p2, f1, f2, "cosine")
        loss, stats, gram = OPS.barlow_gram_loss(p1, f1, 5e-3, 0.1)
        correlation_loss = OPS.barlow_correlation_loss(torch.empty(5, 5), 5e-3, 0.1)
    assert terms.shape == (6, 4) and norms.shape == (6, 4)
    assert loss.shape == () and stats.shape == (5, 5) and gram.shape == (6, 6)
    assert correlation_loss.shape == ()


def test_eager_calls_match_the_custom_ops_bitwise():
    """Outside tracing each op runs as the eager autograd.Function of ops/_common.py, its
    arguments as given (tensors and constants, nothing to flatten), with the registered custom
    op's results, loss and gradient, bitwise."""
    torch.manual_seed(0)
    p1, f1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randn(6, 5, dtype=torch.float64)
    p2, f2 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randn(6, 5, dtype=torch.float64)
    c = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    calls = [(OPS.paired_terms, (p1, p2, f1, f2, "cosine"), [p1, p2]),
             (OPS.barlow_gram_loss, (p1, f1, 5e-3, 0.1), [p1]),
             (OPS.barlow_correlation_loss, (c, 5e-3, 0.1), [c])]
    for op, args, trainable in calls:
        results = []
        for fn in (op, op.custom_op):
            out = fn(*args)
            first = out[0] if isinstance(out, tuple) else out
            if fn is op:
                assert type(first.grad_fn).__name__ == "_EagerBackward" and first.grad_fn.call.layout is None
            results.append((first.detach(), torch.autograd.grad(first.sum(), trainable)))
        (eager, eager_grads), (custom, custom_grads) = results
        assert torch.equal(eager, custom)
        assert all(torch.equal(e, g) for e, g in zip(eager_grads, custom_grads))


def test_an_op_with_its_own_autograd_takes_tensors_and_constants_only():
    """An ``autograd_op`` replaces the eager autograd.Function of an op called with its arguments
    as given; an op whose arguments are flattened (a list of tensors) cannot have one."""
    from typing import List

    from pnr_kernels.ops._common import define_fused_op

    def forward(xs: List[torch.Tensor], scale: float) -> torch.Tensor:
        return xs[0] * scale

    with pytest.raises(TypeError, match="tensors and constants"):
        define_fused_op("pnr_kernels::test_listed_with_own_autograd", "test", forward, None, None, None, None, None,
                        autograd_op=forward, autograd_device_types=("cpu",))
