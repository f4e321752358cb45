#!/usr/bin/env bash
# Start Salient's stack on one machine: a local S3 endpoint (moto's server), an MLflow server
# (sqlite store, artifacts proxied to that S3 endpoint) and a Ray head with the dashboard (job
# submission). Each service runs in its own session; its PID (= its process group) is recorded
# in the state folder, so stop-stack.sh stops exactly these and nothing else on the machine.
#
#   infra/local/start-stack.sh            # then: source "$STATE/env" (printed at the end)
#   salient submit jobs/explain.yaml --address http://127.0.0.1:8265 --python "$PWD/.venv/bin/python"
#   infra/local/stop-stack.sh
#
# Settings (environment): SALIENT_STACK_DIR (state folder), SALIENT_BIN (folder with python,
# moto_server, mlflow and ray; default .venv/bin), S3_PORT (9000), MLFLOW_PORT (5000), RAY_PORT
# (6379), RAY_DASHBOARD_PORT (8265), RAY_CLIENT_PORT (10001), RAY_AGENT_PORT (52365: the head's
# dashboard agent, which runs submitted jobs), RAY_NUM_CPUS (all), SALIENT_BUCKET
# (salient), RAY_AUTH_MODE (token: Ray 2.60's default; the token is ~/.ray/auth_token).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="${SALIENT_BIN:-$ROOT/.venv/bin}"
STATE="${SALIENT_STACK_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/salient-stack}"
S3_PORT="${S3_PORT:-9000}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
RAY_PORT="${RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
RAY_AGENT_PORT="${RAY_AGENT_PORT:-52365}"
RAY_NUM_CPUS="${RAY_NUM_CPUS:-$(nproc)}"
BUCKET="${SALIENT_BUCKET:-salient}"
S3="http://127.0.0.1:${S3_PORT}"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED=0
# The stack's processes read storage the way cluster nodes do: from their environment. moto
# accepts any credentials; real ones already in the environment are kept.
export AWS_ENDPOINT_URL="$S3" MLFLOW_S3_ENDPOINT_URL="$S3"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-local-stack}"
export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-local-stack}"
export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"

mkdir -p "$STATE"
for name in s3 mlflow ray; do
    if [[ -f "$STATE/$name.pid" ]] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
        echo "error: $name is already running (pid $(cat "$STATE/$name.pid")); run stop-stack.sh" >&2
        exit 1
    fi
done

# A taken port would fail later and obscurely (Ray's agent dies, then "No available agent to
# submit job"): check them all now, by name.
for var in S3_PORT MLFLOW_PORT RAY_PORT RAY_DASHBOARD_PORT RAY_CLIENT_PORT RAY_AGENT_PORT; do
    if ! "$BIN/python" -c "import socket, sys; socket.create_server(('127.0.0.1', int(sys.argv[1])))" "${!var}" 2>/dev/null; then
        echo "error: port ${!var} is taken (set $var to another port)" >&2
        exit 1
    fi
done

launch() {  # NAME CMD...: own session (setsid), so its PID is the group stop-stack.sh kills
    local name=$1
    shift
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

wait_http() {  # NAME URL SECONDS
    local deadline=$((SECONDS + $3))
    until "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; do
        if ((SECONDS > deadline)) || ! kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; then
            echo "error: $1 did not come up at $2; see $STATE/$1.log" >&2
            "$ROOT/infra/local/stop-stack.sh"
            exit 1
        fi
        sleep 0.5
    done
    echo "$1: $2"
}

launch s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
wait_http s3 "$S3/moto-api/" 30
"$BIN/python" - "$S3" "$BUCKET" <<'PY'
import sys

import boto3

s3 = boto3.client("s3", endpoint_url=sys.argv[1])
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[2])
PY

launch mlflow "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --artifacts-destination "s3://$BUCKET/mlflow-artifacts"
wait_http mlflow "http://127.0.0.1:$MLFLOW_PORT/health" 90

if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    "$BIN/ray" get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token only if missing
fi
launch ray "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 \
    --port="$RAY_PORT" --ray-client-server-port="$RAY_CLIENT_PORT" \
    --dashboard-agent-listen-port="$RAY_AGENT_PORT" \
    --dashboard-host=127.0.0.1 --dashboard-port="$RAY_DASHBOARD_PORT" \
    --num-cpus="$RAY_NUM_CPUS" --temp-dir="$STATE/ray" --disable-usage-stats
wait_http ray "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" 90

cat >"$STATE/env" <<ENV
# source this file to talk to the local stack (no secrets here)
export AWS_ENDPOINT_URL=$S3
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
export RAY_AUTH_MODE=$RAY_AUTH_MODE
ENV
echo "stack up; state in $STATE (source $STATE/env); stop with infra/local/stop-stack.sh"
