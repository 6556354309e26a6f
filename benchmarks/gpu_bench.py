"""The benchmark of benchmarks/gpu_check.sh: the sizes of issue 22, measured with ``pnr-bench``'s
own machinery (pnr_kernels.bench: CUDA events per phase, p20/p50/p80 of the repeats, peak
allocator memory beyond the inputs, ``percent_of_peak`` against the machine's measured matmul or
copy throughput), every record upserted into the CSV of ``pnr-bench report`` as soon as it is
measured, so that a step cut short keeps what it measured.

    python benchmarks/gpu_bench.py --backends reference native triton infcl --csv OUT/cuda.csv
                                   [--deadline-s S] [--repeats N]
    python benchmarks/gpu_bench.py --backends torch_compile --csv OUT/cuda.csv --deadline-s S
    python benchmarks/gpu_bench.py --dry-run --csv OUT/cuda.csv      # CPU: tiny sizes, same path
    python benchmarks/gpu_bench.py --summary OUT/cuda.csv            # the issue's goals, measured

Cases (CUDA), in this order (each series of a loss x backend x dtype x D x K by rising batch, as
``pnr_kernels.bench.runner.run_cases`` expects; a series that fails stops):

* the paper's batch, every loss: B = 256, D = 128 for the contrastive losses, K = 65536 for the
  MoCo ones; D = 2048 for the regularisers (the projector width of the PNR recipes), and the
  regularisers once more at B = 8192, D = 2048, where their bytes and not their launches count;
* the large batches: SimCLR-PNR and NT-Xent at B = 4096 and 16384, D = 128 and 256;
* bfloat16, then float32, for each size; the headline sizes first (SimCLR-PNR B = 4096, D = 256;
  MoCo-PNR at the paper's batch; NT-Xent B = 4096, D = 256), so that a step that runs out of
  time has measured those.

``--deadline-s``: no case starts later than that many seconds after start-up minus
``--case-reserve-s``; the cases left get a ``skipped`` record. ``torch_compile`` cases start from
``torch._dynamo.reset()``: each case compiles its own graph instead of hitting dynamo's recompile
limit (past which it would silently run the reference eagerly) or turning dynamic.

The summary prints, besides the machine's own peak that the CSV holds, the counted TFLOP/s of
bfloat16 rows against the anchors measured on the H200 (docs: /work/shared/ENVIRONMENT.md): about
790 TFLOP/s for a bfloat16 8192^3 matmul and 4.3 TB/s for a device-to-device copy (read plus
written).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from pnr_kernels import backends
from pnr_kernels.bench import peers
from pnr_kernels.bench import report as bench_report
from pnr_kernels.bench import runner as bench
from pnr_kernels.registry import LOSSES, REGULARIZER

H200_BF16_TFLOPS = 790.0  # bf16 8192^3 torch.mm on the H200 these checks run on (measured there)
H200_COPY_GBS = 4300.0  # device-to-device copy there, bytes read plus written (measured there)
DTYPE_ORDER = ("bfloat16", "float32")

# (loss, batch, dim, queue): the headline sizes first, then the rest of the paper's batch, then
# the remaining large batches (every series still by rising batch).
HEADLINE = [("simclr_pnr", 256, 128, None), ("simclr_pnr", 4096, 256, None), ("moco_pnr", 256, 128, 65536),
            ("nt_xent", 256, 128, None), ("nt_xent", 4096, 256, None)]
LARGE = [(loss, b, d, None) for b in (4096, 16384) for d in (128, 256) for loss in ("simclr_pnr", "nt_xent")]


def cuda_sizes() -> List[Tuple[str, int, int, Optional[int]]]:
    """Every (loss, batch, dim, queue) of the CUDA run, in run order."""
    paper = []
    for loss, spec in LOSSES.items():
        if spec.kind == REGULARIZER:
            paper.append((loss, 256, 2048, None))
        else:
            paper.append((loss, 256, 128, 65536 if spec.queues else None))
    regularizers_large = [(loss, 8192, 2048, None) for loss, spec in LOSSES.items() if spec.kind == REGULARIZER]
    sizes = []
    for size in HEADLINE + paper + LARGE + regularizers_large:
        if size not in sizes:
            sizes.append(size)
    return sizes


def dry_run_sizes() -> List[Tuple[str, int, int, Optional[int]]]:
    """Tiny stand-ins for the CPU dry run: every loss once, and one larger contrastive batch."""
    sizes = [(loss, 16, 16, 64 if spec.queues else None) for loss, spec in LOSSES.items()]
    return sizes + [("nt_xent", 64, 16, None)]


def plan(device: str, sizes, backend_names: Sequence[str], notes: Dict[str, set]) -> List[bench.Case]:
    """The cases of ``sizes`` x dtypes x the usable ``backend_names`` (library backends and
    ``pnr_kernels.bench.peers.PEERS``); why any is left out goes to ``notes`` (reason: losses)."""
    dev = torch.device(device)
    cases = []
    for loss, batch, dim, queue in sizes:
        for dtype in DTYPE_ORDER:
            for name in backend_names:
                if name in peers.PEERS:
                    if peers.PEERS[name] is not None and loss not in peers.PEERS[name]:
                        continue
                    reason = peers.unavailable_reason(name, loss, device)
                else:
                    reason = backends.unavailable_reason(name, loss, dev, bench.DTYPES[dtype])
                if reason is not None:
                    notes.setdefault(f"{name} left out: {reason}", set()).add(loss)
                    continue
                cases.append(bench.Case(loss, name, dtype, batch, dim, queue))
    return cases


def csv_meta() -> Dict[str, str]:
    """The CSV's version columns; the commit from $PNR_COMMIT where the checkout has no git (the
    device machine gets a copy of the working tree)."""
    return {**bench_report._versions(), "commit": os.environ.get("PNR_COMMIT") or bench_report._commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def anchor_text(record: dict) -> str:
    """Counted throughput against the H200 anchors (bfloat16 FLOPs; bytes in any dtype)."""
    unit, value = record.get("throughput_unit"), record.get("throughput")
    if value is None:
        return ""
    if unit == "GFLOP/s":
        text = f"{value / 1e3:.1f} TFLOP/s"
        if record["dtype"] == "bfloat16":
            text += f" ({100 * value / 1e3 / H200_BF16_TFLOPS:.0f} % of {H200_BF16_TFLOPS:.0f})"
        return text
    return f"{value:.0f} GB/s ({100 * value / H200_COPY_GBS:.0f} % of {H200_COPY_GBS:.0f})"


def run(device: str, cases: Sequence[bench.Case], csv_path: str, *, repeats: int, warmup: int,
        deadline_s: Optional[float], reserve_s: float) -> List[dict]:
    start = time.monotonic()
    meta = csv_meta()
    memory_mb = 0.8 * torch.cuda.mem_get_info()[0] / 2 ** 20 if device == "cuda" else bench._default_memory_mb(device)
    budget = bench.Budget(case_timeout_s=60.0, memory_mb=memory_mb)

    def measure_case(case):
        if deadline_s is not None and time.monotonic() - start > deadline_s - reserve_s:
            return bench.failed_record(case, device, bench.SKIPPED,
                                       f"skipped: the step's time budget ({deadline_s:.0f} s) ran out")
        if case.backend == "torch_compile":
            torch._dynamo.reset()
        torch.manual_seed(0)
        # the repeats asked for, no minimum time: the GPU check plans its budget on them, and the
        # dry run only exercises the path on tiny stand-ins
        record = bench.measure(case, device, repeats, warmup, min_warmup_s=0, min_timed_s=0)
        if device == "cuda":
            torch.cuda.empty_cache()
        return record

    done = []

    def on_record(record):
        bench.add_percent_of_peak(record)
        done.append(record)
        bench_report.upsert_csv(csv_path, bench_report.records_to_rows([record], repeats=repeats, meta=meta))
        if record.get("fwd_bwd_ms") is None:
            what = record.get("error") or record.get("status")
        else:
            what = (f"{record['fwd_bwd_ms']:.3f} ms, {record['peak_memory_mb']:.1f} MB, {anchor_text(record)}"
                    + (f", {record['percent_of_peak']:.0f} % of measured peak" if "percent_of_peak" in record else ""))
        print(f"  {len(done)}/{len(cases)} [{time.monotonic() - start:.0f} s] {record['loss']} {record['backend']} "
              f"{record['dtype']} B={record['batch_size']} D={record['dim']} K={record['queue_size'] or '-'}: {what}",
              flush=True)

    try:
        bench.run_cases(cases, measure_case, device=device, budget=budget, repeats=repeats, warmup=warmup,
                        on_record=on_record)
    except KeyboardInterrupt:  # gpu_check.sh's timeout: what was measured is in the CSV already
        print(f"interrupted after {len(done)} of {len(cases)} cases", flush=True)
        raise SystemExit(124)
    print(bench.format_table(done), flush=True)
    return done


# ---------------------------------------------------------------------------------------------
# The goals, from the CSV


def _p50(rows, **key) -> Optional[float]:
    for row in rows:
        if all(str(row[k]) == str(v) for k, v in key.items()) and row["status"] == "ok" and row["p50"]:
            return float(row["p50"])
    return None


def summary_lines(rows: Sequence[Dict[str, str]]) -> List[str]:
    """One line per goal of issue 22 (targets of the benchmark, not assertions): the measured
    value, the target, and met / NOT met / not measured."""
    lines = []

    def verdict(value, ok):
        return "not measured" if value is None else ("met" if ok else "NOT met")

    def time_of(loss, backend, dtype, b, d, k=""):
        return _p50(rows, loss=loss, backend=backend, dtype=dtype, x_value=b, dim=d, queue_size=k or "",
                    mode="full", metric="time")

    for backend in ("triton", "native"):
        key = dict(loss="simclr_pnr", backend=backend, dtype="bfloat16", x_value=4096, dim=256, queue_size="",
                   mode="full")
        gflops = _p50(rows, **key, metric="throughput")
        tflops = None if gflops is None else gflops / 1e3
        lines.append(f"goal SimCLR-PNR B=4096 D=256 bf16 {backend}: "
                     f"{'-' if tflops is None else f'{tflops:.0f}'} TFLOP/s counted (target >= 350): "
                     f"{verdict(tflops, tflops is not None and tflops >= 350)}")
        ours, ref = time_of("simclr_pnr", backend, "bfloat16", 4096, 256), time_of("simclr_pnr", "reference",
                                                                                   "bfloat16", 4096, 256)
        ratio = None if ours is None or ref is None else ref / ours
        lines.append(f"goal SimCLR-PNR B=4096 D=256 bf16 {backend} vs reference: "
                     f"{'-' if ratio is None else f'{ratio:.1f}x'} (target >= 10x): {verdict(ratio, ratio is not None and ratio >= 10)}")
        memory = _p50(rows, **key, metric="memory")
        lines.append(f"goal SimCLR-PNR B=4096 D=256 bf16 {backend} peak extra memory: "
                     f"{'-' if memory is None else f'{memory:.1f} MB'} (target <= 64 MB): "
                     f"{verdict(memory, memory is not None and memory <= 64)}")
        ours, ref = (time_of("moco_pnr", name, "bfloat16", 256, 128, 65536) for name in (backend, "reference"))
        ratio = None if ours is None or ref is None else ref / ours
        lines.append(f"goal MoCo-PNR B=256 K=65536 bf16 {backend} vs reference: "
                     f"{'-' if ratio is None else f'{ratio:.1f}x'} (target >= 3x): {verdict(ratio, ratio is not None and ratio >= 3)}")

    configs = sorted({(r["loss"], r["dtype"], r["x_value"], r["dim"], r["queue_size"]) for r in rows},
                     key=lambda c: (c[0], c[1], float(c[2]), int(c[3]), c[4]))
    worst, pairs = None, 0
    for loss, dtype, b, d, k in configs:
        native, triton_ms = time_of(loss, "native", dtype, b, d, k), time_of(loss, "triton", dtype, b, d, k)
        if native is not None and triton_ms is not None:
            pairs += 1
            if worst is None or native / triton_ms > worst[0]:
                worst = (native / triton_ms, f"{loss} {dtype} B={b} D={d}")
    lines.append(f"goal native within 1.3x of triton: {pairs} sizes both ran; slowest native/triton "
                 f"{'-' if worst is None else f'{worst[0]:.2f}x ({worst[1]})'}: "
                 f"{verdict(worst, worst is not None and worst[0] <= 1.3)}")
    for backend in ("triton", "native"):
        slower, both = [], 0
        for loss, dtype, b, d, k in configs:
            if loss != "nt_xent":
                continue
            ours, peer = time_of(loss, backend, dtype, b, d, k), time_of(loss, "infcl", dtype, b, d, k)
            if ours is not None and peer is not None:
                both += 1
                if ours >= peer:
                    slower.append(f"{dtype} B={b} D={d} ({ours:.3f} vs {peer:.3f} ms)")
        lines.append(f"goal NT-Xent {backend} faster than Inf-CL: {both} sizes both ran"
                     + (f", slower at {'; '.join(slower)}" if slower else "") + f": "
                     f"{verdict(both or None, both > 0 and not slower)}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["reference", "native", "triton", "infcl"],
                        help=f"library backends and peers ({', '.join(peers.PEERS)})")
    parser.add_argument("--csv", help="upsert every record into this CSV (pnr-bench report's format)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=None, help="start no case after this many seconds")
    parser.add_argument("--case-reserve-s", type=float, default=5.0,
                        help="seconds before the deadline after which no case starts (default 5)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: print the CUDA run's plan, then measure tiny stand-in sizes through the same path")
    parser.add_argument("--summary", metavar="CSV", help="print the goals of issue 22 measured in CSV and exit")
    args = parser.parse_args(argv)
    if args.summary:
        rows = bench_report.read_csv(args.summary)
        print("\n".join(summary_lines(rows)))
        return 0
    if not args.csv:
        parser.error("--csv is required (except with --summary)")
    if args.dry_run:
        sizes = cuda_sizes()
        per_size = {name: sum(1 for loss, *_ in sizes if peers.PEERS.get(name) is None or loss in peers.PEERS[name])
                    for name in args.backends}
        print(f"CUDA plan: {len(sizes)} sizes x {len(DTYPE_ORDER)} dtypes; cases per backend (before "
              f"availability): {', '.join(f'{n} {c * len(DTYPE_ORDER)}' for n, c in per_size.items())}")
        for loss, b, d, k in sizes:
            print(f"  {loss} B={b} D={d} K={k or '-'}")
        device, sizes, repeats, warmup = "cpu", dry_run_sizes(), 2, 1
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU and a CUDA build of torch (or --dry-run)")
        device, sizes, repeats, warmup = "cuda", cuda_sizes(), args.repeats, 2
    notes: Dict[str, set] = {}
    cases = plan(device, sizes, args.backends, notes)
    for text, losses in notes.items():
        print(f"note: {text} ({', '.join(sorted(losses))})", flush=True)
    if not cases:
        print("no case to run", flush=True)
        return 1
    print(f"{len(cases)} cases on {device}, {repeats} repeats after {warmup} warm-up steps", flush=True)
    records = run(device, cases, args.csv, repeats=repeats, warmup=warmup, deadline_s=args.deadline_s,
                  reserve_s=args.case_reserve_s)
    failed = [r for r in records if r.get("status") in (bench.FAILED, bench.TIMEOUT)]
    print(f"{len(records) - len(failed)} of {len(records)} cases ok, out of memory or skipped; {len(failed)} failed",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
