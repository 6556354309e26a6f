# Sourced by scripts/run and scripts/test: create or reuse .venv at the checkout root and install
# what is missing into it, so that a machine with only python3 (3.9+) and git needs nothing else.
#
#   * .venv is made with `python3 -m venv` (set PNR_PYTHON to use another interpreter);
#   * torch is installed pinned (PNR_TORCH, default torch==2.13.0) unless .venv already has a
#     torch: an open-ended `torch` would let pip pick a multi-GB CUDA build on a CPU machine. On a
#     machine that installs from PyPI, PNR_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#     selects the CPU build; on a GPU machine install the CUDA build of your choice into .venv
#     first and the scripts keep it;
#   * then the package itself, editable, with its train and dev extras.
#
# A stamp in .venv records what was installed (the pyproject.toml hash and the torch pin); a
# second call with the same stamp installs nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON_BIN="${PNR_PYTHON:-python3}"
TORCH_PIN="${PNR_TORCH:-torch==2.13.0}"
STAMP="$VENV/.pnr-kernels-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16) $TORCH_PIN"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    :  # set up by an earlier call
else
    setup_start=$(date +%s)
    echo "setting up $VENV (first call only; one to three minutes)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON_BIN" -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        echo "  torch: keeping the one in $VENV ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
    else
        echo "  torch: installing $TORCH_PIN"
        "${PIP[@]}" ${PNR_TORCH_INDEX_URL:+--extra-index-url "$PNR_TORCH_INDEX_URL"} "$TORCH_PIN"
    fi
    echo "  pnr-kernels: installing this checkout (editable) with its train and dev extras"
    "${PIP[@]}" -e "$ROOT[train,dev]"
    echo "$WANT" > "$STAMP"
    echo "set up in $(( $(date +%s) - setup_start )) s"
fi
export PATH="$VENV/bin:$PATH"
