#!/usr/bin/env bash
# The operator console in a real browser: installs Debian's chromium (if
# missing) and playwright-core (npm ci), starts the real hub binary on ports
# chosen here (the console test restarts it on the same ones), registers
# spokes and sends directives carrying hostile text, pushes metric points,
# runs the Node example spoke (examples/node-spoke) so directives sent from
# the page complete, then runs admin-page.test.mjs and console.test.mjs.
# Screenshots go to target/artifacts/ (not committed): admin-page.png and
# console-{fleet,spoke,directive,events,confirm}.png.
#
#   cargo build -p hub --bin hub && bash tests/web/run.sh   (HUB_BIN: the binary)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HUB_BIN=${HUB_BIN:-$ROOT/target/debug/hub}
WEB=$ROOT/tests/web
SPOKE_DIR=$ROOT/examples/node-spoke
ARTIFACTS=$ROOT/target/artifacts
if ! command -v grpcurl >/dev/null && [[ -x $ROOT/target/test-tools/bin/grpcurl ]]; then
  PATH=$ROOT/target/test-tools/bin:$PATH
fi

if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
(cd "$WEB" && npm ci --silent --no-audit --no-fund)
(cd "$SPOKE_DIR" && npm ci --silent --no-audit --no-fund)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-web.XXXXXX")
HUB_PID=
SPOKE_PID=
cleanup() {
  local status=$?
  local pid
  for pid in "$SPOKE_PID" "$HUB_PID" "$(cat "$WORK/hub-restarted.pid" 2>/dev/null)"; do
    if [[ -n $pid ]]; then
      kill -CONT "$pid" 2>/dev/null || true
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      # The restarted hub is no child of this shell: wait for it to go.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  if [[ $status -ne 0 ]]; then
    for log in hub.log hub-restarted.log spoke.log; do
      echo "----- $log -----" >&2
      cat "$WORK/$log" >&2 || true
    done
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

# Fixed ports, so the test can restart the hub where the page's live stream
# reconnects to: two the kernel hands out now (free, unless taken meanwhile).
read -r GRPC_PORT HTTP_PORT < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
export HUB_TEST_LISTEN=127.0.0.1:$GRPC_PORT HUB_TEST_HTTP_LISTEN=127.0.0.1:$HTTP_PORT

# shellcheck source=tests/lib/hub.sh
source "$ROOT/tests/lib/hub.sh"
start_hub "$WORK" "$WORK/hub.log"
ENROLL="authorization: Bearer $(cat "$WORK/hub-data/enrollment.token")"
ADMIN_TOKEN=$(cat "$WORK/hub-data/admin.token")

json() { # EXPRESSION: reads JSON on stdin, prints the Python expression of it (j)
  python3 -c 'import json, sys; j = json.load(sys.stdin); print('"$1"')'
}
register() { # NAME LABELS-JSON → prints the spoke key
  grpcurl -plaintext -H "$ENROLL" \
    -d '{"name": "'"$1"'", "labels": '"$2"', "capabilities": [{"directive_type": "sync_doc", "version": "1"}]}' \
    "$GRPC_ADDR" hub.v1.SpokeService/Register | json 'j["spokeKey"]'
}
as_spoke() { # KEY METHOD JSON → the reply
  grpcurl -plaintext -H "authorization: Bearer $1" -d "$3" "$GRPC_ADDR" "hub.v1.SpokeService/$2"
}
send() { # NAME PAYLOAD → prints the directive id
  (cd "$WORK" && "$HUB_BIN" --addr "$GRPC_ADDR" send sync_doc --to "$1" --payload "$2" --json) \
    | json 'j["directives"][0]["id"]'
}

# Hostile text wherever spokes and operators may put free text (names are
# restricted to [a-z0-9._-]): labels, status messages, payloads, directive
# errors, metric labels and units. Each would set window.pwned if it ran.
KEY=$(register billing-eu '{"team": "<script>window.pwned=4</script>"}')
register payroll-us '{"region": "us"}' >/dev/null
D1=$(send billing-eu '{"doc": "<img src=x onerror=window.pwned=2>"}')
D2=$(send payroll-us '{"doc": "payslips"}')
D3=$(send billing-eu '{"doc": "will fail"}')
# billing-eu polls (D1 and D3 become delivered) and fails D3.
as_spoke "$KEY" PollDirectives '{"max_directives": 10}' >/dev/null
as_spoke "$KEY" Ack '{"directive_id": "'"$D3"'", "outcome": "ACK_OUTCOME_FAILED",
  "error": "<script>window.pwned=6</script> disk full"}' >/dev/null
as_spoke "$KEY" Heartbeat \
  '{"status": "SPOKE_STATUS_DEGRADED", "status_message": "<script>window.pwned = 1</script>"}' >/dev/null
# Metric points: statistics/latency in two series (one label set hostile),
# and a chart whose unit is hostile.
POINTS=$(python3 - <<'PY'
import datetime, json
now = datetime.datetime.now(datetime.timezone.utc)
def at(minutes_ago):
    return (now - datetime.timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
hostile = {"route": "<img src=x onerror=window.pwned=3>"}
points = [
    {"domain": "statistics", "name": "latency", "value": 12.5, "unit": "ms", "labels": hostile, "time": at(20)},
    {"domain": "statistics", "name": "latency", "value": 17.25, "unit": "ms", "labels": hostile, "time": at(10)},
    {"domain": "statistics", "name": "latency", "value": 99, "unit": "ms", "labels": {"route": "checkout"}, "time": at(5)},
    {"domain": "statistics", "name": "errors", "value": 5, "unit": "<svg onload=window.pwned=8>", "time": at(5)},
]
print(json.dumps({"batch_id": "web-test-1", "points": points}))
PY
)
ACCEPTED=$(as_spoke "$KEY" PushMetrics "$POINTS" | json 'j["batches"][0].get("acceptedPoints", 0)')
if [[ $ACCEPTED != 4 ]]; then
  echo "PushMetrics stored $ACCEPTED of 4 points" >&2
  exit 1
fi

# The Node example spoke: handles echo and sum, pushes its demo batch.
node "$SPOKE_DIR/spoke.js" --hub "$GRPC_ADDR" --name node-spoke --state-dir "$WORK/node-spoke" \
  --enrollment-token-file "$WORK/hub-data/enrollment.token" --backoff-base 0.2 \
  --events-file "$WORK/spoke-events.jsonl" >"$WORK/spoke.log" 2>&1 &
SPOKE_PID=$!
for _ in $(seq 150); do
  grep -q '"event":"metrics"' "$WORK/spoke-events.jsonl" 2>/dev/null && break
  kill -0 "$SPOKE_PID" || { echo "the node spoke exited" >&2; exit 1; }
  sleep 0.1
done
grep -q '"event":"metrics"' "$WORK/spoke-events.jsonl" \
  || { echo "the node spoke did not push its metrics within 15 s" >&2; exit 1; }

mkdir -p "$ARTIFACTS"
export HUB_HTTP="http://$HTTP_ADDR" HUB_ADMIN_TOKEN="$ADMIN_TOKEN" GRPC_ADDR HUB_BIN WORK ROOT \
  HUB_PID NODE_SPOKE_PID="$SPOKE_PID" ARTIFACTS
cd "$WEB"
SPOKES="billing-eu,payroll-us,node-spoke" DIRECTIVES="$D1,$D2" \
  SCREENSHOT="$ARTIFACTS/admin-page.png" node --test admin-page.test.mjs
HOSTILE_DIRECTIVE=$D1 FAILED_DIRECTIVE=$D3 node --test console.test.mjs
echo "screenshots: target/artifacts/admin-page.png, target/artifacts/console-*.png"
