"""Collectives with correct gradients, used where a loss spans data-parallel ranks.

Everything here is torch.distributed (gloo on CPU, nccl on GPU); nothing is a home-made transport.

* :func:`gather_rows` all-gathers a (M, ...) block of every rank into (W * M, ...), in rank
  order. With ``differentiable=True`` its backward is a reduce-scatter with SUM: the gradient
  that every rank computed for key ``j`` is summed and handed to the key's owner. That is what
  makes DDP's averaging of parameter gradients equal to the gradient of the mean of the ranks'
  losses, i.e. of the single-process loss on the concatenated global batch (docs/losses.md,
  "Data-parallel"). A gather whose backward keeps only the local slice of the gradient (lightly's
  ``GatherLayer`` until 2024, lightly-ai/lightly#1528, copied by many repositories) loses every
  other rank's contribution to the local keys. torch.distributed.nn.functional.all_gather sums
  correctly too, but is deprecated and on gloo runs one scatter per rank.
* :func:`data_parallel` decides whether a loss gathers (``gather_distributed`` on, torch.distributed
  initialised, more than one rank in the group) and checks that every rank has the same local
  batch size (one tiny all-gather of the sizes), so that a mismatch is a clear error on every
  rank instead of a hang or garbage.
* :func:`all_reduce_mean` averages over ranks (Barlow's cross-correlation).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

# torch >= 2.13 renames the tensor collectives (the old names warn); older torch has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in ``group`` (the default group when None), 1 when torch.distributed is not
    initialised."""
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group``, 0 when torch.distributed is not initialised."""
    return dist.get_rank(group) if is_initialized() else 0


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks, differentiable (the gradient is all-reduced too, as the sum
    rule requires); identity on a single process."""
    n = world_size()
    if n == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x) / n


def gathers(gather_distributed: bool, process_group=None) -> bool:
    """Whether a loss with these options is data-parallel (``gather_distributed`` and W > 1 in
    ``process_group``; also True for a process_group without torch.distributed, which
    :func:`data_parallel` refuses), found without a collective: :func:`data_parallel`'s decision."""
    if not gather_distributed:
        return False
    return world_size(process_group) != 1 if is_initialized() else process_group is not None


class Gather(NamedTuple):
    """Where this rank's rows sit in the global batch: ``rank`` and ``world`` in ``group``."""
    rank: int
    world: int
    group: object

    def offset(self, local_rows: int) -> int:
        """Global index of this rank's first row when every rank holds ``local_rows`` rows."""
        return self.rank * local_rows

    def rows(self, x: torch.Tensor, *, differentiable: bool) -> torch.Tensor:
        return gather_rows(x, self.group, differentiable=differentiable)


def data_parallel(gather_distributed: bool, process_group, local_sizes: Union[int, Mapping[str, int]],
                  device) -> Optional[Gather]:
    """A :class:`Gather` when a loss must gather its keys (``gather_distributed`` and W > 1 in
    ``process_group``), else None (the single-process loss).

    ``local_sizes``: this rank's number of rows (an int: the stacked rows of a loss), or a
    mapping name -> rows for several blocks. One all-gather of the sizes checks that every rank
    has the same; else ValueError naming the sizes of every rank, raised on every rank (so that
    none of them waits in a later collective)."""
    if not gathers(gather_distributed, process_group):
        return None
    if not is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    world, me = dist.get_world_size(process_group), dist.get_rank(process_group)
    named = {"stacked rows (2 x batch)": local_sizes} if isinstance(local_sizes, int) else dict(local_sizes)
    local = torch.tensor(list(named.values()), dtype=torch.int64, device=device)
    sizes = torch.empty(world * len(named), dtype=torch.int64, device=device)
    _all_gather_single(sizes, local, group=process_group)
    sizes = sizes.view(world, len(named)).tolist()
    for column, name in enumerate(named):
        per_rank = [row[column] for row in sizes]
        if any(s != per_rank[0] for s in per_rank):
            listed = ", ".join(f"rank {r}: {s}" for r, s in enumerate(per_rank))
            raise ValueError(
                f"gather_distributed needs the same local batch size on every rank, but the {name} have "
                f"{listed} (this is rank {me}). Drop the last incomplete batch (DataLoader(drop_last=True) "
                "with a DistributedSampler) or pad it on every rank")
    return Gather(me, world, process_group)


def global_keys(gather_distributed: bool, process_group, local_rows: int, device):
    """How a loss over its own batch sees its keys (docs/losses.md, "Data-parallel"): a function
    turning a local key block into the global one (every rank's block in rank order; with
    autograd for blocks that require a gradient) and the global index of this rank's first row.
    The identity and 0 when there is no gather (off, not initialised, or one rank)."""
    gather = data_parallel(gather_distributed, process_group, local_rows, device)
    if gather is None:
        return (lambda x: x), 0
    return (lambda x: gather.rows(x, differentiable=x.requires_grad)), gather.offset(local_rows)


def gather_key_blocks(rows, keys, diagonal_offsets, gather_distributed: bool, process_group):
    """The public op's key blocks and diagonal offsets under data parallelism: with a gather, every
    block all-gathered (autograd for those that require a gradient) and block k's offset moved to
    ``rank * M_k + diagonal_offsets[k]``; else unchanged. Checks that the rows and every block have
    the same size on every rank."""
    if gather_distributed:
        sizes = {"rows": rows[0].shape[0], **{f"keys[{k}]": key.shape[0] for k, key in enumerate(keys)}}
        gather = data_parallel(True, process_group, sizes, rows[0].device)
        if gather is not None:
            diagonal_offsets = [gather.offset(key.shape[0]) + o for key, o in zip(keys, diagonal_offsets)]
            keys = [gather.rows(key, differentiable=key.requires_grad) for key in keys]
    return list(keys), list(diagonal_offsets)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward: reduce-scatter (SUM) of the gathered gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((ctx.world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.world,) + tuple(grad.shape[1:]))
        _reduce_scatter_single(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_rows(x: torch.Tensor, group=None, *, differentiable: bool = True) -> torch.Tensor:
    """(W * M, ...) = every rank's ``x`` (each (M, ...), the same M) in rank order.

    ``differentiable``: the result carries autograd back to ``x`` (when ``x`` requires a
    gradient), the backward being a reduce-scatter with SUM; else it is gathered without autograd
    (frozen blocks). Every rank must call it, in the same order."""
    if differentiable and x.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(x, group)
    with torch.no_grad():
        x = x.detach().contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out
