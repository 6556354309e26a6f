"""Drop-in functions for users of the PNR authors' training code (github.com/csm9493/PNR, built
on CaSSLe and solo-learn): the same names, argument order and defaults as the functions their
distillers import, each a thin call into this library's public losses. A distiller switches by
changing its import line, e.g.

    from cassle.losses.pnr import simclr_moco_loss_func     # before
    from pnr_kernels.compat import simclr_moco_loss_func    # after

docs/migrating.md is the guide (argument mapping, conventions, what moving to torch >= 2.4
takes); docs/losses.md states the mathematics. Paths below are files of the upstream repository.

Conventions that hold for every function here:

- Inputs are normalised inside (``n(x) = x / max(||x||, 1e-12)``), as this library always does.
  Where the upstream function expects unit rows and the distiller normalises before calling
  (MoCo-PNR), normalising again changes neither the value nor the gradient with respect to the
  tensors the distiller normalised (``n`` is idempotent and its Jacobian at a unit row is the
  projection that ``F.normalize``'s own Jacobian already applies). Queues are used as given
  (they hold unit rows), as upstream.
- The arguments the upstream code treats as frozen (the previous model's outputs, the momentum
  keys, the queues, the second argument of ``byol_loss_func`` / ``simsiam_loss_func``) receive
  no gradient here either; where upstream detaches nothing but its distillers only ever pass a
  frozen tensor (``invariance_loss``), a second argument that requires a gradient is refused
  rather than silently detached.
- ``return_terms=True`` returns ``(total, terms)``, ``terms`` a dict of 0-dim tensors named as
  the authors log them (the distiller-level functions) or as the upstream function names its
  parts (``loss1``, ``loss2``). The terms carry autograd like the total.
- ``backend``: as in :mod:`pnr_kernels.losses` ("auto" or a backend name).
"""
from __future__ import annotations

import torch

from . import distributed, losses
from ._autocast import autocast_disabled
from ._validation import check_bool, check_embeddings, check_same_dtype_device
from .ops.infonce import _queue_ce, _row_dot, _unit_rows
from .queue import PNRQueue
from .reference import queue_poison

__all__ = [
    "PreviousModelQueue",
    "barlow_loss_func",
    "barlow_pnr_distill_loss",
    "byol_loss_func",
    "byol_pnr_distill_loss",
    "invariance_loss",
    "moco_pnr_loss_func",
    "simclr_distill_loss_func",
    "simclr_moco_loss_func",
    "simsiam_loss_func",
    "vicreg_pnr_distill_loss",
]


def _check_terms(return_terms) -> bool:
    return check_bool("return_terms", return_terms)


# ---------------------------------------------------------------------------------------------
# Contrastive: SimCLR-PNR, MoCo-PNR, CaSSLe's SimCLR term
# ---------------------------------------------------------------------------------------------

def simclr_moco_loss_func(p1, p2, z1, z2, f1, f2, temperature=0.1, labels=None, *, return_terms=False,
                          backend="auto"):
    """SimCLR-PNR, upstream ``cassle/losses/pnr.py::simclr_moco_loss_func`` (called by
    ``cassle/distillers/simclr_pnr.py``), with its argument order ``(p1, p2, z1, z2, f1, f2)``:
    p* the predictor outputs, z* the current projections, f* the frozen previous model's.

    With ``Z = n([z1; z2])``, ``P = n([p1; p2])``, ``F = n([f1; f2])`` (N = 2B rows), ``i'`` the
    other view of row i and ``t = temperature``:

        loss1 = mean_i( -Z_i.Z_i'/t + LSE({Z_i.Z_j/t : j != i} U {Z_i.F_j/t : j != i}) )
        loss2 = mean_i( -P_i.F_i /t + LSE({P_i.F_j/t : j != i} U {P_i.Z_j/t : j != i}) )
        loss  = loss1 + loss2

    i.e. ``pnr_kernels.simclr_pnr_loss(z1, z2, p1, p2, f1, f2, temperature=temperature)``
    (docs/losses.md section 1). One temperature serves both terms; the upstream default is 0.1,
    and the distiller passes its ``distill_temperature`` (command-line default 0.2). The distiller
    averages this call with the one with the views swapped; both give the same value.

    ``labels`` is accepted for the signature's sake; upstream ignores it, so anything but None is
    refused here rather than ignored. ``return_terms``: also ``{"loss1": ..., "loss2": ...}``
    (upstream's names of the main and regularising terms), from the same single fused pass.
    """
    if labels is not None:
        raise ValueError("labels: the upstream simclr_moco_loss_func ignores its labels argument; "
                         "pass None (supervised contrastive PNR is not implemented)")
    if not _check_terms(return_terms):
        return losses.simclr_pnr_loss(z1, z2, p1, p2, f1, f2, temperature=temperature, backend=backend)
    b, _ = check_embeddings(dict(p1=p1, p2=p2, z1=z1, z2=z2, f1=f1, f2=f2))
    with autocast_disabled(z1.device.type):
        z, p, f = _unit_rows(z1, z2), _unit_rows(p1, p2), _unit_rows(f1.detach(), f2.detach())
        # one pass of the central op: rows [Z, P] against keys [Z, F], each row's own key dropped
        lse = losses.multi_key_infonce([z, p], [z, f], temperature=temperature, exclude_diagonal=True,
                                       backend=backend)
        loss1 = (lse[0] - _row_dot(z, z.roll(b, dims=0)) / temperature).mean().to(z1.dtype)
        loss2 = (lse[1] - _row_dot(p, f) / temperature).mean().to(z1.dtype)
    return loss1 + loss2, {"loss1": loss1, "loss2": loss2}


def _check_queue_dk(name, queue, *, dim, like_name, like):
    """A (D, K) queue of unit columns, upstream's layout (one view of its (2, D, K) buffer)."""
    if not isinstance(queue, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (dim, K), got {type(queue).__name__}")
    if queue.dim() != 2 or queue.shape[0] != dim or queue.shape[1] == 0:
        raise ValueError(f"{name} must be (dim, K) with dim = {dim} (the embeddings' width) and K >= 1, got "
                         f"shape {tuple(queue.shape)}; pass one view of the (2, D, K) buffer, e.g. queue[1]")
    check_same_dtype_device(like_name, like, name, queue)


def moco_pnr_loss_func(query1, key1, queue1, distill1, query2, key2, queue2, distill2, temperature=0.1,
                       distill_temperature=0.1, loss_alpha=0.5, *, return_terms=False, backend="auto"):
    """One direction of MoCo-PNR, upstream ``cassle/losses/pnr.py::moco_pnr_loss_func`` (called
    twice, crossed, by ``cassle/distillers/mocov2plus_pnr.py``), with its argument order and its
    (D, K) queues: ``queue1`` one view of the key queue, ``queue2`` the same view of the
    previous-model queue. With ``Q = [queue1, queue2]`` (its columns the negatives), ``a = n(.)``
    of every embedding, ``t = temperature``, ``td = distill_temperature`` and

        ce(a, pos, Q, t) = mean_i( -a_i.pos_i/t + LSE({a_i.pos_i/t} U {a_i.q/t : q in Q}) )

    the value is ``loss1 + loss2`` with

        loss1 = ce(query1, key1, Q, t)        (the MoCo term, extra negatives from the old model)
        loss2 = ce(distill1, query2, Q, td)   (the predictor against the frozen output)

    As upstream, ``query2`` is the positive of ``distill1`` (the distiller passes the frozen output
    there), and ``key2``, ``distill2`` and ``loss_alpha`` are not used. The distiller's

        (moco_pnr_loss_func(z1, k2, queue[1], p1, f1, k1, queue2[1], p2, t, td, a)
         + moco_pnr_loss_func(z2, k1, queue2[0], p2, f2, k2, queue[0], p1, t, td, a)) / 2

    equals ``pnr_kernels.moco_pnr_loss(z1, z2, k1, k2, p1, p2, f1, f2, queue.transpose(1, 2),
    queue2.transpose(1, 2), temperature=t, distill_temperature=td)`` (docs/losses.md section 3),
    which computes both directions in one call. key1 and query2 (momentum key, frozen output) and
    the queues get no gradient. One pass of the central op (rows [query1, distill1] against the
    two queues); ``return_terms`` adds ``{"loss1": ..., "loss2": ...}`` from it.
    """
    _, dim = check_embeddings(dict(query1=query1, key1=key1, distill1=distill1, query2=query2))
    for name, queue in (("queue1", queue1), ("queue2", queue2)):
        _check_queue_dk(name, queue, dim=dim, like_name="query1", like=query1)
    return_terms = _check_terms(return_terms)
    with autocast_disabled(query1.device.type):
        q, p, k, f = (_unit_rows(x) for x in (query1, distill1, key1.detach(), query2.detach()))
        keys = [queue1.detach().T, queue2.detach().T]  # (K, D) views of the (D, K) queues
        lse = losses.multi_key_infonce([q, p], keys, temperature=[temperature, distill_temperature],
                                       backend=backend)
        poison = queue_poison(queue1, queue2)
        loss1 = (_queue_ce(lse[0], q, k, temperature) + poison).to(query1.dtype)
        loss2 = (_queue_ce(lse[1], p, f, distill_temperature) + poison).to(query1.dtype)
    total = loss1 + loss2
    return (total, {"loss1": loss1, "loss2": loss2}) if return_terms else total


def simclr_distill_loss_func(p1, p2, z1, z2, temperature=0.1, *, backend="auto"):
    """One direction of CaSSLe's SimCLR distillation term, upstream
    ``cassle/losses/simclr.py::simclr_distill_loss_func`` (called twice by
    ``cassle/distillers/contrastive.py``, once with the frozen outputs first). With
    ``A = n([p1; p2])``, ``C = n([z1; z2])`` and ``t = temperature`` (upstream default 0.1; the
    distiller passes ``distill_temperature``, default 0.2):

        d(A, C) = mean_i( -A_i.C_i/t + LSE({A_i.C_j/t : all j}) )

    nothing masked (upstream's logit mask is all ones). Both pairs of arguments receive gradients
    when they require one (the distiller's second call puts the trainable p as keys). The
    distiller's average of both calls is ``pnr_kernels.cassle_simclr_regularizer(p1, p2, f1, f2,
    temperature=t)`` (docs/losses.md section 5), one call.
    """
    check_embeddings(dict(p1=p1, p2=p2, z1=z1, z2=z2))
    with autocast_disabled(p1.device.type):
        a, c = _unit_rows(p1, p2), _unit_rows(z1, z2)
        lse = losses.multi_key_infonce([a], [c], temperature=temperature, backend=backend)[0]
        return (lse - _row_dot(a, c) / temperature).mean().to(p1.dtype)


# ---------------------------------------------------------------------------------------------
# Non-contrastive pair terms (the upstream functions the BYOL/VICReg/Barlow-PNR distillers call)
# ---------------------------------------------------------------------------------------------

def byol_loss_func(p, z, simplified=True, *, backend="auto"):
    """``2 - 2 mean_i cos(p_i, z_i)``, ``z`` frozen: upstream ``cassle/losses/byol.py::
    byol_loss_func`` (BYOL-PNR's positive and negative terms). ``simplified`` picks upstream's
    cosine (True) or normalised dot product (False); the two agree up to the norms' clamping
    (1e-8 vs 1e-12), and this computes the cosine for both. A call of
    :func:`pnr_kernels.byol_pnr_regularizer` with ``negative_weight=0`` on the pair (p, z)."""
    check_bool("simplified", simplified)
    return losses.byol_pnr_regularizer(p, p, z, z, distill_weight=1.0, negative_weight=0.0, backend=backend)


def simsiam_loss_func(p, z, simplified=True, *, backend="auto"):
    """``-mean_i cos(p_i, z_i)``, ``z`` frozen: upstream ``cassle/losses/simsiam.py::
    simsiam_loss_func`` (Barlow-PNR's negative term); ``simplified`` as in
    :func:`byol_loss_func`, from whose value it is computed (``byol / 2 - 1``)."""
    return byol_loss_func(p, z, simplified, backend=backend) / 2 - 1


def invariance_loss(z1, z2, *, backend="auto"):
    """``mean((z1 - z2)^2)`` over all elements, upstream ``cassle/losses/vicreg.py::
    invariance_loss`` as VICReg-PNR's distiller calls it, with ``z2`` the frozen previous-model
    output: a ``z2`` that requires a gradient is refused (use :func:`pnr_kernels.vicreg_loss` for
    VICReg's own invariance term between two trainable views). A call of
    :func:`pnr_kernels.vicreg_pnr_regularizer` with ``negative_weight=0``."""
    if isinstance(z2, torch.Tensor) and z2.requires_grad and torch.is_grad_enabled():
        raise ValueError("z2 requires a gradient, but compat.invariance_loss treats it as the frozen target "
                         "(as the VICReg-PNR distiller uses it); detach it, or use pnr_kernels.vicreg_loss")
    return losses.vicreg_pnr_regularizer(z1, z1, z2, z2, distill_weight=1.0, negative_weight=0.0, backend=backend)


def _author_gradient_scale(loss: torch.Tensor, differentiable_all_reduce) -> torch.Tensor:
    """``loss`` itself, or with ``differentiable_all_reduce=False`` the same value with a gradient
    1/W as large (W ranks of the default group): the effect of the authors' in-place,
    non-differentiated ``dist.all_reduce`` of the cross-correlation (see barlow_loss_func)."""
    if check_bool("differentiable_all_reduce", differentiable_all_reduce):
        return loss
    world = distributed.world_size()
    if world == 1:
        return loss
    return loss.detach() + (loss - loss.detach()) / world


def barlow_loss_func(z1, z2, lamb=5e-3, scale_loss=0.025, *, differentiable_all_reduce=True):
    """Barlow Twins, upstream ``cassle/losses/barlow.py::barlow_loss_func`` (the method's loss and
    Barlow-PNR's positive term). Each column standardised with the batch mean and biased
    variance (``BatchNorm1d(affine=False)`` in training mode, eps 1e-5), ``C = z1^T z2 / N``
    averaged over the ranks under torch.distributed, and

        loss = scale_loss * ( sum_i (C_ii - 1)^2 + lamb * sum_{i != j} C_ij^2 )

    (``pnr_kernels.barlow_twins_loss(z1, z2, off_diagonal_weight=lamb, scale=scale_loss)``,
    docs/losses.md section 4). Both arguments receive gradients.

    differentiable_all_reduce: under W > 1 ranks the value is the same either way. True (the
    default, exact): the average of C is differentiated, so DDP's averaged gradient is the
    gradient of the loss. False: the authors' gradient, whose ``dist.all_reduce`` of C is not
    differentiated, so every rank's gradient of this loss is exactly 1/W of the exact one (their
    Barlow term weighs 1/W as much, against the unreduced terms, as its value says). No effect on
    one process."""
    loss = losses.barlow_twins_loss(z1, z2, off_diagonal_weight=lamb, scale=scale_loss)
    return _author_gradient_scale(loss, differentiable_all_reduce)


# ---------------------------------------------------------------------------------------------
# The BYOL/VICReg/Barlow-PNR distillers' added loss, in one fused call (two with the terms)
# ---------------------------------------------------------------------------------------------

def _pnr_distill(regularizer, p1, p2, frozen_z1, frozen_z2, distill_lamb, negative_lamb, names, return_terms,
                 backend, **options):
    """``distill_lamb * pos - negative_lamb * neg`` with ``pos = (pos(p1,f1) + pos(p2,f2)) / 2``,
    ``neg = (neg(p1,f2) + neg(p2,f1)) / 2``: one call of ``regularizer``, or with ``return_terms``
    two (weights (1, 0) and (0, -1)) whose weighted sum is the total."""
    if not _check_terms(return_terms):
        return regularizer(p1, p2, frozen_z1, frozen_z2, distill_weight=distill_lamb, negative_weight=negative_lamb,
                           backend=backend, **options)
    pos = regularizer(p1, p2, frozen_z1, frozen_z2, distill_weight=1.0, negative_weight=0.0, backend=backend,
                      **options)
    neg = regularizer(p1, p2, frozen_z1, frozen_z2, distill_weight=0.0, negative_weight=-1.0, backend=backend,
                      **options)
    return distill_lamb * pos - negative_lamb * neg, dict(zip(names, (pos, neg)))


def byol_pnr_distill_loss(p1, p2, frozen_z1, frozen_z2, *, distill_lamb=1.0, negative_lamb=1.0,
                          return_terms=False, backend="auto"):
    """What upstream ``cassle/distillers/byol_pnr.py`` adds to BYOL's loss (p* = its
    ``distill_predictor(z*)``): ``distill_lamb * positive - negative_lamb * negative`` with

        positive = (byol(p1, f1) + byol(p2, f2)) / 2,  negative = (byol(p1, f2) + byol(p2, f1)) / 2

    ``byol(p, f) = 2 - 2 mean cos(p, f)``; ``pnr_kernels.byol_pnr_regularizer`` with
    ``distill_weight=distill_lamb``, ``negative_weight=negative_lamb``. Defaults: the distiller's
    ``--distill_lamb`` (1) and BYOL's ``--negative_lamb`` (1; the authors' CIFAR-100 script uses
    0.5). ``return_terms``: also ``{"train_byol_pnr_positive_loss": positive,
    "train_byol_pnr_negative_loss": negative}`` (the authors' logging keys), at the cost of a
    second O(B D) pass."""
    return _pnr_distill(losses.byol_pnr_regularizer, p1, p2, frozen_z1, frozen_z2, distill_lamb, negative_lamb,
                        ("train_byol_pnr_positive_loss", "train_byol_pnr_negative_loss"), return_terms, backend)


def vicreg_pnr_distill_loss(p1, p2, frozen_z1, frozen_z2, *, distill_lamb=25.0, negative_lamb=23.0,
                            return_terms=False, backend="auto"):
    """What upstream ``cassle/distillers/vicreg_pnr.py`` adds to VICReg's loss:
    ``distill_lamb * distill - negative_lamb * negative`` with ``invariance_loss`` (the mean
    squared difference) in place of byol in :func:`byol_pnr_distill_loss`;
    ``pnr_kernels.vicreg_pnr_regularizer``. Defaults: ``--distill_lamb`` 25, VICReg's
    ``--negative_lamb`` 23. ``return_terms`` keys: ``train_predictive_distill_loss``,
    ``train_predictive_negative_loss`` (the authors' logging keys)."""
    return _pnr_distill(losses.vicreg_pnr_regularizer, p1, p2, frozen_z1, frozen_z2, distill_lamb, negative_lamb,
                        ("train_predictive_distill_loss", "train_predictive_negative_loss"), return_terms, backend)


def barlow_pnr_distill_loss(p1, p2, frozen_z1, frozen_z2, *, distill_lamb=1.0, negative_lamb=1.0,
                            distill_barlow_lamb=5e-3, distill_scale_loss=0.1, differentiable_all_reduce=True,
                            return_terms=False, backend="auto"):
    """What upstream ``cassle/distillers/barlow_pnr.py`` adds to Barlow Twins' loss:
    ``distill_lamb * distill - negative_lamb * negative`` with

        distill  = (barlow(p1, f1) + barlow(p2, f2)) / 2     (barlow_loss_func with lamb =
                   distill_barlow_lamb, scale_loss = distill_scale_loss)
        negative = (simsiam(p1, f2) + simsiam(p2, f1)) / 2    (simsiam(p, f) = -mean cos(p, f))

    ``pnr_kernels.barlow_pnr_regularizer`` (docs/losses.md section 4). Defaults: the distiller's
    ``--distill_lamb`` 1, ``--distill_barlow_lamb`` 5e-3, ``--distill_scale_loss`` 0.1, Barlow's
    ``--negative_lamb`` 1. ``differentiable_all_reduce=False`` gives the distill term the authors'
    gradient (1/W of the exact one under W ranks, see :func:`barlow_loss_func`); the negative
    term has no all-reduce. ``return_terms`` keys: ``train_decorrelative_distill_loss``,
    ``train_negative_loss`` (the authors' logging keys)."""
    options = dict(off_diagonal_weight=distill_barlow_lamb, scale=distill_scale_loss)
    names = ("train_decorrelative_distill_loss", "train_negative_loss")
    if check_bool("differentiable_all_reduce", differentiable_all_reduce) or distributed.world_size() == 1:
        return _pnr_distill(losses.barlow_pnr_regularizer, p1, p2, frozen_z1, frozen_z2, distill_lamb,
                            negative_lamb, names, return_terms, backend, **options)
    return_terms = _check_terms(return_terms)
    distill = _author_gradient_scale(losses.barlow_pnr_regularizer(
        p1, p2, frozen_z1, frozen_z2, distill_weight=1.0, negative_weight=0.0, backend=backend, **options), False)
    negative = losses.barlow_pnr_regularizer(p1, p2, frozen_z1, frozen_z2, distill_weight=0.0,
                                             negative_weight=-1.0, backend=backend, **options)
    total = distill_lamb * distill - negative_lamb * negative
    return (total, dict(zip(names, (distill, negative)))) if return_terms else total


# ---------------------------------------------------------------------------------------------
# The previous-model queue of MoCo-PNR, in the authors' buffer layout and names
# ---------------------------------------------------------------------------------------------

class PreviousModelQueue(PNRQueue):
    """The previous model's FIFO queue of MoCo-PNR alone, as upstream
    ``cassle/distillers/mocov2plus_pnr.py`` keeps it beside the method's own key queue: a
    ``(2, D, K)`` buffer of unit columns per view and a write pointer, saved and loaded under the
    authors' names ``queue2`` (float, ``(2, D, K)``) and ``queue2_ptr`` (int64, shape ``(1,)``),
    so ``state_dict()`` of a module holding this queue as ``m.prev`` has ``prev.queue2`` and
    ``prev.queue2_ptr``, and the two buffers of an authors' checkpoint load directly:

        queue.load_state_dict({name: ckpt["state_dict"][name] for name in ("queue2", "queue2_ptr")})

    A :class:`pnr_kernels.PNRQueue` with ``previous=False`` whose one queue holds the frozen
    outputs: :meth:`enqueue` ``(f1, f2)`` normalises, all-gathers under torch.distributed
    (``gather_distributed``, default True, as upstream gathers) and writes at the pointer,
    wrapping around (upstream asserts that the batch divides K; where it does, the two agree).
    ``queue2``: the (2, D, K) buffer, for :func:`moco_pnr_loss_func` (``queue2[v]``);
    ``prev_queue``: its (2, K, D) view, for :func:`pnr_kernels.moco_pnr_loss`. Enqueueing writes
    in place, so use (or clone, as upstream does) the queue before enqueueing.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None, seed: int = 0):
        super().__init__(size, dim, dtype=dtype, device=device, previous=False, seed=seed)

    @property
    def queue2(self) -> torch.Tensor:
        """(2, D, K): the frozen outputs per view, upstream's layout (the buffer itself)."""
        return self.key_storage

    @property
    def prev_queue(self) -> torch.Tensor:
        """(2, K, D): the same entries as rows, a view (what pnr_kernels.moco_pnr_loss takes)."""
        return self.key_storage.transpose(1, 2)

    @property
    def key_queue(self):
        raise RuntimeError("PreviousModelQueue holds the previous model's outputs only: use prev_queue (or "
                           "queue2); the momentum keys stay in the method's own queue")

    def enqueue(self, f1: torch.Tensor, f2: torch.Tensor, *, gather_distributed: bool = True,
                process_group=None) -> None:
        """Write ``n(f1), n(f2)`` (the previous model's outputs of the two views, every rank's
        under torch.distributed) at the pointer and advance it; no autograd."""
        _, dim = check_embeddings(dict(f1=f1, f2=f2))
        if dim != self.dim:
            raise ValueError(f"f1 has dim {dim}, the queue holds dim {self.dim}")
        if f1.device != self.key_storage.device:
            raise ValueError(f"f1 is on {f1.device}, the queue on {self.key_storage.device}")
        super().enqueue(f1, f2, gather_distributed=gather_distributed, process_group=process_group)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        storage, pointer = self.key_storage, self.pointer.reshape(1)
        destination[prefix + "queue2"] = storage if keep_vars else storage.detach()
        destination[prefix + "queue2_ptr"] = pointer if keep_vars else pointer.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = {prefix + "queue2": "queue2", prefix + "queue2_ptr": "queue2_ptr"}
        found = {short: state_dict[full] for full, short in names.items() if full in state_dict}
        missing_keys.extend(full for full in names if full not in state_dict)
        if strict:
            unexpected_keys.extend(key for key in state_dict if key.startswith(prefix) and key not in names
                                   and "." not in key[len(prefix):])
        queue, pointer = found.get("queue2"), found.get("queue2_ptr")
        if queue is not None and tuple(queue.shape) != tuple(self.key_storage.shape):
            error_msgs.append(f"{prefix}queue2 has shape {tuple(queue.shape)}, this queue holds (2, D, K) = "
                              f"{tuple(self.key_storage.shape)}")
            queue = None
        if pointer is not None:
            valid = pointer.numel() == 1 and not pointer.dtype.is_floating_point
            if not valid or not 0 <= int(pointer.reshape(-1)[0]) < self.size:
                error_msgs.append(f"{prefix}queue2_ptr must be one integer in [0, {self.size}), got {pointer!r}")
                pointer = None
        with torch.no_grad():
            if queue is not None:
                self.key_storage.copy_(queue)
            if pointer is not None:
                self.pointer.fill_(int(pointer.reshape(-1)[0]))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.key_storage.dtype}, buffers=queue2, queue2_ptr"
