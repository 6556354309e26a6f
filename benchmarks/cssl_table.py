"""Run the digits continual-SSL comparison and print a markdown table of the results.

    python benchmarks/cssl_table.py                       # SimCLR, BYOL x finetune/cassle/pnr x seeds 0,1,2
    python benchmarks/cssl_table.py --jobs 2 --methods simclr --seeds 0 1 -- --epochs 10

Each run is ``python -m pnr_kernels.cssl --method M --strategy S --seed K --output-dir
ROOT/M_S_seedK --resume`` with the trainer's defaults (plus anything after ``--``), so an
interrupted table continues where it stopped and finished runs are only re-read. The table
reports the final all-class linear accuracy, the forgetting (both in %), and the kNN accuracy as
mean +- sample standard deviation over the seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(method, strategy, seed, args, extra):
    out = os.path.join(args.output_root, f"{method}_{strategy}_seed{seed}")
    cmd = [sys.executable, "-m", "pnr_kernels.cssl", "--dataset", args.dataset, "--method", method,
           "--strategy", strategy, "--seed", str(seed), "--output-dir", out, "--resume", "--no-progress", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.json")) as handle:
        metrics = json.load(handle)
    print(f"{method:>10s} {strategy:>8s} seed {seed}: acc {metrics['average_accuracy']:.2f} "
          f"forgetting {metrics['forgetting']:.2f} kNN {metrics['knn_average_accuracy']:.2f} ({seconds:.0f}s)",
          file=sys.stderr, flush=True)
    return (method, strategy, seed), metrics


def mean_std(values):
    mean = round(statistics.fmean(values), 2) + 0.0  # no "-0.00"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--methods", nargs="+", default=["simclr", "byol"])
    parser.add_argument("--strategies", nargs="+", default=["finetune", "cassle", "pnr"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-root", default="cssl_table_runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each is its own process)")
    parser.add_argument("extra", nargs="*", help="options passed to every pnr-cssl run (after --)")
    args = parser.parse_args(argv)
    jobs = [(m, s, k) for m in args.methods for s in args.strategies for k in args.seeds]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(pool.map(lambda job: run_one(*job, args, args.extra), jobs))
    lines = ["| method | strategy | final accuracy (%) | forgetting (%) | kNN accuracy (%) | kNN forgetting (%) |",
             "|---|---|---|---|---|---|"]
    for m in args.methods:
        for s in args.strategies:
            runs = [results[(m, s, k)] for k in args.seeds]
            lines.append(f"| {m} | {s} | {mean_std([r['average_accuracy'] for r in runs])} | "
                         f"{mean_std([r['forgetting'] for r in runs])} | "
                         f"{mean_std([r['knn_average_accuracy'] for r in runs])} | "
                         f"{mean_std([r['knn_forgetting'] for r in runs])} |")
    print(f"{args.dataset}, seeds {args.seeds}, mean ± std; {len(jobs)} runs in "
          f"{time.perf_counter() - started:.0f}s with {args.jobs} job(s)\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
