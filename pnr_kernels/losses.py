"""The public functional losses: validate, detach the frozen inputs, dispatch to a backend.

The mathematics of each loss is in docs/losses.md; ``pnr_kernels.reference`` is its plain
PyTorch statement. All inputs are raw (un-normalised) embeddings; each function returns a scalar
tensor in the inputs' dtype. Frozen inputs (``f*``, ``k*`` and the queues) never receive a
gradient, even when they require one.
"""
from __future__ import annotations

import torch

from . import backends, reference
from ._validation import check_embeddings, check_positive_number, check_queue, check_weight


def _dispatch(loss: str, backend: str, like: torch.Tensor):
    return backends.resolve(backend, loss, like.device, like.dtype)


def simclr_pnr_loss(z1, z2, p1, p2, f1, f2, *, temperature=0.2, backend="auto"):
    """SimCLR with pseudo-negatives (docs/losses.md, section 1).

    z1, z2: current projections of the two views (B, D); p1, p2: predictor outputs g(z1), g(z2);
    f1, f2: the frozen previous model's projections. Returns ``mean(main) + mean(reg)``.
    """
    check_embeddings(dict(z1=z1, z2=z2, p1=p1, p2=p2, f1=f1, f2=f2))
    t = check_positive_number("temperature", temperature)
    fn = _dispatch("simclr_pnr", backend, z1)
    return fn(z1, z2, p1, p2, f1.detach(), f2.detach(), temperature=t)


def nt_xent_loss(z1, z2, *, temperature=0.2, backend="auto"):
    """Plain SimCLR / NT-Xent over 2B rows (docs/losses.md, section 2)."""
    check_embeddings(dict(z1=z1, z2=z2))
    t = check_positive_number("temperature", temperature)
    return _dispatch("nt_xent", backend, z1)(z1, z2, temperature=t)


def moco_pnr_loss(q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue, *,
                  temperature=0.2, distill_temperature=0.2, backend="auto"):
    """MoCo with pseudo-negatives (docs/losses.md, section 3).

    q*: queries; k*: momentum keys; p*: predictor outputs; f*: frozen previous-model outputs, all
    (B, D). key_queue, prev_queue: (2, K, D) queues of unit rows per view, any strides (a
    transposed view of a (2, D, K) buffer works without a copy).
    """
    _, dim = check_embeddings(dict(q1=q1, q2=q2, k1=k1, k2=k2, p1=p1, p2=p2, f1=f1, f2=f2))
    check_queue("key_queue", key_queue, dim=dim, like_name="q1", like=q1)
    check_queue("prev_queue", prev_queue, dim=dim, like_name="q1", like=q1)
    t = check_positive_number("temperature", temperature)
    td = check_positive_number("distill_temperature", distill_temperature)
    fn = _dispatch("moco_pnr", backend, q1)
    return fn(q1, q2, k1.detach(), k2.detach(), p1, p2, f1.detach(), f2.detach(),
              key_queue.detach(), prev_queue.detach(), temperature=t, distill_temperature=td)


def moco_loss(q1, q2, k1, k2, key_queue, *, temperature=0.2, backend="auto"):
    """Plain symmetric MoCo (v2+) InfoNCE with a (2, K, D) key queue of any strides: the loss of the
    first task and of the fine-tuning/CaSSLe baselines (docs/losses.md, section 3)."""
    _, dim = check_embeddings(dict(q1=q1, q2=q2, k1=k1, k2=k2))
    check_queue("key_queue", key_queue, dim=dim, like_name="q1", like=q1)
    t = check_positive_number("temperature", temperature)
    fn = _dispatch("moco", backend, q1)
    return fn(q1, q2, k1.detach(), k2.detach(), key_queue.detach(), temperature=t)


def cassle_simclr_regularizer(p1, p2, f1, f2, *, temperature=0.2, backend="auto"):
    """CaSSLe's SimCLR regulariser ``(d(P, F) + d(F, P)) / 2`` (docs/losses.md, section 5),
    unweighted: multiply by the strategy's weight yourself."""
    check_embeddings(dict(p1=p1, p2=p2, f1=f1, f2=f2))
    t = check_positive_number("temperature", temperature)
    fn = _dispatch("cassle_simclr", backend, p1)
    return fn(p1, p2, f1.detach(), f2.detach(), temperature=t)


def byol_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=1.0, negative_weight=0.5, backend="auto"):
    """BYOL-PNR regulariser (docs/losses.md, section 4): cosine pull to f of the same view,
    cosine push from f of the other view."""
    check_embeddings(dict(p1=p1, p2=p2, f1=f1, f2=f2))
    wd = check_weight("distill_weight", distill_weight)
    wn = check_weight("negative_weight", negative_weight)
    fn = _dispatch("byol_pnr", backend, p1)
    return fn(p1, p2, f1.detach(), f2.detach(), distill_weight=wd, negative_weight=wn)


def vicreg_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=25.0, negative_weight=23.0, backend="auto"):
    """VICReg-PNR regulariser (docs/losses.md, section 4): mean squared differences."""
    check_embeddings(dict(p1=p1, p2=p2, f1=f1, f2=f2))
    wd = check_weight("distill_weight", distill_weight)
    wn = check_weight("negative_weight", negative_weight)
    fn = _dispatch("vicreg_pnr", backend, p1)
    return fn(p1, p2, f1.detach(), f2.detach(), distill_weight=wd, negative_weight=wn)


def barlow_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=1.0, negative_weight=1.0,
                           off_diagonal_weight=5e-3, scale=0.1, backend="auto"):
    """BarlowTwins-PNR regulariser (docs/losses.md, section 4): Barlow loss to f of the same view,
    negative cosine against f of the other view."""
    check_embeddings(dict(p1=p1, p2=p2, f1=f1, f2=f2))
    kwargs = dict(
        distill_weight=check_weight("distill_weight", distill_weight),
        negative_weight=check_weight("negative_weight", negative_weight),
        off_diagonal_weight=check_weight("off_diagonal_weight", off_diagonal_weight),
        scale=check_weight("scale", scale),
    )
    fn = _dispatch("barlow_pnr", backend, p1)
    return fn(p1, p2, f1.detach(), f2.detach(), **kwargs)


# Base losses of the non-contrastive methods (reference implementations; a trainer adds the
# PNR or CaSSLe regulariser to them).

def byol_loss(p1, p2, t1, t2):
    """BYOL: ``(2 - 2 mean cos(p1, t2)) + (2 - 2 mean cos(p2, t1))``; the momentum-target
    projections t1, t2 get no gradient."""
    check_embeddings(dict(p1=p1, p2=p2, t1=t1, t2=t2))
    return reference.byol_loss(p1, p2, t1.detach(), t2.detach())


def vicreg_loss(z1, z2, *, sim_weight=25.0, var_weight=25.0, cov_weight=1.0):
    """VICReg between the two views; needs at least 2 rows (the variance is unbiased)."""
    b, _ = check_embeddings(dict(z1=z1, z2=z2))
    if b < 2:
        raise ValueError(f"vicreg_loss needs a batch of at least 2 rows, got {b}")
    return reference.vicreg_loss(
        z1, z2, sim_weight=check_weight("sim_weight", sim_weight),
        var_weight=check_weight("var_weight", var_weight), cov_weight=check_weight("cov_weight", cov_weight),
    )


def barlow_twins_loss(z1, z2, *, off_diagonal_weight=5e-3, scale=0.1):
    """Barlow Twins between the two views (docs/losses.md, section 4)."""
    check_embeddings(dict(z1=z1, z2=z2))
    return reference.barlow_twins_loss(
        z1, z2, off_diagonal_weight=check_weight("off_diagonal_weight", off_diagonal_weight),
        scale=check_weight("scale", scale),
    )


# The losses with backends, by key (the keys of ``pnr_kernels.reference.LOSSES`` and of every
# backend's ``losses()``); used by the benchmark runner and the tests.
LOSS_FUNCTIONS = {
    "simclr_pnr": simclr_pnr_loss,
    "nt_xent": nt_xent_loss,
    "moco_pnr": moco_pnr_loss,
    "moco": moco_loss,
    "cassle_simclr": cassle_simclr_regularizer,
    "byol_pnr": byol_pnr_regularizer,
    "vicreg_pnr": vicreg_pnr_regularizer,
    "barlow_pnr": barlow_pnr_regularizer,
}
