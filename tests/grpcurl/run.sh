#!/usr/bin/env bash
# Proves the grpcurl walk-through in README.md (between the walkthrough
# markers) works
# verbatim: starts the real hub with its defaults in a fresh directory, runs
# the ```sh block with bash there (twice, as a user running it again would),
# and checks what a user would see. Also checks a few error statuses with
# grpcurl directly.
#
#   cargo build -p hub && bash tests/grpcurl/run.sh
#
# HUB_BIN: the hub binary (default: target/debug/hub). Needs grpcurl, curl,
# python3 and timeout on PATH. Builds nothing.
#
# The hub listens on ports the kernel picks (so a busy 50051/8080 cannot break
# the test); the block's 127.0.0.1:50051 is rewritten to the real address.
# Everything else (data dir, generated token files) is the hub's default.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
README=$ROOT/README.md
HUB_BIN=${HUB_BIN:-target/debug/hub}
case $HUB_BIN in /*) ;; *) HUB_BIN=$ROOT/$HUB_BIN ;; esac
DEFAULT_GRPC=127.0.0.1:50051

for tool in grpcurl curl python3 timeout; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is not on PATH" >&2; exit 1; }
done
[[ -x $HUB_BIN ]] || { echo "run.sh: no hub binary at $HUB_BIN (cargo build -p hub, or set HUB_BIN)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-grpcurl.XXXXXX")
HUB_LOG=$WORK/hub.log
HUB_PID=
PASSED=0

cleanup() {
  local status=$?
  if [[ -n $HUB_PID ]] && kill -0 "$HUB_PID" 2>/dev/null; then
    kill "$HUB_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$HUB_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$HUB_PID" 2>/dev/null || true
    wait "$HUB_PID" 2>/dev/null || true
  fi
  if [[ $status -ne 0 && -f $HUB_LOG ]]; then
    echo "----- hub log ($HUB_LOG) -----" >&2
    cat "$HUB_LOG" >&2
    echo "----- end of hub log; work dir kept: $WORK -----" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pass() {
  PASSED=$((PASSED + 1))
  echo "ok $PASSED - $1"
}

# fail DESCRIPTION [DETAIL]: stop at the first failure.
fail() {
  echo "FAIL: $1" >&2
  if [[ -n ${2:-} ]]; then printf '%s\n' "$2" | sed 's/^/    | /' >&2; fi
  echo "grpcurl walk-through: $PASSED passed, 1 failed" >&2
  exit 1
}

# expect_contains DESCRIPTION TEXT NEEDLE...: TEXT contains every NEEDLE.
expect_contains() {
  local what=$1 text=$2 needle
  shift 2
  for needle in "$@"; do
    [[ $text == *"$needle"* ]] || fail "$what: expected to find '$needle' in:" "$text"
  done
  pass "$what"
}

# --- start the hub ---------------------------------------------------------

# shellcheck source=tests/lib/hub.sh
source "$ROOT/tests/lib/hub.sh"
start_hub "$WORK" "$HUB_LOG" 2>"$WORK/start.err" || fail "$(cat "$WORK/start.err")"
[[ -s $WORK/hub-data/admin.token && -s $WORK/hub-data/enrollment.token ]] \
  || fail "the hub did not generate hub-data/admin.token and hub-data/enrollment.token"
pass "hub ready on $GRPC_ADDR (http $HTTP_ADDR) with generated tokens in ./hub-data"

# --- extract the walk-through ------------------------------------------------

SECTION=$(awk '/<!-- walkthrough:start -->/ { on = 1; next } /<!-- walkthrough:end -->/ { exit } on' "$README")
BLOCKS=$(grep -c '^```sh$' <<<"$SECTION" || true)
[[ $BLOCKS == 1 ]] || fail "README.md's walkthrough section must hold exactly one \`\`\`sh block (found $BLOCKS)"
BLOCK=$(awk '/^```sh$/ { on = 1; next } on && /^```$/ { exit } on' <<<"$SECTION")
expect_contains "the walk-through block targets the default address" "$BLOCK" "$DEFAULT_GRPC"
# The block runs unchanged after a two-line prelude whose DEBUG trap prints
# "### step: <command>" before each top-level command, so that each command's
# output can be told apart.
{
  cat <<'PRELUDE'
step_nl=$'\n'
trap 'printf "### step: %s\n" "${BASH_COMMAND//$step_nl/ }"' DEBUG
PRELUDE
  printf '%s\n' "$BLOCK" | sed 's/127\.0\.0\.1:50051/'"$GRPC_ADDR"'/g'
} >"$WORK/walkthrough.sh"

# run_walkthrough N: runs the block in a clean bash in the hub's working
# directory. -eu and pipefail make any failing step fail the run (the
# `|| true` after the stream is part of the block).
run_walkthrough() {
  local out=$WORK/walkthrough.$1.out status=0
  (cd "$WORK" && env -i PATH="$PATH" HOME="$HOME" \
    bash -euo pipefail walkthrough.sh </dev/null >"$out" 2>&1) || status=$?
  if [[ $status -ne 0 ]]; then
    fail "walk-through run $1 exited with status $status" "$(cat "$out")"
  fi
  pass "walk-through run $1 exits 0"
}

# step_output N PATTERN: what run N of the walk-through printed from the
# grpcurl command matching PATTERN up to the next grpcurl command (so the
# `echo "$OUT"` after a captured call counts as that call's output).
step_output() {
  STEP="$2" awk '
    /^### step: / {
      if ($0 ~ /grpcurl /) on = ($0 ~ ENVIRON["STEP"])
      next
    }
    on' "$WORK/walkthrough.$1.out"
}

# check_run N: runs the walk-through and checks each step's output; sets
# SPOKE_NAME to the spoke it registered.
check_run() {
  local n=$1 out id
  run_walkthrough "$n"

  out=$(step_output "$n" ' list$')
  expect_contains "[$n] list shows both services and health" "$out" \
    hub.v1.SpokeService hub.v1.AdminService grpc.health.v1.Health
  out=$(step_output "$n" ' describe hub\.v1\.SpokeService$')
  expect_contains "[$n] describe prints the SpokeService contract" "$out" \
    "hub.v1.SpokeService is a service:" "rpc Register" "rpc WatchDirectives" "rpc Ack"
  out=$(step_output "$n" 'grpc\.health\.v1\.Health/Check$')
  expect_contains "[$n] health check says SERVING" "$out" '"status": "SERVING"'
  out=$(step_output "$n" 'SpokeService/Register[)]$')
  expect_contains "[$n] Register returns the new spoke and its key" "$out" \
    '"name": "billing-' '"spokeKey": "' '"directiveType": "sync_doc"'
  SPOKE_NAME=$(printf '%s\n' "$out" | sed -n 's/^ *"name": "\(billing-[0-9]*\)".*/\1/p' | head -n 1)
  out=$(step_output "$n" 'AdminService/CreateDirective[)]$')
  expect_contains "[$n] CreateDirective returns a PENDING sync_doc directive" "$out" \
    '"type": "sync_doc"' '"state": "DIRECTIVE_STATE_PENDING"'
  id=$(printf '%s\n' "$out" | sed -n 's/^ *"id": "\([0-9a-f-]\{36\}\)".*/\1/p' | head -n 1)
  [[ -n $id ]] || fail "[$n] no directive id in the CreateDirective output" "$out"
  out=$(step_output "$n" 'SpokeService/WatchDirectives$')
  expect_contains "[$n] WatchDirectives delivers the directive with its payload" "$out" \
    '"directive": {' "\"id\": \"$id\"" '"doc": "invoices/2026-11"' '"mode": "full"' \
    '"state": "DIRECTIVE_STATE_DELIVERED"' '"attempt": 1'
  out=$(step_output "$n" 'SpokeService/Ack$')
  expect_contains "[$n] Ack answers COMPLETED" "$out" '"state": "DIRECTIVE_STATE_COMPLETED"'
  out=$(step_output "$n" 'AdminService/GetDirective$')
  expect_contains "[$n] GetDirective shows COMPLETED with the result" "$out" \
    "\"id\": \"$id\"" '"state": "DIRECTIVE_STATE_COMPLETED"' '"result": {' '"pages_synced": 12'
  out=$(step_output "$n" 'AdminService/CancelDirective$')
  expect_contains "[$n] CancelDirective answers CANCELLED with the reason" "$out" \
    '"state": "DIRECTIVE_STATE_CANCELLED"' '"error": "sent by mistake"'
  out=$(step_output "$n" 'AdminService/CreateDirectives$')
  expect_contains "[$n] CreateDirectives answers each item: two created, one refused naming the field" "$out" \
    '"results": [' '"created": {' '"type": "sync_doc"' '"code": 3' '"message": "type: '
  [[ $(grep -c '"state": "DIRECTIVE_STATE_PENDING"' <<<"$out") == 2 ]] \
    || fail "[$n] CreateDirectives should create exactly two PENDING directives" "$out"
  out=$(step_output "$n" 'AdminService/WatchEvents')
  expect_contains "[$n] WatchEvents replays the completed and the cancelled directive" "$out" \
    '"type": "EVENT_TYPE_DIRECTIVE_COMPLETED"' "\"directiveId\": \"$id\"" \
    '"type": "EVENT_TYPE_DIRECTIVE_CANCELLED"' '"reason": "sent by mistake"'
  if [[ $out == *EVENT_TYPE_DIRECTIVE_CREATED* ]]; then
    fail "[$n] WatchEvents ignored its type filter" "$out"
  fi
  if grep -q 'ERROR:' "$WORK/walkthrough.$n.out"; then
    fail "[$n] the walk-through printed a gRPC error" "$(cat "$WORK/walkthrough.$n.out")"
  fi
  pass "[$n] the walk-through printed no gRPC error"
}

# --- the walk-through, twice on the same data dir ----------------------------

check_run 1
FIRST_SPOKE=$SPOKE_NAME
check_run 2
[[ $SPOKE_NAME != "$FIRST_SPOKE" ]] \
  || fail "both runs registered the same spoke name $SPOKE_NAME"
pass "the two runs registered different spokes ($FIRST_SPOKE, $SPOKE_NAME)"

# --- error statuses and describe, with grpcurl directly ---------------------

# grpc CMD...: runs grpcurl in the hub's directory; prints stdout and stderr,
# then "exit=<status>" on the last line.
grpc() {
  local status=0 out
  out=$(cd "$WORK" && grpcurl -plaintext "$@" 2>&1) || status=$?
  printf '%s\nexit=%s\n' "$out" "$status"
}
ADMIN_TOKEN=$(cat "$WORK/hub-data/admin.token")
ENROLLMENT_TOKEN=$(cat "$WORK/hub-data/enrollment.token")

# Why the walk-through picks a fresh name each run.
out=$(grpc -H "authorization: Bearer $ENROLLMENT_TOKEN" -d '{"name": "'"$SPOKE_NAME"'"}' \
  "$GRPC_ADDR" hub.v1.SpokeService/Register)
expect_contains "Register of an existing name with the enrollment token answers AlreadyExists" \
  "$out" "Code: AlreadyExists" "exit=70"

out=$(grpc -d '{"directive_id": "00000000-0000-7000-8000-000000000000",
               "outcome": "ACK_OUTCOME_COMPLETED"}' \
  "$GRPC_ADDR" hub.v1.SpokeService/Ack)
expect_contains "Ack without authorization answers Unauthenticated" "$out" \
  "Code: Unauthenticated" "exit=80"

out=$(grpc -H "authorization: Bearer $ADMIN_TOKEN" \
  -d '{"target": {"spoke_name": "'"$SPOKE_NAME"'"}, "payload": {"doc": "x"}}' \
  "$GRPC_ADDR" hub.v1.AdminService/CreateDirective)
expect_contains "CreateDirective without a type answers InvalidArgument naming type" "$out" \
  "Code: InvalidArgument" "Message: type" "exit=67"

out=$(grpc "$GRPC_ADDR" describe hub.v1.Directive)
expect_contains "describe hub.v1.Directive prints the message" "$out" \
  "hub.v1.Directive is a message:" "message Directive {" "string id = 1;" \
  "hub.v1.DirectiveState state = 6;" "exit=0"

# --- graceful shutdown of the real binary -----------------------------------

# A spoke holds a stream open; SIGTERM ends it with UNAVAILABLE and the hub
# exits 0.
read -r SPOKE_KEY SPOKE_ID < <(cd "$WORK" && grpcurl -plaintext -H "authorization: Bearer $ENROLLMENT_TOKEN" \
  -d '{"name": "shutdown-watcher"}' "$GRPC_ADDR" hub.v1.SpokeService/Register \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["spokeKey"], r["spoke"]["id"])')
MISSING=00000000-0000-7000-8000-00000000abcd
out=$(grpc -H "authorization: Bearer $SPOKE_KEY" \
  -d '{"directive_id": "'"$MISSING"'", "outcome": "ACK_OUTCOME_COMPLETED"}' \
  "$GRPC_ADDR" hub.v1.SpokeService/Ack)
expect_contains "Ack of a directive that does not exist answers NotFound" "$out" "Code: NotFound"
(cd "$WORK" && exec grpcurl -plaintext -H "authorization: Bearer $SPOKE_KEY" \
  "$GRPC_ADDR" hub.v1.SpokeService/WatchDirectives) >"$WORK/watch.out" 2>&1 &
WATCH_PID=$!
for _ in $(seq 100); do
  grep -q '"connected": true' <(grpc -H "authorization: Bearer $ADMIN_TOKEN" \
    -d '{"spoke_name": "shutdown-watcher"}' "$GRPC_ADDR" hub.v1.AdminService/GetSpoke) && break
  sleep 0.1
done
kill -TERM "$HUB_PID"
hub_status=0
wait "$HUB_PID" || hub_status=$?
HUB_PID=
[[ $hub_status == 0 ]] || fail "the hub exited with $hub_status after SIGTERM" "$(tail -20 "$HUB_LOG")"
pass "SIGTERM stops the hub with exit status 0"
watch_status=0
wait "$WATCH_PID" || watch_status=$?
expect_contains "SIGTERM ends an open WatchDirectives stream with Unavailable" \
  "$(cat "$WORK/watch.out")" "Code: Unavailable" "retryAfter"

# --- logs: a line per failed call (failed authentications in aggregate), no secret

FAILED_ACK=$(python3 - "$HUB_LOG" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    span = entry.get("span", {})
    fields = entry.get("fields", {})
    if fields.get("message") == "rpc failed" and span.get("method") == "hub.v1.SpokeService/Ack":
        print(fields.get("code"), span.get("spoke_id", "-"), span.get("directive_id", "-"), fields.get("error"))
    # Failed authentications are logged in aggregate (a flood of wrong keys
    # must not become a flood of log lines): one line with a count.
    if fields.get("message") == "failed authentications":
        print("AUTH_FAILURES", fields.get("count"), fields.get("latest"))
EOF
)
expect_contains "the Ack without a key is counted in the aggregate authentication-failure line" \
  "$FAILED_ACK" "AUTH_FAILURES 1 127.0.0.1"
expect_contains "the NOT_FOUND Ack's log line names the spoke and the directive" "$FAILED_ACK" \
  "NOT_FOUND $SPOKE_ID $MISSING directive $MISSING not found"
for secret in "$ADMIN_TOKEN" "$ENROLLMENT_TOKEN" "$SPOKE_KEY"; do
  if grep -qF "$secret" "$HUB_LOG"; then
    fail "a secret appears in the hub log"
  fi
done
pass "no token or spoke key appears in the hub log"

# --- bad configuration fails before binding, naming the option --------------

out=$(cd "$WORK" && "$HUB_BIN" serve --listen nowhere 2>&1) && fail "--listen nowhere was accepted" "$out"
expect_contains "a malformed --listen is refused naming the option" "$out" "--listen"
status=0
out=$(cd "$WORK" && HUB_MAX_ATTEMPTS=0 "$HUB_BIN" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 2>&1) \
  || status=$?
[[ $status == 2 ]] || fail "HUB_MAX_ATTEMPTS=0 should exit 2, got $status" "$out"
[[ $out != *"hub listening"* ]] || fail "the hub bound its ports despite bad configuration" "$out"
expect_contains "a bad HUB_MAX_ATTEMPTS is refused before listening, naming flag and variable" "$out" \
  "--max-attempts (HUB_MAX_ATTEMPTS)"

echo "grpcurl walk-through: $PASSED passed, 0 failed"
