#!/usr/bin/env bash
# Installs what Tidepool's scripts need and is missing, from Debian's packages,
# and creates the dedicated user PostgreSQL and PgBouncer run as.
#   install-deps.sh          runtime and test needs
#   install-deps.sh bench    also the benchmark tools
set -euo pipefail
source "$(dirname "$0")/lib.sh"

need=()
have() { command -v "$1" >/dev/null 2>&1; }
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql postgresql-contrib)
have pgbouncer || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
have psql || need+=(postgresql-client)
have curl || need+=(curl)
have setpriv || need+=(util-linux)
have ab || need+=(apache2-utils)
have openssl || need+=(openssl)
# The test cluster's real node (scripts/kube-node.sh) and its images
# (scripts/images.sh).
have containerd || need+=(containerd)
have runc || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
have iptables || need+=(iptables)
have conntrack || need+=(conntrack)
have nsenter || need+=(util-linux)
have mmdebstrap || need+=(mmdebstrap)
have buildah || need+=(buildah)
have objcopy || need+=(binutils)
have gcc || need+=(gcc libc6-dev)
# promtool checks the alerts and runs their tests; Prometheus scrapes the
# stack for the dashboards' tests.
have promtool || need+=(prometheus)
if [ "${1:-}" = bench ]; then
  have wrk || need+=(wrk)
  have gnuplot || need+=(gnuplot-nox)
  # scripts/draw-dashboard.py, with Debian's own Python.
  /usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3-matplotlib)
fi

if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing packages (${need[*]}); run as root or install them: apt-get install ${need[*]}"
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's package starts a cluster of its own on 5432; ours runs in the state
# folder, so stop the packaged one if it is running.
if [ "$(id -u)" -eq 0 ] && have pg_lsclusters; then
  pg_lsclusters --no-header 2>/dev/null | while read -r version name port status _; do
    if [ "$status" = online ]; then
      say "stopping Debian's own PostgreSQL cluster $version/$name (port $port)"
      pg_ctlcluster "$version" "$name" stop || true
    fi
  done
fi
# Debian's pgbouncer package may start a service on 6432 too, and its
# prometheus package one on 9090; the tests run their own.
for service in pgbouncer prometheus; do
  if [ "$(id -u)" -eq 0 ] && have systemctl && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl stop "$service" || true
  fi
done

if [ "$(id -u)" -eq 0 ] && ! id "$TIDEPOOL_RUN_AS" >/dev/null 2>&1; then
  say "creating the system user $TIDEPOOL_RUN_AS"
  useradd --system --no-create-home --shell /usr/sbin/nologin "$TIDEPOOL_RUN_AS"
fi

have cargo || die "Rust (cargo) is not installed; install it with rustup and run again"
have go || die "Go (1.24 or later) is not installed; it builds the Kubernetes test tools from their modules"
