#!/usr/bin/env bash
# Spokes in other languages, and the wire-compatibility gate:
#
# - buf lint and buf breaking of proto/ against the released snapshot
#   proto/released.binpb (tests/contract/gate.sh), and a test of that gate
#   (tests/contract/self-test.sh: a renumbered field must make it fail);
# - nothing generated is tracked by git, and what is generated is ignored;
# - the conformance scenario (tests/conformance/scenario.py) against the real
#   hub binary for each client in CLIENTS below, for those in
#   ACK_STREAM_CLIENTS the check that they ack over AckStream, and for those
#   in WEBHOOK_CLIENTS the webhook phase (directives by signed HTTP POST).
#
#   cargo build --workspace --all-targets && bash tests/polyglot.sh
#
# HUB_BIN: the hub binary (default: target/debug/hub). Builds nothing: the
# Rust client (target/debug/examples/conformance_spoke) comes from that cargo
# build too.
# Installs what it needs: grpcio, grpcio-tools, standardwebhooks and buf (PyPI) into
# target/polyglot-venv, the Node spoke's packages (npm ci), and the Python
# stubs, generated from proto/ into target/python-stubs.
# Last line: "polyglot: N passed, M failed"; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export HUB_BIN=${HUB_BIN:-target/debug/hub}
VENV=target/polyglot-venv
export HUB_PY_STUBS=$ROOT/target/python-stubs

# The conformance clients, one per line: NAME=COMMAND, run from the repository
# root; the scenario appends the client options (see scenario.py). The Rust
# client is the spoke-client library's example conformance_spoke, built by
# `cargo build --workspace --all-targets` (tests/run.sh), not here.
CLIENTS=(
  "python=$VENV/bin/python examples/python-spoke/spoke.py"
  "node=node examples/node-spoke/spoke.js"
  "rust=target/debug/examples/conformance_spoke"
)
# The clients that must ack over SpokeService.AckStream: the scenario checks
# the hub's /metrics for AckStream calls and no unary Ack
# (--expect-ack-stream). Add rust here once spoke-client acks over the stream.
ACK_STREAM_CLIENTS=(python node rust)
# The clients with a webhook mode (--webhook-listen, --webhook-url): the
# scenario also runs its webhook phase for them (--webhook). spoke-client
# has none yet.
WEBHOOK_CLIENTS=(python node)

PASSED=0
FAILED=0
step() { printf '\n==> %s\n' "$*"; }

# run NAME CMD...: runs a step and adds up its checks: the counts of its
# closing "...: N passed, M failed" line if it prints one, else one check
# decided by its exit status. The step runs as a background job (so `set -e`
# holds inside a function step) that the trap below can stop.
CURRENT=
run() {
  local name=$1 out status=0 counts tailer
  shift
  step "$name"
  out=$(mktemp)
  "$@" >"$out" 2>&1 &
  CURRENT=$!
  tail -n +1 -s 0.2 --pid="$CURRENT" -f "$out" &
  tailer=$!
  wait "$CURRENT" || status=$?
  CURRENT=
  wait "$tailer" || true
  counts=$(tail -n 1 "$out" | sed -n 's/.*: \([0-9][0-9]*\) passed, \([0-9][0-9]*\) failed$/\1 \2/p')
  rm -f "$out"
  if [[ -n $counts ]]; then
    PASSED=$((PASSED + ${counts% *}))
    FAILED=$((FAILED + ${counts#* }))
    if [[ $status != 0 && ${counts#* } == 0 ]]; then FAILED=$((FAILED + 1)); fi
  elif [[ $status == 0 ]]; then
    PASSED=$((PASSED + 1))
  else
    echo "FAILED: $name (exit $status)"
    FAILED=$((FAILED + 1))
  fi
}
# Stopped from outside: stop the running step (the scenario then stops the
# hub and spoke it started) and wait for it.
trap 'if [[ -n $CURRENT ]]; then kill -TERM "$CURRENT" 2>/dev/null || true; wait "$CURRENT" || true; fi; exit 143' INT TERM

summary() {
  echo
  echo "polyglot: $PASSED passed, $FAILED failed"
  [[ $FAILED == 0 ]]
}

install_tools() {
  local stamp=$VENV/.requirements
  if [[ ! -x $VENV/bin/buf ]] || ! cmp -s examples/python-spoke/requirements.txt "$stamp"; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
      -r examples/python-spoke/requirements.txt 'buf-bin==1.75.0'
    cp examples/python-spoke/requirements.txt "$stamp"
  fi
  (cd examples/node-spoke && npm ci --no-audit --no-fund --loglevel=error)
  rm -rf "$HUB_PY_STUBS"
  mkdir -p "$HUB_PY_STUBS"
  "$VENV/bin/python" -m grpc_tools.protoc -Iproto \
    --python_out="$HUB_PY_STUBS" --grpc_python_out="$HUB_PY_STUBS" proto/hub/v1/*.proto
  buf --version
  node --version
  "$VENV/bin/python" -c 'import grpc; print("grpcio", grpc.__version__)'
}

# Nothing generated is committed (the snapshot is the one exception), and
# what tests generate is ignored by git.
generated_code_hygiene() {
  if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "not a git work tree: skipped"
    return 0
  fi
  local tracked
  tracked=$(git ls-files | grep -E '_pb2(_grpc)?\.pyi?$|(^|/)node_modules/|\.(binpb|pb|desc)$' \
    | grep -v '^proto/released\.binpb$' || true)
  if [[ -n $tracked ]]; then
    echo "generated files tracked by git:"
    echo "$tracked"
    return 1
  fi
  local generated
  for generated in target/python-stubs/hub/v1/spoke_pb2.py examples/node-spoke/node_modules/@grpc; do
    git check-ignore -q "$generated" || { echo "$generated is not ignored by git"; return 1; }
  done
  echo "no generated code is tracked; target/python-stubs and node_modules are ignored"
}

if [[ ! -x $HUB_BIN ]]; then
  echo "polyglot.sh: no hub binary at $HUB_BIN (cargo build -p hub, or set HUB_BIN)" >&2
  FAILED=1
  summary || exit 1
fi

export PATH=$ROOT/$VENV/bin:$PATH
run "tools: grpcio, grpcio-tools, standardwebhooks, buf (PyPI), npm ci, Python stubs" install_tools
if [[ $FAILED != 0 ]]; then summary || exit 1; fi

run "contract gate: buf lint, buf breaking against proto/released.binpb" bash tests/contract/gate.sh
run "contract gate self-test: a renumbered field must fail the gate" bash tests/contract/self-test.sh
run "generated code hygiene" generated_code_hygiene

for client in "${CLIENTS[@]}"; do
  name=${client%%=*}
  read -r -a command <<<"${client#*=}"
  if [[ ${command[0]} == */* && ! -x ${command[0]} ]]; then
    echo "FAILED: conformance: $name: no client at ${command[0]} (cargo build --workspace --all-targets)"
    FAILED=$((FAILED + 1))
    continue
  fi
  options=(--client "$name")
  if [[ " ${ACK_STREAM_CLIENTS[*]} " == *" $name "* ]]; then options+=(--expect-ack-stream); fi
  if [[ " ${WEBHOOK_CLIENTS[*]} " == *" $name "* ]]; then options+=(--webhook); fi
  run "conformance: $name spoke against $HUB_BIN" \
    "$VENV/bin/python" tests/conformance/scenario.py "${options[@]}" -- "${command[@]}"
done

summary
