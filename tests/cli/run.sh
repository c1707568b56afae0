#!/usr/bin/env bash
# The README's operator walk-through, run verbatim against the real hub
# binary and the example spoke (spoke-client/examples/demo_spoke.rs), in a
# fresh directory; then checks what the operator saw.
#
#   cargo build --workspace --all-targets && bash tests/cli/run.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HUB_BIN=${HUB_BIN:-$ROOT/target/debug/hub}
SPOKE_BIN=${SPOKE_BIN:-$ROOT/target/debug/examples/demo_spoke}
[[ -x $SPOKE_BIN ]] || { echo "no example spoke at $SPOKE_BIN (cargo build --workspace --all-targets)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-cli.XXXXXX")
HUB_PID=
SPOKE_PID=
PASSED=0
cleanup() {
  local status=$?
  for pid in $SPOKE_PID $HUB_PID; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $status -ne 0 ]]; then
    for log in hub.log spoke.log walkthrough.out; do
      echo "----- $log -----" >&2
      cat "$WORK/$log" >&2 2>/dev/null || true
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
pass() { PASSED=$((PASSED + 1)); echo "ok $PASSED - $1"; }
fail() { echo "FAIL: $1" >&2; echo "operator walk-through: $PASSED passed, 1 failed" >&2; exit 1; }
expect() { # DESCRIPTION TEXT NEEDLE...
  local what=$1 text=$2 needle
  shift 2
  for needle in "$@"; do
    [[ $text == *"$needle"* ]] || fail "$what: no '$needle' in:"$'\n'"$text"
  done
  pass "$what"
}

# shellcheck source=tests/lib/hub.sh
source "$ROOT/tests/lib/hub.sh"
start_hub "$WORK" "$WORK/hub.log"
# The walk-through calls target/debug/hub from the repository root.
ln -s "$ROOT/target" "$WORK/target"
(cd "$WORK" && exec "$SPOKE_BIN" --hub "http://$GRPC_ADDR" --state-dir "$WORK/spoke-state") >"$WORK/spoke.log" 2>&1 &
SPOKE_PID=$!
for _ in $(seq 100); do
  [[ $(cd "$WORK" && "$HUB_BIN" spokes 2>/dev/null) == *"demo-spoke  ONLINE"* ]] && break
  kill -0 "$SPOKE_PID" 2>/dev/null || fail "the example spoke exited"
  sleep 0.1
done

BLOCK=$(awk '/<!-- operator:start -->/ { on = 1; next } /<!-- operator:end -->/ { exit } on' "$ROOT/README.md" \
  | awk '/^```sh$/ { on = 1; next } on && /^```$/ { exit } on')
[[ -n $BLOCK ]] || fail "no operator walk-through block in README.md"
(cd "$WORK" && env -i PATH="$PATH" HOME="$HOME" bash -euo pipefail -c "$BLOCK") >"$WORK/walkthrough.out" 2>&1 \
  || fail "the walk-through exited non-zero"
OUT=$(cat "$WORK/walkthrough.out")
pass "the walk-through runs verbatim and exits 0"

expect "hub spokes shows the example spoke online, with its labels" "$OUT" \
  "NAME        HEALTH  LAST HEARTBEAT" "demo-spoke  ONLINE" "kind=demo"
expect "hub send by name and by selector each create one directive" "$OUT" \
  "1 directive(s) created in group"
[[ $(grep -c '1 directive(s) created in group' <<<"$OUT") == 2 ]] || fail "expected two creates"
pass "both sends created exactly one directive"
expect "hub events --follow shows both completing" "$OUT" "DIRECTIVE_COMPLETED"
[[ $(grep -c 'DIRECTIVE_COMPLETED  demo-spoke' <<<"$OUT") == 2 ]] || fail "expected two completions in: $OUT"
pass "exactly two completions were followed"
expect "hub directives lists both as COMPLETED" "$OUT" "demo-spoke  ai_task   COMPLETED" "demo-spoke  sync_doc  COMPLETED"
expect "hub spoke shows details and capabilities" "$OUT" "name:             demo-spoke" "ai_task   1" "sync_doc  1"

# Stopping the spoke flushes its metrics; the operator then sees them.
kill -INT "$SPOKE_PID"
wait "$SPOKE_PID" || fail "the example spoke did not stop cleanly"
SPOKE_PID=
METRICS=$(cd "$WORK" && "$HUB_BIN" metrics --spoke demo-spoke --name pages_synced)
expect "hub metrics shows what the spoke recorded" "$METRICS" "demo-spoke  statistics  pages_synced  3"

# /metrics parses with the Prometheus client's OpenMetrics parser and counts
# what the walk-through did.
PY=$ROOT/target/test-tools/bin/python
[[ -x $PY ]] || PY=python3
SCRAPE=$(curl -sf "http://$HTTP_ADDR/metrics" | "$PY" -c '
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
values = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
        values[f"{s.name}{{{labels}}}"] = s.value
for key in ["hub_deliveries_total{}", "hub_acks_total{outcome=completed}",
            "hub_directives{state=COMPLETED}", "hub_spokes{health=ONLINE}"]:
    print(f"{key}={values.get(key)};")
') || fail "/metrics does not parse as OpenMetrics"
expect "/metrics parses and counts the walk-through's deliveries and acks" "$SCRAPE" \
  "hub_deliveries_total{}=2;" "hub_acks_total{outcome=completed}=2;" "hub_directives{state=COMPLETED}=2;"

ERR=$(cd "$WORK" && "$HUB_BIN" cancel 00000000-0000-7000-8000-000000000000 2>&1) && fail "cancelling nothing succeeded"
expect "an error is one line with the code" "$ERR" "hub: error: NOT_FOUND: directive"
[[ $(wc -l <<<"$ERR") == 1 ]] || fail "more than one line: $ERR"

# hub send --from -: JSON lines on stdin go through CreateDirectives, a row
# per line; a failed line fails the command, with a one-line summary.
LINES='{"target": {"spokeName": "demo-spoke"}, "type": "sync_doc", "payload": {"doc": "batch/1"}}
{"target": {"spoke_name": "nobody"}, "type": "sync_doc"}'
STATUS=0
OUT=$(cd "$WORK" && "$HUB_BIN" send --from - <<<"$LINES" 2>"$WORK/send.err") || STATUS=$?
[[ $STATUS == 1 ]] || fail "hub send --from with a failed line exited $STATUS, not 1: $OUT"
expect "hub send --from - reads JSON lines from stdin and prints a row per line" "$OUT" \
  "LINE  RESULT" "1     created" "2     failed" 'NOT_FOUND: spoke "nobody" not found'
ERR=$(cat "$WORK/send.err")
expect "a failed line makes it exit 1 with a one-line summary" "$ERR" \
  "hub: error: 1 of 2 line(s) failed (line 2): 1 directive(s) created"
[[ $(wc -l <<<"$ERR") == 1 ]] || fail "more than one line: $ERR"

echo "operator walk-through: $PASSED passed, 0 failed"
