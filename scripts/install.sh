#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install resumer with its test tools.
# torch goes first and stays pinned: an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
pip install -q -c .ci/constraints.txt -e '.[test]'
python -c "import torch, resumer; print('resumer', resumer.__version__, 'torch', torch.__version__)"
