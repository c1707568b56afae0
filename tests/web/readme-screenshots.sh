#!/usr/bin/env bash
# Makes the README's console screenshots (docs/console-fleet.png and
# docs/console-spoke.png) from a real hub with a small, tidy fleet: three
# spokes, the Node example spoke completing directives, an hour of metric
# points. Not part of the test suite; run it by hand after a visible change
# to the console, check the images, and commit them.
#
#   cargo build -p hub && bash tests/web/readme-screenshots.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HUB_BIN=${HUB_BIN:-$ROOT/target/debug/hub}
WEB=$ROOT/tests/web
SPOKE_DIR=$ROOT/examples/node-spoke
command -v grpcurl >/dev/null || export PATH="$ROOT/target/test-tools/bin:$PATH"
(cd "$WEB" && npm ci --silent --no-audit --no-fund)
(cd "$SPOKE_DIR" && npm ci --silent --no-audit --no-fund)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-shots.XXXXXX")
HUB_PID=
SPOKE_PID=
cleanup() {
  for pid in $SPOKE_PID $HUB_PID; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=tests/lib/hub.sh
source "$ROOT/tests/lib/hub.sh"
start_hub "$WORK" "$WORK/hub.log"
ENROLL="authorization: Bearer $(cat "$WORK/hub-data/enrollment.token")"
ADMIN_TOKEN=$(cat "$WORK/hub-data/admin.token")
key_of() { python3 -c 'import json, sys; print(json.load(sys.stdin)["spokeKey"])'; }
register() { # NAME LABELS-JSON TYPE → prints the key
  grpcurl -plaintext -H "$ENROLL" \
    -d '{"name": "'"$1"'", "labels": '"$2"', "version": "2.4.1", "capabilities": [{"directive_type": "'"$3"'", "version": "2"}]}' \
    "$GRPC_ADDR" hub.v1.SpokeService/Register | key_of
}
as_spoke() { grpcurl -plaintext -H "authorization: Bearer $1" -d "$3" "$GRPC_ADDR" "hub.v1.SpokeService/$2" >/dev/null; }
send() { (cd "$WORK" && "$HUB_BIN" --addr "$GRPC_ADDR" send "$1" --to "$2" --payload "$3" >/dev/null); }

BILLING=$(register billing-eu '{"region": "eu", "tier": "gold"}' sync_doc)
PAYROLL=$(register payroll-us '{"region": "us"}' sync_doc)
as_spoke "$BILLING" Heartbeat '{"status": "SPOKE_STATUS_OK", "version": "2.4.1"}'
as_spoke "$PAYROLL" Heartbeat '{"status": "SPOKE_STATUS_DEGRADED", "status_message": "disk 91% full", "version": "2.4.1"}'
send sync_doc payroll-us '{"doc": "payslips/2026-11"}'
POINTS=$(python3 - <<'PY'
import datetime, json, math
now = datetime.datetime.now(datetime.timezone.utc)
points = []
for i in range(60, 0, -2):
    at = (now - datetime.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for route, base in (("checkout", 42.0), ("search", 18.0)):
        value = round(base + 8 * math.sin(i / 6) + (i % 7), 1)
        points.append({"domain": "statistics", "name": "latency", "value": value, "unit": "ms",
                       "labels": {"route": route}, "time": at})
    points.append({"domain": "statistics", "name": "orders", "value": 120 + (60 - i) * 3,
                   "unit": "orders/min", "time": at})
print(json.dumps({"batch_id": "shots-1", "points": points}))
PY
)
as_spoke "$BILLING" PushMetrics "$POINTS"

node "$SPOKE_DIR/spoke.js" --hub "$GRPC_ADDR" --name node-spoke --state-dir "$WORK/node-spoke" \
  --enrollment-token-file "$WORK/hub-data/enrollment.token" >"$WORK/spoke.log" 2>&1 &
SPOKE_PID=$!
sleep 2
send echo node-spoke '{"message": "hello"}'
send sum node-spoke '{"numbers": [1, 2, 3]}'
sleep 2

mkdir -p "$ROOT/docs"
cd "$WEB"
HUB_HTTP="http://$HTTP_ADDR" HUB_ADMIN_TOKEN="$ADMIN_TOKEN" OUT="$ROOT/docs" node --input-type=module -e '
import { chromium } from "playwright-core";
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"] });
const page = await browser.newPage({ viewport: { width: 1200, height: 820 } });
const base = process.env.HUB_HTTP;
await page.goto(base + "/");
await page.fill("input[name=token]", process.env.HUB_ADMIN_TOKEN);
await Promise.all([page.waitForURL(base + "/"), page.click("button[type=submit]")]);
await page.locator("#live.on").waitFor();
await page.screenshot({ path: process.env.OUT + "/console-fleet.png" });
await page.goto(base + "/spokes/billing-eu?range=1h");
await page.locator("#live.on").waitFor();
await page.locator("#metrics").scrollIntoViewIfNeeded();
await page.screenshot({ path: process.env.OUT + "/console-spoke.png" });
await browser.close();
'
echo "wrote docs/console-fleet.png and docs/console-spoke.png"
