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
# mutmut forks each mutant's run from a process that already ran the tests; a thread pool made before a fork has no
# threads in the child (a wait on it lasts until mutmut's timeout, reported as a timeout, not a kill). resumer's own
# read pool is made afresh in a forked child; torch's intra-op OpenMP pool is kept out with one thread.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
rm -rf mutants
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" || true
python scripts/mutation_summary.py
