#!/usr/bin/env bash
# Tests the wire-compatibility gate itself: copies proto/ to a temporary
# directory, changes the copy, and runs tests/contract/gate.sh on it against
# the real snapshot. Compatible changes must pass; breaking ones must FAIL
# (a case about a breaking change passes only if the gate fails, and fails
# for the reason buf names).
#
#   bash tests/contract/self-test.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GATE=$ROOT/tests/contract/gate.sh
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hub-contract.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok - $1"; }
not_ok() {
  failed=$((failed + 1))
  echo "not ok - $1"
  if [[ -n ${2:-} ]]; then printf '%s\n' "$2" | sed 's/^/    | /'; fi
}

# fresh NAME: a pristine copy of proto/ in $WORK/NAME; prints its path.
fresh() {
  rm -rf "${WORK:?}/$1"
  cp -R "$ROOT/proto" "$WORK/$1"
  echo "$WORK/$1"
}

# edit FILE SED-SCRIPT: edits FILE in place and fails unless it changed, so a
# case can never pass because its edit silently matched nothing.
edit() {
  cp "$1" "$1.orig"
  sed -i "$2" "$1"
  if cmp -s "$1" "$1.orig"; then
    echo "self-test: the edit '$2' did not change $1" >&2
    exit 1
  fi
  rm "$1.orig"
}

# expect_pass WHAT DIR: the gate accepts the contract in DIR.
expect_pass() {
  local out status=0
  out=$(bash "$GATE" "$2" 2>&1) || status=$?
  if [[ $status == 0 ]]; then ok "$1: the gate passes"; else not_ok "$1: the gate should pass" "$out"; fi
}

# expect_break WHAT DIR NEEDLE: the gate fails on `buf breaking`, and buf's
# report contains NEEDLE.
expect_break() {
  local out status=0
  out=$(bash "$GATE" "$2" 2>&1) || status=$?
  if [[ $status != 0 && $out == *"not ok - buf breaking"* && $out == *"$3"* && $out == *"ok - buf lint"* ]]; then
    ok "$1: the gate FAILS, naming it ($3)"
  else
    not_ok "$1: the gate should fail on buf breaking with '$3' (exit $status)" "$out"
  fi
}

# The untouched contract passes: the cases below fail for their edit alone.
dir=$(fresh unchanged)
expect_pass "an unchanged copy of proto/" "$dir"

# Compatible: a new field.
dir=$(fresh added-field)
edit "$dir/hub/v1/types.proto" '/^message Spoke {/,/^}/ s|^}|  // A field added in a later release.\n  string added_later = 99;\n}|'
expect_pass "a new field on hub.v1.Spoke (compatible)" "$dir"

# Breaking: a renumbered field.
dir=$(fresh renumbered)
edit "$dir/hub/v1/types.proto" '/^message Spoke {/,/^}/ s/  string name = 2;/  string name = 22;/'
expect_break "hub.v1.Spoke.name renumbered 2 -> 22" "$dir" 'field "2" with name "name" on message "Spoke" was deleted'

# Breaking: a retyped field.
dir=$(fresh retyped)
edit "$dir/hub/v1/types.proto" '/^message Directive {/,/^}/ s/  DirectiveState state = 6;/  string state = 6;/'
expect_break "hub.v1.Directive.state retyped enum -> string" "$dir" 'on message "Directive" changed type'

# Breaking: a removed RPC.
dir=$(fresh removed-rpc)
edit "$dir/hub/v1/spoke.proto" '/^  rpc PollDirectives(/d'
expect_break "hub.v1.SpokeService.PollDirectives removed" "$dir" '"PollDirectives" on service "SpokeService" was deleted'

# The way out for a breaking change: a new package hub.v2 beside an unchanged
# hub.v1 (here: v1 copied to v2, then broken there) passes.
dir=$(fresh hub-v2)
cp -R "$dir/hub/v1" "$dir/hub/v2"
for f in "$dir"/hub/v2/*.proto; do
  edit "$f" 's/^package hub\.v1;/package hub.v2;/'
done
for f in "$dir"/hub/v2/spoke.proto "$dir"/hub/v2/admin.proto; do
  edit "$f" 's|import "hub/v1/types.proto";|import "hub/v2/types.proto";|'
done
edit "$dir/hub/v2/types.proto" '/^message Spoke {/,/^}/ s/  string name = 2;/  string name = 22;/'
expect_pass "a breaking change made in a new package hub.v2, hub.v1 unchanged" "$dir"

echo "contract self-test: $passed passed, $failed failed"
[[ $failed == 0 ]]
