"""The public functional losses: validate, detach the frozen inputs, dispatch to a backend.

The mathematics of each loss is in docs/losses.md; ``pnr_kernels.reference`` is its plain
PyTorch statement and ``pnr_kernels.registry`` its description (inputs, which are trainable,
options). All inputs are raw (un-normalised) embeddings; each function returns a scalar tensor in
the inputs' dtype, computed at the inputs' precision whatever the autocast state. Frozen inputs
(``f*``, ``k*`` and the queues) never receive a gradient, even when they require one.
"""
from __future__ import annotations

import torch

from . import backends, reference, registry
from ._autocast import autocast_disabled
from ._validation import (DATA_PARALLEL_CHECKS, check_embeddings, check_infonce_inputs, check_queue,
                          check_temperatures_for_dtype, check_weight)


def _dispatch(what: str, backend: str, first: torch.Tensor, function_of, *args, **options) -> torch.Tensor:
    """Choose the backend for ``what`` (a loss, or the op family "infonce") on ``first``'s device
    and dtype, and call ``function_of(chosen)(*args, **options)`` with autocast off (the one
    dispatch of the public functions)."""
    chosen = backends.choose(backend, what, first.device.type, first.dtype)
    with autocast_disabled(first.device.type):
        return function_of(chosen)(*args, **options)


def _run(loss: str, backend: str, inputs, **options) -> torch.Tensor:
    """Validate ``inputs`` (positional, in the public order) and ``options`` against the loss's
    registry entry, detach the frozen inputs, and compute the loss on the chosen backend."""
    spec = registry.LOSSES[loss]
    named = dict(zip(spec.inputs, inputs))
    _, dim = check_embeddings({name: named[name] for name in spec.embeddings})
    first_name = spec.inputs[0]
    first = named[first_name]
    for name in spec.queues:
        check_queue(name, named[name], dim=dim, like_name=first_name, like=first)
    options = {name: spec.options[name](name, value) for name, value in options.items()}
    check_temperatures_for_dtype(options, first.dtype)
    args = [x if trainable else x.detach() for x, trainable in zip(inputs, spec.trainable_mask)]
    return _dispatch(loss, backend, first, lambda chosen: backends.loss_function(chosen, loss), *args, **options)


def multi_key_infonce(rows, keys, *, temperature=0.2, exclude_diagonal=False, diagonal_offsets=None,
                      backend="auto", gather_distributed=False, process_group=None):
    """The central op of every contrastive loss here, public so that new pseudo-negative losses
    can be composed from it (docs/losses.md, "The central op" and "Data-parallel"):

        lse[r, i] = LSE over key blocks k and keys j of keys[k][j] . rows[r][i] / temperature[r],
                    leaving out j = diagonal_offsets[k] + i where exclude_diagonal[k]

    rows: a list of R row sets, each (M, D); keys: a list of key blocks, each (M_k, D); any strides,
    one floating dtype and device. Nothing is normalised: pass unit rows for cosine logits.
    temperature: one for all row sets or one per row set. exclude_diagonal: one flag for all key
    blocks or one per block. diagonal_offsets: None (0) or an int >= 0 per block (or one for all);
    a key that does not exist (offset + i >= M_k) leaves nothing out.

    gather_distributed (with W > 1 ranks in process_group, the default group when None): every
    key block is all-gathered in rank order, the blocks that require a gradient with autograd (the
    backward sums every rank's gradient of a key and returns it to the key's owner), the others
    without; block k's offset becomes ``rank * M_k + diagonal_offsets[k]``, so a row drops its own
    key in the global batch. Every rank must hold the same M and M_k (else ValueError naming them).

    Returns (R, M) in float32 (float64 for float64 inputs); add the positives yourself, e.g. the
    InfoNCE loss of row i with positive logit s_i is ``logaddexp(lse[r, i], s_i) - s_i`` when the
    positive is not among the keys, ``lse[r, i] - s_i`` when it is. Gradients flow to every row
    set and key block that requires one; nothing of size rows x keys is stored by the fused
    backends (the native CUDA kernels take at most 8 row sets and 8 key blocks, a block with a
    non-zero offset counting as 2).
    """
    rows, keys, exclude, scales, offsets = check_infonce_inputs(rows, keys, exclude_diagonal, temperature,
                                                                diagonal_offsets)
    data_parallel = {name: DATA_PARALLEL_CHECKS[name](name, value) for name, value in
                     (("gather_distributed", gather_distributed), ("process_group", process_group))}
    return _dispatch("infonce", backend, rows[0], backends.infonce_function, rows, keys, exclude, scales,
                     offsets, **data_parallel)


def simclr_pnr_loss(z1, z2, p1, p2, f1, f2, *, temperature=0.2, backend="auto", gather_distributed=False,
                    process_group=None):
    """SimCLR with pseudo-negatives (docs/losses.md, section 1).

    z1, z2: current projections of the two views (B, D); p1, p2: predictor outputs g(z1), g(z2);
    f1, f2: the frozen previous model's projections. Returns ``mean(main) + mean(reg)``.

    gather_distributed: under torch.distributed with W > 1 ranks in ``process_group`` (default
    group when None), the rows meet the keys Z, F of the whole global batch, each row dropping its
    own key at its global index; the loss is the mean over the local rows and its gradients,
    averaged by DDP, are those of the loss on the concatenated global batch (docs/losses.md,
    "Data-parallel"). Every rank must hold the same batch size. Off, or W = 1: the local loss.
    """
    return _run("simclr_pnr", backend, (z1, z2, p1, p2, f1, f2), temperature=temperature,
                gather_distributed=gather_distributed, process_group=process_group)


def nt_xent_loss(z1, z2, *, temperature=0.2, backend="auto", gather_distributed=False, process_group=None):
    """Plain SimCLR / NT-Xent over 2B rows (docs/losses.md, section 2); ``gather_distributed``,
    ``process_group``: the keys are the whole global batch, as for :func:`simclr_pnr_loss`."""
    return _run("nt_xent", backend, (z1, z2), temperature=temperature, gather_distributed=gather_distributed,
                process_group=process_group)


def moco_pnr_loss(q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue, *,
                  temperature=0.2, distill_temperature=0.2, backend="auto"):
    """MoCo with pseudo-negatives (docs/losses.md, section 3).

    q*: queries; k*: momentum keys; p*: predictor outputs; f*: frozen previous-model outputs, all
    (B, D). key_queue, prev_queue: (2, K, D) queues of unit rows per view, any strides (a
    transposed view of a (2, D, K) buffer works without a copy).
    """
    return _run("moco_pnr", backend, (q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue),
                temperature=temperature, distill_temperature=distill_temperature)


def moco_loss(q1, q2, k1, k2, key_queue, *, temperature=0.2, backend="auto"):
    """Plain symmetric MoCo (v2+) InfoNCE with a (2, K, D) key queue of any strides: the loss of the
    first task and of the fine-tuning/CaSSLe baselines (docs/losses.md, section 3)."""
    return _run("moco", backend, (q1, q2, k1, k2, key_queue), temperature=temperature)


def cassle_simclr_regularizer(p1, p2, f1, f2, *, temperature=0.2, backend="auto", gather_distributed=False,
                              process_group=None):
    """CaSSLe's SimCLR regulariser ``(d(P, F) + d(F, P)) / 2`` (docs/losses.md, section 5),
    unweighted: multiply by the strategy's weight yourself. ``gather_distributed``,
    ``process_group``: the keys (P of the current model, F of the frozen one) are the whole global
    batch, as for :func:`simclr_pnr_loss` (nothing is excluded here)."""
    return _run("cassle_simclr", backend, (p1, p2, f1, f2), temperature=temperature,
                gather_distributed=gather_distributed, process_group=process_group)


def byol_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=1.0, negative_weight=0.5, backend="auto"):
    """BYOL-PNR regulariser (docs/losses.md, section 4): cosine pull to f of the same view,
    cosine push from f of the other view."""
    return _run("byol_pnr", backend, (p1, p2, f1, f2), distill_weight=distill_weight,
                negative_weight=negative_weight)


def vicreg_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=25.0, negative_weight=23.0, backend="auto"):
    """VICReg-PNR regulariser (docs/losses.md, section 4): mean squared differences."""
    return _run("vicreg_pnr", backend, (p1, p2, f1, f2), distill_weight=distill_weight,
                negative_weight=negative_weight)


def barlow_pnr_regularizer(p1, p2, f1, f2, *, distill_weight=1.0, negative_weight=1.0,
                           off_diagonal_weight=5e-3, scale=0.1, backend="auto"):
    """BarlowTwins-PNR regulariser (docs/losses.md, section 4): Barlow loss to f of the same view,
    negative cosine against f of the other view."""
    return _run("barlow_pnr", backend, (p1, p2, f1, f2), distill_weight=distill_weight,
                negative_weight=negative_weight, off_diagonal_weight=off_diagonal_weight, scale=scale)


# Base losses of the non-contrastive methods (reference implementations; a trainer adds the
# PNR or CaSSLe regulariser to them).

def byol_loss(p1, p2, t1, t2):
    """BYOL: ``(2 - 2 mean cos(p1, t2)) + (2 - 2 mean cos(p2, t1))``; the momentum-target
    projections t1, t2 get no gradient."""
    check_embeddings(dict(p1=p1, p2=p2, t1=t1, t2=t2))
    with autocast_disabled(p1.device.type):
        return reference.byol_loss(p1, p2, t1.detach(), t2.detach())


def vicreg_loss(z1, z2, *, sim_weight=25.0, var_weight=25.0, cov_weight=1.0):
    """VICReg between the two views; needs at least 2 rows (the variance is unbiased)."""
    b, _ = check_embeddings(dict(z1=z1, z2=z2))
    if b < 2:
        raise ValueError(f"vicreg_loss needs a batch of at least 2 rows, got {b}")
    weights = dict(sim_weight=check_weight("sim_weight", sim_weight),
                   var_weight=check_weight("var_weight", var_weight),
                   cov_weight=check_weight("cov_weight", cov_weight))
    with autocast_disabled(z1.device.type):
        return reference.vicreg_loss(z1, z2, **weights)


def barlow_twins_loss(z1, z2, *, off_diagonal_weight=5e-3, scale=0.1):
    """Barlow Twins between the two views (docs/losses.md, section 4)."""
    check_embeddings(dict(z1=z1, z2=z2))
    weights = dict(off_diagonal_weight=check_weight("off_diagonal_weight", off_diagonal_weight),
                   scale=check_weight("scale", scale))
    with autocast_disabled(z1.device.type):
        return reference.barlow_twins_loss(z1, z2, **weights)


registry.register_public_functions(globals())  # spec.function, without the registry importing this module
