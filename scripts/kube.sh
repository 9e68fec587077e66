#!/usr/bin/env bash
# A real Kubernetes cluster on this machine, built from upstream modules
# (scripts/kube-build.sh): etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler; kwok with one fake node, so Deployments get ReplicaSets
# and Pods that are scheduled and report Running and Ready without a
# container runtime (for scale); and a real node where pods run
# (scripts/kube-node.sh: containerd, kubelet and kube-proxy in a network
# namespace joined to the host by a veth pair) with its add-ons
# (scripts/kube-addons.sh: CoreDNS and metrics-server). With TIDEPOOL_KUBE_NODE=0
# there is no real node and everything listens on loopback only.
#
#   kube.sh up      start (idempotent); the last line printed is `export KUBECONFIG=...`
#   kube.sh down    stop, by recorded PIDs
#   kube.sh status
#   kube.sh host-state     what the node may change on the host, a fact a line
#   kube.sh freshen-host   remove the tools' leftovers of earlier runs (unused)
#
# State (certificates, etcd data, logs, kubeconfig) lives in
# $TIDEPOOL_STATE_DIR/kube; the API server's audit log of every write is
# log/audit.log there (scripts/kube/audit-policy.yaml). The admission plugin
# OwnerReferencesPermissionEnforcement is on, as in clusters that guard
# owner references (OpenShift): setting blockOwnerDeletion needs the right to
# update the owner's finalizers, so the operator's RBAC is checked for it.
# kwok's pods wait for
# their finalizers when deleted (scripts/kube/kwok-pod-stages.yaml). The kwok
# node renews a node Lease as a kubelet does: without one the node-lifecycle
# controller saw it NotReady every minute and marked its pods not ready,
# which kwok never undoes. Ports: TIDEPOOL_KUBE_ETCD_PORT (12379, and the
# next one for etcd peers), TIDEPOOL_KUBE_API_PORT (16443).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

: "${TIDEPOOL_KUBE_ETCD_PORT:=12379}"
: "${TIDEPOOL_KUBE_API_PORT:=16443}"
: "${TIDEPOOL_KUBE_NODE:=1}"
KUBE=$TIDEPOOL_STATE_DIR/kube
PKI=$KUBE/pki
RUN=$KUBE/run
LOGS=$KUBE/log
KUBECONFIG_FILE=$KUBE/kubeconfig
NODE=kwok-node-0
# With a real node the API server listens on the veth's host end, where
# pods reach it (through the `kubernetes` Service), and only there.
if [ "$TIDEPOOL_KUBE_NODE" = 1 ]; then API_ADDRESS=$TIDEPOOL_NODE_HOST_IP; else API_ADDRESS=127.0.0.1; fi
# The first address of the Service range: the `kubernetes` Service.
KUBERNETES_SERVICE_IP=$(python3 -c 'import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[1])' "$TIDEPOOL_SERVICE_CIDR")
source "$REPO_ROOT/scripts/kube-node.sh"
source "$REPO_ROOT/scripts/kube-addons.sh"

# A key and a certificate signed by the cluster CA: $1 name, $2 subject,
# $3 subjectAltName (optional).
issue_cert() {
  local name=$1 subject=$2 san=${3:-}
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr" 2>/dev/null
  local ext=$PKI/$name.ext
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$san" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$san"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } > "$ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

# Bumped when the set of certificates changes, so an older PKI is redone.
PKI_VERSION=3

make_pki() {
  [ "$(cat "$PKI/.complete" 2>/dev/null)" = "$PKI_VERSION" ] && return
  say "generating certificates in $PKI"
  rm -rf "$PKI"
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 3650 \
    -subj "/CN=tidepool-kube-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  issue_cert apiserver "/CN=kube-apiserver" \
    "IP:127.0.0.1,IP:$TIDEPOOL_NODE_HOST_IP,IP:$KUBERNETES_SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  issue_cert admin "/O=system:masters/CN=tidepool-admin"
  issue_cert controller-manager "/CN=system:kube-controller-manager"
  issue_cert scheduler "/CN=system:kube-scheduler"
  issue_cert kwok "/O=system:masters/CN=kwok-controller"
  # The real node: its kubelet's client and serving certificates, kube-proxy,
  # and the API server's client for kubectl logs and exec.
  issue_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  issue_cert kubelet-serving "/CN=$NODE_NAME" "IP:$TIDEPOOL_NODE_IP,DNS:$NODE_NAME"
  issue_cert kube-proxy "/CN=system:kube-proxy"
  issue_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  # The aggregation layer: the API server's client to metrics-server, and
  # metrics-server's serving certificate (scripts/kube-addons.sh).
  issue_cert front-proxy-client "/CN=front-proxy-client"
  issue_cert metrics-server "/CN=metrics-server" \
    "IP:$TIDEPOOL_NODE_HOST_IP,DNS:metrics-server.kube-system.svc"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  echo "$PKI_VERSION" > "$PKI/.complete"
}

# A kubeconfig for client certificate $1, written to $2.
write_kubeconfig() {
  local name=$1 file=$2
  (umask 077; cat > "$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: tidepool
  cluster:
    server: https://$API_ADDRESS:$TIDEPOOL_KUBE_API_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$name.crt")
    client-key-data: $(base64 -w0 < "$PKI/$name.key")
contexts:
- name: tidepool
  context: {cluster: tidepool, user: $name}
current-context: tidepool
KUBECONFIG
)
}

# Starts "$@" in the background, its PID in $RUN/$name.pid, output in $LOGS/$name.log.
start() {
  local name=$1; shift
  if pid_alive "$RUN/$name.pid"; then
    return
  fi
  setsid "$@" </dev/null >>"$LOGS/$name.log" 2>&1 &
  echo $! > "$RUN/$name.pid"
}

kubectl_() { "$TIDEPOOL_KUBE_BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

up() {
  if [ "$TIDEPOOL_KUBE_NODE" = 1 ]; then
    load_kube_tools kubernetes etcd kwok node
  else
    load_kube_tools kubernetes etcd kwok
  fi
  mkdir -p "$KUBE" "$RUN" "$LOGS"
  make_pki
  for name in admin controller-manager scheduler kwok kubelet kube-proxy; do
    write_kubeconfig "$name" "$KUBE/$name.kubeconfig"
  done
  [ "$TIDEPOOL_KUBE_NODE" != 1 ] || node_net_up
  cp "$KUBE/admin.kubeconfig" "$KUBECONFIG_FILE"

  if ! pid_alive "$RUN/etcd.pid"; then
    require_free_port "$TIDEPOOL_KUBE_ETCD_PORT" etcd
    require_free_port "$(( TIDEPOOL_KUBE_ETCD_PORT + 1 ))" "etcd peers"
  fi
  local etcd_url=http://127.0.0.1:$TIDEPOOL_KUBE_ETCD_PORT peer_url=http://127.0.0.1:$(( TIDEPOOL_KUBE_ETCD_PORT + 1 ))
  start etcd "$TIDEPOOL_ETCD_BIN/etcd" --name tidepool --data-dir "$KUBE/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "tidepool=$peer_url" --unsafe-no-fsync --log-level warn
  wait_until "curl -fsS $etcd_url/health" 30 "etcd (see $LOGS/etcd.log)"

  pid_alive "$RUN/kube-apiserver.pid" || require_free_port "$TIDEPOOL_KUBE_API_PORT" kube-apiserver
  start kube-apiserver "$TIDEPOOL_KUBE_BIN/kube-apiserver" \
    --etcd-servers "$etcd_url" \
    --bind-address "$API_ADDRESS" --advertise-address "$API_ADDRESS" --secure-port "$TIDEPOOL_KUBE_API_PORT" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range "$TIDEPOOL_SERVICE_CIDR" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --enable-admission-plugins OwnerReferencesPermissionEnforcement \
    --requestheader-client-ca-file "$PKI/ca.crt" --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$PKI/front-proxy-client.crt" --proxy-client-key-file "$PKI/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --audit-policy-file "$REPO_ROOT/scripts/kube/audit-policy.yaml" --audit-log-path "$LOGS/audit.log" \
    --audit-log-maxsize 100 --audit-log-maxbackup 1 \
    --profiling=false
  wait_until "kubectl_ get --raw /readyz" 60 "kube-apiserver (see $LOGS/kube-apiserver.log)"

  start kube-controller-manager "$TIDEPOOL_KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$KUBE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$KUBE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$KUBE/controller-manager.kubeconfig" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials --leader-elect=false --secure-port 0 --profiling=false \
    --horizontal-pod-autoscaler-sync-period 5s
  start kube-scheduler "$TIDEPOOL_KUBE_BIN/kube-scheduler" \
    --kubeconfig "$KUBE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$KUBE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$KUBE/scheduler.kubeconfig" \
    --leader-elect=false --secure-port 0 --profiling=false
  start kwok "$TIDEPOOL_KWOK_BIN/kwok" --kubeconfig "$KUBE/kwok.kubeconfig" \
    --config "$REPO_ROOT/scripts/kube/kwok-pod-stages.yaml" \
    --node-lease-duration-seconds 40 \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-ip 127.0.0.1 --node-port 0 --server-address ""

  if ! kubectl_ get node "$NODE" >/dev/null 2>&1; then
    kubectl_ apply -f - >/dev/null <<NODE
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $NODE
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {cpu: "1000", memory: 4Ti, pods: "5000"}
  capacity: {cpu: "1000", memory: 4Ti, pods: "5000"}
NODE
  fi
  wait_until "kubectl_ wait --for=condition=Ready node/$NODE --timeout=1s" 60 "the kwok node (see $LOGS/kwok.log)"
  [ "$TIDEPOOL_KUBE_NODE" != 1 ] || { node_up; addons_up; }
  wait_until "kubectl_ get serviceaccount default -n default" 60 "the default service account (see $LOGS/kube-controller-manager.log)"
  say "control plane ready: $("$TIDEPOOL_KUBE_BIN/kubectl" version --kubeconfig "$KUBECONFIG_FILE" 2>/dev/null | tr '\n' ' ')"
  echo "export KUBECONFIG=$KUBECONFIG_FILE"
}

down() {
  local name
  addons_down
  node_down
  for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    stop_pid "$RUN/$name.pid" 20 "$name"
  done
  node_net_down
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok; do
    print_status "$name" "$RUN/$name.pid"
  done
  node_status
  addons_status
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  host-state) host_state ;;
  freshen-host) freshen_host ;;
  *) die "usage: kube.sh up|down|status|host-state|freshen-host" ;;
esac
