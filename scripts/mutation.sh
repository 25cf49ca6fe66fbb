#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the safety-critical modules named in pyproject.toml [tool.mutmut]:
# each mutant is a small change to the code (a flipped comparison, a dropped call, another constant);
# a good test suite fails on ("kills") nearly every one. Prints killed / survived per module.
# Usage: bash scripts/mutation.sh [--sample] ['resumer.core.reconcile*' ...]   (mutant name globs; default: every
# module). --sample: every mutant whose number ends in 7 (a systematic one-in-ten sample of each function's mutants).
# Not run in CI: the whole set (about 9,000 mutants) takes hours on 2 cores, the sample under one. VENV=.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${VENV:-.venv}/bin/activate"
python -c "import mutmut" 2>/dev/null || pip install -q -c .ci/constraints.txt mutmut==3.8.1
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
# mutmut forks each mutant's run from a process that already ran the tests; a thread pool made before a fork has no
# threads in the child (a wait on it lasts until mutmut's timeout, reported as a timeout, not a kill). resumer's own
# read pool is made afresh in a forked child; torch's intra-op OpenMP pool is kept out with one thread.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
only='*'
if [ "${1:-}" = "--sample" ]; then
  shift
  only='*7'
  modules=$(python -c "import tomllib; print(' '.join(p[:-3].replace('/', '.') + '.*7' for p in
    tomllib.load(open('pyproject.toml', 'rb'))['tool']['mutmut']['only_mutate']))")
  set -- "$@" $modules
fi
rm -rf mutants
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" || true
python scripts/mutation_summary.py --only "$only"
