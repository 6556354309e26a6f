#!/usr/bin/env bash
# One-shot GPU check (about 8 minutes at most): the test suite on CUDA tensors with the compiled
# Triton kernels (TRITON_INTERPRET=0), then the benchmark table. Usage, from anywhere:
#
#     benchmarks/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/gpu.txt (nvidia-smi -L and versions), native_build.txt, tests.log, memcheck.log,
# bench.log, bench.json, cuda.csv and status.txt (exit codes). Exits non-zero if either step failed. PYTHON overrides the interpreter.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0

{
    nvidia-smi -L
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

"$PY" -c "from pnr_kernels.native import main; raise SystemExit(main(['build']))" 2>&1 | tee "$OUT/native_build.txt"

timeout 240 "$PY" -m pytest tests -q --durations=10 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

# The hand-written CUDA kernels under compute-sanitizer (out-of-bounds and misaligned accesses),
# on the small cases only.
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" -m pytest -q -x \
    tests/test_infonce_native_cuda.py tests/test_regularizers_native.py -k "op_matches or 3-5-7 or cuda" 2>&1 | tail -30 | tee "$OUT/memcheck.log"

# Our backends only (the torch_compile peer's compilations would not fit this budget); the records
# also go to OUT_DIR/cuda.csv for `pnr-bench report`.
timeout 160 "$PY" -m pnr_kernels.bench --device cuda --backends reference native triton \
    --json "$OUT/bench.json" --csv "$OUT/cuda.csv" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests exit code: $tests_rc; bench exit code: $bench_rc (124: timed out)" | tee "$OUT/status.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
