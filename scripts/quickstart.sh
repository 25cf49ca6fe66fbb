#!/usr/bin/env bash
# Fresh machine to the main job, on embedded defaults (no services to start): install into .venv, run the
# demo (plan, refusal, rename, resume on a local folder), then the mlp job on 2 Ray Train CPU workers with
# embedded Ray and MLflow on SQLite, and print the decisions it recorded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh .venv
. .venv/bin/activate
resumer demo --dir resumer-demo
resumer submit jobs/mlp.yaml
resumer history mlp
