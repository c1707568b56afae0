#!/usr/bin/env bash
# The benchmark: the hub (HUB_SYNC=full and normal), the floor of its
# contract, Redis Streams (AOF always and everysec) and NATS JetStream,
# through the same scenarios, in one run on this machine. See README.md here.
#
#   bash tests/bench/run.sh                 # full sizes, release builds
#   bash tests/bench/run.sh --smoke         # tiny sizes, debug builds, seconds
#   bash tests/bench/run.sh --out FILE ...  # other flags go to `hub-bench run`
#
# HUB_BIN=path uses that hub binary instead of building one. Installs
# redis-server and nats-server from Debian's packages when missing, runs each
# on 127.0.0.1 with its data in a temp dir, and stops everything on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=0
args=()
out=''
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

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
if ! command -v redis-server >/dev/null || ! command -v nats-server >/dev/null; then
  step "installing redis-server and nats-server (Debian packages)"
  apt-get install -y redis-server nats-server >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y redis-server nats-server >/dev/null; }
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

step "starting redis-server and nats-server on 127.0.0.1 (data in $tmp)"
mkdir -p "$tmp/redis" "$tmp/nats"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$tmp/redis" \
  --appendonly yes --appendfsync always --save '' --daemonize no \
  --logfile "$tmp/redis.log" &
redis_pid=$!
wait_port "$redis_port" "$redis_pid" || { cat "$tmp/redis.log" >&2; exit 1; }
nats_port=$(free_port)
nats-server -js -sd "$tmp/nats" -a 127.0.0.1 -p "$nats_port" -l "$tmp/nats.log" &
nats_pid=$!
wait_port "$nats_port" "$nats_pid" || { cat "$tmp/nats.log" >&2; exit 1; }
redis-server --version >&2
nats-server --version >&2

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
"$bench" run --hub-bin "$HUB_BIN" \
  --redis "127.0.0.1:$redis_port" --redis-pid "$redis_pid" \
  --nats "127.0.0.1:$nats_port" --nats-pid "$nats_pid" \
  --out "$out" "${sizes[@]}" "${args[@]}" || status=$?
exit $status
