# Shared by the shell tests: start the real hub binary on ports the kernel
# picks, in a directory of the caller's, and wait until it answers.
#
#   source tests/lib/hub.sh
#   start_hub DIR LOG [extra serve flags...]   # sets HUB_PID GRPC_ADDR HTTP_ADDR
#
# A caller that must restart the hub on the same ports chooses them:
# HUB_TEST_LISTEN and HUB_TEST_HTTP_LISTEN (HOST:PORT; default 127.0.0.1:0).
#
# Needs HUB_BIN, python3 and curl. Returns non-zero (with the reason on
# stderr) if the hub exits or is not ready within 10 s.

start_hub() {
  local dir=$1 log=$2
  shift 2
  # Its own defaults only: nothing from the caller's environment.
  (
    cd "$dir"
    exec env -u HUB_DATA_DIR -u DATABASE_URL -u HUB_ADMIN_TOKEN -u HUB_ENROLLMENT_TOKEN \
      "$HUB_BIN" serve --listen "${HUB_TEST_LISTEN:-127.0.0.1:0}" \
      --http-listen "${HUB_TEST_HTTP_LISTEN:-127.0.0.1:0}" --log-format json "$@"
  ) >"$log" 2>&1 &
  HUB_PID=$!
  GRPC_ADDR=''
  HTTP_ADDR=''
  # The "hub listening" line names the bound addresses; then /healthz answers.
  for _ in $(seq 100); do
    if ! kill -0 "$HUB_PID" 2>/dev/null; then
      echo "the hub exited during startup" >&2
      return 1
    fi
    if [[ -z $GRPC_ADDR ]]; then
      read -r GRPC_ADDR HTTP_ADDR < <(python3 - "$log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if fields.get("message") == "hub listening":
        print(fields["grpc"], fields["http"])
        break
PY
      ) || true
    fi
    if [[ -n $GRPC_ADDR ]] && curl -sf "http://$HTTP_ADDR/healthz" >/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "the hub was not ready within 10 s" >&2
  return 1
}
