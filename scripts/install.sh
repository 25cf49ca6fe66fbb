#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install resumer with its test tools.
# torch goes first and stays pinned: an unpinned torch pulls several GB of CUDA packages.
#   bash scripts/install.sh [VENV] [--no-compile]
# --no-compile leaves the bytecode to be written on first import (CI does this: compiling all ~26,000 files of the
# venv, most never imported, took pip about 60 s on 2 cores; Python then writes .pyc only for what runs, unless
# PYTHONDONTWRITEBYTECODE is set, which these machines set and CI unsets for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
compile=()
case "${2:-}" in
  "") ;;
  --no-compile) compile=(--no-compile) ;;
  *) echo "install.sh: unknown option '$2' (usage: bash scripts/install.sh [VENV] [--no-compile])" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "${compile[@]}" torch==2.13.0
pip install -q "${compile[@]}" -c .ci/constraints.txt -e '.[test]'
python -c "import torch, resumer; print('resumer', resumer.__version__, 'torch', torch.__version__)"
