"""The PNR losses in plain PyTorch: the ground truth every fused backend is tested against.

Readable and unoptimised: the similarity matrices are materialised. Formulas follow
docs/losses.md (the project's statement of the losses); section numbers below refer to it.
Half-precision inputs are computed in float32 and the loss is returned in the input dtype;
float64 inputs are computed in float64. These functions assume validated inputs (see
``pnr_kernels.losses`` for the checked public API) and that frozen inputs were already detached.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import distributed

NORMALIZE_EPS = 1e-12
COSINE_EPS = 1e-8
BARLOW_VARIANCE_EPS = 1e-5
VICREG_VARIANCE_EPS = 1e-4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss is accumulated in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x.dtype))


# Rows (or columns) whose largest magnitude exceeds this are divided by it before a norm or a
# variance is taken, so that squares of huge values (fp32 rows near 1e20 and beyond) cannot
# overflow. Below it nothing is rescaled, so ordinary inputs are computed exactly as
# torch.nn.functional computes them (the authors' code).
HUGE = 1e15


def _overflow_guard(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``max |x|`` along ``dim`` where it exceeds HUGE, else 1; detached (every formula that
    divides by it is invariant to the factor, up to an eps that is negligible at that scale)."""
    scale = x.detach().abs().amax(dim=dim, keepdim=True)
    return torch.where(scale > HUGE, scale, torch.ones_like(scale))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation, ``x / max(||x||, 1e-12)``; an all-zero row stays all zero.
    Huge rows are scaled down first (see HUGE), which leaves the result unchanged."""
    return F.normalize(x / _overflow_guard(x, 1), dim=1, eps=NORMALIZE_EPS)


def _masked_diagonal(logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``logits`` with entry (i, offset + i) set to -inf for every row i (where that column
    exists): the key whose global index is the row's own is left out of the LSE."""
    i = torch.arange(logits.shape[0], device=logits.device)[:, None]
    j = torch.arange(logits.shape[1], device=logits.device)[None, :]
    return logits.masked_fill(j == i + offset, float("-inf"))


# ---------------------------------------------------------------------------------------------
# The fused op's contract, materialised (docs/losses.md, "The central op" and "Data-parallel")
# ---------------------------------------------------------------------------------------------

def infonce_lse(
    rows: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    exclude_diagonal: Sequence[bool],
    scales: Sequence[float],
    diagonal_offsets: Optional[Sequence[int]] = None,
    *,
    gather_distributed: bool = False,
    process_group=None,
) -> torch.Tensor:
    """``lse[r, i] = LSE over blocks k, keys j (j != diagonal_offsets[k] + i where
    exclude_diagonal[k]) of scales[r] * rows[r][i] . keys[k][j]``, shape (R, M), in the compute
    dtype. ``diagonal_offsets`` defaults to zeros (row i drops key i).

    With ``gather_distributed`` and W > 1 ranks, every key block is first all-gathered in rank
    order (with autograd for blocks that require a gradient) and block k's offset becomes
    ``rank * M_k + diagonal_offsets[k]`` (``M_k``: the local block's rows, the same on every rank).

    Every fused backend implements exactly this; the losses add their positives around it.
    """
    offsets = list(diagonal_offsets) if diagonal_offsets is not None else [0] * len(keys)
    keys, offsets = distributed.gather_key_blocks(rows, keys, offsets, gather_distributed, process_group)
    out = []
    for row, scale in zip(rows, scales):
        blocks = []
        for key, exclude, offset in zip(keys, exclude_diagonal, offsets):
            logits = (_up(row) @ _up(key).T) * scale
            blocks.append(_masked_diagonal(logits, offset) if exclude else logits)
        out.append(torch.logsumexp(torch.cat(blocks, dim=1), dim=1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Contrastive losses (sections 1, 2, 3 and 5). With ``gather_distributed`` (SimCLR-PNR, NT-Xent,
# CaSSLe) the keys are the whole global batch and the self-exclusion is at the global index.
# ---------------------------------------------------------------------------------------------

def simclr_pnr_loss(z1, z2, p1, p2, f1, f2, *, temperature: float = 0.2,
                    gather_distributed: bool = False, process_group=None) -> torch.Tensor:
    """SimCLR-PNR, section 1: ``mean_i(main_i) + mean_i(reg_i)`` over the local rows."""
    b = z1.shape[0]
    z = normalize(_up(torch.cat([z1, z2])))
    p = normalize(_up(torch.cat([p1, p2])))
    f = normalize(_up(torch.cat([f1, f2])))
    t = temperature
    keys, o = distributed.global_keys(gather_distributed, process_group, 2 * b, z.device)
    zk, fk = keys(z), keys(f)
    main = -(z * z.roll(b, dims=0)).sum(1) / t + torch.logsumexp(
        torch.cat([_masked_diagonal(z @ zk.T / t, o), _masked_diagonal(z @ fk.T / t, o)], dim=1), dim=1
    )
    reg = -(p * f).sum(1) / t + torch.logsumexp(
        torch.cat([_masked_diagonal(p @ fk.T / t, o), _masked_diagonal(p @ zk.T / t, o)], dim=1), dim=1
    )
    return (main.mean() + reg.mean()).to(z1.dtype)


def nt_xent_loss(z1, z2, *, temperature: float = 0.2, gather_distributed: bool = False,
                 process_group=None) -> torch.Tensor:
    """Plain SimCLR / NT-Xent, section 2."""
    b = z1.shape[0]
    z = normalize(_up(torch.cat([z1, z2])))
    t = temperature
    keys, o = distributed.global_keys(gather_distributed, process_group, 2 * b, z.device)
    loss = -(z * z.roll(b, dims=0)).sum(1) / t + torch.logsumexp(_masked_diagonal(z @ keys(z).T / t, o), dim=1)
    return loss.mean().to(z1.dtype)


def queue_poison(*queues: torch.Tensor) -> torch.Tensor:
    """0, or NaN when any queue holds a NaN or an Inf. Queue rows enter the logits as given (they
    are not normalised), and an Inf entry can make a logit -inf, which the log-sum-exp ignores;
    adding this to a loss keeps the contract that non-finite inputs give a non-finite loss, in
    one O(K D) read and without a host synchronisation."""
    return sum(0 * q.detach().abs().amax().to(compute_dtype(q.dtype)) for q in queues)


def _moco_ce(anchor, positive, queue, t):
    """``mean_i(-a_i.pos_i/t + LSE({a_i.pos_i/t} U {a_i.q/t : q in queue}))``."""
    pos = (anchor * positive).sum(1, keepdim=True) / t
    logits = torch.cat([pos, anchor @ queue.T / t], dim=1)
    return (torch.logsumexp(logits, dim=1) - pos[:, 0]).mean()


def moco_pnr_loss(
    q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue, *,
    temperature: float = 0.2, distill_temperature: float = 0.2,
) -> torch.Tensor:
    """MoCo-PNR, section 3. Queue rows are used as given (they already hold unit rows)."""
    dtype = q1.dtype
    q1, q2, k1, k2, p1, p2, f1, f2 = (normalize(_up(x)) for x in (q1, q2, k1, k2, p1, p2, f1, f2))
    keys_view0 = torch.cat([_up(key_queue[0]), _up(prev_queue[0])])
    keys_view1 = torch.cat([_up(key_queue[1]), _up(prev_queue[1])])
    t, td = temperature, distill_temperature
    loss = (
        _moco_ce(q1, k2, keys_view1, t) + _moco_ce(p1, f1, keys_view1, td)
        + _moco_ce(q2, k1, keys_view0, t) + _moco_ce(p2, f2, keys_view0, td)
    ) / 2
    return (loss + queue_poison(key_queue, prev_queue)).to(dtype)


def moco_loss(q1, q2, k1, k2, key_queue, *, temperature: float = 0.2) -> torch.Tensor:
    """Plain symmetric MoCo (v2+), section 3 without the PNR terms:
    ``(ce(q1, k2, key_queue[1]) + ce(q2, k1, key_queue[0])) / 2``."""
    dtype = q1.dtype
    q1, q2, k1, k2 = (normalize(_up(x)) for x in (q1, q2, k1, k2))
    t = temperature
    loss = (_moco_ce(q1, k2, _up(key_queue[1]), t) + _moco_ce(q2, k1, _up(key_queue[0]), t)) / 2
    return (loss + queue_poison(key_queue)).to(dtype)


def cassle_simclr_regularizer(p1, p2, f1, f2, *, temperature: float = 0.2, gather_distributed: bool = False,
                              process_group=None) -> torch.Tensor:
    """CaSSLe's SimCLR regulariser, section 5, without its weight: ``(d(P, F) + d(F, P)) / 2``."""
    p = normalize(_up(torch.cat([p1, p2])))
    f = normalize(_up(torch.cat([f1, f2])))
    t = temperature
    keys, _ = distributed.global_keys(gather_distributed, process_group, p.shape[0], p.device)

    def d(a, c, c_keys):
        return (torch.logsumexp(a @ c_keys.T / t, dim=1) - (a * c).sum(1) / t).mean()

    return ((d(p, f, keys(f)) + d(f, p, keys(p))) / 2).to(p1.dtype)


# ---------------------------------------------------------------------------------------------
# Non-contrastive regularisers (section 4) and the base losses a trainer needs
# ---------------------------------------------------------------------------------------------

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise ``cos(a_i, b_i)``, each norm clamped at 1e-8, as
    ``torch.nn.functional.cosine_similarity`` computes it (value and gradient); huge rows are
    scaled down first (see HUGE), which leaves the result unchanged."""
    return F.cosine_similarity(a / _overflow_guard(a, 1), b / _overflow_guard(b, 1), dim=1, eps=COSINE_EPS)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_i cos(a_i, b_i)`` with each norm clamped at 1e-8 (see :func:`cosine`)."""
    return cosine(a, b).mean()


def _byol_term(p, f):
    return 2 - 2 * mean_cosine(p, f)


def _vicreg_term(p, f):
    return ((p - f) ** 2).mean()


def barlow_correlation(a, b) -> torch.Tensor:
    """``C = a^T b^ / B`` (D x D) of the column-standardised batches (section 4), averaged over
    ranks under DDP."""
    def standardise(x):
        # (x - mean) / sqrt(var + eps), on x / s with eps / s^2 (s: see _overflow_guard) so
        # that the variance of huge columns does not overflow
        s = _overflow_guard(x, 0)
        y = x / s
        return (y - y.mean(0)) / torch.sqrt(y.var(0, unbiased=False) + BARLOW_VARIANCE_EPS / s ** 2)

    c = standardise(a).T @ standardise(b) / a.shape[0]
    return distributed.all_reduce_mean(c)


def barlow_loss_of_correlation(c, *, off_diagonal_weight: float, scale: float) -> torch.Tensor:
    """``s * (sum_i (C_ii - 1)^2 + l * sum_{i != j} C_ij^2)``."""
    diagonal = torch.diagonal(c)
    on = ((diagonal - 1) ** 2).sum()
    off = (c ** 2).sum() - (diagonal ** 2).sum()
    return scale * (on + off_diagonal_weight * off)


def barlow_loss(a, b, *, off_diagonal_weight: float = 5e-3, scale: float = 0.1) -> torch.Tensor:
    """Barlow Twins loss of two (B, D) batches (section 4); C is averaged over ranks under DDP."""
    return barlow_loss_of_correlation(barlow_correlation(a, b), off_diagonal_weight=off_diagonal_weight,
                                      scale=scale)


def _pnr_regularizer(pos, neg, p1, p2, f1, f2, distill_weight, negative_weight):
    """``w_d (pos(p1,f1) + pos(p2,f2)) / 2 - w_n (neg(p1,f2) + neg(p2,f1)) / 2``."""
    dtype = p1.dtype
    p1, p2, f1, f2 = (_up(x) for x in (p1, p2, f1, f2))
    reg = distill_weight * (pos(p1, f1) + pos(p2, f2)) / 2 - negative_weight * (neg(p1, f2) + neg(p2, f1)) / 2
    return reg.to(dtype)


def byol_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=1.0, negative_weight=0.5):
    """BYOL-PNR: pos = neg = ``2 - 2 mean cos``."""
    return _pnr_regularizer(_byol_term, _byol_term, p1, p2, f1, f2, distill_weight, negative_weight)


def vicreg_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=25.0, negative_weight=23.0):
    """VICReg-PNR: pos = neg = mean squared difference over all elements."""
    return _pnr_regularizer(_vicreg_term, _vicreg_term, p1, p2, f1, f2, distill_weight, negative_weight)


def barlow_pnr_regularizer(
    p1, p2, f1, f2, *, distill_weight=1.0, negative_weight=1.0, off_diagonal_weight=5e-3, scale=0.1
):
    """BarlowTwins-PNR: pos = Barlow loss, neg = ``-mean cos``."""
    def pos(p, f):
        return barlow_loss(p, f, off_diagonal_weight=off_diagonal_weight, scale=scale)

    def neg(p, f):
        return -mean_cosine(p, f)

    return _pnr_regularizer(pos, neg, p1, p2, f1, f2, distill_weight, negative_weight)


def byol_loss(p1, p2, t1, t2) -> torch.Tensor:
    """BYOL's symmetric loss: ``(2 - 2 mean cos(p1, t2)) + (2 - 2 mean cos(p2, t1))``; t* are
    the momentum-target projections and get no gradient."""
    out = _byol_term(_up(p1), _up(t2).detach()) + _byol_term(_up(p2), _up(t1).detach())
    return out.to(p1.dtype)


def vicreg_loss(z1, z2, *, sim_weight=25.0, var_weight=25.0, cov_weight=1.0) -> torch.Tensor:
    """VICReg (Bardes et al.): invariance (MSE), variance hinge on the unbiased std (eps 1e-4),
    and off-diagonal covariance squared sum divided by D; needs a batch of at least 2."""
    dtype = z1.dtype
    z1, z2 = _up(z1), _up(z2)
    n, d = z1.shape

    def variance(z):
        return F.relu(1 - torch.sqrt(z.var(0) + VICREG_VARIANCE_EPS)).mean()

    def covariance(z):
        z = z - z.mean(0)
        cov = z.T @ z / (n - 1)
        return ((cov ** 2).sum() - (torch.diagonal(cov) ** 2).sum()) / d

    loss = (sim_weight * F.mse_loss(z1, z2) + var_weight * (variance(z1) + variance(z2))
            + cov_weight * (covariance(z1) + covariance(z2)))
    return loss.to(dtype)


def barlow_twins_loss(z1, z2, *, off_diagonal_weight=5e-3, scale=0.1) -> torch.Tensor:
    """The Barlow Twins loss between the two current views (same formula as the PNR term)."""
    return barlow_loss(_up(z1), _up(z2), off_diagonal_weight=off_diagonal_weight, scale=scale).to(z1.dtype)
