#!/usr/bin/env bash
# A multi-node Ray cluster on ONE machine, to try the cluster path without a cloud account.
#
#   cluster/local.sh up 2     # a head (0 CPUs, like the cloud head) + 2 worker nodes of 1 CPU each
#   cluster/local.sh status   # the address to use and `ray status` for this cluster
#   cluster/local.sh down     # stops exactly the processes `up` started
#   cluster/local.sh add      # one more 1-CPU worker node (e.g. a replacement)
#   cluster/local.sh nodes    # NAME SESSION-ID per node: head, worker1, worker2, ...
#   cluster/local.sh kill-node worker2   # SIGKILL every process of that node: a lost machine
#
# `up` and `status` print an `export RAY_ADDRESS=... RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...`
# line; paste it into another shell, then:
#   diffscale submit sweeps/demo.yaml                # the driver joins the cluster
#   ray job submit --address http://HEAD_IP:DASHBOARD_PORT --working-dir . -- diffscale submit ...
#
# Every node is a separate `ray start --block` in its own session (setsid), with its own ports
# and its own temp dir, all under ${DIFFSCALE_LOCAL_CLUSTER:-/tmp/diffscale-local-cluster}.
# `down` kills the sessions recorded there, never `ray stop` (which would stop every Ray on
# the machine).
# Which `ray` is used: $DIFFSCALE_RAY, else the `ray` next to this repo's .venv, else PATH.
set -euo pipefail

STATE="${DIFFSCALE_LOCAL_CLUSTER:-/tmp/diffscale-local-cluster}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${DIFFSCALE_RAY:-}" ]]; then RAY="$DIFFSCALE_RAY"
elif [[ -x "$HERE/../.venv/bin/ray" ]]; then RAY="$HERE/../.venv/bin/ray"
else RAY="$(command -v ray || true)"; fi
PY="$(dirname "$RAY")/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
START_TIMEOUT_S="${DIFFSCALE_LOCAL_TIMEOUT_S:-180}"  # a loaded 2-core machine needs minutes
# Ray 2.60 protects a cluster with an auth token; this cluster's one lives in its state dir, and
# every client (ray status, ray job submit, diffscale, ray.init) needs these two variables.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() { echo "local.sh: $*" >&2; exit 2; }

free_ports() {  # free_ports N -> N distinct free TCP ports, one a line
  "$PY" - "$1" <<'PYEOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PYEOF
}

alive_sessions() {  # the recorded session ids that still have a process
  [[ -f "$STATE/sessions" ]] || return 0
  local sid
  while read -r sid; do
    # zombies (exited, not yet reaped) do not count as running
    [[ -n "$sid" ]] && ps -eo sid=,stat= | awk -v s="$sid" '$1 == s && $2 !~ /^Z/ {f=1} END{exit !f}' \
      && echo "$sid"
  done < "$STATE/sessions"
  return 0
}

session_pids() {  # session_pids SID -> the pids in that session
  ps -eo pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ {print $1}'
}

alive_nodes() {  # number of active nodes `ray status` reports for this cluster
  "$RAY" status --address "$(address)" 2>/dev/null \
    | awk '/^Active:/{a=1; next} /^(Pending|Recent failures):/{a=0} a && /node_/{n++} END{print n+0}'
}

start_node() {  # start_node NAME ARGS... : one `ray start --block` in a new session
  local name="$1"; shift
  setsid "$RAY" start --block "$@" > "$STATE/logs/$name.log" 2>&1 < /dev/null &
  LAST_PID=$!
  echo "$LAST_PID" >> "$STATE/sessions"  # setsid execs in place: this pid is the session id
  echo "$name $LAST_PID" >> "$STATE/nodes"
}

forget_node() {  # forget_node SID: a node that failed to start
  sed -i "/^$1\$/d" "$STATE/sessions"
  sed -i "/ $1\$/d" "$STATE/nodes"
}

start_worker() {  # start_worker NAME: a 1-CPU worker node, started again if it misses Ray's timeout
  local attempt
  for attempt in 1 2 3; do
    # One at a time: on a small machine, raylets starting together can miss Ray's start
    # timeout (30 s, fixed inside Ray); a node that missed it exits, and is started again.
    # Its own temp dir, as on a machine of its own: nodes that share one also share the
    # runtime-env cache (runtime_resources/), and a worker node deleting a job's unused
    # working_dir there pulls it from under the job's entrypoint on the head.
    # shellcheck disable=SC2046
    start_node "$1" --address="$(address)" --num-cpus=1 --num-gpus=0 \
      --temp-dir="$STATE/r${1#worker}" --disable-usage-stats $(node_ports)
    wait_started "$STATE/logs/$1.log" "$LAST_PID" && return 0
    echo "worker node $1 did not start (attempt $attempt of 3)" >&2
    kill -KILL -- "-$LAST_PID" 2>/dev/null || true
    forget_node "$LAST_PID"
  done
  return 1
}

node_ports() {  # the per-node ports that default to fixed numbers or must differ per raylet
  local p; mapfile -t p < <(free_ports 6)
  echo "--node-manager-port=${p[0]} --object-manager-port=${p[1]} --metrics-export-port=${p[2]}" \
       "--dashboard-agent-listen-port=${p[3]} --dashboard-agent-grpc-port=${p[4]}" \
       "--runtime-env-agent-port=${p[5]}"
}

cmd_up() {
  local n="${1:-2}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "up N: N must be a whole number of worker nodes, got '$n'"
  [[ -x "$RAY" ]] || die "no 'ray' found (set DIFFSCALE_RAY or install the project: make test)"
  if [[ -n "$(alive_sessions)" ]]; then
    die "a cluster is already running under $STATE (cluster/local.sh status; cluster/local.sh down)"
  fi
  # Ray puts unix sockets under $STATE/ray/session_<date>_<pid>/sockets/: 107 bytes at most.
  ((${#STATE} <= 40)) || die "DIFFSCALE_LOCAL_CLUSTER='$STATE' is too long for Ray's socket paths (40 characters at most)"
  # Jobs (ray job submit) run their entrypoint with the nodes' PATH: find this venv's
  # python / diffscale first.
  PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"; export PATH
  rm -rf "$STATE"; mkdir -p "$STATE/logs"
  (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' > "$RAY_AUTH_TOKEN_PATH")
  local gcs dash client
  { read -r gcs; read -r dash; read -r client; } < <(free_ports 3)
  echo "$gcs" > "$STATE/gcs_port"; echo "$dash" > "$STATE/dashboard_port"
  # The head offers no CPUs: trials run only on worker nodes, as on the cloud configs.
  # shellcheck disable=SC2046
  start_node head --head --num-cpus=0 --num-gpus=0 \
    --port="$gcs" --dashboard-port="$dash" --ray-client-server-port="$client" \
    --include-dashboard=true --dashboard-host=0.0.0.0 --temp-dir="$STATE/ray" \
    --disable-usage-stats $(node_ports)
  wait_head_ip || { echo "head did not start; its log:" >&2; tail -20 "$STATE/logs/head.log" >&2; cmd_down >&2; exit 1; }
  local i
  for ((i = 1; i <= n; i++)); do start_worker "worker$i" || true; done
  if ! wait_nodes $((n + 1)); then
    echo "only $(alive_nodes) of $((n + 1)) nodes joined; the last worker's log:" >&2
    tail -20 "$STATE/logs/worker$n.log" >&2 2>/dev/null || true
    cmd_down >&2
    exit 1
  fi
  echo "up: 1 head (0 CPUs) + $n worker nodes (1 CPU each); state in $STATE"
  print_address
}

wait_head_ip() {  # the node IP Ray chose for the head, from its log, into $STATE/head_ip
  local deadline=$((SECONDS + START_TIMEOUT_S)) ip
  while ((SECONDS < deadline)); do
    ip="$(grep 'Local node IP' "$STATE/logs/head.log" | grep -oE '[0-9]+(\.[0-9]+){3}' | head -1 || true)"
    if [[ -n "$ip" ]]; then echo "$ip" > "$STATE/head_ip"; wait_nodes 1; return; fi
    [[ -n "$(alive_sessions)" ]] || return 1
    sleep 1
  done
  return 1
}

wait_started() {  # wait_started LOG PID: until `ray start --block` says its node is up
  local deadline=$((SECONDS + START_TIMEOUT_S))
  while ((SECONDS < deadline)); do
    grep -q "Ray runtime started" "$1" 2>/dev/null && return 0
    # it exited (Ray's own start timeout); an exited child stays a zombie until reaped
    [[ "$(ps -o stat= -p "$2" 2>/dev/null)" =~ ^[^Z] ]] || return 1
    sleep 1
  done
  return 1
}

wait_nodes() {  # wait_nodes K: until K nodes are active (or START_TIMEOUT_S passes)
  local deadline=$((SECONDS + START_TIMEOUT_S))
  while ((SECONDS < deadline)); do
    [[ "$(alive_nodes)" -ge "$1" ]] && return 0
    [[ -n "$(alive_sessions | head -1)" ]] || return 1  # every node exited: no use waiting
    sleep 1
  done
  return 1
}

address() { echo "$(cat "$STATE/head_ip"):$(cat "$STATE/gcs_port")"; }

print_address() {  # what a client shell needs, ready to paste
  echo "export RAY_ADDRESS=$(address) RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  echo "# dashboard and job server (ray job submit --address ...):"
  echo "#   http://$(cat "$STATE/head_ip"):$(cat "$STATE/dashboard_port")"
}

cmd_add() {  # one more worker node, named after the highest one so far
  [[ -n "$(alive_sessions)" ]] || die "no local cluster running under $STATE (cluster/local.sh up N)"
  PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"; export PATH
  local last name
  last="$(awk '$1 ~ /^worker[0-9]+$/ {n = substr($1, 7) + 0; if (n > m) m = n} END {print m + 0}' "$STATE/nodes")"
  name="worker$((last + 1))"
  # (no count of active nodes here: a killed node stays "active" until Ray's health check
  # marks it dead, so the count can stand still while the new node joins)
  start_worker "$name" \
    || { echo "worker node $name did not join; its log:" >&2; tail -20 "$STATE/logs/$name.log" >&2; exit 1; }
  echo "add: $name joined (session $(awk -v n="$name" '$1 == n {print $2}' "$STATE/nodes"))"
}

cmd_kill_node() {  # SIGKILL every process of one node, as when its machine disappears
  local name="${1:-}" sid pid
  [[ -n "$name" ]] || die "kill-node NAME: NAME is one of: $(awk '{printf "%s ", $1}' "$STATE/nodes" 2>/dev/null)"
  sid="$(awk -v n="$name" '$1 == n {print $2}' "$STATE/nodes" 2>/dev/null | tail -1)"
  [[ -n "$sid" ]] || die "kill-node: no node '$name' under $STATE (allowed: $(awk '{printf "%s ", $1}' "$STATE/nodes" 2>/dev/null))"
  kill -KILL -- "-$sid" 2>/dev/null || true  # the node's process group ...
  for pid in $(session_pids "$sid"); do kill -KILL "$pid" 2>/dev/null || true; done  # ... and session
  echo "kill-node: SIGKILL sent to node $name (session $sid)"
}

cmd_nodes() {
  [[ -f "$STATE/nodes" ]] || die "no local cluster under $STATE"
  local name sid state
  while read -r name sid; do
    state=dead; [[ -n "$(session_pids "$sid")" ]] && state=alive
    echo "$name $sid $state"
  done < "$STATE/nodes"
}

cmd_status() {
  [[ -n "$(alive_sessions)" ]] || { echo "no local cluster running under $STATE"; exit 1; }
  print_address
  "$RAY" status --address "$(address)"
}

cmd_down() {
  local sids sid pid
  sids="$(alive_sessions)"
  if [[ -z "$sids" ]]; then echo "down: nothing running under $STATE"; return 0; fi
  # Workers first, head last (reverse start order); SIGTERM lets `ray start --block` clean up.
  for sid in $(echo "$sids" | tac); do kill -TERM -- "-$sid" 2>/dev/null || true; done
  local deadline=$((SECONDS + 15))
  while ((SECONDS < deadline)) && [[ -n "$(alive_sessions)" ]]; do sleep 0.5; done
  for sid in $(alive_sessions); do  # what is left (also any process that left its group)
    for pid in $(session_pids "$sid"); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  sleep 0.5
  if [[ -n "$(alive_sessions)" ]]; then echo "down: still alive: $(alive_sessions)" >&2; exit 1; fi
  echo "down: stopped $(echo "$sids" | wc -w) node(s) under $STATE"
}

case "${1:-}" in
  up) cmd_up "${2:-2}" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  add) cmd_add ;;
  kill-node) cmd_kill_node "${2:-}" ;;
  nodes) cmd_nodes ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
