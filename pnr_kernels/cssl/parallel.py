"""Data parallelism of pnr-cssl under torchrun (``torch.distributed.run``).

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`setup` reads them and initialises the default process group (gloo for
``--device cpu``, nccl for ``--device cuda``, the CUDA device set from LOCAL_RANK). Without them, or
with WORLD_SIZE=1, the run is the plain single-process one, unchanged.

What the trainer does with W > 1 ranks (docs/trainer.md, "Data-parallel training"):

* every rank draws the same seeded permutation of the task's images per epoch and takes its own
  slice of each global batch of W x --batch-size images (what DistributedSampler(drop_last=True)
  does, through the trainer's checkpointed generator); the augmentation generator is seeded per
  rank;
* the Learner is wrapped in DistributedDataParallel (gradients averaged); the contrastive losses
  run with ``gather_distributed=True``; MoCo's queues enqueue every rank's keys;
* rank 0 alone writes the checkpoint, metrics.json and the plot, logs, and evaluates; the others
  wait at a barrier;
* --resume: rank 0 reads the checkpoint and broadcasts it (no shared file system needed).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


TIMEOUT = datetime.timedelta(hours=1)
# With the authors' linear evaluation after the last task (100 epochs over every training image on
# rank 0, decode-bound on image folders) the others may wait for hours.
LONG_TIMEOUT = datetime.timedelta(hours=24)


@dataclass
class Parallel:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, make: Callable[[], Any]) -> Any:
        """``make()`` on rank 0, its result on every rank. An exception raised by ``make`` is
        broadcast too and raised on every rank, so that no rank waits for the others in vain."""
        if not self.enabled:
            return make()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except Exception as exc:  # re-raised below, on every rank
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def all_gather_object(self, value: Any) -> list:
        if not self.enabled:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a detached scalar over ranks (a copy)."""
        value = value.detach().clone()
        if self.enabled:
            dist.all_reduce(value)
            value /= self.world
        return value

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Every buffer of ``module`` (BatchNorm running statistics, queues) from rank 0."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def environment() -> Optional[dict]:
    """RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return dict(rank=rank, world=world, local_rank=local)


def setup(device: str, timeout: datetime.timedelta = TIMEOUT) -> Parallel:
    """Join the torchrun job, if there is one with more than one rank (see the module docstring);
    ``timeout``: of the process group's collectives."""
    env = environment()
    if env is None or env["world"] <= 1:
        return Parallel()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
        torch.cuda.set_device(env["local_rank"])
    initialized_here = False
    if not dist.is_initialized():
        # Rank 0 evaluates while the others wait in the next collective: a timeout of an hour
        # (not nccl's default 10 minutes) leaves room for a CIFAR linear probe.
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", timeout=timeout)
        initialized_here = True
    if dist.get_world_size() != env["world"] or dist.get_rank() != env["rank"]:
        raise RuntimeError("the initialised process group disagrees with RANK/WORLD_SIZE")
    return Parallel(rank=env["rank"], world=env["world"], local_rank=env["local_rank"],
                    initialized_here=initialized_here)


def teardown(parallel: Parallel, synchronise: bool = True) -> None:
    """End the process group that :func:`setup` started: with ``synchronise`` (every rank ends
    here alike: a finished or stopped run) after a barrier; without (an error on this rank) at once.
    The caller frees DistributedDataParallel first."""
    import gc

    gc.collect()
    if parallel.initialized_here and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()
