#!/usr/bin/env bash
# A real 6-node Redis Cluster (3 masters, 3 replicas) on 127.0.0.1, for kvbm's remote tier (G4)
# tests and benchmarks. Uses Debian's redis-server and redis-cli.
#
#   scripts/redis_cluster.sh start  [--base-port P] [--dir D] [--node-timeout MS]
#   scripts/redis_cluster.sh stop   [--base-port P] [--dir D]
#   scripts/redis_cluster.sh status [--base-port P] [--dir D]
#
# Nodes listen on 127.0.0.1 ports P..P+5 (default 7000..7005). Data, logs and pid files live in D
# (default ${TMPDIR:-/tmp}/kvbm-redis-cluster-P). `start` returns once every node reports
# cluster_state:ok, all 16384 slots are served, every node knows all 6 and every replica's link
# to its master is up (bounded by KVBM_REDIS_CLUSTER_WAIT_S, default 30 s). `start` on a cluster
# that is already healthy does nothing; `stop` kills exactly the nodes whose pid files are in D
# (checking each pid still is a redis-server on its port), then removes D; `stop` with nothing
# running succeeds. `status` prints each node's role and state and exits 1 unless all are ok.
# Nothing is persisted (no RDB, no AOF): the cluster is a cache.
set -euo pipefail

readonly kNodes=6
base_port=7000
dir=""
node_timeout_ms=1000
wait_s="${KVBM_REDIS_CLUSTER_WAIT_S:-30}"

die() {
  echo "redis_cluster.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '5,7p' "$0" | sed 's/^# *//' >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
command="$1"
shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --base-port) [[ $# -ge 2 ]] || die "--base-port needs a value"; base_port="$2"; shift 2 ;;
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; dir="$2"; shift 2 ;;
    --node-timeout) [[ $# -ge 2 ]] || die "--node-timeout needs a value"; node_timeout_ms="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) die "unknown argument '$1' (expected --base-port P, --dir D or --node-timeout MS)" ;;
  esac
done

[[ "$base_port" =~ ^[0-9]+$ ]] || die "--base-port '$base_port' is not a number"
((base_port >= 1024 && base_port + kNodes - 1 <= 55535)) ||
  die "--base-port $base_port out of range: ports P..P+5 and the cluster bus ports P+10000.. must lie in 1024..65535"
[[ "$node_timeout_ms" =~ ^[0-9]+$ ]] && ((node_timeout_ms >= 100)) ||
  die "--node-timeout '$node_timeout_ms' must be a whole number of milliseconds >= 100"
[[ "$wait_s" =~ ^[0-9]+$ ]] || die "KVBM_REDIS_CLUSTER_WAIT_S='$wait_s' is not a whole number of seconds"
[[ -n "$dir" ]] || dir="${TMPDIR:-/tmp}/kvbm-redis-cluster-$base_port"

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || die "'$tool' not found: install Debian's redis-server (scripts/install_deps.sh)"
done

ports=()
for ((i = 0; i < kNodes; i++)); do ports+=($((base_port + i))); done

cli() {  # cli PORT ARGS...: one command to one node, bounded in time.
  local port="$1"
  shift
  timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}

port_in_use() {  # true when something accepts TCP connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The pid from D/PORT/redis.pid when that process still is a redis-server on PORT, else nothing.
node_pid() {
  local port="$1" pidfile="$dir/$1/redis.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  [[ -r "/proc/$pid/cmdline" ]] || return 0
  if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "redis-server.*:$port\b"; then echo "$pid"; fi
}

node_ok() {  # cluster_state ok, all slots served, all nodes known, replica link up
  local info
  info="$(cli "$1" cluster info | tr -d '\r')" || return 1
  grep -qx 'cluster_state:ok' <<<"$info" || return 1
  grep -qx 'cluster_slots_ok:16384' <<<"$info" || return 1
  grep -qx "cluster_known_nodes:$kNodes" <<<"$info" || return 1
  local repl
  repl="$(cli "$1" info replication | tr -d '\r')" || return 1
  if grep -qx 'role:slave' <<<"$repl"; then grep -qx 'master_link_status:up' <<<"$repl" || return 1; fi
  return 0
}

all_ok() {
  local p
  for p in "${ports[@]}"; do node_ok "$p" || return 1; done
}

wait_until() {  # wait_until WHAT CMD...: polls CMD until it succeeds or wait_s passes
  local what="$1" deadline=$((SECONDS + wait_s))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

do_stop() {
  local p pid pids=()
  for p in "${ports[@]}"; do
    pid="$(node_pid "$p")"
    if [[ -n "$pid" ]]; then
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 10))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        kill -9 "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.05
    done
  done
  if [[ -d "$dir" ]]; then
    # Only a directory this script made (it holds our marker) is removed.
    [[ -f "$dir/.kvbm-redis-cluster" ]] || die "refusing to remove '$dir': not made by redis_cluster.sh"
    rm -rf -- "$dir"
  fi
  ((${#pids[@]} == 0)) && echo "redis_cluster.sh: nothing running on ports ${ports[0]}..${ports[-1]}" ||
    echo "redis_cluster.sh: stopped ${#pids[@]} nodes on ports ${ports[0]}..${ports[-1]}, removed $dir"
}

do_status() {
  local p pid rc=0 role state
  for p in "${ports[@]}"; do
    pid="$(node_pid "$p")"
    if [[ -z "$pid" ]]; then
      echo "127.0.0.1:$p down"
      rc=1
      continue
    fi
    role="$(cli "$p" info replication | tr -d '\r' | sed -n 's/^role://p')"
    state="$(cli "$p" cluster info | tr -d '\r' | sed -n 's/^cluster_state://p')"
    echo "127.0.0.1:$p pid $pid role ${role:-?} cluster_state ${state:-?}"
    [[ "$state" == ok ]] || rc=1
  done
  return $rc
}

do_start() {
  local p running=0
  for p in "${ports[@]}"; do [[ -n "$(node_pid "$p")" ]] && running=$((running + 1)); done
  if ((running == kNodes)) && all_ok; then
    echo "redis_cluster.sh: already running on ports ${ports[0]}..${ports[-1]} ($dir)"
    return 0
  fi
  if ((running > 0)) || [[ -d "$dir" ]]; then
    # A half-started or broken cluster of ours: start over.
    do_stop >/dev/null
  fi
  for p in "${ports[@]}"; do
    port_in_use "$p" && die "port $p on 127.0.0.1 is already in use by another process; pick another --base-port"
    port_in_use $((p + 10000)) && die "cluster bus port $((p + 10000)) on 127.0.0.1 is already in use; pick another --base-port"
  done

  mkdir -p "$dir" || die "cannot create '$dir'"
  touch "$dir/.kvbm-redis-cluster"
  for p in "${ports[@]}"; do
    mkdir -p "$dir/$p"
    redis-server --port "$p" --bind 127.0.0.1 --protected-mode yes \
      --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout "$node_timeout_ms" --cluster-replica-validity-factor 0 \
      --save '' --appendonly no --repl-diskless-sync-delay 0 --dir "$dir/$p" \
      --daemonize yes --pidfile "$dir/$p/redis.pid" --logfile "$dir/$p/redis.log" ||
      { do_stop >/dev/null; die "redis-server on port $p did not start (see $dir/$p/redis.log)"; }
  done
  for p in "${ports[@]}"; do
    wait_until "node $p" eval "[[ \"\$(cli $p ping)\" == PONG ]]" ||
      { local log; log="$(tail -5 "$dir/$p/redis.log" 2>/dev/null)"; do_stop >/dev/null
        die "node 127.0.0.1:$p did not answer PING within ${wait_s}s; its log ends: $log"; }
  done
  local addrs=()
  for p in "${ports[@]}"; do addrs+=("127.0.0.1:$p"); done
  local out
  if ! out="$(timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes 2>&1)"; then
    do_stop >/dev/null
    die "redis-cli --cluster create failed: $(tail -5 <<<"$out")"
  fi
  if ! wait_until "cluster" all_ok; then
    local st
    st="$(do_status 2>&1 || true)"
    do_stop >/dev/null
    die "the cluster did not reach cluster_state:ok on all $kNodes nodes within ${wait_s}s:"$'\n'"$st"
  fi
  echo "redis_cluster.sh: 6-node cluster up on 127.0.0.1:${ports[0]}..${ports[-1]} ($dir)"
}

case "$command" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) die "unknown command '$command' (expected start, stop or status)" ;;
esac
