#!/usr/bin/env bash
# Local cluster for llm2clip-pipeline: a Ray head with token authentication and an MLflow
# tracking server (sqlite + artifact dir), both bound to 127.0.0.1 only.
#
#   cluster/local.sh up       start both (idempotent: leaves running services alone)
#   cluster/local.sh down     stop both
#   cluster/local.sh status   print what runs where; exit 1 if either is down
#   cluster/local.sh env      print the environment file jobs and clients source
#
# Everything lives under $LLM2CLIP_RUN_DIR (default: <repo>/.run): ray/ (temp dir, token,
# logs), mlflow/ (mlflow.db, artifacts/), cluster.env. Ports come from LLM2CLIP_RAY_PORT
# (6379), LLM2CLIP_DASHBOARD_PORT (8265), LLM2CLIP_CLIENT_PORT (10001), LLM2CLIP_AGENT_PORT
# (52365), LLM2CLIP_MLFLOW_PORT (5000): give a second local cluster its own set.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${LLM2CLIP_RUN_DIR:-$repo/.run}
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
venv=${LLM2CLIP_VENV:-$repo/.venv}
ray_port=${LLM2CLIP_RAY_PORT:-6379}
dash_port=${LLM2CLIP_DASHBOARD_PORT:-8265}
client_port=${LLM2CLIP_CLIENT_PORT:-10001}
agent_port=${LLM2CLIP_AGENT_PORT:-52365}
mlflow_port=${LLM2CLIP_MLFLOW_PORT:-5000}
ray_dir=$run_dir/ray
mlflow_dir=$run_dir/mlflow
env_file=$run_dir/cluster.env
token_file=$ray_dir/auth_token

[ -x "$venv/bin/ray" ] || { echo "no virtualenv at $venv: run 'make venv' first" >&2; exit 2; }
# Submitted jobs run `python`: the head inherits this PATH, so that is the venv's python.
export PATH="$venv/bin:$PATH"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file LLM2CLIP_RUN_DIR=$run_dir
export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port
export RAY_ADDRESS=127.0.0.1:$ray_port
# Keep Ray off the network: no usage stats upload.
export RAY_USAGE_STATS_ENABLED=0

write_env() {
  cat >"$env_file" <<EOF
# Written by cluster/local.sh: source it to talk to the local cluster.
export LLM2CLIP_RUN_DIR=$run_dir
export RAY_ADDRESS=127.0.0.1:$ray_port
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$token_file
export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$dash_port
export MLFLOW_TRACKING_URI=http://127.0.0.1:$mlflow_port
export RAY_USAGE_STATS_ENABLED=0
EOF
}

# `ray status` retries for ~40 s when nothing listens: ask it only once the GCS port answers.
port_open() { timeout 2 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }
ray_up() { port_open "$ray_port" && ray status --address "$RAY_ADDRESS" >/dev/null 2>&1; }
mlflow_up() { curl -fsS "http://127.0.0.1:$mlflow_port/health" >/dev/null 2>&1; }

start_ray() {
  if ray_up; then echo "ray: already running at $RAY_ADDRESS"; return; fi
  mkdir -p "$ray_dir"
  if [ ! -s "$token_file" ]; then
    (umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$token_file")
  fi
  local cpus=()
  [ -n "${LLM2CLIP_RAY_CPUS:-}" ] && cpus=(--num-cpus "$LLM2CLIP_RAY_CPUS")
  # setsid: every Ray process of this head shares one session, which `down` stops.
  # Ray's gRPC ports (GCS, raylet, Ray Client) listen on all interfaces whatever
  # --node-ip-address says; token auth guards them. Dashboard/jobs API: loopback only.
  setsid ray start --head --node-ip-address 127.0.0.1 --port "$ray_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash_port" --include-dashboard true \
    --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" --temp-dir "$ray_dir/tmp" --disable-usage-stats "${cpus[@]}" \
    >"$ray_dir/start.log" 2>&1 </dev/null \
    || { cat "$ray_dir/start.log" >&2; echo "ray: failed to start (log above)" >&2; exit 1; }
  pgrep -f -- "gcs_server.*$ray_dir/tmp" | head -1 | xargs -r ps -o sid= -p | tr -d ' ' >"$ray_dir/session.sid"
  for _ in $(seq 1 60); do ray_up && break; sleep 1; done
  ray_up || { echo "ray: head did not come up; see $ray_dir/start.log" >&2; exit 1; }
  echo "ray: head at $RAY_ADDRESS, dashboard http://127.0.0.1:$dash_port (token auth on)"
}

start_mlflow() {
  if mlflow_up; then return; fi
  mkdir -p "$mlflow_dir/artifacts"
  # setsid: the server outlives this script and the shell that ran it.
  setsid "$venv/bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" \
    --backend-store-uri "sqlite:///$mlflow_dir/mlflow.db" \
    --artifacts-destination "$mlflow_dir/artifacts" --workers 1 \
    >"$mlflow_dir/server.log" 2>&1 </dev/null &
  echo $! >"$mlflow_dir/server.pid"
}

wait_mlflow() {
  for _ in $(seq 1 120); do mlflow_up && break; sleep 1; done
  mlflow_up || { tail -20 "$mlflow_dir/server.log" >&2; echo "mlflow: server did not come up" >&2; exit 1; }
  echo "mlflow: tracking server at $MLFLOW_TRACKING_URI (store $mlflow_dir)"
}

stop_ray() {
  # `ray stop` would stop every Ray on the machine; stop only this head's session.
  local sid pids
  sid=$(cat "$ray_dir/session.sid" 2>/dev/null || true)
  if [ -n "$sid" ]; then
    for sig in TERM TERM TERM KILL; do
      pids=$(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}')
      [ -n "$pids" ] || break
      kill -s $sig $pids 2>/dev/null || true
      sleep 1
    done
    rm -f "$ray_dir/session.sid"
  fi
  echo "ray: stopped"
}

stop_mlflow() {
  if [ -f "$mlflow_dir/server.pid" ]; then
    local pid; pid=$(cat "$mlflow_dir/server.pid")
    # The server runs in its own session: kill the whole group (gunicorn/uvicorn workers).
    kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    rm -f "$mlflow_dir/server.pid"
  fi
  echo "mlflow: stopped"
}

case "${1:-}" in
  up)
    write_env
    # The MLflow server starts while Ray does (each takes tens of seconds on a small machine).
    start_mlflow
    start_ray
    wait_mlflow
    echo "env: source $env_file"
    ;;
  down)
    stop_ray
    stop_mlflow
    ;;
  status)
    rc=0
    if ray_up; then echo "ray: up at $RAY_ADDRESS (dashboard http://127.0.0.1:$dash_port)"; else echo "ray: down"; rc=1; fi
    if mlflow_up; then echo "mlflow: up at $MLFLOW_TRACKING_URI"; else echo "mlflow: down"; rc=1; fi
    exit $rc
    ;;
  env)
    write_env
    cat "$env_file"
    ;;
  *)
    echo "usage: $0 up|down|status|env" >&2
    exit 2
    ;;
esac
