"""Interleaved CPU timings of the native InfoNCE kernels against the reference and torch.compile.

    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py large   # native vs torch.compile, B = 1024, 2048
    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py small   # native vs reference, B = 256
    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py dtypes  # native fp32 vs bf16 vs fp16, B = 2048
    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py crossover  # native vs reference, B = 8 .. 256
    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py compile --losses moco --batches 256 \
        --queue-sizes 16384 65536    # native vs torch.compile of the reference, any grid

On a loaded machine, run with ``OMP_WAIT_POLICY=passive`` in the environment, or add
``--threads 1 --clock cpu`` (the process's CPU time of one thread is far less disturbed by other
processes than the wall time). With libgomp's default wait policy an idle OpenMP thread spins
(about 300k PAUSE instructions, some 20 ms on recent Intel cores) before it sleeps; on a
machine whose cores are all busy the spinning threads take the CPU from the working ones: NT-Xent
at B = 1024 took 372 ms of wall time per step (2 threads, load average 6) against 47 ms with
OMP_WAIT_POLICY=passive, for the old and the new kernels alike.

Every case is one forward + backward (D = 128, fp32 unless stated). The candidates of a case run
interleaved (A, B, A, B, ...) after a warm-up, and the median of the repeats is printed together
with the load average, because the development machine is shared."""
import argparse
import os
import statistics
import time

import torch

CLOCK = time.perf_counter
ONLY_NATIVE = False

import pnr_kernels
from pnr_kernels.registry import LOSSES, make_inputs


def step_fn(fn, args, kwargs, env=None):
    """One forward + backward; ``env`` (variables of the native kernels, read on every call) is
    set around the step, so that variants of the kernels interleave in one process."""
    trainable = [a for a in args if a.requires_grad]

    def step():
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            loss = fn(*args, **kwargs)
            torch.autograd.grad(loss, trainable)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
    return step


NO_STASH = {"PNR_KERNELS_CPU_LOGITS_BUDGET_MB": "0"}


def compare(title, candidates, repeats, warmup=2):
    for step in candidates.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, step in candidates.items():
            start = CLOCK()
            step()
            times[name].append(CLOCK() - start)
    load = open("/proc/loadavg").read().split()[:3]
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    text = ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
    print(f"{title}: {text}  [median of {repeats}, load {' '.join(load)}]", flush=True)
    return medians


def native(loss):
    return lambda *a, **k: getattr(pnr_kernels, LOSSES[loss].public)(*a, **k, backend="native")


def ref(loss):
    return lambda *a, **k: getattr(pnr_kernels, LOSSES[loss].public)(*a, **k, backend="reference")


def large(repeats):
    for loss in ("simclr_pnr", "nt_xent"):
        compiled = torch.compile(LOSSES[loss].reference)
        for batch in (1024, 2048):
            args, kwargs = make_inputs(loss, batch, 128, torch.float32, requires_grad=True)
            cands = {"native": step_fn(native(loss), args, kwargs),
                     "native_recompute": step_fn(native(loss), args, kwargs, NO_STASH)}
            if not ONLY_NATIVE:
                cands["torch_compile"] = step_fn(compiled, args, kwargs)
            m = compare(f"{loss} B={batch}", cands, repeats)
            if not ONLY_NATIVE:
                print(f"    torch_compile / native = {m['torch_compile'] / m['native']:.2f}")


def small(repeats):
    for loss in ("nt_xent", "cassle_simclr", "moco", "simclr_pnr"):
        args, kwargs = make_inputs(loss, 256, 128, torch.float32, requires_grad=True, queue_size=4096)
        cands = {"native": step_fn(native(loss), args, kwargs),
                 "native_recompute": step_fn(native(loss), args, kwargs, NO_STASH)}
        if not ONLY_NATIVE:
            cands["reference"] = step_fn(ref(loss), args, kwargs)
        m = compare(f"{loss} B=256" + (" K=4096" if loss == "moco" else ""), cands, repeats)
        if not ONLY_NATIVE:
            print(f"    reference / native = {m['reference'] / m['native']:.2f}")


def crossover(repeats):
    """native vs reference at small batches, where fixed costs dominate (for backend="auto")."""
    for loss in ("nt_xent", "cassle_simclr", "moco", "simclr_pnr", "moco_pnr"):
        for batch in (8, 32, 64, 128, 256):
            args, kwargs = make_inputs(loss, batch, 128, torch.float32, requires_grad=True, queue_size=4096)
            m = compare(f"{loss} B={batch}" + (" K=4096" if loss.startswith("moco") else ""),
                        {"native": step_fn(native(loss), args, kwargs),
                         "reference": step_fn(ref(loss), args, kwargs)}, repeats)
            print(f"    reference / native = {m['reference'] / m['native']:.2f}")


GRID = {"losses": ["nt_xent", "simclr_pnr", "cassle_simclr", "moco", "moco_pnr"], "batches": [256, 512],
        "queue_sizes": [16384]}


def compile(repeats):
    """native (stash within its budget, and recomputed) vs torch.compile of the reference on the
    grid of --losses, --batches and (for the queue losses) --queue-sizes."""
    for loss in GRID["losses"]:
        compiled = torch.compile(LOSSES[loss].reference)
        queue_sizes = GRID["queue_sizes"] if loss.startswith("moco") else [None]
        for batch in GRID["batches"]:
            for queue_size in queue_sizes:
                args, kwargs = make_inputs(loss, batch, 128, torch.float32, requires_grad=True,
                                           queue_size=queue_size or 5)
                cands = {"native": step_fn(native(loss), args, kwargs),
                         "native_no_stash": step_fn(native(loss), args, kwargs, NO_STASH),
                         "torch_compile": step_fn(compiled, args, kwargs)}
                title = f"{loss} B={batch}" + (f" K={queue_size}" if queue_size else "")
                m = compare(title, cands, repeats)
                print(f"    torch_compile / native = {m['torch_compile'] / m['native']:.2f}", flush=True)


def dtypes(repeats):
    for loss in ("simclr_pnr", "nt_xent"):
        cands = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            args, kwargs = make_inputs(loss, 2048, 128, dtype, requires_grad=True)
            name = str(dtype).split(".")[1]
            cands[name] = step_fn(native(loss), args, kwargs, NO_STASH)
            if dtype != torch.float32:
                half = {"PNR_KERNELS_CPU_PRODUCTS": "half", **NO_STASH}
                cands[name + "_half_products"] = step_fn(native(loss), args, kwargs, half)
        compare(f"{loss} B=2048 native", cands, repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["large", "small", "dtypes", "crossover", "compile"], nargs="+")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time, which a loaded machine disturbs far less than "
                             "the wall time (use with --threads 1, where no thread spins at a barrier)")
    parser.add_argument("--only-native", action="store_true",
                        help="time the native backend alone (to compare builds in separate processes)")
    parser.add_argument("--losses", nargs="+", default=GRID["losses"], help="compile: the losses")
    parser.add_argument("--batches", type=int, nargs="+", default=GRID["batches"], help="compile: the B")
    parser.add_argument("--queue-sizes", type=int, nargs="+", default=GRID["queue_sizes"],
                        help="compile: the queue sizes K of the MoCo losses")
    opts = parser.parse_args()
    GRID.update(losses=opts.losses, batches=opts.batches, queue_sizes=opts.queue_sizes)
    ONLY_NATIVE = opts.only_native
    if opts.threads:
        torch.set_num_threads(opts.threads)
    CLOCK = time.process_time if opts.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {opts.clock} clock, "
          f"PNR_KERNELS_CPU_PRODUCTS={os.environ.get('PNR_KERNELS_CPU_PRODUCTS', '(unset)')}")
    for what in opts.what:
        globals()[what](opts.repeats)
