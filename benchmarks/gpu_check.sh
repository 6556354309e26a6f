#!/usr/bin/env bash
# The GPU check of issue 22, in one call of at most GPU_CHECK_BUDGET_S seconds (default 450):
#
#     benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]        (OUT_DIR defaults to $OUT)
#
# Steps, each under its own `timeout` (SIGINT first, so pytest still writes its JUnit XML and the
# benchmark its last records), each recorded in OUT_DIR/status.txt as
# `step NAME rc=RC seconds=S timeout=T NOTE`, and each run whatever the earlier ones gave:
#
#   wheels     installs the wheels of .whl/ (benchmarks/gpu_wheels.sh; inf-cl; another folder
#              with PNR_GPU_CHECK_WHEELS) into a scratch folder on PYTHONPATH, when there are any;
#   env        device, driver, torch/CUDA/triton/nvcc/compute-sanitizer versions -> env.txt;
#   build      the native extension with its CUDA part for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0,
#              one compiler per source), -> build.log; fails when the CUDA part was not built,
#              and the sanitizer steps are then skipped;
#   tests      the tests that touch CUDA tensors (compiled Triton kernels, native CUDA kernels,
#              the public layer on CUDA with an NCCL world of one, the build's CUDA checks) with
#              pytest-xdist -n 8 and pytest-timeout per test, when installed -> tests.log,
#              tests.xml (JUnit);
#   memcheck,  compute-sanitizer on the smallest native CUDA cases (benchmarks/gpu_sanitize_cases.py),
#   racecheck  our kernels only (--kernel-name kns=pnr_kernels) -> sanitizer.log; a runtime that
#              refuses the device is recorded as such;
#   bench      reference, native, triton and Inf-CL at the sizes of benchmarks/gpu_bench.py,
#              -> bench.log, cuda.csv (the CSV of `pnr-bench report`, upserted per case);
#   compile    torch.compile of the reference at the same sizes, headline sizes first, until its
#              time runs out -> bench.log, cuda.csv;
#   report     `pnr-bench report` of cuda.csv (the generated docs tables, into bench.log) and the
#              issue's goals against what was measured (into status.txt).
#
# 8 files at most come back from the device: env.txt build.log tests.log tests.xml sanitizer.log
# bench.log cuda.csv status.txt; nothing else is written under OUT_DIR. Exits 0 when every step
# did. PYTHON overrides the interpreter (default python3; in a dry run the checkout's .venv when
# there is one); PNR_COMMIT names the commit in the CSV (the device's copy of the tree has no git).
#
# --dry-run (or PNR_GPU_CHECK_DRY_RUN=1): the same script end to end on a machine without a GPU,
# so that the device call cannot fail on a typo. What needs the GPU is replaced, and the step's
# note in status.txt starts with DRY RUN: the tests are collected (TRITON_INTERPRET=1) instead of
# run, the sanitizer's cases run on the CPU kernels without compute-sanitizer, the benchmark
# measures tiny CPU stand-ins (after printing the CUDA plan) and the compile step skips its cases
# through its deadline; TRITON_INTERPRET=1 there, so the benchmark's triton cases run interpreted.
# The wheels, env, build (nvcc for sm_90) and report steps run as they are.
set -uo pipefail

DRY_RUN=${PNR_GPU_CHECK_DRY_RUN:-0}
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "$0: unknown option $1 (usage: $0 [--dry-run] [OUT_DIR])" >&2; exit 2 ;;
        *) OUT_DIR=$1 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    echo "usage: $0 [--dry-run] [OUT_DIR] (OUT_DIR defaults to \$OUT, which is unset)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
if [ "$DRY_RUN" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    PYTHON="$ROOT/.venv/bin/python"
fi
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the H200; every step sees it, so all share one build (cache key). PNR_GPU_CHECK_ARCHS overrides
# it (the dry run's test reuses the suite's build that way).
export TORCH_CUDA_ARCH_LIST=${PNR_GPU_CHECK_ARCHS:-9.0}
if [ "$DRY_RUN" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
STATUS="$OUT_DIR/status.txt"
START=$(date +%s)
FAILED_STEPS=()

elapsed() { echo $(( $(date +%s) - START )); }

# step_timeout CAP RESERVE: CAP seconds, or less so that RESERVE seconds stay for the steps after.
step_timeout() {
    local left=$(( BUDGET - $(elapsed) - $2 ))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

record() {  # record NAME RC SECONDS TIMEOUT NOTE...
    local name=$1 rc=$2 secs=$3 limit=$4
    shift 4
    printf 'step %-9s rc=%-3s seconds=%-4s timeout=%-4s %s\n' "$name" "$rc" "$secs" "$limit" "$*" >> "$STATUS"
    if [ "$rc" != 0 ] && [ "$rc" != "-" ]; then FAILED_STEPS+=("$name"); fi
}

# run_step NAME TIMEOUT LOG NOTE -- COMMAND...: COMMAND under `timeout`, appended to LOG; sets RC.
run_step() {
    local name=$1 limit=$2 log=$3 note=$4
    shift 5
    if [ "$limit" -lt 5 ]; then
        RC=- SECS=0 LIMIT=$limit
        record "$name" - 0 "$limit" "NOT RUN: the budget of ${BUDGET} s is spent"
        FAILED_STEPS+=("$name")
        return
    fi
    echo "== $name: $* (timeout ${limit} s)" >> "$log"
    local t0
    t0=$(date +%s)
    timeout -s INT -k 15 "$limit" "$@" >> "$log" 2>&1
    RC=$?
    SECS=$(( $(date +%s) - t0 ))
    LIMIT=$limit
    [ "$RC" = 124 ] && note="TIMED OUT; $note"
    echo "== $name: rc=$RC after ${SECS} s" >> "$log"
    record "$name" "$RC" "$SECS" "$limit" "$note"
    echo "[$(elapsed) s] $name: rc=$RC after ${SECS} s"
}

MODE=device
[ "$DRY_RUN" = 1 ] && MODE=dry-run
: > "$STATUS"
echo "gpu_check mode=$MODE started=$(date -u +%Y-%m-%dT%H:%M:%SZ) budget=${BUDGET}s python=$PY" \
    "commit=${PNR_COMMIT:-unknown}" >> "$STATUS"

# --- wheels: carried packages the device machine lacks (benchmarks/gpu_wheels.sh) -------------
shopt -s nullglob
WHEELS=("${PNR_GPU_CHECK_WHEELS:-$ROOT/.whl}"/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    SITE="$SCRATCH/site"
    run_step wheels "$(step_timeout 60 390)" "$OUT_DIR/env.txt" "${#WHEELS[@]} wheels into $SITE" -- \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${WHEELS[@]}"
    [ "$RC" = 0 ] && export PYTHONPATH="$PYTHONPATH:$SITE"
else
    record wheels - 0 0 "no wheels in .whl/ (benchmarks/gpu_wheels.sh fetches them)"
fi

# --- env: device, driver and versions ----------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || { [ -x /usr/local/cuda/bin/compute-sanitizer ] && echo /usr/local/cuda/bin/compute-sanitizer; })
cat > "$SCRATCH/env.py" <<'EOF'
import importlib, importlib.metadata, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("device", props.name, "capability", f"{props.major}.{props.minor}", "SMs", props.multi_processor_count,
          "memory", f"{props.total_memory / 2 ** 30:.1f} GiB")
for dist, module in (("triton", "triton"), ("numpy", "numpy"), ("pytest", "pytest"), ("pytest-xdist", "xdist"),
                     ("pytest-timeout", "pytest_timeout"), ("inf-cl", "inf_cl")):
    try:
        importlib.import_module(module)
        print(dist, importlib.metadata.version(dist))
    except Exception as error:  # noqa: BLE001
        print(dist, "MISSING:", type(error).__name__, error)
EOF
ENV_NOTE="nvidia-smi, torch, triton, nvcc, compute-sanitizer"
[ "$DRY_RUN" = 1 ] && ENV_NOTE="DRY RUN: no GPU here, nvidia-smi and the device lines are absent"
run_step env "$(step_timeout 30 380)" "$OUT_DIR/env.txt" "$ENV_NOTE" -- bash -c '
    uname -a; nproc; free -g | head -2
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    "$1" "$2"
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc); "$nvcc" --version | tail -2
    if [ -n "$3" ]; then "$3" --version | head -2; else echo "compute-sanitizer: not found"; fi
' env "$PY" "$SCRATCH/env.py" "$SANITIZER"
HAVE_XDIST=0; HAVE_TIMEOUT=0
grep -qs '^pytest-xdist [0-9]' "$OUT_DIR/env.txt" && HAVE_XDIST=1
grep -qs '^pytest-timeout [0-9]' "$OUT_DIR/env.txt" && HAVE_TIMEOUT=1

# --- build: the native extension, CUDA part for sm_90 only --------------------------------------
BUILD_LOG="$OUT_DIR/build.log"
BUILD_NOTE="TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
[ "$DRY_RUN" = 1 ] && BUILD_NOTE="DRY RUN: CPU torch, the CUDA part is compiled as a check only; $BUILD_NOTE"
run_step build "$(step_timeout 120 330)" "$BUILD_LOG" "$BUILD_NOTE" -- "$PY" -m pnr_kernels.native build
BUILD_OK=0
if [ "$RC" = 0 ] && grep -qs '^CUDA part: ' "$BUILD_LOG"; then
    BUILD_OK=1
    LIBRARY=$(sed -n 's/^\(built\|cached\): //p' "$BUILD_LOG" | tail -1)
    if command -v cuobjdump >/dev/null && [ -n "$LIBRARY" ]; then
        echo "== cuobjdump --list-elf $LIBRARY" >> "$BUILD_LOG"
        cuobjdump --list-elf "$LIBRARY" >> "$BUILD_LOG" 2>&1
    fi
elif [ "$RC" = 0 ]; then
    sed -i '$d' "$STATUS"  # the build ran but without its CUDA part: a failure here
    record build 1 "$SECS" "$LIMIT" "FAILED: the CUDA part was not built (build.log); sanitizer steps skipped"
fi
if [ "$BUILD_OK" = 0 ]; then
    echo "native build failed or has no CUDA part; the end of build.log:"
    tail -25 "$BUILD_LOG" 2>/dev/null
fi

# --- tests: the ones that touch CUDA tensors -----------------------------------------------------
TEST_FILES=(tests/test_infonce_triton.py tests/test_regularizers_triton.py tests/test_common_triton.py
            tests/test_infonce_native_cuda.py tests/test_regularizers_native.py tests/test_public_cuda.py
            tests/test_native_build.py::test_library_registers_cuda_kernels_when_nvcc_is_present
            tests/test_native_build.py::test_cuda_reasons_on_a_torch_with_cuda)
# test_regularizers_native.py also holds CPU tests: only its CUDA ones (ids and names say cuda)
TEST_SELECT="not test_regularizers_native.py or cuda"
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs --durations=15 --junitxml="$OUT_DIR/tests.xml"
        -k "$TEST_SELECT")
TEST_NOTE=""
if [ "$HAVE_XDIST" = 1 ]; then
    if [ "$DRY_RUN" = 1 ]; then PYTEST+=(-n 0); else PYTEST+=(-n 8); fi
else
    TEST_NOTE="pytest-xdist missing: one process; "
fi
if [ "$HAVE_TIMEOUT" = 1 ]; then PYTEST+=(--timeout 150); else TEST_NOTE+="pytest-timeout missing: no per-test timeout; "; fi
if [ "$DRY_RUN" = 1 ]; then
    PYTEST+=(--collect-only)
    TEST_NOTE="DRY RUN: collected only, under TRITON_INTERPRET=1 (no GPU); $TEST_NOTE"
fi
run_step tests "$(step_timeout 170 160)" "$OUT_DIR/tests.log" "${TEST_NOTE}TRITON_INTERPRET=$TRITON_INTERPRET" -- \
    "${PYTEST[@]}" "${TEST_FILES[@]}"
"$PY" - "$OUT_DIR/tests.xml" >> "$STATUS" 2>&1 <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as error:
    print(f"tests: no JUnit XML ({type(error).__name__}: {error})")
    raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("tests: {tests} run, {failures} failed, {errors} errors, {skipped} skipped".format(**count))
for case in root.iter("testcase"):
    for outcome in ("failure", "error"):
        for node in case.findall(outcome):
            print(f"  {outcome}: {case.get('classname')}::{case.get('name')}: {(node.get('message') or '')[:160]}")
EOF
[ "$DRY_RUN" = 1 ] && [ -f "$OUT_DIR/tests.log" ] && \
    grep -c '::' "$OUT_DIR/tests.log" | sed 's/^/tests: collected (dry run) /' >> "$STATUS"

# --- sanitizer: memcheck and racecheck on the smallest native CUDA cases --------------------------
SAN_LOG="$OUT_DIR/sanitizer.log"
CASES=("$PY" benchmarks/gpu_sanitize_cases.py)
sanitize() {  # sanitize TOOL CAP RESERVE
    local tool=$1 cap=$2 reserve=$3
    if [ "$DRY_RUN" = 1 ]; then
        if [ "$tool" = memcheck ]; then
            run_step "$tool" "$(step_timeout "$cap" "$reserve")" "$SAN_LOG" \
                "DRY RUN: the cases on the CPU kernels, without compute-sanitizer (needs a GPU)" -- \
                "${CASES[@]}" --device cpu
        else
            record "$tool" - 0 0 "DRY RUN: skipped, compute-sanitizer needs a GPU (the cases ran under memcheck's step)"
        fi
        return
    fi
    if [ "$BUILD_OK" = 0 ]; then record "$tool" - 0 0 "skipped: no native CUDA build"; return; fi
    if [ -z "$SANITIZER" ]; then record "$tool" 1 0 0 "FAILED: compute-sanitizer not found"; return; fi
    local before filter=() what="every kernel (this compute-sanitizer has no --kernel-name)"
    if "$SANITIZER" --help 2>&1 | grep -q -- '--kernel-name'; then
        filter=(--kernel-name kns=pnr_kernels) what="our kernels only (--kernel-name kns=pnr_kernels)"
    fi
    before=$(wc -l < "$SAN_LOG" 2>/dev/null || echo 0)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "$tool" "$(step_timeout "$cap" "$reserve")" "$SAN_LOG" "$what" -- \
        "$SANITIZER" --tool "$tool" --error-exitcode 99 --print-limit 20 "${filter[@]}" "${CASES[@]}"
    if [ "$RC" != - ] && tail -n +"$((before + 1))" "$SAN_LOG" | grep -q 'Device not supported\|error 999'; then
        sed -i '$d' "$STATUS"
        [ "$RC" != 0 ] && unset 'FAILED_STEPS[-1]'
        record "$tool" - "$SECS" "$LIMIT" "the runtime refused the device under compute-sanitizer (rc=$RC, sanitizer.log): not checked"
    fi
}
touch "$SAN_LOG"
sanitize memcheck 45 115
sanitize racecheck 45 70

# --- bench: our backends and Inf-CL, then torch.compile of the reference -------------------------
BENCH_LOG="$OUT_DIR/bench.log"
CSV="$OUT_DIR/cuda.csv"
if [ "$DRY_RUN" = 1 ]; then
    T=$(step_timeout 240 40)
    run_step bench "$T" "$BENCH_LOG" "DRY RUN: the CUDA plan printed, tiny CPU stand-ins measured" -- \
        "$PY" benchmarks/gpu_bench.py --dry-run --backends reference native triton infcl --csv "$CSV" \
        --deadline-s $((T - 10))
    T=$(step_timeout 60 20)
    run_step compile "$T" "$BENCH_LOG" "DRY RUN: every case skipped through its deadline (no compilation)" -- \
        "$PY" benchmarks/gpu_bench.py --dry-run --backends torch_compile --csv "$CSV" --deadline-s 0
else
    T=$(step_timeout 170 60)
    run_step bench "$T" "$BENCH_LOG" "reference native triton infcl" -- \
        "$PY" benchmarks/gpu_bench.py --backends reference native triton infcl --csv "$CSV" --deadline-s $((T - 15))
    T=$(step_timeout 300 20)
    run_step compile "$T" "$BENCH_LOG" "torch.compile of the reference, headline sizes first" -- \
        "$PY" benchmarks/gpu_bench.py --backends torch_compile --csv "$CSV" --deadline-s $((T - 5)) \
        --case-reserve-s 45
fi

# --- report: the generated docs tables and the issue's goals --------------------------------------
if [ -s "$CSV" ]; then
    DOCS="$SCRATCH/benchmarks.md"
    "$PY" -c "from pnr_kernels import bench_report as r; print(r.DOCS_BEGIN); print(r.DOCS_END)" > "$DOCS"
    run_step report "$(step_timeout 30 0)" "$BENCH_LOG" "pnr-bench report of cuda.csv, goals below" -- \
        "$PY" -m pnr_kernels.bench report --csv "$CSV" --docs "$DOCS"
    cat "$DOCS" >> "$BENCH_LOG"
    "$PY" benchmarks/gpu_bench.py --summary "$CSV" >> "$STATUS" 2>&1
else
    record report 1 0 0 "FAILED: no cuda.csv to report"
fi

FILES=$(cd "$OUT_DIR" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')
echo "files $(cd "$OUT_DIR" && find . -type f | wc -l): $FILES" >> "$STATUS"
if [ ${#FAILED_STEPS[@]} -eq 0 ]; then
    echo "result ok mode=$MODE seconds=$(elapsed)" >> "$STATUS"
else
    echo "result FAILED mode=$MODE seconds=$(elapsed) steps: ${FAILED_STEPS[*]}" >> "$STATUS"
fi
cat "$STATUS"
[ ${#FAILED_STEPS[@]} -eq 0 ]
