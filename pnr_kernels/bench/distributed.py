"""``pnr-bench --world-size W``: what the data-parallel gather of a contrastive loss costs.

    pnr-bench --world-size 2 [--loss simclr_pnr] [--backend native] [--batch 256] [--dim 128]
              [--dtype float32] [--repeats 20] [--threads 1] [--json PATH]

W processes on this machine's CPU, joined by torch.distributed over gloo (nccl with ``--device
cuda``, one GPU per rank), each holding ``--batch`` rows per view. One step is the loss's forward
and backward on the rank's embeddings (leaves requiring a gradient, the frozen ones not). Rows:

* ``W=1``: one process, the local loss (the single-GPU baseline);
* ``W=<W> local``: W processes, ``gather_distributed=False`` (every rank sees only its own batch);
* ``W=<W> gather``: W processes, ``gather_distributed=True`` (every rank's rows meet the W-times
  larger global key set: the op's work grows W-fold, plus the collectives);
* ``collectives``: the all-gathers (Z, F: the forward) and the reduce-scatter (the key gradient: the
  backward) of one step alone, and the size check.

Times are the median over repeats of the slowest rank (ranks start each repeat together at a
barrier). On a shared CPU the W-process rows compete for cores: ``--threads`` fixes the threads per
process, torch's and OpenMP's (default 1, so each rank has a core of its own on a 2-core machine).
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from .. import _cli
from ..testing import free_port
from .dtypes import DTYPES


def _inputs(loss, batch, dim, dtype, device, seed):
    from ..registry import LOSSES

    spec = LOSSES[loss]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g).to(device=device, dtype=dtype)
            .requires_grad_(name in spec.trainable) for name in spec.inputs]


def _median_ms(fn, repeats, warmup, device, barrier=None):
    times = []
    for i in range(warmup + repeats):
        if barrier is not None:
            barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def time_steps(config: dict, rank: int = 0, world: int = 1) -> dict:
    """Per-repeat step times (ms) of this rank: ``local`` and, when ``world > 1`` (inside an
    initialised process group), ``gather`` and ``collectives``."""
    from .. import distributed
    from ..registry import LOSSES

    spec = LOSSES[config["loss"]]
    device = torch.device(config["device"] if config["device"] == "cpu" else f"cuda:{rank}")
    dtype = DTYPES[config["dtype"]]
    args = _inputs(config["loss"], config["batch"], config["dim"], dtype, device, seed=rank)
    trainable = [a for a in args if a.requires_grad]
    barrier = None
    if world > 1:
        import torch.distributed as dist

        barrier = dist.barrier

    def step(gather):
        def run():
            out = spec.function(*args, temperature=0.2, backend=config["backend"], gather_distributed=gather)
            torch.autograd.grad(out, trainable)
        return run

    reps, warmup = config["repeats"], config["warmup"]
    result = {"local": _median_ms(step(False), reps, warmup, device, barrier)}
    if world > 1:
        result["gather"] = _median_ms(step(True), reps, warmup, device, barrier)
        # the collectives of one SimCLR-PNR-like step: size check, all-gather of two (2B, D) blocks
        # (one with autograd), and the reduce-scatter of the trainable block's gradient
        z = torch.randn(2 * config["batch"], config["dim"], device=device, dtype=dtype, requires_grad=True)
        f = torch.randn(2 * config["batch"], config["dim"], device=device, dtype=dtype)

        def collectives():
            gather = distributed.data_parallel(True, None, z.shape[0], device)
            zg, _ = gather.rows(z, differentiable=True), gather.rows(f, differentiable=False)
            torch.autograd.grad(zg, z, torch.ones_like(zg))
        result["collectives"] = _median_ms(collectives, reps, warmup, device, barrier)
    return result


def _worker(rank, world, port, config, out_path):
    import torch.distributed as dist

    torch.set_num_threads(config["threads"])
    backend = "nccl" if config["device"] == "cuda" else "gloo"
    if config["device"] == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        times = time_steps(config, rank, world)
        every = [None] * world
        dist.all_gather_object(every, times)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(every, f)
    finally:
        dist.destroy_process_group()



def _slowest_rank_median(per_rank, key):
    """Median over repeats of the slowest rank's time in each repeat."""
    return statistics.median(max(times) for times in zip(*(r[key] for r in per_rank)))


def measure(config: dict) -> list:
    """Rows of the table (dicts): W=1, W local, W gather, collectives."""
    import torch.multiprocessing as mp

    world = config["world_size"]
    torch.set_num_threads(config["threads"])
    single = time_steps(config)
    rows = [dict(setting="W=1", world=1, global_batch=config["batch"], ms=statistics.median(single["local"]))]
    # The ranks' OpenMP runtimes (the native CPU kernels) read their thread count from the
    # environment: torch.set_num_threads in a spawned rank does not reach them.
    os.environ["OMP_NUM_THREADS"] = str(config["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(world, free_port(), config, out), nprocs=world, join=True)
        with open(out) as f:
            per_rank = json.load(f)
    global_batch = world * config["batch"]
    rows.append(dict(setting=f"W={world} local", world=world, global_batch=global_batch,
                     ms=_slowest_rank_median(per_rank, "local")))
    rows.append(dict(setting=f"W={world} gather", world=world, global_batch=global_batch,
                     ms=_slowest_rank_median(per_rank, "gather")))
    rows.append(dict(setting=f"W={world} collectives only", world=world, global_batch=global_batch,
                     ms=_slowest_rank_median(per_rank, "collectives")))
    return rows


def format_rows(config, rows) -> str:
    head = (f"{config['loss']} on {config['backend']} ({config['dtype']}, {config['device']}), batch {config['batch']} "
            f"per rank and view, D {config['dim']}, {config['threads']} thread(s) per process, median of "
            f"{config['repeats']} (slowest rank); load average {os.getloadavg()[0]:.2f}")
    lines = [head, "| setting | global batch | step (ms) |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['global_batch']} | {r['ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def build_parser():
    """The parser of ``pnr-bench --world-size``: every value is checked here, before any work."""
    from .. import backends
    from ..registry import LOSSES

    gathered = sorted(name for name, spec in LOSSES.items() if spec.gathers)
    parser = _cli.ArgumentParser(prog="pnr-bench --world-size", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=_cli.Number(int, 2), required=True,
                        help="processes (ranks), >= 2 (W=1 is measured beside it)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--loss", choices=gathered, default="simclr_pnr")
    parser.add_argument("--backend", choices=("auto", *backends.BACKENDS), default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=_cli.positive_int, default=256, help="rows per view on each rank")
    parser.add_argument("--dim", type=_cli.positive_int, default=128)
    parser.add_argument("--repeats", type=_cli.positive_int, default=20)
    parser.add_argument("--warmup", type=_cli.nonneg_int, default=3)
    parser.add_argument("--threads", type=_cli.positive_int, default=1, help="torch threads per process")
    parser.add_argument("--json", metavar="PATH", type=_cli.output_file,
                        help="write the rows as JSON to PATH (missing folders are created)")
    return parser


def main(argv=None) -> int:
    from .. import backends

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        parser.error(f"--device cuda needs {args.world_size} GPUs, this machine has {torch.cuda.device_count()}")
    config = {k: v for k, v in vars(args).items() if k != "json"}
    try:  # name the backend that runs (the same on every rank); refuse one that cannot run here
        config["backend"] = backends.choose(args.backend, args.loss, args.device, DTYPES[args.dtype])
    except (backends.BackendUnavailableError, ValueError) as exc:
        parser.error(f"argument --backend: {exc}")
    try:
        rows = measure(config)
    except (*_spawn_errors(), RuntimeError) as exc:  # a rank failed: its last line, not the spawn traceback
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return _cli.fail("pnr-bench --world-size", f"a rank failed: {lines[-1] if lines else type(exc).__name__}")
    print(format_rows(config, rows))
    if args.json:
        with open(_cli.make_parents(args.json), "w") as f:
            json.dump({"config": config, "rows": rows}, f, indent=1)
    return 0


def _spawn_errors():
    """The exceptions ``torch.multiprocessing.spawn`` raises when a rank fails."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    return (ProcessRaisedException, ProcessExitedException)


if __name__ == "__main__":
    sys.exit(main())
