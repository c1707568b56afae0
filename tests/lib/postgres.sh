# A throwaway PostgreSQL cluster for the tests, sourced by tests/run.sh.
#
#   source tests/lib/postgres.sh
#   pg_start            # installs PostgreSQL from Debian's packages when missing,
#                       # creates a cluster under target/postgres on a free port
#                       # (127.0.0.1 only), starts it, exports HUB_TEST_POSTGRES_URL
#   pg_stop             # stops it and removes the cluster (also run on EXIT)
#
# The cluster trusts connections from 127.0.0.1 (it is reachable only from
# this machine and holds nothing but test data). The server runs as the
# `postgres` user the package creates: initdb refuses to run as root.
#
# Variables read by pg_start (the defaults are what the test suite uses):
#   PG_DIR=path         the cluster's directory [target/postgres]; removed
#                       and made again by pg_start, removed by pg_stop
#   PG_DURABLE=1        configure it like a normal server: fsync,
#                       synchronous_commit and full_page_writes keep
#                       PostgreSQL's defaults (on) [0: all three off, for
#                       speed; test data needs no durability]
#   PG_SETTINGS='-c name=value ...'  more server settings, appended last
#                       (e.g. a larger max_connections) [none]
# pg_start also sets PG_PID (the postmaster's process id).

pg_bin() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

pg_install() {
  if [ -z "$(pg_bin)" ]; then
    echo "installing PostgreSQL from Debian's packages"
    if [ "$(id -u)" -eq 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
  fi
  # The package starts a cluster of its own on 5432; ours does not need it.
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    for cluster in $(pg_lsclusters -h 2>/dev/null | awk '$4 == "online" {print $1 "/" $2}'); do
      pg_ctlcluster "${cluster%/*}" "${cluster#*/}" stop 2>/dev/null || true
    done
  fi
}

# Runs a PostgreSQL tool as the cluster's owner.
pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_start() {
  pg_install
  local bin root port
  bin=$(pg_bin)
  root=${PG_DIR:-target/postgres}
  case $root in /*) ;; *) root="$PWD/$root" ;; esac
  rm -rf "$root"
  mkdir -p "$root"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$root"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local initdb_sync=(--no-sync) durability
  # Test data only: no fsync, no synchronous commit.
  durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  if [ "${PG_DURABLE:-0}" = 1 ]; then
    # Like a normal server: every commit flushed before it is answered.
    initdb_sync=()
    durability=''
  fi
  pg_as_owner "$bin/initdb" -D "$root/data" -U postgres -A trust "${initdb_sync[@]}" -E UTF8 >"$root/initdb.log"
  # 127.0.0.1 and a socket in the cluster dir.
  pg_as_owner "$bin/pg_ctl" -D "$root/data" -l "$root/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $root $durability -c max_connections=200 ${PG_SETTINGS:-}" \
    start >/dev/null
  PG_ROOT="$root"
  PG_BIN="$bin"
  PG_PID=$(head -n 1 "$root/data/postmaster.pid")
  export HUB_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  trap pg_stop EXIT
  echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($root)"
}

pg_stop() {
  if [ -n "${PG_ROOT:-}" ] && [ -d "$PG_ROOT/data" ]; then
    pg_as_owner "$PG_BIN/pg_ctl" -D "$PG_ROOT/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_ROOT"
  fi
  PG_ROOT=
}
