#!/usr/bin/env bash
# A flake hunt: runs the whole test suite N times in a row (default 5) while
# one busy loop per core, at nice 0, keeps every core busy, and prints each
# round's failures and the load average. The test services (scripts/test-env.sh)
# stay up between rounds.
#
#   scripts/soak-tests.sh [N]
#
# Each round's full output is kept in $TIDEPOOL_STATE_DIR/soak/round-K.log.
# The busy loops stop when the script ends, and by themselves after
# TIDEPOOL_SOAK_BUSY_LIMIT seconds (N x 20 minutes by default) in any case.
# Exits non-zero if any round had a failure.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$REPO_ROOT/scripts/test-env.sh"
cd "$REPO_ROOT"

rounds=${1:-5}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "usage: soak-tests.sh [ROUNDS], ROUNDS a positive whole number"
busy_limit=${TIDEPOOL_SOAK_BUSY_LIMIT:-$(( rounds * 1200 ))}
LOGS=$TIDEPOOL_STATE_DIR/soak
mkdir -p "$LOGS"

say "building the tests"
cargo build --workspace --bins --quiet
cargo build --release --workspace --bins --quiet
cargo test --workspace --no-run --quiet

busy=()
stop_busy() {
  [ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2>/dev/null || true
  [ ${#busy[@]} -eq 0 ] || wait "${busy[@]}" 2>/dev/null || true
  busy=()
}
trap 'stop_busy; test_env_down' EXIT
test_env_up

cores=$(nproc)
say "starting $cores busy loops at nice 0 (each stops by itself after ${busy_limit}s)"
for _ in $(seq "$cores"); do
  nice -n 0 timeout "$busy_limit" bash -c 'while :; do :; done' &
  busy+=($!)
done

failed_rounds=0
for round in $(seq "$rounds"); do
  log=$LOGS/round-$round.log
  started=$SECONDS
  status=0
  run_tests --no-fail-fast > "$log" 2>&1 || status=$?
  passed=$(awk '/^test result:/ {n += $4} END {print n + 0}' "$log")
  failures=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$log" | paste -sd ' ' -)
  load=$(cut -d ' ' -f 1-3 /proc/loadavg)
  if [ "$status" -eq 0 ]; then
    printf 'round %d/%d: %d passed, 0 failed in %d s; load average %s\n' "$round" "$rounds" "$passed" $(( SECONDS - started )) "$load"
  else
    failed_rounds=$(( failed_rounds + 1 ))
    printf 'round %d/%d: FAILED (exit %d) in %d s: %s; load average %s; see %s\n' "$round" "$rounds" "$status" \
      $(( SECONDS - started )) "${failures:-no test failed: the run itself did}" "$load" "$log"
  fi
done

stop_busy
printf 'soak: %d rounds with every core busy, %d with failures\n' "$rounds" "$failed_rounds"
[ "$failed_rounds" -eq 0 ]
