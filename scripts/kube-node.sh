# The real node of the test cluster, next to kwok's fake one: containerd,
# kubelet and kube-proxy in a network namespace of their own, joined to the
# host by a veth pair, as kind runs a node inside a container. Sourced by
# scripts/kube.sh after lib.sh; do not run it.
#
#   host                               namespace $TIDEPOOL_NODE_NETNS
#   ─────────────────────────────      ─────────────────────────────────────
#   kube-apiserver, PostgreSQL   veth  containerd, kubelet, kube-proxy
#   on $TIDEPOOL_NODE_HOST_IP  <────>  $TIDEPOOL_NODE_IP; bridge cni0 with
#   routes: pod and Service            the pods on $TIDEPOOL_POD_CIDR (each in
#   ranges via the veth                a namespace of its own)
#
# Everything the kubelet and kube-proxy do to the network (iptables rules,
# ip_forward, the bridge) stays in the namespace and goes with it. What
# they change host-wide (sysctls, cgroup folders, mounts, files in /run and
# /var/lib) is recorded before the first start and put back by node_down;
# `kube.sh host-state` prints all of it, and scripts/test.sh compares it
# before and after.
#
# The node is tainted $REAL_NODE_TAINT:NoSchedule, so only pods that
# tolerate it land there (kwok's node stays for scale tests). Images come
# from scripts/images.sh (no registry is reachable): kube.sh up imports
# the archives it finds in $TIDEPOOL_IMAGE_DIR.

NODE_NAME=tidepool-node
REAL_NODE_TAINT=tidepool.dev/real-node
NODE_DIR=$KUBE/node
# containerd's socket and state: short paths (a socket path has 108 bytes),
# on tmpfs, one node per machine.
NODE_RUN=/run/$TIDEPOOL_NODE_NETNS
CONTAINERD_SOCKET=$NODE_RUN/containerd.sock
# What the kubelet and kube-proxy change host-wide (the bridge plugin's
# ip_forward and kube-proxy's conntrack settings are per namespace).
HOST_SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)
HOST_RECORD=$RUN/host-before-node

# Runs "$@" in the node's namespace. nsenter, not `ip netns exec`: the
# latter makes a new mount namespace and remounts /sys, hiding the cgroup v1
# mounts from the kubelet.
IN_NODE=(nsenter "--net=/run/netns/$TIDEPOOL_NODE_NETNS" --)
in_node() { "${IN_NODE[@]}" "$@"; }
ctr_() { ctr --address "$CONTAINERD_SOCKET" --namespace k8s.io "$@"; }

# Is the node's namespace there, and ours?
node_net_exists() { [ -e "/run/netns/$TIDEPOOL_NODE_NETNS" ]; }

# The namespace, the veth pair and the host routes to the pod and Service
# ranges (without them, a packet from the host to those addresses would
# take the default route off the machine).
node_net_up() {
  [ "$(id -u)" -eq 0 ] || die "the real node needs root (network namespaces, cgroups)"
  if node_net_exists; then
    [ -f "$RUN/netns.owner" ] || die "network namespace $TIDEPOOL_NODE_NETNS exists but was not made by this state folder ($KUBE); stop the cluster that made it (make kube-down there) or set TIDEPOOL_NODE_NETNS"
    return
  fi
  if ip link show "$TIDEPOOL_NODE_VETH" >/dev/null 2>&1; then
    die "a link named $TIDEPOOL_NODE_VETH exists already; remove it or set TIDEPOOL_NODE_VETH"
  fi
  record_host_state
  say "creating network namespace $TIDEPOOL_NODE_NETNS ($TIDEPOOL_NODE_HOST_IP <-> $TIDEPOOL_NODE_IP)"
  ip netns add "$TIDEPOOL_NODE_NETNS"
  echo "$KUBE" > "$RUN/netns.owner"
  ip link add "$TIDEPOOL_NODE_VETH" type veth peer name eth0 netns "$TIDEPOOL_NODE_NETNS"
  ip addr add "$TIDEPOOL_NODE_HOST_IP/30" dev "$TIDEPOOL_NODE_VETH"
  ip link set "$TIDEPOOL_NODE_VETH" up
  in_node ip link set lo up
  in_node ip addr add "$TIDEPOOL_NODE_IP/30" dev eth0
  in_node ip link set eth0 up
  # Processes in the namespace reach ClusterIPs; nothing else leaves it.
  in_node ip route add "$TIDEPOOL_SERVICE_CIDR" via "$TIDEPOOL_NODE_HOST_IP"
  ip route add "$TIDEPOOL_POD_CIDR" via "$TIDEPOOL_NODE_IP"
  ip route add "$TIDEPOOL_SERVICE_CIDR" via "$TIDEPOOL_NODE_IP"
}

# The host-wide values the node changes, recorded once per `up` cycle.
record_host_state() {
  local name
  {
    for name in "${HOST_SYSCTLS[@]}"; do echo "sysctl $name $(sysctl -n "$name")"; done
    for name in /run/netns /run/containerd /run/containerd/s /var/lib/cni /opt/containerd; do
      if [ -e "$name" ]; then echo "exists $name"; fi
    done
    for name in /run/netns/cni-*; do
      if [ -e "$name" ]; then echo "exists $name"; fi
    done
  } > "$HOST_RECORD"
}

# What `make kube-down` must leave as it found it, one fact per line, for
# scripts/test.sh to compare: the sysctls the node changes, links, routes,
# network namespaces, cgroup folders at each hierarchy's top, mounts,
# /run's entries and the folders containerd and CNI plugins default to.
host_state() {
  local name dir
  for name in "${HOST_SYSCTLS[@]}" net.ipv4.ip_forward net.ipv4.conf.all.route_localnet; do
    echo "sysctl $name=$(sysctl -n "$name")"
  done
  ip -o link show | awk '{sub(/@.*/, "", $2); print "link " $2}'
  ip route show | sed 's/^/route /'
  ip netns list | sed 's/^/netns /'
  for dir in /sys/fs/cgroup/*/; do
    find "$dir" -mindepth 1 -maxdepth 1 -type d -printf "cgroup ${dir#/sys/fs/cgroup/}%f\n"
  done | sort
  findmnt -rn -o TARGET | sort | sed 's/^/mount /'
  find /run -mindepth 1 -maxdepth 1 -printf 'run %f\n' | sort
  for name in /run/containerd/s /var/lib/cni /opt/containerd /etc/cni /etc/cni/net.d; do
    if [ -e "$name" ]; then echo "exists $name"; fi
  done
  if command -v iptables-save >/dev/null; then
    iptables-save 2>/dev/null | { grep -v '^#' || true; } | sed 's/\[[0-9]*:[0-9]*\]//; s/^/iptables /'
  fi
  return 0
}

# Makes the host as a machine that never ran the project finds it, as far
# as the tools' default folders go: removes what an earlier run of an older
# version left there, each only when nothing uses it. libmount's /run/mount
# (when its utab records no mount and no one holds its lock), runc's
# /run/runc (when it holds no container's state) and buildah's
# /etc/cni/net.d (when it holds only its lock file, not held). Today's
# scripts point all three into their own folders (scripts/lib.sh,
# scripts/images.sh); scripts/test.sh calls this before it records the
# host, so its before-and-after check is the check of a first run. And
# what a node that died without `make kube-down` left (below).
freshen_host() {
  local removed=()
  if [ -d /run/mount ] && [ ! -s /run/mount/utab ] \
     && { [ ! -e /run/mount/utab.lock ] || flock -n /run/mount/utab.lock true; } \
     && [ -z "$(find /run/mount -mindepth 1 -maxdepth 1 ! -name utab ! -name utab.lock)" ]; then
    rm -rf /run/mount && removed+=(/run/mount)
  fi
  if [ -d /run/runc ] && [ -z "$(ls -A /run/runc)" ]; then
    rmdir /run/runc && removed+=(/run/runc)
  fi
  if [ -d /etc/cni/net.d ] && [ -z "$(find /etc/cni/net.d -mindepth 1 -maxdepth 1 ! -name cni.lock)" ] \
     && { [ ! -e /etc/cni/net.d/cni.lock ] || flock -n /etc/cni/net.d/cni.lock true; }; then
    rm -rf /etc/cni/net.d && removed+=(/etc/cni/net.d)
    rmdir /etc/cni 2>/dev/null && removed+=(/etc/cni)
  fi
  # A node whose processes died with their machine (a crash, a restored
  # snapshot) without `make kube-down` leaves its namespace's file, no
  # longer a mount, and its /run folder with a socket nothing listens on:
  # `ip netns add` and the image import would stumble on them.
  # Its pods' namespaces (containerd's cni-<id>) go the same way.
  local name
  for name in "/run/netns/$TIDEPOOL_NODE_NETNS" /run/netns/cni-*; do
    if [ -f "$name" ] && ! mountpoint -q "$name"; then
      rm -f "$name" && removed+=("$name")
    fi
  done
  if [ -d "$NODE_RUN" ] && ! node_net_exists && ! ctr --address "$CONTAINERD_SOCKET" version >/dev/null 2>&1 \
     && [ -z "$(findmnt -rn -o TARGET | grep -F "$NODE_RUN/" || true)" ]; then
    rm -rf "$NODE_RUN" && removed+=("$NODE_RUN")
  fi
  [ ${#removed[@]} -eq 0 ] || say "removed what an earlier run left on the host: ${removed[*]}"
  return 0
}

write_node_config() {
  mkdir -p "$NODE_DIR/cni/net.d" "$NODE_DIR/kubelet" "$NODE_DIR/containerd" "$NODE_RUN"
  cat > "$NODE_DIR/containerd.toml" <<TOML
# containerd for the real node (scripts/kube-node.sh). Everything in
# folders of its own; settings this machine needs are explained there.
version = 2
root = "$NODE_DIR/containerd"
state = "$NODE_RUN/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$CONTAINERD_SOCKET"
[ttrpc]
  address = "$NODE_RUN/containerd.sock.ttrpc"
[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Root here cannot lower oom_score_adj (no CAP_SYS_RESOURCE): without
  # this every pod sandbox fails to start.
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
TOML
  cat > "$NODE_DIR/cni/net.d/10-tidepool.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "tidepool",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$TIDEPOOL_POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NODE_DIR/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  # Pods of dnsPolicy ClusterFirst (the default) ask the cluster's CoreDNS
  # (scripts/kube-addons.sh), which forwards nothing; a pod of dnsPolicy
  # Default gets this file, whose lookups go to its own loopback and fail
  # there. No DNS query leaves the machine.
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$NODE_DIR/resolv.conf"
  cat > "$NODE_DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $TIDEPOOL_NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
containerRuntimeEndpoint: unix://$CONTAINERD_SOCKET
# This machine: cgroup v1 (hybrid), no systemd as PID 1, swap allowed.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
resolvConf: $NODE_DIR/resolv.conf
clusterDNS: ["$DNS_SERVICE_IP"]
clusterDomain: $CLUSTER_DOMAIN
registerWithTaints:
- {key: $REAL_NODE_TAINT, value: "true", effect: NoSchedule}
# The disk is shared with everything else on the machine: no evictions for
# its fill level, and no image garbage collection (the images cannot be
# pulled again).
evictionHard: {memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
YAML
  # kube-proxy exits when its configuration file changes: a second `up`
  # replaces the file only when its content differs.
  cat > "$NODE_DIR/kube-proxy.yaml.new" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $KUBE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $TIDEPOOL_POD_CIDR
bindAddress: $TIDEPOOL_NODE_IP
healthzBindAddress: $TIDEPOOL_NODE_IP:10256
metricsBindAddress: 127.0.0.1:10249
# NodePorts only on the node's address (so route_localnet stays as it is),
# and the host's conntrack table size left alone (it is machine-wide).
nodePortAddresses: ["$TIDEPOOL_NODE_IP/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  if cmp -s "$NODE_DIR/kube-proxy.yaml.new" "$NODE_DIR/kube-proxy.yaml"; then
    rm "$NODE_DIR/kube-proxy.yaml.new"
  else
    mv "$NODE_DIR/kube-proxy.yaml.new" "$NODE_DIR/kube-proxy.yaml"
  fi
}

# Imports the pause image and every image archive of scripts/images.sh into
# the node's containerd.
import_images() {
  local archive
  for archive in "$TIDEPOOL_IMAGE_DIR"/*.tar; do
    [ -f "$archive" ] || continue
    ctr_ images import "$archive" >/dev/null \
      || die "importing $archive into the node's containerd failed"
  done
}

node_up() {
  node_net_up
  write_node_config
  # The pause image: the sandbox of every pod.
  "$REPO_ROOT/scripts/images.sh" pause >/dev/null

  start containerd "${IN_NODE[@]}" containerd --config "$NODE_DIR/containerd.toml"
  wait_until "ctr --address $CONTAINERD_SOCKET version" 30 "containerd (see $LOGS/containerd.log)"
  import_images

  start kubelet "${IN_NODE[@]}" "$TIDEPOOL_NODE_BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" \
    --kubeconfig "$KUBE/kubelet.kubeconfig" --root-dir "$NODE_DIR/kubelet" \
    --cert-dir "$NODE_DIR/kubelet/pki" --hostname-override "$NODE_NAME" \
    --node-ip "$TIDEPOOL_NODE_IP" --node-labels "type=real" --v=1
  start kube-proxy "${IN_NODE[@]}" "$TIDEPOOL_NODE_BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml" --v=1
  wait_until "kubectl_ wait --for=condition=Ready node/$NODE_NAME --timeout=1s" 60 \
    "the real node (see $LOGS/kubelet.log and $LOGS/containerd.log)"
}

# Stops the node: kubelet and kube-proxy first (so nothing restarts a
# container), then every container (the processes in the kubepods
# cgroups), containerd and its shims (the processes left in the
# namespace), the mounts under the node's folders and the cgroup folders.
# The namespace and its veth stay for node_net_down.
node_down() {
  local pid pids dir name
  # Only the cluster that made the node takes it down.
  [ -f "$RUN/netns.owner" ] || return 0
  stop_pid "$RUN/kube-proxy.pid" 10 kube-proxy
  stop_pid "$RUN/kubelet.pid" 20 kubelet
  kill_cgroup_tree kubepods
  stop_pid "$RUN/containerd.pid" 20 containerd
  if node_net_exists; then
    pids=$(ip netns pids "$TIDEPOOL_NODE_NETNS" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      say "killing what is left in namespace $TIDEPOOL_NODE_NETNS: $(echo $pids)"
      kill -KILL $pids 2>/dev/null || true
      for pid in $pids; do (wait_until "! kill -0 $pid" 10 "process $pid") || true; done
    fi
  fi
  # Mounts: containers' root filesystems and shm, the pods' volumes.
  for dir in "$NODE_DIR" "$NODE_RUN"; do
    findmnt -rn -o TARGET | { grep -F "$dir/" || true; } | sort -r | while read -r name; do
      umount -l "$name" 2>/dev/null || true
    done
  done
  remove_cgroup_tree kubepods
  rm -rf "$NODE_RUN"
}

# Deletes the namespace with its veth and the routes through it, and puts
# back the recorded host settings. Only once the control plane has stopped:
# without the veth, the API server's address (its host end) is no longer
# local, and a packet to it would take the default route off the machine.
node_net_down() {
  local kind name value
  [ -f "$RUN/netns.owner" ] || return 0
  if node_net_exists; then
    say "deleting network namespace $TIDEPOOL_NODE_NETNS (its veth and the routes through it go with it)"
    ip netns delete "$TIDEPOOL_NODE_NETNS"
  fi
  if [ -f "$HOST_RECORD" ]; then
    while read -r kind name value; do
      [ "$kind" = sysctl ] && sysctl -qw "$name=$value"
    done < "$HOST_RECORD"
    for name in /run/containerd/s /run/containerd /var/lib/cni /opt/containerd; do
      grep -qx "exists $name" "$HOST_RECORD" || rm -rf "$name"
    done
    # containerd's CRI keeps each pod's network namespace bind-mounted at
    # /run/netns/cni-<id> (a fixed path) until the pod is removed; pods
    # killed with the node leave theirs.
    for name in /run/netns/cni-*; do
      [ -e "$name" ] && ! grep -qx "exists $name" "$HOST_RECORD" || continue
      umount "$name" 2>/dev/null || umount -l "$name" 2>/dev/null || true
      rm -f "$name"
    done
    # `ip netns add` made /run/netns a mount point of its own.
    if ! grep -qx "exists /run/netns" "$HOST_RECORD" && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
      umount /run/netns 2>/dev/null || true
      rmdir /run/netns 2>/dev/null || true
    fi
    rm -f "$HOST_RECORD"
  fi
  rm -f "$RUN/netns.owner"
}

# SIGKILLs every process in cgroup folder $1 of every hierarchy.
kill_cgroup_tree() {
  local procs
  procs=$(find /sys/fs/cgroup/*/"$1" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u || true)
  [ -n "$procs" ] || return 0
  say "killing the node's containers: $(echo $procs)"
  kill -KILL $procs 2>/dev/null || true
  local pid
  for pid in $procs; do (wait_until "! kill -0 $pid" 10 "process $pid") || true; done
}

# Removes cgroup folder $1 of every hierarchy, innermost first.
remove_cgroup_tree() {
  local dir
  for dir in /sys/fs/cgroup/*/"$1"; do
    [ -d "$dir" ] || continue
    find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ ! -d "$dir" ] || say "warning: could not remove cgroup folder $dir"
  done
}

node_status() {
  local name
  for name in containerd kubelet kube-proxy; do
    print_status "$name" "$RUN/$name.pid"
  done
}
