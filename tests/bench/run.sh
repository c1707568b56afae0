#!/usr/bin/env bash
# The benchmark: the hub (HUB_SYNC=full and normal, and full on PostgreSQL),
# the floor of its contract, Redis Streams (AOF always and everysec), NATS
# JetStream and a plain PostgreSQL job queue, through the same scenarios, in
# one run on this machine. See README.md here.
#
#   bash tests/bench/run.sh                 # full sizes, release builds
#   bash tests/bench/run.sh --smoke         # tiny sizes, debug builds, seconds
#   bash tests/bench/run.sh --out FILE ...  # other flags go to `hub-bench run`
#   bash tests/bench/run.sh --targets hub-pg,hub-pg-3,pg-queue \
#     --scenarios cycle,cycle-large,light   # only the PostgreSQL columns
#
# HUB_BIN=path uses that hub binary instead of building one. Installs
# redis-server, nats-server and PostgreSQL from Debian's packages when
# missing, runs each on 127.0.0.1 (Redis and NATS with their data in a temp
# dir, PostgreSQL in target/bench-postgres, configured like a normal server:
# fsync on), and stops everything on exit. With --targets, only the servers
# those targets need are installed and started.
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=0
args=()
out=''
targets=''  # --targets as given ('': all)
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    --targets) targets=$2; args+=("$1" "$2"); shift ;;
    --targets=*) targets=${1#--targets=}; args+=("$1") ;;
    *) args+=("$1") ;;
  esac
  shift
done

# Whether any of the targets named runs (all do without --targets).
wants() {
  [ -z "$targets" ] && return 0
  local t
  for t in "$@"; do
    case ",$targets," in *",$t,"*) return 0 ;; esac
  done
  return 1
}
want_redis=0 want_nats=0 want_pg=0
if wants redis-always redis-everysec; then want_redis=1; fi
if wants nats; then want_nats=1; fi
if wants hub-pg hub-pg-3 pg-queue; then want_pg=1; fi

step() { printf '\n==> %s\n' "$*" >&2; }

# 10,000 spokes are 10,000 sockets in the load generator and in the hub
# (which inherits this limit).
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt 65536 ]; then
  ulimit -Hn 65536 2>/dev/null || true
  hard=$(ulimit -Hn)
fi
if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then hard=65536; fi
ulimit -n "$hard"

export PATH="$PATH:/usr/sbin:/sbin"
packages=()
if [ $want_redis = 1 ] && ! command -v redis-server >/dev/null; then packages+=(redis-server); fi
if [ $want_nats = 1 ] && ! command -v nats-server >/dev/null; then packages+=(nats-server); fi
if [ ${#packages[@]} -gt 0 ]; then
  step "installing ${packages[*]} (Debian packages)"
  apt-get install -y "${packages[@]}" >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y "${packages[@]}" >/dev/null; }
fi

if [ $smoke = 1 ]; then
  profile=debug
  build=()
else
  profile=release
  build=(--release)
fi
step "building ($profile)"
if [ -z "${HUB_BIN:-}" ]; then
  cargo build "${build[@]}" -p hub -p hub-bench
  HUB_BIN="$PWD/target/$profile/hub"
else
  cargo build "${build[@]}" -p hub-bench
fi
bench="$PWD/target/$profile/hub-bench"

tmp=$(mktemp -d -t hub-bench-run.XXXXXX)
redis_pid=''
nats_pid=''
cleanup() {
  if declare -F pg_stop >/dev/null; then pg_stop; fi
  for pid in $redis_pid $nats_pid; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $redis_pid $nats_pid; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until something listens on 127.0.0.1:$1 (or the process $2 exits).
wait_port() {
  for _ in $(seq 200); do
    if ! kill -0 "$2" 2>/dev/null; then
      echo "the server on port $1 exited; see its log" >&2
      return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "nothing listens on port $1 after 10 s" >&2
  return 1
}

servers=()
if [ $want_redis = 1 ]; then
  step "starting redis-server on 127.0.0.1 (data in $tmp/redis)"
  mkdir -p "$tmp/redis"
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$tmp/redis" \
    --appendonly yes --appendfsync always --save '' --daemonize no \
    --logfile "$tmp/redis.log" &
  redis_pid=$!
  wait_port "$redis_port" "$redis_pid" || { cat "$tmp/redis.log" >&2; exit 1; }
  redis-server --version >&2
  servers+=(--redis "127.0.0.1:$redis_port" --redis-pid "$redis_pid")
fi
if [ $want_nats = 1 ]; then
  step "starting nats-server on 127.0.0.1 (data in $tmp/nats)"
  mkdir -p "$tmp/nats"
  nats_port=$(free_port)
  nats-server -js -sd "$tmp/nats" -a 127.0.0.1 -p "$nats_port" -l "$tmp/nats.log" &
  nats_pid=$!
  wait_port "$nats_port" "$nats_pid" || { cat "$tmp/nats.log" >&2; exit 1; }
  nats-server --version >&2
  servers+=(--nats "127.0.0.1:$nats_port" --nats-pid "$nats_pid")
fi
if [ $want_pg = 1 ]; then
  step "starting PostgreSQL on 127.0.0.1 (cluster in target/bench-postgres)"
  # Apart from the test suite's cluster (target/postgres), and durable like a
  # normal server, unlike that one: fsync, synchronous_commit and
  # full_page_writes on. One worker connection per spoke of the PostgreSQL
  # queue (1000 in cycle-large) plus its producers and the hubs'.
  source tests/lib/postgres.sh
  PG_DIR=target/bench-postgres PG_DURABLE=1 PG_SETTINGS='-c max_connections=1200' pg_start >&2
  trap cleanup EXIT  # pg_start set its own; ours stops PostgreSQL too
  servers+=(--postgres "$HUB_TEST_POSTGRES_URL" --postgres-pid "$PG_PID")
fi

if [ $smoke = 1 ]; then
  sizes=(--cycle-spokes 10 --cycle-directives 200 --cycle-window 16
    --large-spokes 20 --large-directives 400 --large-window 32
    --light-spokes 10 --light-directives 50
    --idle-small 20 --idle-large 100 --flood-secs 2 --timeout-secs 60)
  out=${out:-target/bench/smoke.json}
else
  sizes=()
  out=${out:-target/bench/results-$(date -u +%Y%m%dT%H%M%SZ).json}
fi
mkdir -p "$(dirname "$out")"

step "hub-bench run (hub: $HUB_BIN)"
status=0
"$bench" run --hub-bin "$HUB_BIN" "${servers[@]}" \
  --out "$out" "${sizes[@]}" "${args[@]}" || status=$?
exit $status
