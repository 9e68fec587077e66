# The test cluster's add-ons, for the real node (sourced by scripts/kube.sh):
#
# - CoreDNS (tools/kube/coredns: the kubernetes plugin and no forwarder)
#   serves cluster.local on the veth's host end, port 1053; the `kube-dns`
#   Service (the 10th address of the Service range, the kubelet's
#   clusterDNS) reaches it through an EndpointSlice of its own. A pod
#   resolves Service names (a CloudNativePG Secret's `host`); any other name
#   gets an answer from here (REFUSED/NXDOMAIN) and no query leaves the
#   machine.
# - metrics-server serves the resource metrics API (metrics.k8s.io) from the
#   real node's kubelet, so a HorizontalPodAutoscaler on CPU works. It
#   listens on the veth's host end, port 4443, behind the APIService
#   v1beta1.metrics.k8s.io (the API server routes to its endpoint, with the
#   front-proxy client certificate).
#
# Both run as host processes beside the control plane, as the admin client
# (a test cluster of one user), their logs in $LOGS.

DNS_PORT=1053
METRICS_SERVER_PORT=4443
# The kubelet's clusterDNS.
DNS_SERVICE_IP=$(python3 -c 'import ipaddress,sys; print(ipaddress.ip_network(sys.argv[1])[10])' "$TIDEPOOL_SERVICE_CIDR")
CLUSTER_DOMAIN=cluster.local

# Serves the addresses of a Service without a selector: `$1` name in
# kube-system, then `port:targetPort:protocol:name` for each port, all to
# the veth's host end.
host_service() {
  local name=$1 ports="" slice_ports="" spec port target protocol port_name
  shift
  for spec in "$@"; do
    IFS=: read -r port target protocol port_name <<< "$spec"
    ports+="  - {name: $port_name, port: $port, targetPort: $target, protocol: $protocol}"$'\n'
    slice_ports+="- {name: $port_name, port: $target, protocol: $protocol}"$'\n'
  done
  local cluster_ip=""
  [ "$name" != kube-dns ] || cluster_ip="  clusterIP: $DNS_SERVICE_IP"
  kubectl_ apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata: {name: $name, namespace: kube-system, labels: {app.kubernetes.io/name: $name}}
spec:
$cluster_ip
  ports:
$ports
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $name-host
  namespace: kube-system
  labels: {kubernetes.io/service-name: $name, endpointslice.kubernetes.io/managed-by: tidepool-scripts}
addressType: IPv4
endpoints:
- addresses: ["$TIDEPOOL_NODE_HOST_IP"]
  conditions: {ready: true}
ports:
$slice_ports
YAML
}

addons_up() {
  load_kube_tools addons
  [ -n "${TIDEPOOL_COREDNS_BIN:-}" ] && [ -n "${TIDEPOOL_METRICS_SERVER_BIN:-}" ] \
    || die "the add-ons were not built"
  cat > "$KUBE/Corefile" <<COREFILE
$CLUSTER_DOMAIN:$DNS_PORT in-addr.arpa:$DNS_PORT ip6.arpa:$DNS_PORT {
    bind $TIDEPOOL_NODE_HOST_IP
    errors
    ready $TIDEPOOL_NODE_HOST_IP:8181
    kubernetes $CLUSTER_DOMAIN in-addr.arpa ip6.arpa {
        kubeconfig $KUBE/admin.kubeconfig
        pods insecure
    }
    cache 5
}
.:$DNS_PORT {
    bind $TIDEPOOL_NODE_HOST_IP
    errors
}
COREFILE
  start coredns "$TIDEPOOL_COREDNS_BIN/coredns" -conf "$KUBE/Corefile"
  host_service kube-dns "53:$DNS_PORT:UDP:dns" "53:$DNS_PORT:TCP:dns-tcp"
  wait_until "curl -fsS http://$TIDEPOOL_NODE_HOST_IP:8181/ready" 30 "CoreDNS (see $LOGS/coredns.log)"

  start metrics-server "$TIDEPOOL_METRICS_SERVER_BIN/metrics-server" \
    --kubeconfig "$KUBE/admin.kubeconfig" \
    --authentication-kubeconfig "$KUBE/admin.kubeconfig" \
    --authorization-kubeconfig "$KUBE/admin.kubeconfig" \
    --bind-address "$TIDEPOOL_NODE_HOST_IP" --secure-port "$METRICS_SERVER_PORT" \
    --tls-cert-file "$PKI/metrics-server.crt" --tls-private-key-file "$PKI/metrics-server.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" \
    --kubelet-preferred-address-types InternalIP --kubelet-use-node-status-port \
    --node-selector type=real --metric-resolution 15s --profiling=false
  host_service metrics-server "443:$METRICS_SERVER_PORT:TCP:https"
  kubectl_ apply -f - >/dev/null <<YAML
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  service: {name: metrics-server, namespace: kube-system, port: 443}
  caBundle: $(base64 -w0 < "$PKI/ca.crt")
  groupPriorityMinimum: 100
  versionPriority: 100
YAML
  wait_until "kubectl_ get --raw /apis/metrics.k8s.io/v1beta1" 60 \
    "the metrics API (see $LOGS/metrics-server.log)"
}

addons_down() {
  stop_pid "$RUN/metrics-server.pid" 10 metrics-server
  stop_pid "$RUN/coredns.pid" 10 coredns
}

addons_status() {
  print_status coredns "$RUN/coredns.pid"
  print_status metrics-server "$RUN/metrics-server.pid"
}
