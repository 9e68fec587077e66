#!/usr/bin/env bash
# Builds Tidepool's container images from the repository's Dockerfiles
# (images/*/Dockerfile, and the example applications': examples/shop, and
# examples/django-celery with its Redis)
# with no registry and no daemon, and loads them into
# the real node's containerd when it is up (scripts/kube-node.sh):
#
#   images.sh [all|pause|tidepool|operator|pgbouncer|shop|django|redis|cloudnative-pg|postgresql|bases ...]
#                                                             (all by default; cloudnative-pg is
#                                                             CloudNativePG's operator from
#                                                             scripts/kube-build.sh, postgresql
#                                                             its PostgreSQL 17 operand)
#   images.sh sizes                                           name, tag, size
#   images.sh rootfs django|redis|postgresql DIR              copy an image's root
#                                                             filesystem to DIR (built first
#                                                             when missing), to run its
#                                                             processes on loopback
#
# `FROM` resolves offline to two local bases that mmdebstrap makes from
# Debian trixie's packages, once per machine:
#   localhost/tidepool-runtime:trixie  glibc and libgcc only, extracted
#                                      (no shell, no package manager)
#   localhost/tidepool-debian:trixie   with apt, for build stages
# The Rust binaries are the host's release build (no Rust toolchain can be
# fetched inside an image build here), stripped into the build context.
# buildah keeps its storage in $TIDEPOOL_IMAGE_CACHE; each image is written
# as an OCI archive to $TIDEPOOL_IMAGE_DIR, which kube.sh up imports.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

STORE=$TIDEPOOL_IMAGE_CACHE/storage
BASES=$TIDEPOOL_IMAGE_CACHE/bases
MIRROR=${TIDEPOOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The version in crate manifest $1.
crate_version() { sed -n 's/^version = "\(.*\)"/\1/p' "$1" | head -n 1; }
VERSION=$(crate_version "$REPO_ROOT/service/Cargo.toml")
TIDEPOOL_IMAGE=localhost/tidepool:$VERSION
OPERATOR_IMAGE=localhost/tidepool-operator:$VERSION
PGBOUNCER_IMAGE=localhost/tidepool-pgbouncer:1.24.1
SHOP_IMAGE=localhost/tidepool-shop:$(crate_version "$REPO_ROOT/examples/shop/Cargo.toml")
DJANGO_IMAGE=localhost/tidepool-django-celery:0.1.0
REDIS_IMAGE=localhost/tidepool-example-redis:0.1.0
# CloudNativePG reads the PostgreSQL major version from the tag's start.
POSTGRESQL_IMAGE=localhost/tidepool-postgresql:17-trixie
CNPG_IMAGE=localhost/tidepool-cloudnative-pg:1.27.1

buildah_() {
  buildah --root "$STORE" --runroot "$TIDEPOOL_IMAGE_CACHE/run" --storage-driver overlay "$@"
}
# Nothing buildah does may change the host. Every buildah command (even
# `inspect`) sets up CNI, whose folder and lock file default to
# /etc/cni/net.d: buildah's configuration is the system's with that folder
# in the cache (CONTAINERS_CONF replaces the system file, so it is copied).
# A `RUN` step runs runc, whose state folder defaults to /run/runc: in the
# cache too.
containers_conf() {
  local conf=$TIDEPOOL_IMAGE_CACHE/containers.conf system=/usr/share/containers/containers.conf
  local setting="network_config_dir = \"$TIDEPOOL_IMAGE_CACHE/cni\""
  if [ -f "$system" ] && grep -q '^\[network\]' "$system"; then
    awk -v setting="$setting" '{ print } /^\[network\]/ { print setting }' "$system" > "$conf.new"
  else
    { [ ! -f "$system" ] || cat "$system"; printf '[network]\n%s\n' "$setting"; } > "$conf.new"
  fi
  mv "$conf.new" "$conf"
  echo "$conf"
}
mkdir -p "$TIDEPOOL_IMAGE_CACHE"
CONTAINERS_CONF=$(containers_conf)
export CONTAINERS_CONF
RUNC_ROOT=(--runtime-flag "root=$TIDEPOOL_IMAGE_CACHE/runc")

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || die "$tool is not installed (run: make deps)"
done
mkdir -p "$STORE" "$BASES" "$TIDEPOOL_IMAGE_DIR"

# Makes local base image $1 from mmdebstrap's variant $2 (and packages $3),
# unless it is in the store already.
base_image() {
  local name=$1 variant=$2 include=${3:-} tarball container
  buildah_ inspect --type image "$name" >/dev/null 2>&1 && return
  tarball=$BASES/${name//[\/:]/_}.tar
  say "making base image $name (mmdebstrap --variant=$variant trixie; once per machine)"
  mmdebstrap --quiet --variant="$variant" ${include:+--include="$include"} trixie "$tarball" "$MIRROR" \
    || die "mmdebstrap failed for $name"
  container=$(buildah_ from scratch)
  buildah_ add --quiet "$container" "$tarball" / >/dev/null
  buildah_ config --env PATH=/usr/local/bin:/usr/sbin:/usr/bin --env LANG=C.UTF-8 "$container"
  buildah_ commit --quiet --rm "$container" "$name" >/dev/null
  rm -f "$tarball"
}

bases() {
  base_image localhost/tidepool-runtime:trixie extract base-files,base-passwd,libc6,libgcc-s1,netbase
  base_image localhost/tidepool-debian:trixie apt
}

# Builds $1/Dockerfile (a folder of the repository: images/tidepool,
# examples/shop) as image $2 with the binaries "${@:3}" in its context
# (stripped), or with the folder itself as its context when none are
# given (examples/django-celery), and writes the archive
# $TIDEPOOL_IMAGE_DIR/<the folder's name>.tar.
build_image() {
  local folder=$1 image=$2 dir context file started=$SECONDS
  dir=$(basename "$folder")
  shift 2
  context=$(mktemp -d)
  if [ $# -eq 0 ]; then
    cp -r "$REPO_ROOT/$folder/." "$context/"
  fi
  for file in "$@"; do
    [ -f "$file" ] || die "$file is missing (run: make build)"
    objcopy --strip-debug "$file" "$context/$(basename "$file")"
  done
  say "building $image from $folder/Dockerfile"
  buildah_ bud --quiet --pull=never --network=host --layers "${RUNC_ROOT[@]}" \
    -f "$REPO_ROOT/$folder/Dockerfile" -t "$image" "$context" >/dev/null \
    || { rm -rf "$context"; die "building $image failed"; }
  rm -rf "$context"
  rm -f "$TIDEPOOL_IMAGE_DIR/$dir.tar"
  buildah_ push --quiet "$image" "oci-archive:$TIDEPOOL_IMAGE_DIR/$dir.tar:$image" \
    || die "writing $image to $TIDEPOOL_IMAGE_DIR/$dir.tar failed"
  say "built $image in $(( SECONDS - started )) s"
  load "$TIDEPOOL_IMAGE_DIR/$dir.tar"
}

# Imports archive $1 into the real node's containerd when it runs (when
# it does not, the node imports every archive as it starts).
load() {
  local socket=/run/$TIDEPOOL_NODE_NETNS/containerd.sock
  [ -S "$socket" ] && ctr --address "$socket" version >/dev/null 2>&1 || return 0
  ctr --address "$socket" --namespace k8s.io images import "$1" >/dev/null \
    || die "importing $1 into the node's containerd failed"
}

pause() {
  load_kube_tools node
  # Rebuilt only when the binary changed.
  local stamp=$TIDEPOOL_IMAGE_DIR/pause.sha256
  if [ -f "$TIDEPOOL_IMAGE_DIR/pause.tar" ] && sha256sum --status -c "$stamp" 2>/dev/null; then
    return
  fi
  build_image images/pause "$PAUSE_IMAGE" "$TIDEPOOL_NODE_BIN/pause"
  sha256sum "$TIDEPOOL_NODE_BIN/pause" > "$stamp"
}
tidepool() { bases; build_image images/tidepool "$TIDEPOOL_IMAGE" "$TIDEPOOL_BIN"; }
operator() { bases; build_image images/operator "$OPERATOR_IMAGE" "$TIDEPOOL_OPERATOR_BIN"; }
pgbouncer() { bases; build_image images/pgbouncer "$PGBOUNCER_IMAGE"; }
shop() { bases; build_image examples/shop "$SHOP_IMAGE" "$TIDEPOOL_SHOP_BIN"; }
django() { bases; build_image examples/django-celery "$DJANGO_IMAGE"; }
redis() { bases; build_image examples/django-celery/redis "$REDIS_IMAGE"; }
cloudnative_pg() {
  load_kube_tools cloudnative-pg
  bases
  build_image images/cloudnative-pg "$CNPG_IMAGE" "$TIDEPOOL_CNPG_BIN/manager"
}
postgresql() { bases; build_image images/postgresql "$POSTGRESQL_IMAGE"; }

# Copies the root filesystem of example image $1 (django or redis) to
# folder $2, which must not exist: scripts/bench-django.sh runs the same
# Django, Celery and Redis on loopback from it.
rootfs() {
  local image container mount
  case ${1:-} in
    django) image=$DJANGO_IMAGE ;;
    redis) image=$REDIS_IMAGE ;;
    postgresql) image=$POSTGRESQL_IMAGE ;;
    *) die "usage: images.sh rootfs django|redis|postgresql DIR" ;;
  esac
  [ -n "${2:-}" ] && [ ! -e "$2" ] || die "images.sh rootfs: give a folder that does not exist yet (got '${2:-}')"
  buildah_ inspect --type image "$image" >/dev/null 2>&1 || "$1"
  container=$(buildah_ from --pull=never "$image") || die "buildah from $image failed"
  mount=$(buildah_ mount "$container") || { buildah_ rm "$container" >/dev/null; die "buildah mount $image failed"; }
  mkdir -p "$2"
  cp -a "$mount/." "$2/" || { buildah_ rm "$container" >/dev/null; die "copying $image's root filesystem to $2 failed"; }
  buildah_ umount "$container" >/dev/null
  buildah_ rm "$container" >/dev/null
}

sizes() {
  buildah_ images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -v '<none>' | sort
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(all)
if [ "${targets[0]}" = rootfs ]; then
  rootfs "${targets[@]:1}"
  exit
fi
for target in "${targets[@]}"; do
  case $target in
    all) pause; tidepool; operator; pgbouncer; shop; django; redis; cloudnative_pg; postgresql ;;
    pause|tidepool|operator|pgbouncer|shop|django|redis|postgresql|bases|sizes) "$target" ;;
    cloudnative-pg) cloudnative_pg ;;
    *) die "unknown image $target (all, pause, tidepool, operator, pgbouncer, shop, django, redis, cloudnative-pg, postgresql, bases, sizes, rootfs)" ;;
  esac
done
