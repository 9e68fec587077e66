# Shared settings and helpers of Tidepool's scripts. Source it; do not run it.
#
# Every knob is an environment variable with a default, so two stacks (the
# demo's and the tests') can run side by side on other ports and folders.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

: "${TIDEPOOL_PG_PORT:=5432}"
: "${TIDEPOOL_POOLER_PORT:=6432}"
: "${TIDEPOOL_WEB_PORT:=8000}"
: "${TIDEPOOL_WORKER_PORT:=8001}"
: "${TIDEPOOL_RUN_AS:=tidepool}"              # PostgreSQL and PgBouncer refuse root
: "${TIDEPOOL_POOLER_MAX_CLIENT_CONN:=2000}"
: "${CARGO_TARGET_DIR:=$HOME/.cache/tidepool/cargo-target}"
: "${TIDEPOOL_BIN:=$CARGO_TARGET_DIR/release/tidepool}"
if [ -z "${TIDEPOOL_OPERATOR_BIN:-}" ]; then
  TIDEPOOL_OPERATOR_BIN=$(dirname "$TIDEPOOL_BIN")/tidepool-operator
  # An application's own binary (TIDEPOOL_BIN=~/my-shop/target/debug/my-shop)
  # has no operator beside it: the planner is the project's own build.
  [ -x "$TIDEPOOL_OPERATOR_BIN" ] || TIDEPOOL_OPERATOR_BIN=$CARGO_TARGET_DIR/release/tidepool-operator
fi
: "${TIDEPOOL_LOADGEN_BIN:=$CARGO_TARGET_DIR/release/tidepool-loadgen}"
: "${TIDEPOOL_SHOP_BIN:=$CARGO_TARGET_DIR/release/tidepool-shop}"
# The benchmarks' figures and report sections (tools/bench-report).
: "${TIDEPOOL_BENCH_REPORT_BIN:=$CARGO_TARGET_DIR/release/tidepool-bench-report}"
export CARGO_TARGET_DIR

# The test cluster's real node (scripts/kube-node.sh): its network
# namespace, the veth pair joining it to the host (the host end, where the
# API server and the test PostgreSQL listen, and the node's end), and the
# pod and Service ranges, routed from the host through the veth while the
# node is up. One real node per machine.
: "${TIDEPOOL_NODE_NETNS:=tidepool-node}"
: "${TIDEPOOL_NODE_VETH:=tidepool0}"
: "${TIDEPOOL_NODE_HOST_IP:=10.250.0.1}"
: "${TIDEPOOL_NODE_IP:=10.250.0.2}"
: "${TIDEPOOL_POD_CIDR:=10.244.0.0/24}"
: "${TIDEPOOL_SERVICE_CIDR:=10.0.0.0/16}"
# Container images (scripts/images.sh): buildah's store and the bases,
# and the archives the node imports.
: "${TIDEPOOL_IMAGE_CACHE:=$HOME/.cache/tidepool/images}"
: "${TIDEPOOL_IMAGE_DIR:=$TIDEPOOL_IMAGE_CACHE/archives}"
PAUSE_IMAGE=localhost/tidepool-pause:3.10

# The local stack's sizes come from the same planner as the pods', for the
# local spec scripts/local-tidepool.yaml (one web process, one worker, one
# PgBouncer for both, no surge): TIDEPOOL_PG_MAX_CONNECTIONS,
# TIDEPOOL_POOLER_POOL_SIZE (PgBouncer's cap: the sum of the shares),
# TIDEPOOL_POOLER_MIN_POOL_SIZE, TIDEPOOL_DB_POOL_SIZE (web's pool),
# TIDEPOOL_WORKER_CONCURRENCY and TIDEPOOL_WORKER_LISTEN_NOTIFY (1: the
# worker also LISTENs on a direct connection). A variable already set wins.
load_local_plan() {
  local name value plan
  [ -x "$TIDEPOOL_OPERATOR_BIN" ] || die "$TIDEPOOL_OPERATOR_BIN is not built (run: make build)"
  plan=$("$TIDEPOOL_OPERATOR_BIN" plan -f "$REPO_ROOT/scripts/local-tidepool.yaml" -o env) \
    || die "the local spec scripts/local-tidepool.yaml does not fit its budget"
  # Set, not exported: TIDEPOOL_DB_POOL_SIZE is web's, and a worker that
  # inherited it would shrink its task pool.
  while IFS='=' read -r name value; do
    [ -n "${!name:-}" ] || printf -v "$name" '%s' "$value"
  done <<< "$plan"
}


APP_DB=tidepool
APP_USER=tidepool

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] || die "PostgreSQL is not installed (run: make deps)"
  printf '%s\n' "$dir"
}

# Runs "${@:3}" in root filesystem $1 (an image's: scripts/images.sh rootfs)
# as user $2 (uid:gid), in place of the calling shell: in a mount namespace
# of its own with the host's /dev and a /proc bound in, and each folder of
# ROOTFS_BINDS (absolute paths, space-separated) at its own path; the
# mounts go with the last process in it. The host's network. Needs root.
exec_in_rootfs() {
  local root=$1 user=$2
  shift 2
  exec unshare --mount --propagation private -- /bin/sh -c '
    root=$0 user=$1 binds=$2; shift 2
    mount --rbind /dev "$root/dev" && mount -t proc proc "$root/proc" || exit 1
    for dir in $binds; do mkdir -p "$root$dir" && mount --bind "$dir" "$root$dir" || exit 1; done
    exec chroot --userspec="$user" "$root" "$@"' "$root" "$user" "${ROOTFS_BINDS:-}" "$@"
}

# Runs a command as the dedicated service user when we are root.
as_service_user() {
  if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid="$TIDEPOOL_RUN_AS" --regid="$TIDEPOOL_RUN_AS" --init-groups -- "$@"
  else
    "$@"
  fi
}

# The same, in a new session (detached from the terminal's Ctrl-C), exec'd
# without forking so that `$!` of a background call is the command's PID.
as_service_user_detached() {
  if [ "$(id -u)" -eq 0 ]; then
    exec setsid setpriv --reuid="$TIDEPOOL_RUN_AS" --regid="$TIDEPOOL_RUN_AS" --init-groups -- "$@"
  else
    exec setsid "$@"
  fi
}

# State lives in .tidepool/ at the repository root, unless configured, or
# unless the service user cannot reach the checkout (a clone inside a
# private folder): then in /var/lib/tidepool/<hash of the checkout's path>.
if [ -z "${TIDEPOOL_STATE_DIR:-}" ]; then
  TIDEPOOL_STATE_DIR=$REPO_ROOT/.tidepool
  if [ "$(id -u)" -eq 0 ] && id "$TIDEPOOL_RUN_AS" >/dev/null 2>&1 \
     && ! as_service_user test -x "$REPO_ROOT"; then
    TIDEPOOL_STATE_DIR=/var/lib/tidepool/$(printf '%s' "$REPO_ROOT" | sha1sum | cut -c1-12)
    mkdir -p "$TIDEPOOL_STATE_DIR" && chmod 755 /var/lib/tidepool "$TIDEPOOL_STATE_DIR"
    printf 'note: user %s cannot reach %s; keeping state in %s\n' "$TIDEPOOL_RUN_AS" "$REPO_ROOT" "$TIDEPOOL_STATE_DIR" >&2
  fi
fi
export TIDEPOOL_STATE_DIR

# util-linux's mount and umount (the scripts', the kubelet's for pod volumes,
# mmdebstrap's) keep their utab, and create its folder /run/mount, where
# this says: in the state folder, so a run leaves nothing of its own in /run.
export LIBMOUNT_UTAB=$TIDEPOOL_STATE_DIR/libmount/utab

# Is something listening on 127.0.0.1:$1?
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

require_free_port() {
  local port=$1 what=$2
  if port_in_use "$port"; then
    die "port $port (for $what) is already in use on 127.0.0.1; stop what uses it or choose another port with the variable that sets it (see scripts/lib.sh)"
  fi
}

# Waits until $1 succeeds, at most $2 seconds, polling every 0.1 s.
wait_until() {
  local check=$1 limit=$2 what=$3 tries
  tries=$(( limit * 10 ))
  while ! eval "$check" >/dev/null 2>&1; do
    tries=$(( tries - 1 ))
    [ "$tries" -gt 0 ] || die "$what did not become ready within ${limit}s"
    sleep 0.1
  done
}

# Is the process recorded in pid file $1 alive?
pid_alive() { [ -f "$1" ] && kill -0 "$(head -n 1 "$1")" 2>/dev/null; }

# Prints "$1: running (pid N)" or "$1: stopped" for pid file $2.
print_status() {
  if pid_alive "$2"; then echo "$1: running (pid $(head -n 1 "$2"))"; else echo "$1: stopped"; fi
}

# Stops the process recorded in pid file $1 with SIGTERM, waiting up to $2
# seconds before SIGKILL; $3 names it in messages.
stop_pid() {
  local pidfile=$1 limit=$2 what=$3 pid
  pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(head -n 1 "$pidfile")
  say "stopping $what (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! (wait_until "! kill -0 $pid" "$limit" "$what" 2>/dev/null); then
    say "$what did not stop within ${limit}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# Builds what is missing of the Kubernetes tools ("$@", all by default;
# scripts/kube-build.sh) and exports their bin folders: TIDEPOOL_KUBE_BIN,
# TIDEPOOL_ETCD_BIN, TIDEPOOL_KWOK_BIN, TIDEPOOL_HELM_BIN, TIDEPOOL_NODE_BIN,
# and TIDEPOOL_MONITORING_CRDS (the folder of prometheus-operator's CRDs).
load_kube_tools() {
  local built tool dir
  built=$("$REPO_ROOT/scripts/kube-build.sh" "$@") || die "building the Kubernetes tools failed"
  while IFS='=' read -r tool dir; do
    case $tool in
      kubernetes) export TIDEPOOL_KUBE_BIN=$dir ;;
      etcd) export TIDEPOOL_ETCD_BIN=$dir ;;
      kwok) export TIDEPOOL_KWOK_BIN=$dir ;;
      helm) export TIDEPOOL_HELM_BIN=$dir ;;
      node) export TIDEPOOL_NODE_BIN=$dir ;;
      monitoring) export TIDEPOOL_MONITORING_CRDS=${dir%/bin}/crds ;;
      metrics-server) export TIDEPOOL_METRICS_SERVER_BIN=$dir ;;
      coredns) export TIDEPOOL_COREDNS_BIN=$dir ;;
      cloudnative-pg) export TIDEPOOL_CNPG_BIN=$dir TIDEPOOL_CNPG_MANIFESTS=${dir%/bin}/manifests ;;
    esac
  done <<< "$built"
}

secret() { cat "$TIDEPOOL_STATE_DIR/secrets/$1"; }

# Connection URLs. They carry passwords: pass them through the environment,
# never on a command line (visible in ps) or in a log.
superuser_url() { printf 'postgres://postgres:%s@127.0.0.1:%s/postgres' "$(secret postgres.password)" "$TIDEPOOL_PG_PORT"; }
# A direct connection to a TLS-only cluster (scripts/stack.sh,
# TIDEPOOL_PG_TLS_DIR) verifies it with the cluster's CA.
direct_tls() {
  if [ -s "$TIDEPOOL_STATE_DIR/tls/ca.crt" ]; then
    printf '?sslmode=verify-full&sslrootcert=%s' "$TIDEPOOL_STATE_DIR/tls/ca.crt"
  fi
}
direct_url() { printf 'postgres://%s:%s@127.0.0.1:%s/%s%s' "$APP_USER" "$(secret app.password)" "$TIDEPOOL_PG_PORT" "$APP_DB" "$(direct_tls)"; }
pooled_url() { printf 'postgres://%s:%s@127.0.0.1:%s/%s' "$APP_USER" "$(secret app.password)" "$TIDEPOOL_POOLER_PORT" "$APP_DB"; }

# The local stack's PgBouncer figures (the pgbouncer_* series of web's and
# worker's /metrics, or of `tidepool pooler-exporter`) come from its admin
# console, as the stats user pooler-config created, whose password it wrote
# beside the auth file: the variables that say so.
POOLER_STATS_USER=tidepool_stats
pooler_stats_env() {
  echo "TIDEPOOL_POOLER_STATS_URL=postgres://$POOLER_STATS_USER@127.0.0.1:$TIDEPOOL_POOLER_PORT/pgbouncer"
  echo "TIDEPOOL_POOLER_STATS_PASSWORD_FILE=$TIDEPOOL_STATE_DIR/pgbouncer/stats.password"
}

# Dies when the machine's one real node is up: a benchmark that starts its
# own test cluster needs it.
require_no_real_node() {
  [ ! -e "/run/netns/$TIDEPOOL_NODE_NETNS" ] || die "a real node is up already (network namespace $TIDEPOOL_NODE_NETNS); stop it first (make kube-down, or the test cluster's)"
}

# psql as the superuser over loopback.
psql_super() { PGPASSWORD=$(secret postgres.password) psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$TIDEPOOL_PG_PORT" -U postgres "$@"; }

# Samples the application role's PostgreSQL server connections every 100 ms
# over one superuser session (no process per sample), writing
# "epoch_seconds count" lines to $1 in the background, for at most 10
# minutes; only those that match SQL condition $2, when given. SAMPLER
# holds its PID; stop it with stop_connection_sampler.
start_connection_sampler() {
  printf '%s\n' \
    "SELECT extract(epoch FROM clock_timestamp())::numeric(16,2), count(*) FROM pg_stat_activity WHERE usename = '$APP_USER' AND (${2:-true})" \
    '\watch 0.1' \
    | PGPASSWORD=$(secret postgres.password) timeout 600 \
      psql -X -q -At -F ' ' -h 127.0.0.1 -p "$TIDEPOOL_PG_PORT" -U postgres -d postgres > "$1" &
  SAMPLER=$!
}
stop_connection_sampler() { kill "${SAMPLER:-}" 2>/dev/null || true; wait "${SAMPLER:-}" 2>/dev/null || true; SAMPLER=; }
# The most connections seen in a sampler's file $1.
sampled_peak() { awk '$2 > max {max = $2} END {print max + 0}' "$1"; }

# The ids in file $1 (one per line as `tidepool enqueue` prints them, in any
# order), from the $2-th smallest (1) on, as "FIRST AND LAST" for SQL's BETWEEN.
id_range() { sort -n "$1" | sed -n "${2:-1},\$p" | sed -n '1p;$p' | paste -sd ' ' | sed 's/ / AND /'; }
# How many jobs with ids in range $1 (from id_range) have a kept result.
kept_results() { psql_super -d "$APP_DB" -At -c "SELECT count(*) FROM tidepool_job_results WHERE id BETWEEN $1"; }

# The benchmarks' figures and report sections: tools/bench-report, whose
# commands parse the tools' output, take medians and write the Markdown.
bench_report() {
  [ -x "$TIDEPOOL_BENCH_REPORT_BIN" ] || die "$TIDEPOOL_BENCH_REPORT_BIN is not built (run: make build)"
  "$TIDEPOOL_BENCH_REPORT_BIN" "$@"
}
# CPU time (user + system) of process $1, in clock ticks of TICK_US µs;
# with $2 = reaped, also of its children that have exited and been waited for.
cpu_ticks() { awk -v reaped="${2:-}" '{print $14 + $15 + (reaped == "reaped" ? $16 + $17 : 0)}' "/proc/$1/stat"; }
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))
# Arithmetic on a report's figures, in a python3 one-liner.
py() { python3 -c "$@"; }

# The requests per second, p50 and p99 (ms) of a `wrk --latency` report $1,
# as "rps p50_ms p99_ms".
wrk_summary() { bench_report wrk "$1"; }
# The median of the arguments, and the arguments as a list, each with
# DECIMALS (2) decimals; with DECIMALS=0, whole numbers with thousands
# separators.
figure_format() { if [ "${DECIMALS:-2}" = 0 ]; then echo "--decimals 0 --thousands"; else echo "--decimals ${DECIMALS:-2}"; fi; }
# shellcheck disable=SC2046 # the format is two or three words
median() { bench_report median $(figure_format) -- "$@"; }
# shellcheck disable=SC2046
runs() { bench_report runs $(figure_format) -- "$@"; }
# Puts the report section in file $4, which starts with marker $2 and ends
# with marker $3, into report $1: in place of the section between those
# markers, or at the end when there is none.
replace_report_section() { bench_report splice --report "$1" --start "$2" --end "$3" "$4"; }

# "met" or "missed" for a Python condition.
verdict() { py "print('met' if $1 else 'missed')"; }

# Figures from the output of ab ($1) and from tidepool-loadgen's JSON report.
ab_total_seconds() { awk '/^Time taken for tests:/ {print $5}' "$1"; }
ab_failed_requests() { awk '/^Failed requests:/ {print $3}' "$1"; }
json_field() { bench_report json "$1" "$2"; }
