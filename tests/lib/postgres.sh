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
  root="$PWD/target/postgres"
  rm -rf "$root"
  mkdir -p "$root"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$root"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  pg_as_owner "$bin/initdb" -D "$root/data" -U postgres -A trust --no-sync -E UTF8 >"$root/initdb.log"
  # Test data only: no fsync, no synchronous commit; 127.0.0.1 and a socket in the cluster dir.
  pg_as_owner "$bin/pg_ctl" -D "$root/data" -l "$root/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $root -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null
  PG_ROOT="$root"
  PG_BIN="$bin"
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
