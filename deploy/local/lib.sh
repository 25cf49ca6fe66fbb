# Shared by up.sh and down.sh (sourced, not run). Bash; Linux or macOS (uses ps, not /proc).
# shellcheck shell=bash

RL_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RL_ROOT=$(cd "$RL_HERE/../.." && pwd)
RL_STATE=${RESUMER_LOCAL_STATE:-$RL_HERE/.state}
[[ $RL_STATE == /* ]] || RL_STATE=$PWD/$RL_STATE
RL_LOGS=$RL_STATE/logs
RL_PIDS=$RL_STATE/pids          # lines: NAME PID PORT  (mlflow, s3)
RL_RAY=$RL_STATE/ray.info       # lines: KEY VALUE      (tmp, pgid, gcs_port, dashboard_port)
RL_ENV=$RL_STATE/env            # export lines for the user's shell

rl_die() { echo "error: $*" >&2; exit 1; }
rl_say() { echo "[resumer-local] $*"; }

# The project's virtualenv if there is one, else PATH.
rl_bin() {
    if [[ -x "$RL_ROOT/.venv/bin/$1" ]]; then echo "$RL_ROOT/.venv/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
    else rl_die "'$1' not found (looked in $RL_ROOT/.venv/bin and PATH); install the project with its test extras: pip install -e '.[test]'"
    fi
}

# Running (a zombie, exited but not yet reaped by its parent, counts as gone).
rl_alive() {
    local stat
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n "$stat" && $stat != Z* ]]
}

# `ps -ww`: whole command lines, whatever COLUMNS says (with COLUMNS=80 in the environment, as pytest-xdist's workers
# have it, ps cuts each line at 80 characters, and a temp dir or port later in it would not be found).
rl_args() { ps -ww -o args= -p "$1" 2>/dev/null || true; }

# The value recorded for KEY in the ray state file.
rl_ray_get() { [[ -f "$RL_RAY" ]] && awk -v k="$1" '$1 == k { sub(/^[^ ]+ /, ""); print; exit }' "$RL_RAY"; }

# PID of a recorded service, only if that process still is the service (PID reuse guard: name and port).
rl_service_pid() {
    local name=$1 pid port args
    [[ -f "$RL_PIDS" ]] || return 0
    read -r pid port < <(awk -v n="$name" '$1 == n { print $2, $3; exit }' "$RL_PIDS") || return 0
    rl_alive "$pid" || return 0
    args=$(rl_args "$pid")
    case $name in
        mlflow) [[ $args == *mlflow* && $args == *"$port"* ]] && echo "$pid" ;;
        s3) [[ $args == *moto_server* && $args == *"$port"* ]] && echo "$pid" ;;
    esac
    return 0
}

# Every process whose command line contains NEEDLE (a path unique to this deployment), not this shell's own.
rl_pids_matching() {
    ps -ww -eo pid=,args= | awk -v needle="$1" -v me="$$" 'index($0, needle) && $1 != me && $2 != "awk" { print $1 }'
}

# Members of process group PGID.
rl_group() {
    [[ -n "${1:-}" ]] || return 0
    ps -eo pid=,pgid= | awk -v g="$1" '$2 == g { print $1 }'
}

# The given PIDs and all their descendants (one per line).
rl_tree() {
    [[ $# -gt 0 ]] || return 0
    ps -eo pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            changed = 1
            while (changed) { changed = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 } }
            for (p in keep) if (p in parent) print p
        }'
}

# TERM the given PIDs, wait up to $RL_GRACE seconds, KILL what is left. Prints the PIDs still alive after that.
rl_stop_pids() {
    local pid left deadline
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    deadline=$((SECONDS + ${RL_GRACE:-10}))
    while ((SECONDS < deadline)); do
        left=()
        for pid in "$@"; do rl_alive "$pid" && left+=("$pid"); done
        ((${#left[@]} == 0)) && return 0
        sleep 0.2
    done
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.5
    for pid in "${left[@]}"; do rl_alive "$pid" && echo "$pid"; done
    return 0
}

# Every process of this deployment's Ray: those naming its temp dir, its process group, and their children.
rl_ray_pids() {
    local tmp pgid roots pid
    tmp=$(rl_ray_get tmp) || true
    pgid=$(rl_ray_get pgid) || true
    [[ -n "$tmp" ]] || return 0
    roots=$(rl_pids_matching "$tmp/" | tr '\n' ' ')
    [[ -n "${roots// /}" ]] || return 0  # none left: the recorded group id may belong to someone else by now
    for pid in $(rl_group "$pgid"); do   # `ray start`'s session: daemons that do not name the temp dir
        [[ $(rl_args "$pid") == *ray* ]] && roots+=" $pid"
    done
    # shellcheck disable=SC2086
    [[ -n "${roots// /}" ]] && rl_tree $roots | sort -u
    return 0
}
