#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for trying the multi-node placement of rlhf_ray:
# a head node (runs the job driver, hosts no workers), ROLLOUT_NODES nodes that advertise the
# `rollout_node` resource and LEARNER_NODES nodes that advertise `learner_node` (see
# rlhf_ray/placement.py; train with cluster.node_resources=true). Every node binds to 127.0.0.1,
# uses free ports and a Ray temp dir of its own under $RLHF_LOCAL_DIR (`ray start --temp-dir` is
# per node): each node's runtime-env agent unpacks a job's working_dir into its own node's
# session directory, so two agents never unpack into, or delete, the directory a driver is
# importing from. Token authentication is on unless RAY_AUTH_MODE says otherwise (a token is
# generated into $RLHF_LOCAL_DIR/auth_token).
#
#   cluster/local_multinode.sh start     # prints how to use it; writes $RLHF_LOCAL_DIR/env
#   source /tmp/rlhf_ray_local/env       # RAY_ADDRESS, RAY_API_SERVER_ADDRESS, auth settings
#   python -m rlhf_ray.train cluster.node_resources=true dry_run=true   # check the plan
#   deploy/submit.sh cluster.node_resources=true trainer.total_steps=2   # run it as a job
#   cluster/local_multinode.sh stop      # stops exactly these nodes (by pid, then by temp dir)
#
# Knobs (environment): RLHF_LOCAL_DIR (default /tmp/rlhf_ray_local; keep it short: unix socket
# paths), RAY (ray binary; default .venv/bin/ray or `ray` on PATH), ROLLOUT_NODES (1),
# LEARNER_NODES (1), ROLLOUT_CPUS (2: engines per rollout node), LEARNER_CPUS (6: learner, critic,
# reference and reward workers per learner node), HEAD_CPUS (1), OBJECT_STORE_MB (256 per node).
set -euo pipefail

DIR=${RLHF_LOCAL_DIR:-/tmp/rlhf_ray_local}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${RAY:-} ]]; then
  if [[ -x $HERE/.venv/bin/ray ]]; then RAY=$HERE/.venv/bin/ray; else RAY=$(command -v ray); fi
fi
PYTHON=$(dirname "$RAY")/python
[[ -x $PYTHON ]] || PYTHON=python3
ROLLOUT_NODES=${ROLLOUT_NODES:-1}
LEARNER_NODES=${LEARNER_NODES:-1}
ROLLOUT_CPUS=${ROLLOUT_CPUS:-2}
LEARNER_CPUS=${LEARNER_CPUS:-6}
HEAD_CPUS=${HEAD_CPUS:-1}
OBJECT_STORE=$(( ${OBJECT_STORE_MB:-256} * 1024 * 1024 ))

free_ports() {  # N free TCP ports on 127.0.0.1
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

launch() {  # launch NAME TEMP ARGS...: `ray start --block` in its own session with Ray temp dir
  # $DIR/TEMP (short: unix socket paths); its pid goes to $DIR/pids
  local name=$1 temp=$DIR/$2; shift 2
  # PATH: `python` in job entrypoints is the interpreter of this ray (e.g. the project's venv)
  PATH="$(dirname "$RAY"):$PATH" setsid "$RAY" start --block --disable-usage-stats --node-ip-address=127.0.0.1 --temp-dir="$temp" \
    --object-store-memory="$OBJECT_STORE" "$@" >"$DIR/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >>"$DIR/pids"
}

alive_nodes() {  # print the alive node types ("head x1, rollout x1"); succeed once there are $1 nodes
  timeout 30 "$PYTHON" - "$1" 2>/dev/null <<'EOF'  # ray.init waits on and on for a head that never started
import collections, os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="ERROR")
kinds = collections.Counter(n["Labels"].get("rlhf-ray/node-type", "?") for n in ray.nodes() if n["Alive"])
print(", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none")
sys.exit(0 if sum(kinds.values()) >= int(sys.argv[1]) else 1)
EOF
}

wait_nodes() {  # wait until the cluster has $1 alive nodes; else name the node types alive
  local want=$1 alive=""
  local deadline=$((SECONDS + ${START_TIMEOUT_S:-180}))
  while ((SECONDS < deadline)); do
    if alive=$(alive_nodes "$want"); then return 0; fi
    sleep 1
  done
  echo "cluster did not reach $want nodes in ${START_TIMEOUT_S:-180} s (alive: ${alive:-none, the head does not answer});" \
    "logs in $DIR/*.log" >&2
  return 1
}

start() {
  if [[ -f $DIR/pids ]]; then
    echo "$DIR/pids exists: a cluster may be running; run '$0 stop' first" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
  if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' >"$DIR/auth_token")
    export RAY_AUTH_TOKEN_PATH=$DIR/auth_token
  fi
  # every port of every node in one go, so no two nodes can be handed the same free port
  local ports
  read -r -a ports < <(free_ports $((7 + 4 * (ROLLOUT_NODES + LEARNER_NODES))))
  read -r GCS DASH AGENT AGENT_GRPC RTENV CLIENT METRICS <<<"${ports[*]:0:7}"
  ports=("${ports[@]:7}")
  # slow machines: give each node's agents longer than the default to come up
  export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-120000}
  launch head h --head --port="$GCS" --num-cpus="$HEAD_CPUS" --resources='{}' \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --dashboard-agent-listen-port="$AGENT" --dashboard-agent-grpc-port="$AGENT_GRPC" \
    --runtime-env-agent-port="$RTENV" --ray-client-server-port="$CLIENT" --metrics-export-port="$METRICS" \
    --labels="rlhf-ray/node-type=head"
  export RAY_ADDRESS=127.0.0.1:$GCS
  wait_nodes 1 || { stop; exit 1; }
  # every other node at once; if one does not come up, the error lists the node types alive
  local i kind nodes=1
  for kind in rollout learner; do
    local count=$ROLLOUT_NODES cpus=$ROLLOUT_CPUS
    [[ $kind == learner ]] && count=$LEARNER_NODES cpus=$LEARNER_CPUS
    for ((i = 0; i < count; i++)); do
      read -r AGENT AGENT_GRPC RTENV NODE_METRICS <<<"${ports[*]:0:4}"  # (METRICS stays the head's)
      ports=("${ports[@]:4}")
      launch "$kind-node-$i" "${kind:0:1}$i" --address="$RAY_ADDRESS" --num-cpus="$cpus" \
        --resources="{\"${kind}_node\": $cpus}" --labels="rlhf-ray/node-type=$kind" \
        --dashboard-agent-listen-port="$AGENT" --dashboard-agent-grpc-port="$AGENT_GRPC" \
        --runtime-env-agent-port="$RTENV" --metrics-export-port="$NODE_METRICS"
      nodes=$((nodes + 1))
    done
  done
  wait_nodes "$nodes" || { stop; exit 1; }
  {
    echo "export RAY_ADDRESS=$RAY_ADDRESS"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    echo "export RLHF_METRICS_URL=http://127.0.0.1:$METRICS/metrics"
  } >"$DIR/env"
  cat <<EOF
local cluster up: 1 head + $ROLLOUT_NODES rollout node(s) + $LEARNER_NODES learner node(s), temp dirs under $DIR
  source $DIR/env
  dashboard:  http://127.0.0.1:$DASH   (head metrics: http://127.0.0.1:$METRICS/metrics)
  stop:       $0 stop
EOF
}

own_pids() {  # every process whose command line names one of our nodes' temp dirs (raylets, workers, agents)
  "$PYTHON" - "$DIR/" <<'EOF'
import os, sys
me, mark = os.getpid(), sys.argv[1].encode()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if int(pid) != me and mark in f.read():
                print(pid)
    except OSError:
        pass
EOF
}

stop_nodes() {  # stop_nodes PID...: TERM each node's `ray start --block`, KILL its group after 20 s
  # TERM goes to `ray start` alone: it drains its node and stops the node's processes (TERM to
  # its whole process group also hits the head's GCS, and the head's drain then hangs).
  local pid left
  for pid; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 200); do
    left=0
    for pid; do kill -0 "$pid" 2>/dev/null && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for pid; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

stop() {
  if [[ ! -f $DIR/pids ]]; then
    echo "no $DIR/pids: nothing started here" >&2
    return 0
  fi
  local pid name left workers=() heads=()
  while read -r pid name; do
    if [[ $name == head ]]; then heads+=("$pid"); else workers+=("$pid"); fi
  done <"$DIR/pids"
  # The worker nodes first (they drain through the head's GCS), then the head.
  stop_nodes "${workers[@]}"
  stop_nodes "${heads[@]}"
  # whatever is left of ours (workers in process groups of their own)
  for _ in $(seq 1 10); do
    left=$(own_pids)
    [[ -z $left ]] && break
    sleep 1
  done
  [[ -n ${DEBUG_STOP:-} && -n $left ]] && ps -o pid,pgid,etime,cmd -p "$(echo $left | tr ' ' ,)" | cut -c1-160 >&2
  for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$DIR/pids" "$DIR/env"
  echo "stopped the local cluster in $DIR"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) [[ -f $DIR/pids ]] && cat "$DIR/pids" && echo "$(own_pids | wc -l) processes" || echo "not running" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
