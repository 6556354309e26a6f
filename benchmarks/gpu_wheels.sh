#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on the device machine, which reaches no package
# registry: downloaded here into .whl/ at the checkout root (kept out of git by a .gitignore of
# `*` inside it), for Python 3.12 on x86-64 (the device's python3). Usage, from anywhere:
#
#     benchmarks/gpu_wheels.sh [--pytest-plugins]
#
# Always: inf-cl (Inf-CL's cal_inf_loss, the NT-Xent peer of the benchmark; pure Python, its
# needs numpy and triton are on the device). --pytest-plugins adds pytest-xdist, execnet and
# pytest-timeout, for an image that lacks them (the H200 image of 2026-11 has them; gpu_check.sh
# runs without -n / --timeout, and says so in status.txt, when they are missing).
# Then name the folder in the device call: carry [".whl"]; gpu_check.sh installs what is there.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WANT=("inf-cl==1.2.1")
if [ "${1:-}" = "--pytest-plugins" ]; then
    WANT+=("pytest-xdist==3.8.0" "execnet==2.1.1" "pytest-timeout==2.4.0")
elif [ $# -gt 0 ]; then
    echo "usage: $0 [--pytest-plugins]" >&2
    exit 2
fi
mkdir -p "$ROOT/.whl"
echo '*' > "$ROOT/.whl/.gitignore"  # ignores the folder's every file, itself included (any clone, any worktree)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$ROOT/.whl" "${WANT[@]}"
ls -l "$ROOT/.whl"
du -sh "$ROOT/.whl"
