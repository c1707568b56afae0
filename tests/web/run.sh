#!/usr/bin/env bash
# The admin page in a real browser: installs Debian's chromium (if missing)
# and playwright-core (npm ci), starts the real hub binary, registers spokes
# and sends directives carrying hostile text, then runs admin-page.test.mjs.
# The screenshot is saved to target/artifacts/admin-page.png (not committed).
#
#   cargo build -p hub && bash tests/web/run.sh      (HUB_BIN: the binary)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HUB_BIN=${HUB_BIN:-$ROOT/target/debug/hub}
WEB=$ROOT/tests/web

if ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
(cd "$WEB" && npm ci --silent --no-audit --no-fund)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-web.XXXXXX")
HUB_PID=
cleanup() {
  local status=$?
  if [[ -n $HUB_PID ]]; then
    kill "$HUB_PID" 2>/dev/null || true
    wait "$HUB_PID" 2>/dev/null || true
  fi
  if [[ $status -ne 0 ]]; then
    echo "----- hub log -----" >&2
    cat "$WORK/hub.log" >&2 || true
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

# shellcheck source=tests/lib/hub.sh
source "$ROOT/tests/lib/hub.sh"
start_hub "$WORK" "$WORK/hub.log"
ENROLL="authorization: Bearer $(cat "$WORK/hub-data/enrollment.token")"
ADMIN_TOKEN=$(cat "$WORK/hub-data/admin.token")

register() { # NAME → prints the spoke key
  grpcurl -plaintext -H "$ENROLL" \
    -d '{"name": "'"$1"'", "capabilities": [{"directive_type": "sync_doc", "version": "1"}]}' \
    "$GRPC_ADDR" hub.v1.SpokeService/Register \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["spokeKey"])'
}
KEY=$(register billing-eu)
register payroll-us >/dev/null
# Hostile text where spokes and operators may put free text.
grpcurl -plaintext -H "authorization: Bearer $KEY" \
  -d '{"status": "SPOKE_STATUS_DEGRADED", "status_message": "<script>window.pwned = 1</script>"}' \
  "$GRPC_ADDR" hub.v1.SpokeService/Heartbeat >/dev/null
send() { # NAME PAYLOAD → prints the directive id
  (cd "$WORK" && "$HUB_BIN" --addr "$GRPC_ADDR" send sync_doc --to "$1" --payload "$2" --json) \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["directives"][0]["id"])'
}
D1=$(send billing-eu '{"doc": "<img src=x onerror=window.pwned=2>"}')
D2=$(send payroll-us '{"doc": "payslips"}')

mkdir -p "$ROOT/target/artifacts"
(cd "$WEB" && HUB_HTTP="http://$HTTP_ADDR" HUB_ADMIN_TOKEN="$ADMIN_TOKEN" \
  SPOKES="billing-eu,payroll-us" DIRECTIVES="$D1,$D2" \
  SCREENSHOT="$ROOT/target/artifacts/admin-page.png" npm test --silent)
echo "screenshot: target/artifacts/admin-page.png"
