#!/usr/bin/env bash
# Regenerate every committed CPU benchmark result from one command, from anywhere:
#
#     benchmarks/regenerate_cpu.sh [--sweep-only] [--full-sweep] [--replace]
#
# 0. pnr-bench limits: the machine's FLOP and bandwidth limits and step floor, measured now (the cache replaced:
#    --remeasure) so that percent_of_peak divides by what this machine does on this quiet run;
# 1. pnr-bench --interleave --sweep --quick for SimCLR-PNR and NT-Xent (reference, native, torch_compile, pml
#    where its memory allows; batches 256, 512, 1024), upserted into benchmarks/data/cpu.csv;
#    with --full-sweep, the full sweep instead (batches 256 to 16384, each backend stopped at its
#    memory or time budget; about half an hour on 2 quiet cores);
# 2. unless --sweep-only: the default grid of every loss (pnr-bench --device cpu --interleave,
#    peers included: B = 256 to 4096, MoCo also at K = 65536, the regularisers at D = 128 and 2048),
#    upserted into the same CSV;
# Every size's candidates (backends and peers) are timed interleaved in one process (--interleave),
# so that machine noise hits all of them alike.
# 3. pnr-bench report: docs/figures/*.png, the generated tables of docs/benchmarks.md and the
#    generated results of README.md, from the CSV alone.
#
# Rows are keyed by (CPU name, loss, backend, dtype, D, K, batch, mode, metric): a re-run on the
# same machine replaces them, a run on another machine adds a section; --replace starts the CSV
# afresh. DTYPES="float32 bfloat16" measures both dtypes (default float32). Measure on a quiet
# machine: every row records the 1-minute load average, and the docs say when it exceeded the
# core count. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CSV=benchmarks/data/cpu.csv
sweep_only=0
quick=--quick
for arg in "$@"; do
    case "$arg" in
        --sweep-only) sweep_only=1 ;;
        --full-sweep) quick= ;;
        --replace) rm -f "$CSV" ;;
        *) echo "usage: $0 [--sweep-only] [--full-sweep] [--replace]" >&2; exit 2 ;;
    esac
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

dtypes=${DTYPES:-float32}
"$PY" -m pnr_kernels.bench limits --remeasure --dtypes $dtypes
"$PY" -m pnr_kernels.bench --device cpu --interleave --sweep $quick --losses simclr_pnr nt_xent --dtypes $dtypes \
    --json "$tmp/sweep.json" --csv "$CSV" --plot "$tmp/sweep_figures"
if [ "$sweep_only" -eq 0 ]; then
    "$PY" -m pnr_kernels.bench --device cpu --interleave --dtypes $dtypes --json "$tmp/grid.json" --csv "$CSV"
fi
"$PY" -m pnr_kernels.bench report --csv "$CSV" --docs docs/benchmarks.md --readme README.md --plot docs/figures
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
