#!/usr/bin/env bash
# Stop exactly what deploy/local/up.sh started: the recorded MLflow and S3 server processes (with their
# children) and the Ray head's processes, found by its own --temp-dir (plus `ray start`'s process group and
# every descendant, e.g. job drivers). It never runs `ray stop`, which would stop EVERY Ray of this user.
# Idempotent: with nothing running it says so and exits 0. Logs and the MLflow database stay in
# deploy/local/.state; `down.sh --purge` removes that folder too.
set -euo pipefail
# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

PURGE=0
case "${1:-}" in
    -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --purge) PURGE=1 ;;
    "") ;;
    *) rl_die "unknown argument '$1' (usage: down.sh [--purge] [--help])" ;;
esac
say() { [[ -n "${RL_QUIET:-}" ]] || rl_say "$@"; }

if [[ ! -d "$RL_STATE" ]]; then
    say "nothing to stop (no state at $RL_STATE)"
    exit 0
fi

failed=()
stopped=0
for name in mlflow s3; do
    pid=$(rl_service_pid "$name")
    [[ -n "$pid" ]] || continue
    pids=$( { rl_tree "$pid"; rl_group "$pid"; } | sort -u | tr '\n' ' ')  # uvicorn/gunicorn children too
    say "stopping $name (pid $pid)"
    # shellcheck disable=SC2086
    left=$(rl_stop_pids $pids)
    [[ -z "$left" ]] || failed+=("$name: $left")
    stopped=1
done

ray_tmp=$(rl_ray_get tmp) || true
ray_pids=$(rl_ray_pids | tr '\n' ' ')
if [[ -n "${ray_pids// /}" ]]; then
    say "stopping Ray head ($(wc -w <<<"$ray_pids" | tr -d ' ') processes under $ray_tmp)"
    # shellcheck disable=SC2086
    left=$(RL_GRACE=${RL_RAY_GRACE:-8} rl_stop_pids $ray_pids)  # the GCS can hang ~15 s flushing metrics
    [[ -z "$left" ]] || failed+=("ray: $left")
    stopped=1
fi
# Ray workers can be forked while we stop the rest: one more sweep for anything naming the temp dir.
if [[ -n "$ray_tmp" ]]; then
    left=""
    late=$(rl_pids_matching "$ray_tmp/" | tr '\n' ' ')
    # shellcheck disable=SC2086
    [[ -z "${late// /}" ]] || left=$(rl_stop_pids $late)
    [[ -z "${left:-}" ]] || failed+=("ray (late): $left")
fi

if ((${#failed[@]})); then
    rl_die "could not stop: ${failed[*]} (see ps; logs in $RL_LOGS)"
fi
rm -f "$RL_ENV" "$RL_PIDS" "$RL_RAY"
if ((PURGE)); then
    rm -rf "$RL_STATE"
    [[ -z "$ray_tmp" || "$ray_tmp" == "$RL_STATE"/* ]] || rm -rf "$ray_tmp"
    say "purged $RL_STATE"
fi
if ((stopped)); then say "down"; else say "nothing was running"; fi
