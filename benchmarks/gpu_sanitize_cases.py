"""The smallest cases of every native CUDA kernel, for benchmarks/gpu_check.sh to run under
compute-sanitizer (memcheck, racecheck): each registered loss, forward and backward on the native
backend, in float32 and bfloat16, at a batch, width and queue length that are no multiple of any
tile (B = 37, D = 19, K = 23), checked against the float64 reference with the dtype's tolerances
(pnr_kernels.testing.check_against_reference).

    python benchmarks/gpu_sanitize_cases.py [--device cuda|cpu]

Prints one line per case and exits non-zero when a case failed or raised. ``--device cpu`` runs
the same cases on the CPU kernels (the dry run of gpu_check.sh, where no GPU is present).
"""
from __future__ import annotations

import argparse
import sys

import torch

from pnr_kernels.registry import LOSSES, make_inputs
from pnr_kernels.testing import check_against_reference

BATCH, DIM, QUEUE = 37, 19, 23
DTYPES = (torch.float32, torch.bfloat16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of torch")
    failures = 0
    for loss in LOSSES:
        for dtype in DTYPES:
            torch.manual_seed(0)
            what = f"{loss} native {str(dtype).split('.')[1]} B={BATCH} D={DIM} K={QUEUE} on {args.device}"
            try:
                inputs, options = make_inputs(loss, BATCH, DIM, dtype, device=args.device, requires_grad=True,
                                              queue_size=QUEUE)
                comparison = check_against_reference(loss, "native", inputs, options, assert_close=False)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001  (every case runs; the exit code says if one failed)
                failures += 1
                print(f"FAILED {what}: {type(error).__name__}: {error}", flush=True)
                continue
            worst = max([comparison.loss, *comparison.gradients.values()])
            status = "ok" if comparison.passed else "FAILED"
            failures += not comparison.passed
            print(f"{status} {what}: largest relative error {worst:.2e} (tolerances {comparison.tolerances})",
                  flush=True)
    print(f"{failures} of {len(LOSSES) * len(DTYPES)} cases failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
