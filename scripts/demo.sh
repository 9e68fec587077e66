#!/usr/bin/env bash
# The main job, locally: starts the stack and runs the seed's web experiment
# at full size against one `tidepool web` process: 10 requests of
# /slow-query/ (5 s each) with ab, then with a client that starts all ten at
# once. Prints each figure, its target and the peak number of PostgreSQL
# server connections. Exits non-zero only if the stack or an experiment
# could not run, not because a figure missed its target.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

"$REPO_ROOT/scripts/stack.sh" up
WEB=http://127.0.0.1:$TIDEPOOL_WEB_PORT
WORK=$(mktemp -d)
trap 'stop_connection_sampler; rm -rf "$WORK"' EXIT

start_connection_sampler "$WORK/samples"

say "seed experiment with ab: ab -n 10 -c 10 $WEB/slow-query/"
ab -n 10 -c 10 "$WEB/slow-query/" > "$WORK/ab.txt" 2>&1 || { cat "$WORK/ab.txt" >&2; die "ab could not run"; }
ab_total=$(ab_total_seconds "$WORK/ab.txt")
ab_failed=$(ab_failed_requests "$WORK/ab.txt")
ab_non2xx=$(awk '/^Non-2xx responses:/ {print $3}' "$WORK/ab.txt"); ab_non2xx=${ab_non2xx:-0}

say "seed experiment, all ten at once: tidepool-loadgen burst --requests 10 --url $WEB/slow-query/"
"$TIDEPOOL_LOADGEN_BIN" burst --requests 10 --url "$WEB/slow-query/" > "$WORK/burst.json" || die "the all-at-once client could not run"
burst_total=$(printf '%.2f' "$(json_field "$WORK/burst.json" total_seconds)")
burst_failed=$(json_field "$WORK/burst.json" failed)

stop_connection_sampler
peak=$(sampled_peak "$WORK/samples")

verdict() { python3 -c 'import sys; print("met" if float(sys.argv[1]) <= float(sys.argv[2]) else "MISSED")' "$1" "$2"; }
cat <<REPORT

Tidepool demo: the seed's web experiment against one tidepool web process
(PgBouncer in transaction mode, $TIDEPOOL_POOLER_POOL_SIZE server connections; pool of $TIDEPOOL_DB_POOL_SIZE in the web process)

  figure                                   measured    target     verdict
  10 x 5 s slow queries, all at once       ${burst_total} s    <= 5.2 s   $(verdict "$burst_total" 5.2)   (failed: $burst_failed)
  the same with ab -n 10 -c 10             ${ab_total} s   <= 10.2 s  $(verdict "$ab_total" 10.2)   (failed: $ab_failed, non-2xx: $ab_non2xx)
  peak PostgreSQL server connections       $peak           <= $TIDEPOOL_POOLER_POOL_SIZE      $(verdict "$peak" "$TIDEPOOL_POOLER_POOL_SIZE")

ab 2.3 opens one connection, waits for its response, and only then opens the
other nine, so its total is about two query times whatever the server does.
The stack is still running: make down stops it.
REPORT
