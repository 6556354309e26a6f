"""pytest-benchmark suite (not part of the default test run):

    python -m pytest benchmarks --benchmark-only [--benchmark-json out.json]

One forward + backward per loss x usable backend at the `pnr-bench --quick` sizes of the device
(CUDA when available, else CPU). For peak memory and the full grid use `pnr-bench`.
"""
import pytest
import torch

from pnr_kernels.bench import runner as bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = bench.make_cases(DEVICE, quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.loss}-{c.backend}-{c.dtype}" for c in CASES])
def test_fwd_bwd(benchmark, case):
    step, _ = bench._step_fn(case, DEVICE)
    step()

    def run():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
