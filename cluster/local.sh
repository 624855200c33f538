#!/usr/bin/env bash
# Local cluster for llm2clip-pipeline: a Ray head with token authentication and an MLflow
# tracking server (sqlite + artifact dir), both bound to 127.0.0.1 only.
#
#   cluster/local.sh up       start both (idempotent: leaves running services alone)
#   cluster/local.sh down     stop both
#   cluster/local.sh status   print what runs where; exit 1 if either is down
#   cluster/local.sh env      print the environment file jobs and clients source
#
# The test rig (issue 32: object storage and a second node, no shared disk, on one machine):
#   cluster/local.sh storage-up|storage-down   an S3-protocol server (moto) on 127.0.0.1:$LLM2CLIP_S3_PORT
#                                              (9000), buckets $LLM2CLIP_S3_BUCKETS; its AWS_* in s3/s3.env
#   cluster/local.sh node-up|node-down|node-status
#                                              a second Ray node joined to this head, in a private mount
#                                              namespace where this run dir and <repo>/.run are empty;
#                                              its own temp dir and scratch (a tmpfs only it sees) under
#                                              $LLM2CLIP_NODE_DIR (/tmp/llm2clip-node2-<ray port>)
#   cluster/local.sh node-kill-raylet          SIGKILL that node's raylet (a kill drill)
#
# Everything lives under $LLM2CLIP_RUN_DIR (default: <repo>/.run): ray/ (temp dir, token,
# logs), mlflow/ (mlflow.db, artifacts/), s3/, cluster.env. Ports come from LLM2CLIP_RAY_PORT
# (6379), LLM2CLIP_DASHBOARD_PORT (8265), LLM2CLIP_CLIENT_PORT (10001), LLM2CLIP_AGENT_PORT
# (52365), LLM2CLIP_MLFLOW_PORT (5000): give a second local cluster its own set.
# LLM2CLIP_MLFLOW_ARTIFACTS (default mlflow/artifacts) is where the MLflow server keeps
# artifacts, e.g. s3://mlflow: the server then needs AWS_* in its environment; clients reach
# artifacts through the server (mlflow-artifacts:/) and need none.
# Ray processes (the head and the second node) start WITHOUT the caller's AWS_*: a job must hand
# its storage settings to its workers (runtime_env), as on a cluster whose nodes have none.
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
mlflow_artifacts=${LLM2CLIP_MLFLOW_ARTIFACTS:-$mlflow_dir/artifacts}
s3_port=${LLM2CLIP_S3_PORT:-9000}
s3_dir=$run_dir/s3
s3_buckets=${LLM2CLIP_S3_BUCKETS:-mlflow llm2clip}
# The second node keeps everything under /tmp, outside every hidden path; one per head (its port).
node_dir=${LLM2CLIP_NODE_DIR:-/tmp/llm2clip-node2-$ray_port}
node_cpus=${LLM2CLIP_NODE_CPUS:-2}
node_resources=${LLM2CLIP_NODE_RESOURCES:-'{"node2": 100}'}
# Not the default 52365: that is the agent port of a demo head on this machine.
node_agent_port=${LLM2CLIP_NODE_AGENT_PORT:-$((agent_port + 1))}
node_object_store=${LLM2CLIP_NODE_OBJECT_STORE_BYTES:-2000000000}
# Hidden on the second node: this head's run dir, the repository's .run/ (prepared models) and
# any more paths in LLM2CLIP_NODE_HIDE (space-separated).
node_hide="$run_dir $repo/.run ${LLM2CLIP_NODE_HIDE:-}"
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
storage_up() { curl -fsS "http://127.0.0.1:$s3_port/" >/dev/null 2>&1; }
# The command, run without any AWS_* variable of this shell (see the header).
without_aws() {
  local unset=() v
  for v in $(compgen -e); do [[ $v == AWS_* ]] && unset+=(-u "$v"); done
  env "${unset[@]}" "$@"
}

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
  without_aws setsid ray start --head --node-ip-address 127.0.0.1 --port "$ray_port" \
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
  if mlflow_up; then
    # A running server keeps the artifact store it was started with.
    local had; had=$(cat "$mlflow_dir/artifacts.uri" 2>/dev/null || true)
    [ "$had" = "$mlflow_artifacts" ] || echo "mlflow: already running with artifacts at ${had:-?}, not $mlflow_artifacts (restart it: down, up)" >&2
    return
  fi
  mkdir -p "$mlflow_dir"
  [[ $mlflow_artifacts == *://* ]] || mkdir -p "$mlflow_artifacts"
  # setsid: the server outlives this script and the shell that ran it.
  setsid "$venv/bin/mlflow" server --host 127.0.0.1 --port "$mlflow_port" \
    --backend-store-uri "sqlite:///$mlflow_dir/mlflow.db" \
    --artifacts-destination "$mlflow_artifacts" --workers 1 \
    >"$mlflow_dir/server.log" 2>&1 </dev/null &
  echo $! >"$mlflow_dir/server.pid"
  echo "$mlflow_artifacts" >"$mlflow_dir/artifacts.uri"
}

wait_mlflow() {
  for _ in $(seq 1 120); do mlflow_up && break; sleep 1; done
  mlflow_up || { tail -20 "$mlflow_dir/server.log" >&2; echo "mlflow: server did not come up" >&2; exit 1; }
  echo "mlflow: tracking server at $MLFLOW_TRACKING_URI (store $mlflow_dir, artifacts $mlflow_artifacts)"
}

stop_ray() {
  # `ray stop` would stop every Ray on the machine; stop only this head's session.
  stop_session "$(cat "$ray_dir/session.sid" 2>/dev/null || true)"
  rm -f "$ray_dir/session.sid"
  echo "ray: stopped"
}

stop_session() {
  # SIGTERM, then SIGKILL, every process of session $1 (one `setsid` start: a head or a node).
  local sid=$1 pids sig
  [ -n "$sid" ] || return 0
  for sig in TERM TERM TERM KILL; do
    pids=$(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}')
    [ -n "$pids" ] || break
    kill -s $sig $pids 2>/dev/null || true
    sleep 1
  done
}

# ---------------------------------------------------------------- S3-protocol server (moto)
write_s3_env() {
  mkdir -p "$s3_dir"
  # moto takes any credentials; these name the loopback server and keep SDKs off the network.
  cat >"$s3_dir/s3.env" <<EOF
# Written by cluster/local.sh storage-up: the S3-protocol server on loopback (moto).
export AWS_ENDPOINT_URL=http://127.0.0.1:$s3_port
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
EOF
}

start_storage() {
  write_s3_env
  if storage_up; then
    echo "s3: already running at http://127.0.0.1:$s3_port"
  else
    # setsid: the server outlives this script. moto keeps objects in memory: storage-down loses them.
    setsid "$venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port" >"$s3_dir/server.log" 2>&1 </dev/null &
    echo $! >"$s3_dir/server.pid"
    for _ in $(seq 1 60); do storage_up && break; sleep 0.5; done
    storage_up || { tail -20 "$s3_dir/server.log" >&2; echo "s3: server did not come up" >&2; exit 1; }
    echo "s3: moto at http://127.0.0.1:$s3_port (objects in memory)"
  fi
  # shellcheck disable=SC1091
  (source "$s3_dir/s3.env" && "$venv/bin/python" - $s3_buckets <<'EOF'
import sys, boto3
s3 = boto3.client("s3")
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for name in sys.argv[1:]:
    if name not in have:
        s3.create_bucket(Bucket=name)
print("s3: buckets", " ".join(f"s3://{n}" for n in sys.argv[1:]))
EOF
  )
  echo "s3: env: source $s3_dir/s3.env"
}

stop_storage() {
  stop_server "$s3_dir/server.pid"
  echo "s3: stopped"
}

# ---------------------------------------------------------------- second Ray node
node_sid() { cat "$node_dir/session.sid" 2>/dev/null || true; }
# The live raylet of the node's session (empty when none; a killed one left unreaped is a zombie).
node_raylet() {
  local sid; sid=$(node_sid)
  [ -n "$sid" ] || return 0
  ps -eo pid=,sid=,stat=,comm= | awk -v s="$sid" '$2 == s && $3 !~ /^Z/ && $4 == "raylet" {print $1}' | head -1
}

start_node() {
  if [ -n "$(node_raylet)" ]; then echo "node2: already running (raylet $(node_raylet))"; return; fi
  ray_up || { echo "node2: the head at $RAY_ADDRESS is not up" >&2; exit 1; }
  local d
  for d in $node_hide; do
    case "$node_dir/" in "$d"/*) echo "node2: its dir $node_dir is under $d, which it must not see" >&2; exit 2 ;; esac
  done
  stop_session "$(node_sid)"  # what is left of an earlier node (after a raylet kill)
  # A fresh node starts with an empty disk.
  rm -rf "${node_dir:?}"
  mkdir -p "$node_dir/scratch"
  # The head's token lies under its run dir, hidden on the node: the node reads its own copy.
  (umask 077 && cp "$token_file" "$node_dir/auth_token")
  # setsid: one session for the node's processes (node-down stops it); unshare: the raylet, and
  # every worker it starts, inherit the private mount namespace that _node-inside prepares.
  without_aws setsid -w unshare -m --propagation private "$repo/cluster/local.sh" _node-inside \
    >"$node_dir/start.log" 2>&1 </dev/null \
    || { cat "$node_dir/start.log" >&2; echo "node2: failed to start (log above)" >&2; exit 1; }
  local raylet; raylet=$(node_raylet)
  [ -n "$raylet" ] || { cat "$node_dir/start.log" >&2; echo "node2: no raylet in session $(node_sid)" >&2; exit 1; }
  # Check from outside, through /proc/PID/root (the raylet's view of the file tree), that the
  # raylet has its own mount namespace and sees the hidden paths empty.
  [ "$(readlink /proc/"$raylet"/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] \
    || { echo "node2: raylet $raylet shares this mount namespace" >&2; exit 1; }
  for d in $node_hide; do
    if [ -d "$d" ] && [ -n "$(ls -A "/proc/$raylet/root$d" 2>/dev/null)" ]; then
      echo "node2: $d is not hidden from raylet $raylet" >&2; exit 1
    fi
  done
  echo "node2: raylet $raylet joined $RAY_ADDRESS (resources $node_resources, $node_cpus CPUs, dir $node_dir; hidden: $node_hide)"
}

# Runs as the session leader inside the new mount namespace (see start_node).
node_inside() {
  ps -o sid= -p $$ | tr -d ' ' >"$node_dir/session.sid"
  local d
  for d in $node_hide; do
    # A path under one already hidden is gone now: skip it.
    if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 llm2clip-hidden "$d"; fi
  done
  # The node's scratch is its own disk: a tmpfs only this namespace sees (the head finds the
  # folder empty), lost with the node.
  mount -t tmpfs -o mode=0755 llm2clip-node2-scratch "$node_dir/scratch"
  export LLM2CLIP_RUN_DIR=$node_dir/scratch RAY_AUTH_TOKEN_PATH=$node_dir/auth_token
  cd "$node_dir"
  # Not --block: `ray start` returns once the raylet is up; the raylet and its workers stay in
  # this namespace (a namespace lives while a process uses it).
  exec ray start --address "$RAY_ADDRESS" --node-ip-address 127.0.0.1 --temp-dir "$node_dir/tmp" \
    --num-cpus "$node_cpus" --resources "$node_resources" --object-store-memory "$node_object_store" \
    --dashboard-agent-listen-port "$node_agent_port" --disable-usage-stats
}

stop_node() {
  stop_session "$(node_sid)"
  rm -f "$node_dir/session.sid"
  echo "node2: stopped"
}

kill_raylet() {
  local raylet; raylet=$(node_raylet)
  [ -n "$raylet" ] || { echo "node2: no raylet running" >&2; exit 1; }
  kill -KILL "$raylet"
  echo "node2: SIGKILL sent to raylet $raylet"
}

# A server started with setsid, its pid in $1: kill its whole group (MLflow's gunicorn/uvicorn
# workers), wait for it, forget it.
stop_server() {
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  rm -f "$1"
}

stop_mlflow() {
  stop_server "$mlflow_dir/server.pid"
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
    # A second node of this head first: without its head it would only retry for a minute.
    if [ -f "$node_dir/session.sid" ]; then stop_node; fi
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
  storage-up) start_storage ;;
  storage-down) stop_storage ;;
  node-up) start_node ;;
  node-down) stop_node ;;
  node-status)
    if [ -n "$(node_raylet)" ]; then echo "node2: up (raylet $(node_raylet), dir $node_dir)"; else echo "node2: down"; exit 1; fi
    ;;
  node-kill-raylet) kill_raylet ;;
  _node-inside) node_inside ;;
  *)
    echo "usage: $0 up|down|status|env|storage-up|storage-down|node-up|node-down|node-status|node-kill-raylet" >&2
    exit 2
    ;;
esac
