#!/usr/bin/env bash
# The wire-compatibility gate: `buf lint` (STANDARD) and `buf breaking` (FILE
# rules, see proto/buf.yaml) of the contract against proto/released.binpb, the
# buf image of the contract as last released.
#
#   bash tests/contract/gate.sh                    check proto/
#   bash tests/contract/gate.sh DIR                check a copy of proto/ in DIR
#                                                  (tests/contract/self-test.sh)
#   bash tests/contract/gate.sh --update-snapshot  release a compatible change:
#                                                  check proto/, then rewrite
#                                                  proto/released.binpb
#
# A compatible change (new fields, messages, enum values, RPCs) passes and is
# released with --update-snapshot. A breaking one (renumbered, retyped or
# removed field, removed RPC, ...) fails: it needs a new package, hub.v2 in
# proto/hub/v2/, beside an unchanged hub.v1.
#
# Needs `buf` on PATH, else uses the one tests/polyglot.sh or tests/run.sh
# installed under target/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SNAPSHOT=$ROOT/proto/released.binpb

update=false
dir=$ROOT/proto
case ${1:-} in
  --update-snapshot) update=true ;;
  '') ;;
  -*) echo "gate.sh: unknown option $1" >&2; exit 2 ;;
  *) dir=$(cd "$1" && pwd) ;;
esac

if ! command -v buf >/dev/null; then
  for venv in polyglot-venv test-tools; do
    if [[ -x $ROOT/target/$venv/bin/buf ]]; then PATH=$ROOT/target/$venv/bin:$PATH; break; fi
  done
fi
command -v buf >/dev/null || { echo "gate.sh: buf is not on PATH (bash tests/polyglot.sh installs it)" >&2; exit 2; }
[[ -f $SNAPSHOT ]] || { echo "gate.sh: no snapshot at $SNAPSHOT" >&2; exit 2; }

passed=0
failed=0
check() {
  local what=$1 out status=0
  shift
  out=$(cd "$dir" && "$@" 2>&1) || status=$?
  if [[ $status == 0 ]]; then
    passed=$((passed + 1))
    echo "ok - $what"
  else
    failed=$((failed + 1))
    echo "not ok - $what (exit $status)"
    printf '%s\n' "$out" | sed 's/^/    | /'
  fi
}

check "buf lint" buf lint
check "buf breaking against proto/released.binpb" buf breaking --against "$SNAPSHOT"

if $update && [[ $failed == 0 ]]; then
  (cd "$dir" && buf build --exclude-source-info -o "$SNAPSHOT")
  echo "updated proto/released.binpb: commit it with the contract change"
fi
echo "contract gate: $passed passed, $failed failed"
[[ $failed == 0 ]]
