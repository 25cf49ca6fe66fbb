#!/usr/bin/env bash
# Fresh machine to a running demo: install into .venv, then `resumer demo` (local folder, no services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh .venv
. .venv/bin/activate
resumer demo --dir resumer-demo "$@"
