#!/usr/bin/env bash
# The local stack on loopback: PostgreSQL, PgBouncer in transaction mode in
# front of it, `tidepool web` and `tidepool worker`. All state lives in
# $TIDEPOOL_STATE_DIR.
#
#   stack.sh up   [postgres|pooler|web|worker ...]   start (all by default), idempotently
#   stack.sh down [postgres|pooler|web|worker ...]   stop, by recorded PIDs
#   stack.sh status
#   stack.sh clean                                    stop everything and delete the state folder
#
# Ports: TIDEPOOL_PG_PORT (5432), TIDEPOOL_POOLER_PORT (6432),
# TIDEPOOL_WEB_PORT (8000), TIDEPOOL_WORKER_PORT (8001, /healthz and
# /metrics). Other knobs: scripts/lib.sh. Extra environment for `tidepool
# web` and `tidepool worker` (TIDEPOOL_MAX_IN_FLIGHT, TIDEPOOL_WORKER_BATCH_SIZE,
# ...) is passed through. PostgreSQL also listens on the real node's host
# end (TIDEPOOL_NODE_HOST_IP, for the test cluster's pods) when
# TIDEPOOL_PG_FOR_NODE=1, and accepts password logins from the node. With
# TIDEPOOL_PG_TLS_DIR (a folder with server.crt, server.key and the ca.crt
# that issued it) the cluster takes TLS connections only (`hostssl` in
# pg_hba.conf, `ssl=on`), and every direct connection, PgBouncer's too,
# verifies it (`sslmode=verify-full`, docs/runtime.md). With
# TIDEPOOL_PG_ROOTFS (a root filesystem of images/postgresql:
# `scripts/images.sh rootfs postgresql DIR`), PostgreSQL's programs are that
# image's (PostgreSQL 17), run in it as its postgres user (26:26) with the
# state folder bound in at its own path (as root only).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

STATE=$TIDEPOOL_STATE_DIR
PG_DATA=$STATE/postgres
POOLER_DIR=$STATE/pgbouncer
RUN=$STATE/run
LOGS=$STATE/log

# Who owns the cluster's files, and runs PostgreSQL's program $1 with the
# rest as its arguments: the service user with the host's programs, or the
# image's postgres user in its root filesystem.
PG_ROOTFS=${TIDEPOOL_PG_ROOTFS:-}
pg_owner() {
  if [ -n "$PG_ROOTFS" ]; then echo 26:26; else echo "$TIDEPOOL_RUN_AS:"; fi
}
pg_program() {
  local program=$1 bindir
  shift
  if [ -z "$PG_ROOTFS" ]; then
    as_service_user "$(pg_bindir)/$program" "$@"
    return
  fi
  [ "$(id -u)" -eq 0 ] || die "TIDEPOOL_PG_ROOTFS needs root (a mount namespace and chroot)"
  bindir=$(ls -d "$PG_ROOTFS"/usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$bindir" ] || die "$PG_ROOTFS has no PostgreSQL (make it with: scripts/images.sh rootfs postgresql DIR)"
  (ROOTFS_BINDS=$STATE exec_in_rootfs "$PG_ROOTFS" 26:26 "${bindir#"$PG_ROOTFS"}/$program" "$@")
}

prepare_state() {
  mkdir -p "$STATE" "$RUN" "$LOGS" "$STATE/secrets" "$POOLER_DIR"
  chmod 700 "$STATE/secrets"
  if [ "$(id -u)" -eq 0 ]; then
    id "$TIDEPOOL_RUN_AS" >/dev/null 2>&1 || die "user $TIDEPOOL_RUN_AS does not exist (run: make deps)"
    chown "$TIDEPOOL_RUN_AS:" "$POOLER_DIR" "$LOGS"
    as_service_user test -w "$LOGS" || die "user $TIDEPOOL_RUN_AS cannot reach $STATE (a parent folder is not traversable); set TIDEPOOL_STATE_DIR to a folder it can reach"
  fi
  for name in postgres.password app.password; do
    [ -s "$STATE/secrets/$name" ] || (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$STATE/secrets/$name")
  done
}

postgres_up() {
  if pid_alive "$PG_DATA/postmaster.pid"; then
    say "PostgreSQL is already running on port $TIDEPOOL_PG_PORT"
    return
  fi
  require_free_port "$TIDEPOOL_PG_PORT" PostgreSQL
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    say "creating a PostgreSQL cluster in $PG_DATA"
    mkdir -p "$PG_DATA"
    [ "$(id -u)" -ne 0 ] || chown "$(pg_owner)" "$PG_DATA"
    local pwfile=$PG_DATA.pwfile
    (umask 077; secret postgres.password > "$pwfile")
    [ "$(id -u)" -ne 0 ] || chown "$(pg_owner)" "$pwfile"
    (cd "$STATE" && pg_program initdb -D "$PG_DATA" -U postgres --pwfile="$pwfile" \
      --auth=scram-sha-256 --encoding=UTF8 --no-locale >"$LOGS/initdb.log" 2>&1) \
      || { rm -f "$pwfile"; die "initdb failed; see $LOGS/initdb.log"; }
    rm -f "$pwfile"
  fi
  # TLS only: the certificate of TIDEPOOL_PG_TLS_DIR, every host line
  # hostssl; a cluster made so stays so (its copy in $STATE/tls).
  if [ -n "${TIDEPOOL_PG_TLS_DIR:-}" ]; then
    local file
    for file in server.crt server.key ca.crt; do
      [ -s "$TIDEPOOL_PG_TLS_DIR/$file" ] || die "TIDEPOOL_PG_TLS_DIR=$TIDEPOOL_PG_TLS_DIR has no $file"
    done
    mkdir -p "$STATE/tls"
    cp -L "$TIDEPOOL_PG_TLS_DIR/server.crt" "$TIDEPOOL_PG_TLS_DIR/server.key" "$TIDEPOOL_PG_TLS_DIR/ca.crt" "$STATE/tls/"
    chmod 600 "$STATE/tls/server.key"
    [ "$(id -u)" -ne 0 ] || chown -R "$(pg_owner)" "$STATE/tls"
  fi
  local tls=() hba_kind=host
  if [ -s "$STATE/tls/server.crt" ]; then
    sed -i 's/^host /hostssl /' "$PG_DATA/pg_hba.conf"
    hba_kind=hostssl
    tls=(-c ssl=on -c "ssl_cert_file=$STATE/tls/server.crt" -c "ssl_key_file=$STATE/tls/server.key")
  fi
  local listen=127.0.0.1 hba_node="$hba_kind all all $TIDEPOOL_NODE_IP/32 scram-sha-256"
  if [ "${TIDEPOOL_PG_FOR_NODE:-0}" = 1 ]; then
    listen+=",$TIDEPOOL_NODE_HOST_IP"
    # Pods reach it masqueraded as the node's address.
    grep -qxF "$hba_node" "$PG_DATA/pg_hba.conf" || echo "$hba_node" >> "$PG_DATA/pg_hba.conf"
  fi
  say "starting PostgreSQL on $listen port $TIDEPOOL_PG_PORT"
  touch "$LOGS/postgres.log"
  [ "$(id -u)" -ne 0 ] || chown "$(pg_owner)" "$LOGS/postgres.log"
  (cd "$STATE" && pg_program pg_ctl -D "$PG_DATA" -l "$LOGS/postgres.log" -w -t 60 \
    -o "-c listen_addresses=$listen -c port=$TIDEPOOL_PG_PORT -c unix_socket_directories='' -c max_connections=$TIDEPOOL_PG_MAX_CONNECTIONS ${tls[*]}" \
    start >/dev/null) || die "PostgreSQL did not start; see $LOGS/postgres.log"
  wait_until "PGPASSWORD=\$(secret postgres.password) psql -X -h 127.0.0.1 -p $TIDEPOOL_PG_PORT -U postgres -c 'SELECT 1' postgres" 30 PostgreSQL
  psql_super -d postgres <<SQL
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', '$APP_USER', '$(secret app.password)')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$APP_USER') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', '$APP_DB', '$APP_USER')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$APP_DB') \gexec
SQL
  say "migrating the schema"
  TIDEPOOL_DIRECT_DATABASE_URL=$(direct_url) "$TIDEPOOL_BIN" migrate
}

pooler_up() {
  if pid_alive "$RUN/pgbouncer.pid"; then
    say "PgBouncer is already running on port $TIDEPOOL_POOLER_PORT"
    return
  fi
  require_free_port "$TIDEPOOL_POOLER_PORT" PgBouncer
  # Kept open while idle: every connection web and worker hold, within the
  # pool (a smaller pool set by hand caps it).
  local min_pool=$TIDEPOOL_POOLER_MIN_POOL_SIZE
  (( min_pool <= TIDEPOOL_POOLER_POOL_SIZE )) || min_pool=$TIDEPOOL_POOLER_POOL_SIZE
  say "starting PgBouncer (transaction mode, $TIDEPOOL_POOLER_POOL_SIZE server connections, $min_pool kept open) on 127.0.0.1:$TIDEPOOL_POOLER_PORT"
  TIDEPOOL_POOLER_UPSTREAM_URL=$(direct_url) as_service_user "$TIDEPOOL_BIN" pooler-config \
    --out-dir "$POOLER_DIR" --listen "127.0.0.1:$TIDEPOOL_POOLER_PORT" \
    --pool-size "$TIDEPOOL_POOLER_POOL_SIZE" --min-pool-size "$min_pool" \
    --max-client-conn "$TIDEPOOL_POOLER_MAX_CLIENT_CONN" --stats-user "$POOLER_STATS_USER" >/dev/null
  local pgbouncer
  pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
  # In the foreground (not -d) and exec'd straight through setsid and setpriv,
  # so the recorded PID is PgBouncer itself.
  as_service_user_detached "$pgbouncer" "$POOLER_DIR/pgbouncer.ini" </dev/null >>"$LOGS/pgbouncer.log" 2>&1 &
  echo $! > "$RUN/pgbouncer.pid"
  wait_until "port_in_use $TIDEPOOL_POOLER_PORT || ! pid_alive $RUN/pgbouncer.pid" 30 PgBouncer
  pid_alive "$RUN/pgbouncer.pid" || die "PgBouncer exited at start; see $LOGS/pgbouncer.log"
}

web_up() {
  if pid_alive "$RUN/web.pid"; then
    say "tidepool web is already running on port $TIDEPOOL_WEB_PORT"
    return
  fi
  require_free_port "$TIDEPOOL_WEB_PORT" "tidepool web"
  say "starting tidepool web (pool of $TIDEPOOL_DB_POOL_SIZE connections) on 127.0.0.1:$TIDEPOOL_WEB_PORT"
  # No load balancer to wait for locally, so no drain delay unless asked.
  # shellcheck disable=SC2046 # pooler_stats_env prints assignments without spaces
  env DATABASE_URL="$(pooled_url)" TIDEPOOL_LISTEN="127.0.0.1:$TIDEPOOL_WEB_PORT" TIDEPOOL_DB_POOL_SIZE="$TIDEPOOL_DB_POOL_SIZE" \
    TIDEPOOL_DRAIN_DELAY="${TIDEPOOL_DRAIN_DELAY:-0s}" $(pooler_stats_env) \
    setsid "$TIDEPOOL_BIN" web </dev/null >>"$LOGS/web.log" 2>&1 &
  echo $! > "$RUN/web.pid"
  wait_until "curl -fsS http://127.0.0.1:$TIDEPOOL_WEB_PORT/readyz || ! pid_alive $RUN/web.pid" 30 "tidepool web (see $LOGS/web.log)"
  pid_alive "$RUN/web.pid" || die "tidepool web exited at start; see $LOGS/web.log"
}

worker_up() {
  if pid_alive "$RUN/worker.pid"; then
    say "tidepool worker is already running (/metrics on port $TIDEPOOL_WORKER_PORT)"
    return
  fi
  require_free_port "$TIDEPOOL_WORKER_PORT" "tidepool worker"
  local direct=""
  [ "$TIDEPOOL_WORKER_LISTEN_NOTIFY" != 1 ] || direct=$(direct_url)
  say "starting tidepool worker (concurrency $TIDEPOOL_WORKER_CONCURRENCY, $([ -n "$direct" ] && echo "polling + LISTEN" || echo "polling only"), /metrics on 127.0.0.1:$TIDEPOOL_WORKER_PORT)"
  # The task pool is the concurrency (the plan's); web's pool size is not the worker's.
  # shellcheck disable=SC2046 # pooler_stats_env prints assignments without spaces
  env -u TIDEPOOL_DB_POOL_SIZE DATABASE_URL="$(pooled_url)" ${direct:+TIDEPOOL_DIRECT_DATABASE_URL="$direct"} \
    TIDEPOOL_WORKER_LISTEN="127.0.0.1:$TIDEPOOL_WORKER_PORT" TIDEPOOL_WORKER_CONCURRENCY="$TIDEPOOL_WORKER_CONCURRENCY" \
    $(pooler_stats_env) setsid "$TIDEPOOL_BIN" worker </dev/null >>"$LOGS/worker.log" 2>&1 &
  echo $! > "$RUN/worker.pid"
  wait_until "curl -fsS http://127.0.0.1:$TIDEPOOL_WORKER_PORT/readyz || ! pid_alive $RUN/worker.pid" 30 "tidepool worker (see $LOGS/worker.log)"
  pid_alive "$RUN/worker.pid" || die "tidepool worker exited at start; see $LOGS/worker.log"
}

web_down() { stop_pid "$RUN/web.pid" 40 "tidepool web"; }
worker_down() { stop_pid "$RUN/worker.pid" 40 "tidepool worker"; }
pooler_down() { stop_pid "$RUN/pgbouncer.pid" 10 PgBouncer; }
postgres_down() {
  pid_alive "$PG_DATA/postmaster.pid" || return 0
  local pid
  pid=$(head -n 1 "$PG_DATA/postmaster.pid")
  say "stopping PostgreSQL"
  (cd "$STATE" && pg_program pg_ctl -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null)
  # pg_ctl returns once the pid file is gone, a moment before the
  # postmaster exits and frees its port.
  wait_until "! kill -0 $pid" 30 "PostgreSQL to exit"
}

status() {
  print_status postgres "$PG_DATA/postmaster.pid"
  print_status pooler "$RUN/pgbouncer.pid"
  print_status web "$RUN/web.pid"
  print_status worker "$RUN/worker.pid"
}

write_env_file() {
  (umask 077; {
    echo "export DATABASE_URL='$(pooled_url)'"
    echo "export TIDEPOOL_DIRECT_DATABASE_URL='$(direct_url)'"
  } > "$STATE/env")
}

command=${1:-}
shift || true
components=("$@")
[ ${#components[@]} -gt 0 ] || components=(postgres pooler web worker)
case $command in
  up)
    [ -x "$TIDEPOOL_BIN" ] || die "$TIDEPOOL_BIN is not built (run: make build)"
    load_local_plan
    prepare_state
    for c in "${components[@]}"; do
      case $c in postgres|pooler|web|worker) "${c}_up" ;; *) die "unknown component $c (postgres, pooler, web, worker)" ;; esac
    done
    write_env_file
    say "up: $(status | tr '\n' ' ')"
    say "connection URLs for your shell: source $STATE/env"
    ;;
  down)
    # Reverse order: the app first, the database last.
    for c in worker web pooler postgres; do
      if [[ " ${components[*]} " == *" $c "* ]]; then "${c}_down"; fi
    done
    ;;
  status) status ;;
  clean)
    for c in worker web pooler postgres; do "${c}_down"; done
    say "deleting $STATE"
    rm -rf "$STATE"
    ;;
  *) die "usage: stack.sh up|down [postgres|pooler|web|worker ...] | status | clean" ;;
esac
