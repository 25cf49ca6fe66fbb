#!/usr/bin/env bash
# Bring up resumer's local "cluster" on 127.0.0.1 only, with free ports:
#   - a multi-process Ray head (`ray start --head`, 2 CPUs, dashboard + Jobs API), its temp dir project-local;
#   - an MLflow tracking server (sqlite under deploy/local/.state, 1 worker);
#   - an S3 API server (moto_server, in memory) with a bucket named "resumer".
# Their addresses go to deploy/local/.state/env:  source deploy/local/.state/env
# Idempotent: when everything is already up it prints the addresses and exits 0. Take it down with down.sh.
#
# Environment: RESUMER_LOCAL_STATE (state dir, default deploy/local/.state), RESUMER_LOCAL_CPUS (default 2),
# RESUMER_LOCAL_TIMEOUT_S (seconds to wait for each service, default 90).
set -euo pipefail
# shellcheck source=deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

case "${1:-}" in
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) rl_die "unknown argument '$1' (usage: up.sh [--help])" ;;
esac

CPUS=${RESUMER_LOCAL_CPUS:-2}
TIMEOUT_S=${RESUMER_LOCAL_TIMEOUT_S:-90}
PY=$(rl_bin python)
RAY=$(rl_bin ray)
MLFLOW=$(rl_bin mlflow)
MOTO=$(rl_bin moto_server)
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
# On Linux, Ray replaces --node-ip-address=127.0.0.1 with the machine's external address; this keeps every
# address Ray advertises (and the servers that bind to the node address) on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Jobs submitted to this Ray run `python`, `resumer`, ... from PATH: the project's environment first.
PATH="$(dirname "$PY"):$PATH"
export PATH

# 0 when URL answers HTTP (any status), never through a proxy from the environment.
rl_http() {
    "$PY" - "$1" <<'PY'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open(sys.argv[1], timeout=2).close()
except urllib.error.HTTPError:
    pass
except OSError:
    sys.exit(1)
PY
}

# ---- already up? ------------------------------------------------------------------------------------------
status() {  # prints "up" / "down" for ray mlflow s3
    local r=down m=down s=down
    [[ -n "$(rl_ray_pids)" ]] && r=up
    [[ -n "$(rl_service_pid mlflow)" ]] && m=up
    [[ -n "$(rl_service_pid s3)" ]] && s=up
    echo "$r $m $s"
}
if [[ -f "$RL_PIDS" || -f "$RL_RAY" ]]; then
    read -r ray_up mlflow_up s3_up < <(status)
    if [[ $ray_up == up && $mlflow_up == up && $s3_up == up && -f "$RL_ENV" ]]; then
        rl_say "already up (state: $RL_STATE):"
        grep '^export' "$RL_ENV"
        exit 0
    fi
    if [[ $ray_up == up || $mlflow_up == up || $s3_up == up ]]; then
        rl_die "partly up (ray: $ray_up, mlflow: $mlflow_up, s3: $s3_up). Run $RL_HERE/down.sh, then up.sh again."
    fi
    rl_say "removing stale state from an earlier run (nothing of it is running)"
    rm -f "$RL_PIDS" "$RL_RAY" "$RL_ENV"
fi

# ---- where --------------------------------------------------------------------------------------------------
mkdir -p "$RL_STATE" "$RL_LOGS"
for log in ray-start mlflow s3; do  # this run's logs only (the previous run's stay as *.log.prev)
    [[ -f "$RL_LOGS/$log.log" ]] && mv -f "$RL_LOGS/$log.log" "$RL_LOGS/$log.log.prev"
done
# Ray puts unix sockets under <temp-dir>/session_<date>_<pid>/sockets/: ~60 characters more, 107 at most.
RAY_TMP=$RL_STATE/ray-tmp
if ((${#RAY_TMP} > 44)); then
    RAY_TMP=${TMPDIR:-/tmp}/resumer-ray-$(printf '%s' "$RL_STATE" | cksum | cut -d' ' -f1)
    RAY_TMP=${RAY_TMP//\/\//\/}
    rl_say "state dir path too long for Ray's sockets; Ray's temp dir is $RAY_TMP"
fi
((${#RAY_TMP} <= 46)) || rl_die "Ray temp dir $RAY_TMP is too long for unix sockets; set TMPDIR or RESUMER_LOCAL_STATE to a shorter path"
mkdir -p "$RAY_TMP"

read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_HTTP AGENT_GRPC RTENV_PORT METRICS_PORT NM_PORT OM_PORT \
    MLFLOW_PORT S3_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(11)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
')

# Start a detached command (own session and process group, stdin closed, output to LOG); print its PID.
# With --wait, wait for it to exit instead and print "PID EXIT_STATUS".
spawn() {
    local wait=0
    [[ $1 == --wait ]] && { wait=1; shift; }
    local log=$1 cwd=$2; shift 2
    "$PY" - "$wait" "$log" "$cwd" "$@" <<'PY'
import subprocess, sys
wait, log, cwd, cmd = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4:]
with open(log, "ab") as out:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                         start_new_session=True)
print(f"{p.pid} {p.wait()}" if wait else p.pid)
PY
}

STARTED=0
cleanup_on_error() {
    local rc=$?
    if ((rc != 0 && STARTED)); then
        echo "error: bring-up failed; stopping what was started (logs stay in $RL_LOGS)" >&2
        RL_QUIET=1 "$RL_HERE/down.sh" >&2 || true
    fi
    exit "$rc"
}
trap cleanup_on_error EXIT

wait_for() {  # NAME URL PID|"" LOG
    local name=$1 url=$2 pid=$3 log=$4 deadline=$((SECONDS + TIMEOUT_S))
    until rl_http "$url"; do
        if [[ -n $pid ]] && ! rl_alive "$pid"; then
            tail -n 30 "$log" >&2 || true
            rl_die "$name exited during start-up (log: $log)"
        fi
        ((SECONDS < deadline)) || { tail -n 30 "$log" >&2 || true; rl_die "$name did not answer $url within ${TIMEOUT_S}s (log: $log)"; }
        sleep 0.5
    done
}

# ---- Ray head -----------------------------------------------------------------------------------------------
rl_say "starting Ray head (127.0.0.1:$GCS_PORT, dashboard :$DASH_PORT, $CPUS CPUs, temp dir $RAY_TMP)"
STARTED=1
printf 'tmp %s\n' "$RAY_TMP" >"$RL_RAY"  # first, so down.sh can find a head that fails half way
# RAY_ADDRESS for the head's processes: Ray's own "auto" lookups in workers (e.g. Ray Train's state queries)
# otherwise fail when another Ray runs on this machine ("Found multiple active Ray instances").
read -r RAY_PGID RAY_RC < <(spawn --wait "$RL_LOGS/ray-start.log" "$RL_ROOT" \
    env RAY_ADDRESS="127.0.0.1:$GCS_PORT" "$RAY" start --head \
    --node-ip-address=127.0.0.1 --port="$GCS_PORT" --num-cpus="$CPUS" --temp-dir="$RAY_TMP" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_HTTP" \
    --dashboard-agent-grpc-port="$AGENT_GRPC" --runtime-env-agent-port="$RTENV_PORT" \
    --metrics-export-port="$METRICS_PORT" --node-manager-port="$NM_PORT" --object-manager-port="$OM_PORT" \
    --disable-usage-stats)
printf 'tmp %s\npgid %s\ngcs_port %s\ndashboard_port %s\n' "$RAY_TMP" "$RAY_PGID" "$GCS_PORT" "$DASH_PORT" >"$RL_RAY"
if [[ $RAY_RC != 0 ]]; then
    tail -n 30 "$RL_LOGS/ray-start.log" >&2 || true
    rl_die "ray start failed (exit $RAY_RC; log: $RL_LOGS/ray-start.log)"
fi
wait_for "Ray Jobs API" "http://127.0.0.1:$DASH_PORT/api/version" "" "$RL_LOGS/ray-start.log"

# ---- MLflow -------------------------------------------------------------------------------------------------
rl_say "starting MLflow server (127.0.0.1:$MLFLOW_PORT, sqlite:///$RL_STATE/mlflow.db)"
MLFLOW_PID=$(spawn "$RL_LOGS/mlflow.log" "$RL_STATE" "$MLFLOW" server \
    --backend-store-uri "sqlite:///$RL_STATE/mlflow.db" --artifacts-destination "$RL_STATE/mlartifacts" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1)
printf 'mlflow %s %s\n' "$MLFLOW_PID" "$MLFLOW_PORT" >>"$RL_PIDS"

# ---- S3 (moto) ----------------------------------------------------------------------------------------------
rl_say "starting S3 API server (moto, 127.0.0.1:$S3_PORT)"
S3_PID=$(spawn "$RL_LOGS/s3.log" "$RL_STATE" "$MOTO" -H 127.0.0.1 -p "$S3_PORT")
printf 's3 %s %s\n' "$S3_PID" "$S3_PORT" >>"$RL_PIDS"

wait_for "MLflow" "http://127.0.0.1:$MLFLOW_PORT/health" "$MLFLOW_PID" "$RL_LOGS/mlflow.log"
wait_for "S3 server" "http://127.0.0.1:$S3_PORT/" "$S3_PID" "$RL_LOGS/s3.log"
"$PY" - "http://127.0.0.1:$S3_PORT/resumer" <<'PY' || rl_die "could not create the bucket 'resumer' on the S3 server"
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
opener.open(urllib.request.Request(sys.argv[1], method="PUT"), timeout=10).close()
PY

# ---- addresses ----------------------------------------------------------------------------------------------
cat >"$RL_ENV.tmp" <<EOF
# Written by deploy/local/up.sh; remove with deploy/local/down.sh.   source $RL_ENV
# Ray's own conventions: RAY_ADDRESS is the GCS address (ray.init, and the Jobs API client finds the dashboard
# from it); RAY_API_SERVER_ADDRESS is the Jobs API's HTTP address ("ray job submit" prefers it).
export RAY_ADDRESS=127.0.0.1:$GCS_PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_AUTH_MODE=disabled
# Without this, Ray on Linux turns 127.0.0.1 into the machine's external address, where nothing listens.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export RESUMER_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export RESUMER_S3_BUCKET=resumer
# The S3 server accepts any credentials, e.g. storage options:
#   {key: testing, secret: testing, client_kwargs: {endpoint_url: http://127.0.0.1:$S3_PORT}}
EOF
mv "$RL_ENV.tmp" "$RL_ENV"
STARTED=0
rl_say "up. Addresses in $RL_ENV:"
grep '^export' "$RL_ENV"
