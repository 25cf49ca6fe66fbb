#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the safety-critical modules named in pyproject.toml [tool.mutmut]:
# each mutant is a small change to the code (a flipped comparison, a dropped call, another constant);
# a good test suite fails on ("kills") nearly every one. Prints killed / survived per module.
# Usage: bash scripts/mutation.sh ['resumer.core.reconcile*' ...]   (mutant name globs; default: every module)
# Not run in CI: the whole set takes about an hour on 2 cores. VENV=.venv by default.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${VENV:-.venv}/bin/activate"
python -c "import mutmut" 2>/dev/null || pip install -q -c .ci/constraints.txt mutmut==3.8.1
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
rm -rf mutants
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" || true
python scripts/mutation_summary.py
