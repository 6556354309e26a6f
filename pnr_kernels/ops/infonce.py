"""The fused multi-key InfoNCE op and the contrastive losses composed from it.

The op (docs/losses.md, "The central op"):

    lse[r, i] = LSE over key blocks k and keys j (j != i where exclude_diagonal[k]) of
                scales[r] * rows[r][i] . keys[k][j]

``rows`` is a list of R row sets, each (M, D); ``keys`` a list of key blocks, each (M_k, D); any
strides. The output is (R, M) in float32 (float64 for float64 inputs). Every row set sees every key
block, so one kernel can load each key tile once for all row sets (SimCLR-PNR's two terms share
Z and F this way). Its gradient, with ``g = grad_lse`` and ``p = exp(logit - lse)``:

    d rows[r][i] = scales[r] * g[r, i] * sum_{k, j} p[r, k, i, j] keys[k][j]
    d keys[k][j] = sum_r scales[r] * sum_i g[r, i] p[r, k, i, j] rows[r][i]

A backend provides an :class:`InfoNCEKernels` pair (forward, backward) that never materialises
anything of size rows x keys; :func:`define_infonce_op` wraps it into a ``torch.library`` custom op
with registered autograd (so it works under ``torch.compile``; eager calls take the equivalent
autograd.Function of ``_common.define_fused_op``), and the loss functions below add
the positives, which are O(M x D), in PyTorch. Inputs that do not require a gradient (the frozen
previous-model blocks) get no gradient work at all: the backward kernel is told which are needed.

Unit rows: the losses normalise their inputs row-wise (``reference.normalize``, in the compute
dtype, rounded back to the input dtype). A backend may also supply that as a fused kernel pair for
CPU tensors (``unit_rows_forward(x, huge, eps) -> y``, ``unit_rows_backward(grad, x, huge, eps) ->
dx``, with ``reference.HUGE`` and ``reference.NORMALIZE_EPS``: y = x' / max(||x'||, eps) with
x' = x / g, g = max |x| of the row where it exceeds huge, else 1; dx = (grad - [||x'|| >= eps]
(grad . y) y) / (max(||x'||, eps) g), y in the compute dtype); :func:`define_infonce_op` then
attaches it to the op as ``op.unit_rows`` (a custom op with autograd, like the op itself) and the
losses use it for CPU tensors instead of PyTorch's composition of the same (some twenty ATen calls
per forward + backward).

SimCLR-PNR and NT-Xent in one op: a backend may also supply the whole of either loss, for CPU
tensors of one process, as one op that records its own autograd node (``views_loss(z1, z2, pnr,
temperature, huge, eps)``, pnr ``[]`` or ``[p1, p2, f1, f2]``; the native backend's is C++,
csrc/infonce_views_cpu.cpp) with the composition's loss and gradients, bitwise, and the op its
node's backward calls under create_graph (``views_loss_backward``, given the first-order-only
refusal here). The composition below costs about a third of an NT-Xent step at B = 256 on a
2-core CPU outside the kernels (three Python autograd Functions, some twenty recorded ATen ops);
the losses call ``op.views_loss`` instead outside tracing and data parallelism.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import distributed
from .._autocast import autocast_disabled
from ..reference import HUGE, NORMALIZE_EPS, compute_dtype, normalize, queue_poison
from ._common import _must_trace, define_fused_op, first_order_only

# forward(rows, keys, exclude_diagonal, scales) -> lse (R, M)
ForwardKernel = Callable[[List[torch.Tensor], List[torch.Tensor], List[bool], List[float]], torch.Tensor]
# backward(grad_lse, lse, rows, keys, exclude_diagonal, scales, rows_need_grad, keys_need_grad)
#   -> the gradients of the rows that need one, then of the keys that need one, in input order,
#      each in its input's dtype and shape
BackwardKernel = Callable[..., List[torch.Tensor]]


@dataclass(frozen=True)
class CrossKernels:
    """Both directions of one rows-against-keys pair in one pass (see :func:`cross_lse_function`):
    ``forward(a, b, scale) -> lse`` (M + M'), ``backward(grad_lse, lse, a, b, scale, a_needs_grad,
    b_needs_grad)`` -> the gradients of those of a, b that need one, in that order; on tensors of
    ``device_types`` only."""
    forward: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    backward: Callable[..., List[torch.Tensor]]
    device_types: Tuple[str, ...]


@dataclass(frozen=True)
class InfoNCEKernels:
    forward: ForwardKernel
    backward: BackwardKernel
    cross: Optional[CrossKernels] = None  # optional: a backend without it runs the op once per direction
    # optional, CPU tensors only: the losses' row normalisation (see "Unit rows" above)
    unit_rows_forward: Optional[Callable[[torch.Tensor, float, float], torch.Tensor]] = None
    unit_rows_backward: Optional[Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]] = None
    # optional, CPU tensors of one process only: SimCLR-PNR / NT-Xent in one op and its node's
    # backward op (see "SimCLR-PNR and NT-Xent in one op" above)
    views_loss: Optional[Callable[..., torch.Tensor]] = None
    views_loss_backward: Optional[Callable[..., List[torch.Tensor]]] = None


def infonce_flops(row_sizes: Sequence[int], key_sizes: Sequence[int], dim: int,
                  rows_need_grad: Sequence[bool], keys_need_grad: Sequence[bool],
                  exclude_diagonal: Sequence[bool] = (), symmetric: Sequence[Tuple[int, int]] = ()) -> int:
    """The products one forward + backward of the op cannot avoid, in FLOPs (2 per multiply-add;
    the bench's work model, docs/benchmarks.md): per (row set r of M rows, key block k of M_k
    keys), each logit the op uses once (2 D) and one multiply-add row of D per gradient side that
    needs one, 2 D L (1 + [rows r need it] + [keys k need it]) with L = M M_k logits, less the
    min(M, M_k) diagonal ones where ``exclude_diagonal[k]`` (default: none excluded). A block in
    ``symmetric`` (r, k) is the row set itself (z against z: M = M_k, gradients on both sides, its
    diagonal excluded): each of its M (M - 1) / 2 pairs once, 6 D (the logit, and its gradient to
    both rows). Recomputing the logits in backward (a memory-lean kernel) is extra work this model
    does not credit: such a kernel shows a lower fraction of the machine's limit, never one above
    100 %. The positives and the normalisation, O(M D), are not counted. (SimCLR-PNR at N = 2B rows:
    17 N (N - 1) D; NT-Xent: 3 N (N - 1) D; the reference, computing every block in full, does 20 and
    6 N^2 D.)"""
    exclude = list(exclude_diagonal) or [False] * len(key_sizes)
    if len(exclude) != len(key_sizes):
        raise ValueError(f"exclude_diagonal has {len(exclude)} flags for {len(key_sizes)} key blocks")
    total = 0
    for r, (m, row_grad) in enumerate(zip(row_sizes, rows_need_grad)):
        for k, (mk, key_grad, excluded) in enumerate(zip(key_sizes, keys_need_grad, exclude)):
            if (r, k) in symmetric:
                if not (m == mk and row_grad and key_grad and excluded):
                    raise ValueError(f"block ({r}, {k}) is symmetric only for a row set that is its key block "
                                     f"with gradients on both sides and its diagonal excluded, got M={m}, "
                                     f"M_k={mk}, rows_need_grad={row_grad}, keys_need_grad={key_grad}, "
                                     f"exclude_diagonal={excluded}")
                total += 3 * m * (m - 1) * dim
            else:
                logits = m * mk - (min(m, mk) if excluded else 0)
                total += 2 * logits * dim * (1 + int(row_grad) + int(key_grad))
    return total


def define_infonce_op(backend: str, kernels: InfoNCEKernels):
    """Register ``pnr_kernels::infonce_lse_<backend>`` (and its backward op) and return the op,
    callable as ``op(rows, keys, exclude_diagonal, scales)`` (see ``_common.define_fused_op``)."""

    def forward(rows: List[torch.Tensor], keys: List[torch.Tensor], exclude_diagonal: List[bool],
                scales: List[float]) -> torch.Tensor:
        with autocast_disabled(rows[0].device.type):
            return kernels.forward(rows, keys, exclude_diagonal, scales)

    def forward_fake(rows, keys, exclude_diagonal, scales):
        return rows[0].new_empty((len(rows), rows[0].shape[0]), dtype=compute_dtype(rows[0].dtype))

    def backward(grad_lse: torch.Tensor, lse: torch.Tensor, rows: List[torch.Tensor],
                 keys: List[torch.Tensor], exclude_diagonal: List[bool], scales: List[float],
                 rows_need_grad: List[bool], keys_need_grad: List[bool]) -> List[torch.Tensor]:
        with autocast_disabled(grad_lse.device.type):
            return kernels.backward(grad_lse.contiguous(), lse, rows, keys, exclude_diagonal, scales,
                                    rows_need_grad, keys_need_grad)

    def backward_fake(grad_lse, lse, rows, keys, exclude_diagonal, scales, rows_need_grad, keys_need_grad):
        needed = [r for r, g in zip(rows, rows_need_grad) if g] + [k for k, g in zip(keys, keys_need_grad) if g]
        return [torch.empty_like(t) for t in needed]

    def setup_context(ctx, inputs, output):
        rows, keys, exclude_diagonal, scales = inputs
        ctx.save_for_backward(output, *rows, *keys)
        ctx.num_rows = len(rows)
        ctx.exclude_diagonal = list(exclude_diagonal)
        ctx.scales = list(scales)
        ctx.rows_need_grad = [r.requires_grad for r in rows]
        ctx.keys_need_grad = [k.requires_grad for k in keys]

    def formula(ctx, backward, grad_lse):
        lse, *tensors = ctx.saved_tensors
        rows, keys = tensors[:ctx.num_rows], tensors[ctx.num_rows:]
        grads = iter(backward(grad_lse, lse, rows, keys, ctx.exclude_diagonal, ctx.scales,
                              ctx.rows_need_grad, ctx.keys_need_grad))
        rows_grad = [next(grads) if need else None for need in ctx.rows_need_grad]
        keys_grad = [next(grads) if need else None for need in ctx.keys_need_grad]
        return rows_grad, keys_grad, None, None

    op = define_fused_op(f"pnr_kernels::infonce_lse_{backend}", backend, forward, forward_fake, backward,
                         backward_fake, setup_context, formula)
    op.cross = None if kernels.cross is None else _define_cross_op(backend, kernels.cross)
    if kernels.unit_rows_forward is not None:
        op.unit_rows = _define_unit_rows_op(backend, kernels)
    if kernels.views_loss is not None:
        first_order_only(kernels.views_loss_backward, backend)
        op.views_loss = functools.partial(_views_loss, kernels.views_loss)
    return op


def _views_loss(kernel, temperature, z1, z2, *pnr):
    """``op.views_loss(temperature, z1, z2[, p1, p2, f1, f2])``: NT-Xent, or SimCLR-PNR."""
    return kernel(z1, z2, list(pnr), temperature, HUGE, NORMALIZE_EPS)


def _define_cross_op(backend: str, kernels: CrossKernels):
    """``pnr_kernels::infonce_cross_lse_<backend>``: ``op(a, b, scale)`` -> lse (M + M'), with
    S = scale a b^T, ``lse[:M]`` = LSE_j S[i, j] and ``lse[M:]`` = LSE_i S[i, j] (the op of a against
    b and of b against a, from one S). Its gradient, with W[i, j] = g[i] exp(S[i, j] - lse[i]) +
    g[M + j] exp(S[i, j] - lse[M + j]): d a = scale W b, d b = scale W^T a."""

    def forward(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        with autocast_disabled(a.device.type):
            return kernels.forward(a, b, scale)

    def forward_fake(a, b, scale):
        return a.new_empty((a.shape[0] + b.shape[0],), dtype=compute_dtype(a.dtype))

    def backward(grad_lse: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                 a_needs_grad: bool, b_needs_grad: bool) -> List[torch.Tensor]:
        with autocast_disabled(grad_lse.device.type):
            return kernels.backward(grad_lse.contiguous(), lse, a, b, scale, a_needs_grad, b_needs_grad)

    def backward_fake(grad_lse, lse, a, b, scale, a_needs_grad, b_needs_grad):
        return [torch.empty_like(t) for t, need in ((a, a_needs_grad), (b, b_needs_grad)) if need]

    def setup_context(ctx, inputs, output):
        a, b, scale = inputs
        ctx.save_for_backward(output, a, b)
        ctx.scale = scale
        ctx.needs = (a.requires_grad, b.requires_grad)

    def formula(ctx, backward, grad_lse):
        lse, a, b = ctx.saved_tensors
        grads = iter(backward(grad_lse, lse, a, b, ctx.scale, *ctx.needs))
        return tuple(next(grads) if need else None for need in ctx.needs) + (None,)

    op = define_fused_op(f"pnr_kernels::infonce_cross_lse_{backend}", backend, forward, forward_fake, backward,
                         backward_fake, setup_context, formula)
    op.device_types = kernels.device_types
    return op


def cross_lse_function(op, device: torch.device):
    """The cross-pair op of the InfoNCE op ``op`` for tensors on ``device``, or None where its
    backend has none there (then the op runs once per direction)."""
    cross = getattr(op, "cross", None)
    return cross if cross is not None and device.type in cross.device_types else None


def _define_unit_rows_op(backend: str, kernels: InfoNCEKernels):
    """``pnr_kernels::unit_rows_<backend>``: the fused row normalisation (see "Unit rows")."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return kernels.unit_rows_forward(x, HUGE, NORMALIZE_EPS)

    def forward_fake(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return kernels.unit_rows_backward(grad, x, HUGE, NORMALIZE_EPS)

    def backward_fake(grad, x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def formula(ctx, backward, grad):
        return (backward(grad, ctx.saved_tensors[0]),)

    return define_fused_op(f"pnr_kernels::unit_rows_{backend}", backend, forward, forward_fake, backward,
                           backward_fake, setup_context, formula)


def _fused_views(op, inputs, gather_distributed, process_group):
    """``op.views_loss`` (see "SimCLR-PNR and NT-Xent in one op" in the module docstring) where it
    applies to these inputs: CPU matrices of one process, outside tracing; else None (compose the
    ops)."""
    views = getattr(op, "views_loss", None)
    if views is None or inputs[0].device.type != "cpu" or inputs[0].dim() != 2 or _must_trace(inputs):
        return None
    if distributed.gathers(gather_distributed, process_group):
        return None
    return views


# ---------------------------------------------------------------------------------------------
# Contrastive losses over the op. They mirror pnr_kernels.reference; the op replaces the
# materialised log-sum-exp, everything else is O(M x D).
# ---------------------------------------------------------------------------------------------

def _unit_rows(*xs: torch.Tensor, op=None) -> torch.Tensor:
    """Stack, normalise in the compute dtype, and round back to the input dtype, so that the
    kernels read the same values the positives below are computed from; with ``op.unit_rows``
    (see "Unit rows" in the module docstring) fused for CPU tensors."""
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    fused = getattr(op, "unit_rows", None)
    if fused is not None and x.device.type == "cpu" and x.dim() == 2:
        return fused(x)
    return normalize(x.to(compute_dtype(x.dtype))).to(x.dtype)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(a.dtype)
    return (a.to(dtype) * b.to(dtype)).sum(1)


# ---------------------------------------------------------------------------------------------
# Key blocks with a diagonal offset, and the data-parallel gather (docs/losses.md, "Data-parallel").
# No kernel knows about either: a block whose self-exclusion starts at key ``offset`` is passed as
# two views of it, so every backend gets both for free.
# ---------------------------------------------------------------------------------------------

def offset_key_blocks(key: torch.Tensor, exclude: bool, offset: int):
    """``[(block, exclude_diagonal), ...]`` expressing "row i drops key ``offset + i`` of ``key``"
    (where that key exists) with the op's plain diagonal flag: ``key[:offset]`` with nothing
    dropped and ``key[offset:]`` with its diagonal dropped (row i drops its key i, i.e. key
    ``offset + i`` of the whole block). Views, no copy: the op's gradients of the two parts flow
    back through the slicing into one gradient of ``key``. Empty parts are left out."""
    if not exclude or offset == 0:
        return [(key, exclude)]
    lo = min(offset, key.shape[0])
    parts = [(key[:lo], False), (key[lo:], True)]
    return [(k, e) for k, e in parts if k.shape[0] > 0]


def multi_key_lse(op, rows, keys, exclude_diagonal, scales, diagonal_offsets=None, *,
                  gather_distributed=False, process_group=None):
    """The op with per-block diagonal offsets and the data-parallel gather (the semantics of
    ``reference.infonce_lse``): under ``gather_distributed`` with W > 1 ranks every key block is
    all-gathered in rank order (trainable blocks with autograd, the backward summing every rank's
    key gradients into the owner's block) and block k's offset becomes ``rank * M_k + offset``."""
    offsets = list(diagonal_offsets) if diagonal_offsets is not None else [0] * len(keys)
    keys, offsets = distributed.gather_key_blocks(rows, keys, offsets, gather_distributed, process_group)
    return _with_offsets(op, rows, keys, exclude_diagonal, scales, offsets)


def _with_offsets(op, rows, keys, exclude_diagonal, scales, offsets):
    """The op with block k's self-exclusion starting at key ``offsets[k]`` (see offset_key_blocks)."""
    blocks = [part for key, exclude, offset in zip(keys, exclude_diagonal, offsets)
              for part in offset_key_blocks(key, exclude, offset)]
    return op(list(rows), [k for k, _ in blocks], [e for _, e in blocks], list(scales))


def _excluding(op, rows, keys, scales, offset):
    """The op with every key block's self-exclusion at global index ``offset + i``."""
    return _with_offsets(op, rows, keys, [True] * len(keys), scales, [offset] * len(keys))


# ---------------------------------------------------------------------------------------------
# Contrastive losses over the op. They mirror pnr_kernels.reference; the op replaces the
# materialised log-sum-exp, everything else is O(M x D).
# ---------------------------------------------------------------------------------------------

def _views(op, z1, z2):
    """The unit rows of both views, u1 and u2, and z = [u1; u2]. The positive of row i of z is
    row i + B (mod 2B), and each pair's dot appears twice in a mean over the 2B rows: that mean is
    ``_row_dot(u1, u2).mean()``, without rolling z (a copy of it, and another in backward)."""
    u1, u2 = _unit_rows(z1, op=op), _unit_rows(z2, op=op)
    return u1, u2, torch.cat([u1, u2])


def simclr_pnr_loss(op, z1, z2, p1, p2, f1, f2, *, temperature, gather_distributed=False, process_group=None):
    views = _fused_views(op, (z1, z2, p1, p2, f1, f2), gather_distributed, process_group)
    if views is not None:
        return views(temperature, z1, z2, p1, p2, f1, f2)
    b, t = z1.shape[0], temperature
    u1, u2, z = _views(op, z1, z2)
    p, f = _unit_rows(p1, p2, op=op), _unit_rows(f1, f2, op=op)
    keys, offset = distributed.global_keys(gather_distributed, process_group, 2 * b, z.device)
    lse = _excluding(op, [z, p], [keys(z), keys(f)], [1.0 / t, 1.0 / t], offset)
    main = lse[0].mean() - _row_dot(u1, u2).mean() / t
    reg = lse[1] - _row_dot(p, f) / t
    return (main + reg.mean()).to(z1.dtype)


def nt_xent_loss(op, z1, z2, *, temperature, gather_distributed=False, process_group=None):
    views = _fused_views(op, (z1, z2), gather_distributed, process_group)
    if views is not None:
        return views(temperature, z1, z2)
    b, t = z1.shape[0], temperature
    u1, u2, z = _views(op, z1, z2)
    keys, offset = distributed.global_keys(gather_distributed, process_group, 2 * b, z.device)
    lse = _excluding(op, [z], [keys(z)], [1.0 / t], offset)
    return (lse[0].mean() - _row_dot(u1, u2).mean() / t).to(z1.dtype)


def _queue_ce(lse_queue, anchor, positive, t):
    """``mean_i(-a_i.pos_i/t + LSE({a_i.pos_i/t} U queue logits))`` from the queue's LSE."""
    pos = _row_dot(anchor, positive) / t
    return (torch.logaddexp(lse_queue, pos) - pos).mean()


def moco_pnr_loss(op, q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue, *,
                  temperature, distill_temperature):
    t, td = temperature, distill_temperature
    q1, q2, k1, k2, p1, p2, f1, f2 = (_unit_rows(x, op=op) for x in (q1, q2, k1, k2, p1, p2, f1, f2))
    total = 0.0
    # view v's queries meet the queues of view v' = 1 - v: (q1, k2, p1, f1, Q1), (q2, k1, p2, f2, Q0)
    for q, k, p, f, v in ((q1, k2, p1, f1, 1), (q2, k1, p2, f2, 0)):
        lse = op([q, p], [key_queue[v], prev_queue[v]], [False, False], [1.0 / t, 1.0 / td])
        total = total + _queue_ce(lse[0], q, k, t) + _queue_ce(lse[1], p, f, td)
    return (total / 2 + queue_poison(key_queue, prev_queue)).to(q1.dtype)


def moco_loss(op, q1, q2, k1, k2, key_queue, *, temperature):
    t = temperature
    q1, q2, k1, k2 = (_unit_rows(x, op=op) for x in (q1, q2, k1, k2))
    total = 0.0
    for q, k, v in ((q1, k2, 1), (q2, k1, 0)):
        total = total + _queue_ce(op([q], [key_queue[v]], [False], [1.0 / t])[0], q, k, t)
    return (total / 2 + queue_poison(key_queue)).to(q1.dtype)


def cassle_simclr_regularizer(op, p1, p2, f1, f2, *, temperature, gather_distributed=False, process_group=None):
    t = temperature
    p, f = _unit_rows(p1, p2, op=op), _unit_rows(f1, f2, op=op)
    keys, _ = distributed.global_keys(gather_distributed, process_group, p.shape[0], p.device)
    pos = _row_dot(p, f) / t
    global_f, cross = keys(f), cross_lse_function(op, p.device)
    if global_f is f and cross is not None:  # one rank: F P^T is P F^T transposed, one pass gives both
        lse = cross(p, f, 1.0 / t)
        d_pf, d_fp = lse[:p.shape[0]] - pos, lse[p.shape[0]:] - pos
    else:
        d_pf = op([p], [global_f], [False], [1.0 / t])[0] - pos
        d_fp = op([f], [keys(p)], [False], [1.0 / t])[0] - pos
    return ((d_pf.mean() + d_fp.mean()) / 2).to(p1.dtype)
