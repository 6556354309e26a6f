"""The fused non-contrastive PNR regularisers (BYOL-PNR, VICReg-PNR, BarlowTwins-PNR) and their
custom-op glue, shared by the Triton and native backends (docs/losses.md, section 4).

Three ops carry all the work; a backend supplies their kernels as :class:`RegularizerKernels`.

``paired_terms(p1, p2, f1, f2, kind)`` reads each row of the four (B, D) inputs once and returns
``terms`` (B, 4), one column per pair ``(p1, f1), (p2, f2), (p1, f2), (p2, f1)``:

    kind "cosine":            terms[i, k] = cos(p_i, f_i) = p_i . f_i / (max(|p_i|, 1e-8) max(|f_i|, 1e-8))
    kind "squared_distance":  terms[i, k] = sum_d (p_id - f_id)^2          (p, f: the k-th pair)

and ``norms`` (B, 4): the row norms ``|p1_i|, |p2_i|, |f1_i|, |f2_i|`` for "cosine" (saved for the
backward; not differentiable), (B, 0) for "squared_distance". Its backward turns ``g = grad_terms``
into the gradients of p1 and p2 in one pass over the rows (f1, f2 are frozen: no gradient):

    squared_distance:  d p1 = 2 (g0 (p1 - f1) + g2 (p1 - f2)),    d p2 likewise with (g1, f2), (g3, f1)
    cosine:            d p  = sum over p's pairs (f) of  g / max(|p|, eps) * (f / max(|f|, eps) - cos * p / |p|)

(``p / |p|`` is taken as 0 for an all-zero row; this is torch.nn.functional.cosine_similarity's
gradient, including when a norm is clamped at eps.)

``paired_loss(p1, p2, f1, f2, kind, weights, constant, p1_needs_grad, p2_needs_grad)`` is the
regularisers' fused form of the two: the scalar ``constant + sum_ik weights[k] * terms[i, k]`` and,
for the inputs asked for, its gradients (the formulas above with ``g[i, k] = weights[k]``),
computed in the forward while each row is in cache and saved; the backward scales them by the
incoming gradient (none at all when that is exactly 1, outside tracing). So a forward + backward
reads each input once and writes each gradient once. A backend without a fused kernel gets
paired_forward followed by paired_backward (``compose_paired_loss``).

``barlow_gram_loss(a, b, off_diagonal_weight=l, scale=s)`` is the Barlow loss of section 4 for one
process, computed without any D x D matrix. With the column-standardised ``a^, b^`` (batch mean,
biased variance, eps 1e-5; folded into the kernels, never written to memory by Triton),
``C = a^T b^ / B`` and ``d_i = C_ii``, the identity ``sum_ij C_ij^2 = <a^ a^T, b^ b^T> / B^2``
gives

    loss = s * ( sum_i (d_i - 1)^2 + l * ( <G_a, G_b> / B^2 - sum_i d_i^2 ) ),   G_x = x^ x^T (B x B)

which costs O(B^2 D) instead of O(B D^2) (B is the per-device batch, usually below D). Its
forward also returns ``stats`` (5, D) = column mean and 1/std of a, of b, and d; and ``gram_b``
(B, B); both are saved for the backward (not differentiable). The backward gives the gradient of
``a`` only (b is the frozen model's output in PNR):

    g^  = s * ( (2 (d - 1) - 2 l d) / B * b^  +  2 l / B^2 * G_b a^ )       (first factor per column)
    d a = rstd_a * ( g^ - mean_rows(g^) - a^ * mean_rows(g^ * a^) )       (standardisation backward)

For B > D a backend may compute C (D x D, the smaller matrix) instead of the Gram matrices in the
same op (``barlow_correlation_form(device)``; the native CPU kernels do): it saves C in
``gram_b``'s place, (D, D), and its backward uses ``G_b a^ = B b^ C^T``. Otherwise two cases need
the D x D cross-correlation through autograd: torch.distributed, where C is averaged over the ranks
before the loss, and B > D. There C comes from
``reference.barlow_correlation`` (standardise, one matmul, ``distributed.all_reduce_mean``; its
backward through the standardisation is autograd's) and ``barlow_correlation_loss(c, l, s)``
reduces it in one read, without the ``C**2`` and diagonal temporaries of the reference:

    loss = s * ( sum_i (C_ii - 1)^2 + l * sum_{i != j} C_ij^2 ),
    d C  = grad * s * ( 2 (C_ii - 1) on the diagonal,  2 l C_ij off it )     (one write)

``barlow_pnr_loss(p1, p2, f1, f2, distill_weight, negative_weight, off_diagonal_weight, scale,
p1_needs_grad, p2_needs_grad)`` (optional: a backend's ``barlow_pnr_loss`` kernel on the device
types it names; the native CPU kernels have it) is the whole Barlow-PNR regulariser of one process
in one call, in ``paired_loss``'s form: the scalar ``w_d (barlow(p1, f1) + barlow(p2, f2)) / 2 +
w_n (mean cos(p1, f2) + mean cos(p2, f1)) / 2`` and the gradients asked for, computed in the
forward (the Barlow gradients above with the weight ``w_d / 2`` folded in, the cosine negatives'
added to them) and scaled by the incoming gradient in the backward. Under torch.distributed the
composition above runs instead (C is averaged over the ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import distributed, reference
from .._autocast import autocast_disabled
from ..reference import compute_dtype
from ._common import define_fused_op

KINDS = ("cosine", "squared_distance")

# paired_forward(p1, p2, f1, f2, kind) -> (terms (B, 4), norms (B, 4) or (B, 0)), compute dtype
PairedForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str],
                         Tuple[torch.Tensor, torch.Tensor]]
# paired_backward(grad_terms, terms, norms, p1, p2, f1, f2, kind, p1_needs_grad, p2_needs_grad)
#   -> [grad p1 if needed, grad p2 if needed], each in its input's dtype and shape
PairedBackward = Callable[..., List[torch.Tensor]]
# paired_loss(p1, p2, f1, f2, kind, weights (4 floats), constant, p1_needs_grad, p2_needs_grad)
#   -> (loss (0-d, compute dtype), grad p1, grad p2), each gradient (0, D) where not needed
PairedLoss = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# barlow_pnr_loss(p1, p2, f1, f2, distill_weight, negative_weight, off_diagonal_weight, scale,
#   p1_needs_grad, p2_needs_grad) -> (loss (0-d, compute dtype), grad p1, grad p2), as PairedLoss
BarlowPNRLoss = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# barlow_forward(a, b, off_diagonal_weight, scale) -> (loss (0-d), stats (5, D), gram_b (B, B); or C
#   (D, D) for B > D where barlow_correlation_form), all in the compute dtype
BarlowForward = Callable[[torch.Tensor, torch.Tensor, float, float],
                         Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# barlow_backward(grad_loss (0-d), a, b, stats, gram_b, off_diagonal_weight, scale) -> grad a
BarlowBackward = Callable[..., torch.Tensor]
# correlation_loss_forward(c (D, D), off_diagonal_weight, scale) -> loss (0-d, c's dtype)
CorrelationLossForward = Callable[[torch.Tensor, float, float], torch.Tensor]
# correlation_loss_backward(grad_loss (0-d), c, off_diagonal_weight, scale) -> grad c
CorrelationLossBackward = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class RegularizerKernels:
    paired_forward: PairedForward
    paired_backward: PairedBackward
    barlow_forward: BarlowForward
    barlow_backward: BarlowBackward
    correlation_loss_forward: CorrelationLossForward
    correlation_loss_backward: CorrelationLossBackward
    paired_loss: Optional[PairedLoss] = None  # None: compose_paired_loss(paired_forward, paired_backward)
    # whether barlow_forward/backward take B > D on a device, saving C (D, D) in gram_b's place
    barlow_correlation_form: Callable[[torch.device], bool] = lambda device: False
    # the whole Barlow-PNR regulariser of one process in one call, on these device types (else composed)
    barlow_pnr_loss: Optional[BarlowPNRLoss] = None
    barlow_pnr_device_types: Tuple[str, ...] = ()
    # paired_loss and barlow_pnr_loss as ops that record their own autograd node (same arguments
    # and results; the native CPU ops, whose backward runs no Python), for the eager path on these
    # device types (see _common.define_fused_op)
    paired_loss_autograd: Optional[PairedLoss] = None
    barlow_pnr_loss_autograd: Optional[BarlowPNRLoss] = None
    autograd_device_types: Tuple[str, ...] = ()


def compose_paired_loss(paired_forward: PairedForward, paired_backward: PairedBackward) -> PairedLoss:
    """The ``paired_loss`` kernel of a backend without a fused one: its paired_forward, then its
    paired_backward with ``grad_terms[i, k] = weights[k]`` (see the module docstring)."""
    def paired_loss(p1, p2, f1, f2, kind, weights, constant, p1_needs_grad, p2_needs_grad):
        terms, norms = paired_forward(p1, p2, f1, f2, kind)
        w = torch.tensor(weights, dtype=terms.dtype, device=terms.device)
        loss = torch.mv(terms, w).sum().add(constant)
        grads = iter(paired_backward(w.expand_as(terms).contiguous(), terms, norms, p1, p2, f1, f2, kind,
                                     p1_needs_grad, p2_needs_grad) if p1_needs_grad or p2_needs_grad else ())
        return (loss, next(grads) if p1_needs_grad else p1.new_empty((0, p1.shape[1])),
                next(grads) if p2_needs_grad else p2.new_empty((0, p2.shape[1])))
    return paired_loss


@dataclass(frozen=True)
class RegularizerOps:
    """The three registered custom ops of one backend (see the module docstring)."""
    paired_terms: Callable
    paired_loss: Callable
    barlow_gram_loss: Callable
    barlow_correlation_loss: Callable
    barlow_correlation_form: Callable[[torch.device], bool]
    barlow_pnr_loss: Optional[Callable]  # None where the backend has no such kernel
    fused_barlow_pnr: Callable[[torch.device], bool]  # whether barlow_pnr_loss runs on a device


def define_regularizer_ops(backend: str, kernels: RegularizerKernels) -> RegularizerOps:
    """Register ``pnr_kernels::paired_terms_<backend>``, ``paired_loss_<backend>``,
    ``barlow_gram_loss_<backend>``, ``barlow_correlation_loss_<backend>`` and, where the backend has
    the kernel, ``barlow_pnr_loss_<backend>`` (each with its backward op, autograd and fake kernels)
    over ``kernels``, and return the ops (see ``_common.define_fused_op``)."""
    prefix = "pnr_kernels::"

    def paired_terms(p1: torch.Tensor, p2: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor,
                     kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
        with autocast_disabled(p1.device.type):
            return kernels.paired_forward(p1, p2, f1, f2, kind)

    def paired_fake(p1, p2, f1, f2, kind):
        b, dtype = p1.shape[0], compute_dtype(p1.dtype)
        return p1.new_empty((b, 4), dtype=dtype), p1.new_empty((b, 4 if kind == "cosine" else 0), dtype=dtype)

    def paired_backward(grad_terms: torch.Tensor, terms: torch.Tensor, norms: torch.Tensor,
                        p1: torch.Tensor, p2: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor,
                        kind: str, p1_needs_grad: bool, p2_needs_grad: bool) -> List[torch.Tensor]:
        with autocast_disabled(p1.device.type):
            return kernels.paired_backward(grad_terms.contiguous(), terms, norms, p1, p2, f1, f2, kind,
                                           p1_needs_grad, p2_needs_grad)

    def paired_backward_fake(grad_terms, terms, norms, p1, p2, f1, f2, kind, p1_needs_grad, p2_needs_grad):
        return [torch.empty_like(p) for p, need in ((p1, p1_needs_grad), (p2, p2_needs_grad)) if need]

    def paired_setup(ctx, inputs, output):
        p1, p2, f1, f2, kind = inputs
        terms, norms = output
        ctx.mark_non_differentiable(norms)
        ctx.save_for_backward(terms, norms, p1, p2, f1, f2)
        ctx.kind = kind
        ctx.needs = (p1.requires_grad, p2.requires_grad)

    def paired_formula(ctx, backward, grad_terms, _grad_norms):
        terms, norms, p1, p2, f1, f2 = ctx.saved_tensors
        grads = iter(backward(grad_terms, terms, norms, p1, p2, f1, f2, ctx.kind, *ctx.needs))
        return (next(grads) if ctx.needs[0] else None, next(grads) if ctx.needs[1] else None,
                None, None, None)

    fused_paired_loss = kernels.paired_loss or compose_paired_loss(kernels.paired_forward, kernels.paired_backward)

    def paired_loss(p1: torch.Tensor, p2: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor, kind: str,
                    weights: List[float], constant: float, p1_needs_grad: bool,
                    p2_needs_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast_disabled(p1.device.type):
            return fused_paired_loss(p1, p2, f1, f2, kind, weights, constant, p1_needs_grad, p2_needs_grad)

    def barlow_pnr_loss(p1: torch.Tensor, p2: torch.Tensor, f1: torch.Tensor, f2: torch.Tensor,
                        distill_weight: float, negative_weight: float, off_diagonal_weight: float, scale: float,
                        p1_needs_grad: bool, p2_needs_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast_disabled(p1.device.type):
            return kernels.barlow_pnr_loss(p1, p2, f1, f2, distill_weight, negative_weight, off_diagonal_weight,
                                           scale, p1_needs_grad, p2_needs_grad)

    # paired_loss and barlow_pnr_loss: a scalar loss whose gradients of p1, p2 (the first two
    # inputs; the last two say which are needed) the forward computes and saves; the backward scales
    # them by the incoming gradient.
    def loss_fake(p1, p2, *args):
        (b, d), dtype, (p1_needs_grad, p2_needs_grad) = p1.shape, compute_dtype(p1.dtype), args[-2:]
        return (p1.new_empty((), dtype=dtype), p1.new_empty((b if p1_needs_grad else 0, d)),
                p2.new_empty((b if p2_needs_grad else 0, d)))

    def scaled_gradients(grad_loss, g1, g2, p1, p2, needs, alias_when_one):
        """grad_loss * each saved gradient that is needed (p1, p2: only so that differentiating this
        reaches the first-order-only refusal); the saved tensors themselves where
        ``alias_when_one`` and grad_loss is exactly 1 on the CPU."""
        saved = [g for g, need in zip((g1, g2), needs) if need]
        if alias_when_one and grad_loss.device.type == "cpu" and grad_loss.item() == 1:
            return saved
        return [grad_loss.mul(g).to(g.dtype) for g in saved]

    def loss_backward(grad_loss: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, p1: torch.Tensor,
                      p2: torch.Tensor, p1_needs_grad: bool, p2_needs_grad: bool) -> List[torch.Tensor]:
        return scaled_gradients(grad_loss, g1, g2, p1, p2, (p1_needs_grad, p2_needs_grad), False)

    def loss_eager_backward(grad_loss, g1, g2, p1, p2, p1_needs_grad, p2_needs_grad):
        return scaled_gradients(grad_loss, g1, g2, p1, p2, (p1_needs_grad, p2_needs_grad), True)

    def loss_backward_fake(grad_loss, g1, g2, p1, p2, p1_needs_grad, p2_needs_grad):
        return [torch.empty_like(p) for p, need in ((p1, p1_needs_grad), (p2, p2_needs_grad)) if need]

    def loss_setup(ctx, inputs, output):
        p1, p2, *_, p1_needs_grad, p2_needs_grad = inputs
        _, g1, g2 = output
        ctx.mark_non_differentiable(g1, g2)
        ctx.set_materialize_grads(False)  # no (B, D) zeros for the gradients of g1, g2
        ctx.save_for_backward(g1, g2, p1, p2)
        ctx.needs = (p1_needs_grad, p2_needs_grad)
        ctx.constants = len(inputs) - 2

    def loss_formula(ctx, backward, grad_loss, _grad_g1, _grad_g2):
        g1, g2, p1, p2 = ctx.saved_tensors
        needs = ctx.needs
        grads = iter(backward(grad_loss, g1, g2, p1, p2, *needs) if any(needs) else ())
        return (next(grads) if needs[0] else None, next(grads) if needs[1] else None, *(None,) * ctx.constants)

    def define_loss_op(name, forward, autograd_op):
        return define_fused_op(f"{prefix}{name}_{backend}", backend, forward, loss_fake, loss_backward,
                               loss_backward_fake, loss_setup, loss_formula, eager_backward=loss_eager_backward,
                               autograd_op=autograd_op, autograd_device_types=kernels.autograd_device_types)

    def barlow_gram_loss(a: torch.Tensor, b: torch.Tensor, off_diagonal_weight: float,
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast_disabled(a.device.type):
            return kernels.barlow_forward(a, b, off_diagonal_weight, scale)

    def barlow_fake(a, b, off_diagonal_weight, scale):
        (n, d), dtype = a.shape, compute_dtype(a.dtype)
        m = d if n > d and kernels.barlow_correlation_form(a.device) else n
        return a.new_empty((), dtype=dtype), a.new_empty((5, d), dtype=dtype), a.new_empty((m, m), dtype=dtype)

    def barlow_backward(grad_loss: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stats: torch.Tensor,
                        gram_b: torch.Tensor, off_diagonal_weight: float, scale: float) -> torch.Tensor:
        with autocast_disabled(a.device.type):
            return kernels.barlow_backward(grad_loss, a, b, stats, gram_b, off_diagonal_weight, scale)

    def barlow_backward_fake(grad_loss, a, b, stats, gram_b, off_diagonal_weight, scale):
        return torch.empty_like(a)

    def barlow_setup(ctx, inputs, output):
        a, b, off_diagonal_weight, scale = inputs
        _, stats, gram_b = output
        ctx.mark_non_differentiable(stats, gram_b)
        ctx.save_for_backward(a, b, stats, gram_b)
        ctx.weights = (off_diagonal_weight, scale)

    def barlow_formula(ctx, backward, grad_loss, _grad_stats, _grad_gram):
        a, b, stats, gram_b = ctx.saved_tensors
        grad_a = backward(grad_loss, a, b, stats, gram_b, *ctx.weights) if a.requires_grad else None
        return grad_a, None, None, None

    def correlation_loss(c: torch.Tensor, off_diagonal_weight: float, scale: float) -> torch.Tensor:
        with autocast_disabled(c.device.type):
            return kernels.correlation_loss_forward(c, off_diagonal_weight, scale)

    def correlation_fake(c, off_diagonal_weight, scale):
        return c.new_empty(())

    def correlation_backward(grad_loss: torch.Tensor, c: torch.Tensor, off_diagonal_weight: float,
                             scale: float) -> torch.Tensor:
        with autocast_disabled(c.device.type):
            return kernels.correlation_loss_backward(grad_loss, c, off_diagonal_weight, scale)

    def correlation_backward_fake(grad_loss, c, off_diagonal_weight, scale):
        return torch.empty_like(c)

    def correlation_setup(ctx, inputs, output):
        c, off_diagonal_weight, scale = inputs
        ctx.save_for_backward(c)
        ctx.weights = (off_diagonal_weight, scale)

    def correlation_formula(ctx, backward, grad_loss):
        (c,) = ctx.saved_tensors
        return backward(grad_loss, c, *ctx.weights), None, None

    return RegularizerOps(
        define_fused_op(f"{prefix}paired_terms_{backend}", backend, paired_terms, paired_fake, paired_backward,
                        paired_backward_fake, paired_setup, paired_formula),
        define_loss_op("paired_loss", paired_loss, kernels.paired_loss_autograd),
        define_fused_op(f"{prefix}barlow_gram_loss_{backend}", backend, barlow_gram_loss, barlow_fake,
                        barlow_backward, barlow_backward_fake, barlow_setup, barlow_formula),
        define_fused_op(f"{prefix}barlow_correlation_loss_{backend}", backend, correlation_loss, correlation_fake,
                        correlation_backward, correlation_backward_fake, correlation_setup, correlation_formula),
        kernels.barlow_correlation_form,
        (define_loss_op("barlow_pnr_loss", barlow_pnr_loss, kernels.barlow_pnr_loss_autograd)
         if kernels.barlow_pnr_loss else None),
        lambda device: kernels.barlow_pnr_loss is not None and device.type in kernels.barlow_pnr_device_types,
    )


# ---------------------------------------------------------------------------------------------
# The regularisers over the ops. They mirror pnr_kernels.reference (section 4):
#   reg = w_d (pos(p1, f1) + pos(p2, f2)) / 2 - w_n (neg(p1, f2) + neg(p2, f1)) / 2
# with the per-row terms' columns ordered (p1, f1), (p2, f2), (p1, f2), (p2, f1).
# ---------------------------------------------------------------------------------------------

def _needs_grad(*tensors):
    return [torch.is_grad_enabled() and t.requires_grad for t in tensors]


def byol_pnr_regularizer(ops, p1, p2, f1, f2, *, distill_weight, negative_weight):
    # terms 2 - 2 cos averaged over rows: w_d (2 - c11 - c22) - w_n (2 - c12 - c21), c the mean cosines
    n = p1.shape[0]
    weights = [-distill_weight / n, -distill_weight / n, negative_weight / n, negative_weight / n]
    loss = ops.paired_loss(p1, p2, f1, f2, "cosine", weights, 2.0 * (distill_weight - negative_weight),
                           *_needs_grad(p1, p2))[0]
    return loss.to(p1.dtype)


def vicreg_pnr_regularizer(ops, p1, p2, f1, f2, *, distill_weight, negative_weight):
    # MSE = row sums of squared differences / (B D)
    n = p1.shape[0] * p1.shape[1]
    weights = [distill_weight / (2 * n), distill_weight / (2 * n), -negative_weight / (2 * n),
               -negative_weight / (2 * n)]
    return ops.paired_loss(p1, p2, f1, f2, "squared_distance", weights, 0.0, *_needs_grad(p1, p2))[0].to(p1.dtype)


def barlow_pnr_regularizer(ops, p1, p2, f1, f2, *, distill_weight, negative_weight,
                           off_diagonal_weight, scale):
    if distributed.world_size() == 1 and ops.fused_barlow_pnr(p1.device):
        return ops.barlow_pnr_loss(p1, p2, f1, f2, distill_weight, negative_weight, off_diagonal_weight, scale,
                                   *_needs_grad(p1, p2))[0].to(p1.dtype)
    if distributed.world_size() > 1 or (p1.shape[0] > p1.shape[1] and not ops.barlow_correlation_form(p1.device)):
        # Under DDP, C is averaged over ranks before the loss (docs/losses.md section 4).
        def barlow(p, f):
            up = compute_dtype(p.dtype)
            c = reference.barlow_correlation(p.to(up), f.to(up))
            return ops.barlow_correlation_loss(c, off_diagonal_weight, scale)
    else:
        def barlow(p, f):
            return ops.barlow_gram_loss(p, f, off_diagonal_weight, scale)[0]
    # negatives: - w_n (neg12 + neg21) / 2 with neg = - mean cos
    n = p1.shape[0]
    weights = [0.0, 0.0, negative_weight / (2 * n), negative_weight / (2 * n)]
    negatives = ops.paired_loss(p1, p2, f1, f2, "cosine", weights, 0.0, *_needs_grad(p1, p2))[0]
    return (distill_weight * (barlow(p1, f1) + barlow(p2, f2)) / 2 + negatives).to(p1.dtype)
