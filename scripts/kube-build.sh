#!/usr/bin/env bash
# Builds the real Kubernetes pieces the tests need from upstream Go modules,
# each pinned in tools/kube/<tool>/go.mod, into a cache outside the checkout
# keyed by version, so each version is built once per machine:
#   $TIDEPOOL_KUBE_CACHE/<tool>-<version>/bin/...
# Prints the bin folder of every tool, one per line, as `<tool>=<dir>`.
#   kube-build.sh [kubernetes|node|etcd|kwok|helm ...]   (all by default)
# `node` is what a real node runs besides containerd: kubelet, kube-proxy
# and the pause container's binary, from the same Kubernetes module.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

: "${TIDEPOOL_KUBE_CACHE:=$HOME/.cache/tidepool/kube}"
TOOLS=$REPO_ROOT/tools/kube
command -v go >/dev/null || die "Go is not installed"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"

# The version a module pins for $2, read from tools/kube/$1/go.mod.
pinned() { (cd "$TOOLS/$1" && go list -m -f '{{.Version}}' "$2"); }

# Builds tools/kube/$1 (or tools/kube/$MODULE) at version $2 with ldflags $3,
# into the cache as $1-$2; the rest are
# `name=package` pairs, each built to bin/<name> (a package ending in `.c`
# is a C file of the module, compiled statically). Skipped when that
# version is in the cache already.
build() {
  local tool=$1 version=$2 ldflags=$3; shift 3
  local out=$TIDEPOOL_KUBE_CACHE/$tool-$version pair module=${MODULE:-$tool}
  if [ -f "$out/.complete" ]; then
    echo "$tool=$out/bin"
    return
  fi
  say "building $tool $version (once per machine; cached in $out)"
  rm -rf "$out"
  mkdir -p "$out/bin"
  local started=$SECONDS
  for pair in "$@"; do
    case ${pair#*=} in
      *.c) build_c "$module" "$out/bin/${pair%%=*}" "${pair#*=}" ;;
      *) (cd "$TOOLS/$module" && go build -trimpath -ldflags "$ldflags" -o "$out/bin/${pair%%=*}" "${pair#*=}") ;;
    esac || die "building ${pair#*=} ($tool $version) failed"
  done
  say "built $tool $version in $(( SECONDS - started )) s"
  touch "$out/.complete"
  echo "$tool=$out/bin"
}

# Compiles the C file $3 (module/path/file.c, of a module tools/kube/$1
# requires) statically to $2.
build_c() {
  local tool=$1 out=$2 file=$3 module dir
  command -v gcc >/dev/null || die "gcc is not installed; it builds ${file##*/}"
  module=${file%%/build/*}
  dir=$(cd "$TOOLS/$tool" && go mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || return 1
  gcc -Os -static -Wall -Werror -o "$out" "$dir/${file#"$module"/}" && strip "$out"
}

# major and minor of a version like v1.34.4
major_of() { local v=${1#v}; echo "${v%%.*}"; }
minor_of() { local v=${1#v*.}; echo "${v%%.*}"; }

# What upstream's hack/lib/version.sh stamps for Kubernetes version $1, so
# `kubectl version`, the API server and the kubelet report the release
# rather than v0.0.0.
kubernetes_ldflags() {
  local v=$1 ldflags="-s -w" pkg
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$(major_of "$v") -X $pkg.gitMinor=$(minor_of "$v")"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$ldflags"
}

build_kubernetes() {
  local v
  v=$(pinned kubernetes k8s.io/kubernetes)
  build kubernetes "$v" "$(kubernetes_ldflags "$v")" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kubectl=k8s.io/kubernetes/cmd/kubectl
}

build_node() {
  local v
  v=$(pinned kubernetes k8s.io/kubernetes)
  # Cached apart from the control plane, built from the same module.
  MODULE=kubernetes build node "$v" "$(kubernetes_ldflags "$v")" \
    kubelet=k8s.io/kubernetes/cmd/kubelet \
    kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
    pause=k8s.io/kubernetes/build/pause/linux/pause.c
}

build_etcd() {
  local v
  v=$(pinned etcd go.etcd.io/etcd/server/v3)
  # etcd's own build stamps the commit; a module build knows only the tag.
  build etcd "$v" "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$v" etcd=go.etcd.io/etcd/server/v3
}

build_helm() {
  local v3 v4 k8s major minor
  v3=$(pinned helm helm.sh/helm/v3)
  v4=$(pinned helm helm.sh/helm/v4)
  k8s=$(pinned helm k8s.io/client-go)
  major=$(( $(major_of "$k8s") + 1 )); minor=$(minor_of "$k8s")
  # The variables Helm's Makefiles set: its version, and the Kubernetes
  # version it assumes for capabilities and lint rules.
  build helm "$v3-$v4" "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$v3 -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$major -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor \
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$major -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor \
    -X helm.sh/helm/v4/internal/version.version=$v4 -X helm.sh/helm/v4/internal/version.gitTreeState=clean \
    -X helm.sh/helm/v4/internal/version.kubeClientVersionMajor=$major \
    -X helm.sh/helm/v4/internal/version.kubeClientVersionMinor=$minor \
    -X helm.sh/helm/v4/pkg/chart/common.k8sVersionMajor=$major -X helm.sh/helm/v4/pkg/chart/common.k8sVersionMinor=$minor \
    -X helm.sh/helm/v4/pkg/chart/v2/lint/rules.k8sVersionMajor=$major \
    -X helm.sh/helm/v4/pkg/chart/v2/lint/rules.k8sVersionMinor=$minor \
    -X helm.sh/helm/v4/internal/chart/v3/lint/rules.k8sVersionMajor=$major \
    -X helm.sh/helm/v4/internal/chart/v3/lint/rules.k8sVersionMinor=$minor" \
    helm=helm.sh/helm/v3/cmd/helm helm4=helm.sh/helm/v4/cmd/helm
}

build_kwok() {
  local v
  v=$(pinned kwok sigs.k8s.io/kwok)
  build kwok "$v" "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" kwok=sigs.k8s.io/kwok/cmd/kwok
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(kubernetes node etcd kwok helm)
for t in "${tools[@]}"; do
  case $t in
    kubernetes|node|etcd|kwok|helm) "build_$t" ;;
    *) die "unknown tool $t (kubernetes, node, etcd, kwok, helm)" ;;
  esac
done
