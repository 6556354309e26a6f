"""Interleaved CPU timings of the native regularisers (BYOL-PNR, VICReg-PNR, Barlow-PNR) against
torch.compile of the reference, with the STREAM bandwidth over arrays of each case's footprint.

    OMP_WAIT_POLICY=passive PYTHONPATH=$PWD python benchmarks/cpu_regularizer_bench.py
    PYTHONPATH=$PWD python benchmarks/cpu_regularizer_bench.py --threads 1 --clock cpu

Every case is one forward + backward at B = 256, D = 128 and 2048, float32, the candidates timed
interleaved (A, B, A, B, ...) by cpu_infonce_bench.compare (median, with the load average). For
the byte-model losses it also prints the bytes of one read of each input and one write of each
gradient (registry work model) over the native median, as a fraction of the higher of a STREAM
copy and triad (torch's copy_ and add over float32 arrays holding the case's bytes together,
best of 30)."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_infonce_bench as common  # noqa: E402  (step_fn, compare, native)
from pnr_kernels.registry import LOSSES, make_inputs  # noqa: E402


def best_seconds(fn, runs=30):
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(runs):
        start = common.CLOCK()
        fn()
        best = min(best, common.CLOCK() - start)
    return best


def stream_gbs(total_bytes):
    """GB/s (bytes read plus written) of a copy and a triad over float32 arrays of total_bytes."""
    n2, n3 = total_bytes // 8, total_bytes // 12
    x, y = torch.ones(n2), torch.empty(n2)
    a, b, c = torch.empty(n3), torch.ones(n3), torch.ones(n3)
    return {"copy": 2 * x.nbytes / best_seconds(lambda: y.copy_(x)) / 1e9,
            "triad": 3 * a.nbytes / best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a)) / 1e9}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--losses", default="vicreg_pnr,byol_pnr,barlow_pnr")
    parser.add_argument("--dims", default="128,2048")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time (use with --threads 1)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    common.CLOCK = time.process_time if opts.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {opts.clock} clock, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    for loss in opts.losses.split(","):
        spec = LOSSES[loss]
        compiled = torch.compile(spec.reference)
        for dim in (int(d) for d in opts.dims.split(",")):
            args, kwargs = make_inputs(loss, opts.batch, dim, torch.float32, requires_grad=True)
            m = common.compare(f"{loss} B={opts.batch} D={dim}",
                               {"native": common.step_fn(common.native(loss), args, kwargs),
                                "torch_compile": common.step_fn(compiled, args, kwargs)}, opts.repeats)
            line = f"    torch_compile / native = {m['torch_compile'] / m['native']:.2f}"
            if spec.work_unit == "byte":
                nbytes = spec.work(opts.batch, dim, None, 4)
                gbs = stream_gbs(nbytes)
                achieved = nbytes / (m["native"] * 1e-3) / 1e9
                limit = max(gbs.values())
                line += (f"; native {achieved:.1f} GB/s for {nbytes / 2 ** 20:.1f} MiB = {100 * achieved / limit:.0f} % "
                         f"of STREAM (copy {gbs['copy']:.1f}, triad {gbs['triad']:.1f} GB/s over that footprint)")
            print(line, flush=True)


if __name__ == "__main__":
    main()
