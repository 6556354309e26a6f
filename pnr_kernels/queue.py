"""The FIFO queues of MoCo and MoCo-PNR (docs/losses.md, section 3), data-parallel ready.

    queue = PNRQueue(size=16384, dim=128, device="cuda")
    loss = moco_pnr_loss(q1, q2, k1, k2, p1, p2, f1, f2, queue.key_queue, queue.prev_queue)
    loss.backward()
    queue.enqueue(k1, k2, f1, f2)   # after the step: every rank's keys, without autograd

The loss itself needs no gather (its negatives are the queue); the global batch enters through
the queue: under torch.distributed, :meth:`PNRQueue.enqueue` all-gathers the keys of every rank
(in rank order) before writing them, so every rank holds the same queue.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import distributed
from ._validation import check_bool, check_embeddings, check_process_group
from .reference import compute_dtype, normalize


class PNRQueue(nn.Module):
    """Two (2, K, D) FIFO queues of unit rows: ``key_queue[v]`` holds momentum keys of view v,
    ``prev_queue[v]`` the frozen previous model's outputs of view v (``previous=False``: the key
    queue only, for plain MoCo).

    Each queue is a transposed view of a contiguous (2, D, K) buffer (the layout the fused kernels
    read best; ``moco_pnr_loss`` takes any strides). The buffers and the write pointer are
    registered buffers, so ``state_dict()`` / ``load_state_dict()`` checkpoint them and ``.to()``
    moves them. They start as random unit rows drawn from a generator seeded with ``seed``, so every
    rank starts from the same queue without communicating.

    K need not be a multiple of the batch: a batch that runs past the end wraps around to the
    start. A batch (all ranks together, under data parallelism) larger than K is refused.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 previous: bool = True, seed: int = 0):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        generator = torch.Generator().manual_seed(seed)

        def unit_rows():
            x = torch.randn(2, dim, size, generator=generator, dtype=torch.float64)
            return (x / x.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)

        self.register_buffer("key_storage", unit_rows())
        self.register_buffer("prev_storage", unit_rows() if check_bool("previous", previous) else None)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64, device=device))

    @property
    def size(self) -> int:
        return self.key_storage.shape[2]

    @property
    def dim(self) -> int:
        return self.key_storage.shape[1]

    @property
    def key_queue(self) -> torch.Tensor:
        """(2, K, D): momentum keys per view (a view of the (2, D, K) buffer)."""
        return self.key_storage.transpose(1, 2)

    @property
    def prev_queue(self) -> Optional[torch.Tensor]:
        """(2, K, D): the previous model's outputs per view, or None with ``previous=False``."""
        return None if self.prev_storage is None else self.prev_storage.transpose(1, 2)

    @torch.no_grad()
    def enqueue(self, k1: torch.Tensor, k2: torch.Tensor, f1: Optional[torch.Tensor] = None,
                f2: Optional[torch.Tensor] = None, *, gather_distributed: bool = True,
                process_group=None) -> None:
        """Write the unit rows ``n(k1), n(k2)`` (and ``n(f1), n(f2)``) of this step at the pointer,
        oldest entries first out, and advance it. Raw embeddings are fine: they are normalised here,
        as the loss normalises its k and f. No autograd (inputs are detached).

        gather_distributed (default True; a no-op when torch.distributed is not initialised or the
        group has one rank): enqueue every rank's rows, all-gathered in rank order in
        ``process_group``, so that all ranks keep identical queues. Every rank must call it with the
        same batch size (else ValueError naming the sizes)."""
        gather_distributed = check_bool("gather_distributed", gather_distributed)
        process_group = check_process_group("process_group", process_group)
        has_prev = self.prev_storage is not None
        named = dict(k1=k1, k2=k2, **(dict(f1=f1, f2=f2) if has_prev else {}))
        if not has_prev and (f1 is not None or f2 is not None):
            raise ValueError("this queue was built with previous=False: pass k1, k2 only")
        if has_prev and (f1 is None or f2 is None):
            raise ValueError("this queue holds previous-model outputs: pass f1 and f2 too")
        _, dim = check_embeddings(named)
        if dim != self.dim:
            raise ValueError(f"k1 has dim {dim}, the queue holds dim {self.dim}")
        if k1.device != self.key_storage.device:
            raise ValueError(f"k1 is on {k1.device}, the queue on {self.key_storage.device}")
        rows = [normalize(x.detach().to(compute_dtype(x.dtype))) for x in named.values()]
        gather = distributed.data_parallel(gather_distributed, process_group, {"k1": rows[0].shape[0]},
                                           rows[0].device)
        if gather is not None:
            rows = [gather.rows(x, differentiable=False) for x in rows]
        n, size = rows[0].shape[0], self.size
        if n > size:
            raise ValueError(f"a step enqueues {n} rows per view (all ranks), more than the queue size {size}")
        start = int(self.pointer)
        first = min(n, size - start)  # rows written before wrapping around
        storages = [self.key_storage] * 2 + ([self.prev_storage] * 2 if has_prev else [])
        for (storage, view), x in zip(zip(storages, (0, 1, 0, 1)), rows):
            x = x.to(storage.dtype).T  # (D, n)
            storage[view, :, start:start + first] = x[:, :first]
            storage[view, :, :n - first] = x[:, first:]
        self.pointer.fill_((start + n) % size)

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, dtype={self.key_storage.dtype}, "
                f"previous={self.prev_storage is not None}")
