# run NAME TIMEOUT CMD...: one device-call stage under a timeout, log in $OUT/NAME.log, tail echoed
# shellcheck shell=bash
run() {
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^\[rank\|warn" "$OUT/$name.log" | tail -n "${TAIL:-40}"
  echo "=== $name done in $((SECONDS - t0)) s (rc $rc$([ $rc = 124 ] && echo ', timed out'))"
}
