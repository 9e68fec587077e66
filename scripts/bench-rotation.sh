#!/usr/bin/env bash
# Password rotation on the real node: section 19 of docs/benchmarks.md
# (`make bench-rotation`).
#
# BENCH_ROTATION_ROUNDS (3) runs of operator/tests/real_node_tls.rs on the
# test cluster (scripts/test-env.sh): a Tidepool with `verify-full` on a
# TLS-only PostgreSQL, under 10 clients of `GET /row/`; both of its roles'
# passwords changed (`ALTER ROLE`, then the Secrets), the pods rolled by
# the operator, the queue scaler connected again. Each run appends what it
# measured to $TIDEPOOL_E2E_FIGURES: the requests and how many failed, the
# seconds from the change to the first server login with the new password
# (the new pod's PgBouncer, by PostgreSQL's `backend_start`) and to the
# end of the roll (every backend of both roles logged in after the change).
# Needs the machine's one real node: stop the test cluster first.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

: "${BENCH_ROTATION_ROUNDS:=3}"
OUT=$REPO_ROOT/docs/benchmarks.md
source "$REPO_ROOT/scripts/test-env.sh"
bench_on_test_cluster

say "19. building the test"
cargo test --quiet -p tidepool-operator --test real_node_tls --no-run
test_env_up
for round in $(seq 1 "$BENCH_ROTATION_ROUNDS"); do
  say "19. round $round of $BENCH_ROTATION_ROUNDS: a rotation under load on the real node"
  TIDEPOOL_E2E_FIGURES=$FIGURES cargo test --quiet -p tidepool-operator --test real_node_tls \
    > "$WORK/test-$round.log" 2>&1 || { cat "$WORK/test-$round.log" >&2; die "the rotation test failed"; }
done

# One line per run: "requests failed first_login_seconds rolled_seconds".
py "
import json
for line in open('$FIGURES'):
    f = json.loads(line)
    if f['test'] == 'password_rotation':
        f = f['figures']
        print(f['requests'], f['failed'], '%.2f' % f['first_login_seconds'], '%.2f' % f['rolled_seconds'])
" > "$WORK/runs"
server_version=$(py "
import json
print(next(json.loads(l)['figures']['server_version'] for l in open('$FIGURES') if json.loads(l)['test'] == 'password_rotation').split()[0])
")
[ "$(wc -l < "$WORK/runs")" = "$BENCH_ROTATION_ROUNDS" ] || die "expected $BENCH_ROTATION_ROUNDS runs' figures: $(cat "$FIGURES")"
column() { awk -v c="$1" '{print $c}' "$WORK/runs"; }
requests=$(awk '{s += $1} END {print s}' "$WORK/runs") failed=$(awk '{s += $2} END {print s}' "$WORK/runs")
first=$(median $(column 3)) rolled=$(median $(column 4))
{
  echo "<!-- rotation benchmark: scripts/bench-rotation.sh -->"
  echo "## 19. Password rotation"
  echo
  echo "Measured $(date -u +"%Y-%m-%d %H:%M UTC") at commit $(git rev-parse --short HEAD) by \`scripts/bench-rotation.sh\` (\`make bench-rotation\`): $BENCH_ROTATION_ROUNDS runs of \`operator/tests/real_node_tls.rs\` on the real node, a Tidepool of one web and one worker pod with \`database.tls.mode: verify-full\` on a TLS-only PostgreSQL $server_version, under 10 clients of \`GET /row/\` through the web Service. Both of its roles' passwords are changed, PostgreSQL first (\`ALTER ROLE\`), then their Secrets; the operator rolls the pods through the paced rollout (their credentials fingerprint changed) and the queue scaler connects again."
  echo
  echo "| run | requests | failed | change to the first login with the new password | change to every backend of both roles logged in anew |"
  echo "|---|---|---|---|---|"
  awk '{printf "| %d | %d | %d | %.2f s | %.2f s |\n", NR, $1, $2, $3, $4}' "$WORK/runs"
  echo
  echo "Medians: the first new login **$first s** after the change, the roll over at **$rolled s**; $failed of $requests requests failed over all runs. The window in which PostgreSQL holds the new password and an old pod the old one runs from the \`ALTER ROLE\` to the roll's end: an old pod's PgBouncer keeps the server connections it logged in with (PostgreSQL does not end a session whose password changed, and the sidecar keeps its share open, \`min_pool_size\`), so only a new server connection of an old pod in that window fails."
  echo "<!-- end of the rotation benchmark -->"
} > "$WORK/section.md"
replace_report_section "$OUT" "<!-- rotation benchmark: scripts/bench-rotation.sh -->" "<!-- end of the rotation benchmark -->" "$WORK/section.md"
say "19. written to docs/benchmarks.md: first new login after $first s, the roll over at $rolled s, $failed of $requests requests failed"
