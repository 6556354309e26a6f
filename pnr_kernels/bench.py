"""``pnr-bench``: forward+backward time and peak extra memory of every loss x backend x size x dtype.

    pnr-bench --device cpu|cuda [--quick] [--losses ...] [--backends ...] [--json PATH]

Time is the median over repeats of one forward + backward (after warm-up). Peak extra memory is
what one forward + backward allocates beyond its inputs: on CUDA ``max_memory_allocated`` minus
the allocation before the step; on CPU the rise of the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs) over its resident set before the step, measured in a fresh
subprocess per case (with glibc returning every allocation of 64 KiB or more to the system when
freed) so that no earlier allocation hides it. Throughput is reported where a
work model exists: GFLOP/s for the contrastive losses (the FLOP model of
``pnr_kernels.registry`` entries' work models) and GB/s for BYOL/VICReg-PNR (reading p1, p2, f1, f2 and
writing two gradients once).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import List, Optional

import torch

from . import backends
from .registry import CONTRASTIVE, LOSSES, QUEUE, make_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PEERS = {"nt_xent": "pml"}  # third-party rows measured beside ours when installed
PEER_MAX_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    backend: str
    dtype: str
    batch_size: int
    dim: int
    queue_size: Optional[int] = None


def work_model(case: Case):
    """(throughput unit, amount) of one forward + backward from the loss's registry entry, or
    None: GFLOP/s for the fused contrastive op's FLOPs, GB/s for bytes moved."""
    spec = LOSSES[case.loss]
    if spec.work is None:
        return None
    itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    amount = spec.work(case.batch_size, case.dim, case.queue_size, itemsize)
    return {"FLOP": "GFLOP/s", "byte": "GB/s"}[spec.work_unit], amount


def _sizes(device: str, quick: bool):
    """(loss, batch, dim, queue, dtypes) grid per device; quick covers every loss once, small."""
    if device == "cpu":
        dtypes = ["float32"]
        if quick:
            contrastive = [(256, 128)]
            moco = [(128, 128, 4096)]
            regularizer = [(256, 512)]
        else:
            contrastive = [(256, 128), (2048, 128)]
            moco = [(256, 128, 16384)]
            regularizer = [(256, 2048)]
    else:
        dtypes = ["bfloat16", "float32"]
        if quick:
            contrastive = [(1024, 256)]
            moco = [(256, 256, 16384)]
            regularizer = [(2048, 2048)]
        else:
            contrastive = [(1024, 256), (4096, 256), (32768, 256)]
            moco = [(256, 256, 65536)]
            regularizer = [(8192, 2048)]
    grid = []
    for loss, spec in LOSSES.items():
        if spec.kind == QUEUE:
            grid += [(loss, b, d, k, dtypes) for b, d, k in moco]
        elif spec.kind == CONTRASTIVE:
            grid += [(loss, b, d, None, dtypes) for b, d in contrastive]
        else:
            grid += [(loss, b, d, None, dtypes) for b, d in regularizer]
    return grid


def _peer_available(name: str) -> bool:
    if name == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def make_cases(device: str, quick: bool, losses=None, backend_names=None) -> List[Case]:
    dev = torch.device(device)
    cases = []
    for loss, b, d, k, dtypes in _sizes(device, quick):
        if losses and loss not in losses:
            continue
        for dtype in dtypes:
            names = [n for n in backends.BACKENDS
                     if backends.unavailable_reason(n, loss, dev, DTYPES[dtype]) is None]
            peer = PEERS.get(loss)
            # pml's NTXentLoss masks (positive pairs) x (negative pairs): O(N^3) memory, 2 GB at
            # N = 512 already, so it is only run at the small sizes
            if peer and b <= PEER_MAX_BATCH and _peer_available(peer):
                names.append(peer)
            for name in names:
                if backend_names and name not in backend_names:
                    continue
                cases.append(Case(loss, name, dtype, b, d, k))
    return cases


def _step_fn(case: Case, device: str):
    """A closure running one forward + backward of the case (from no gradients, as after
    ``zero_grad(set_to_none=True)``), and the inputs it holds."""
    args, kwargs = make_inputs(case.loss, case.batch_size, case.dim, DTYPES[case.dtype], device=device,
                               requires_grad=True, queue_size=case.queue_size or 5)
    if case.backend == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        criterion = NTXentLoss(temperature=kwargs["temperature"])
        labels = torch.arange(case.batch_size, device=device).repeat(2)

        def step():
            for a in args:
                a.grad = None
            criterion(torch.cat(args), labels).backward()
    else:
        fn = LOSSES[case.loss].function

        def step():
            for a in args:
                a.grad = None
            fn(*args, **kwargs, backend=case.backend).backward()
    return step, args


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(step, device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_extra_mb(step) -> float:
    """Rise of the peak resident set during one step over the resident set before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    step()
    return max(0, _status_kb("VmHWM") - before) / 1024


def measure(case: Case, device: str, repeats: int, warmup: int) -> dict:
    """One record for one case, measured in this process."""
    record = dataclasses.asdict(case)
    record["device"] = device
    record["device_name"] = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    try:
        step, inputs = _step_fn(case, device)
        step()  # one-time work (compilation, autotuning, thread pools) outside the measurements
        for a in inputs:  # the step's own gradients count as its memory, the last step's do not
            a.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            record["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        else:
            record["peak_memory_mb"] = _cpu_peak_extra_mb(step)
        record["fwd_bwd_ms"] = _time_ms(step, device, repeats, warmup)
    except torch.cuda.OutOfMemoryError:
        record.update(fwd_bwd_ms=None, peak_memory_mb=None, error="out of memory")
        return record
    model = work_model(case)
    if model is not None:
        unit, amount = model
        record["throughput_unit"] = unit
        record["throughput"] = amount / (record["fwd_bwd_ms"] * 1e-3) / 1e9
    return record


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def _measure_in_subprocess(case: Case, repeats: int, warmup: int) -> dict:
    payload = json.dumps(dict(case=dataclasses.asdict(case), repeats=repeats, warmup=warmup))
    # Allocations of 64 KiB and more are mmapped and unmapped when freed, so the resident set
    # follows what is live instead of what glibc keeps cached from the warm-up step.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "pnr_kernels.bench", "--worker", payload],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {case}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_table(records: List[dict]) -> str:
    header = ["loss", "backend", "dtype", "B", "D", "K", "fwd+bwd ms", "peak MB", "throughput"]
    rows = []
    for r in records:
        if r.get("error"):
            ms, mb, tp = r["error"], "-", "-"
        else:
            ms, mb = f"{r['fwd_bwd_ms']:.2f}", f"{r['peak_memory_mb']:.1f}"
            tp = f"{r['throughput']:.1f} {r['throughput_unit']}" if "throughput" in r else "-"
        rows.append([r["loss"], r["backend"], r["dtype"], str(r["batch_size"]), str(r["dim"]),
                     str(r["queue_size"] or "-"), ms, mb, tp])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pnr-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small size per loss (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), help="losses to run (default: all)")
    parser.add_argument("--backends", nargs="+", help="backends to run (default: every usable one, plus peers)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3 quick, 7 full)")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list to PATH")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one CPU case in a fresh process; prints its record as JSON
        job = json.loads(args.worker)
        torch.manual_seed(0)
        print(json.dumps(measure(Case(**job["case"]), "cpu", job["repeats"], job["warmup"])))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of torch")
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    cases = make_cases(args.device, args.quick, args.losses, args.backends)
    if not cases:
        parser.error("no case matches the requested losses and backends on this device")
    records = []
    for case in cases:
        if args.device == "cpu":
            record = _measure_in_subprocess(case, repeats, warmup)
        else:
            torch.manual_seed(0)
            record = measure(case, "cuda", repeats, warmup)
        records.append(record)
        print(f"  done: {case}", file=sys.stderr, flush=True)
        if args.json:  # rewritten after every case, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    print(f"device: {records[0]['device_name']}; torch {torch.__version__}; median of {repeats}")
    print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
