#!/usr/bin/env bash
# Stop what start-stack.sh started, and only that: the process groups whose PIDs it recorded in
# the state folder (never `ray stop`, which would stop every Ray on the machine).
# SIGTERM first, SIGKILL after STOP_GRACE seconds (default 10; Ray's GCS can take longer).
set -uo pipefail

STATE="${SALIENT_STACK_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/salient-stack}"
GRACE="${STOP_GRACE:-10}"

alive() {  # PGID: true while a live (non-zombie) process is in the group
    ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
}

for name in ray mlflow s3; do
    pidfile="$STATE/$name.pid"
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    # the recorded PID must still lead its own group: a reused PID is someone else's process
    if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" == "$pid" ]]; then
        kill -TERM -- "-$pid" 2>/dev/null
        for _ in $(seq 1 $((GRACE * 4))); do
            alive "$pid" || break
            sleep 0.25
        done
        if alive "$pid"; then
            kill -KILL -- "-$pid" 2>/dev/null
        fi
        echo "$name: stopped (process group $pid)"
    else
        echo "$name: not running"
    fi
    rm -f "$pidfile"
done
