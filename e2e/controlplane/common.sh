# Sourced by up and down: where the plane keeps its state, its ports, and small helpers.
# shellcheck shell=bash disable=SC2034,SC2154 # the sourcing script sets $here and uses the ports

repo="$(cd "$here/../.." && pwd)"
bin="$("$here/bin-dir")"
# Absolute, so that the kubeconfig path `up` prints and the paths in the components' arguments
# (which `down` recognises them by) hold from any working directory.
run_dir="$(realpath -m "${CHARLM_RUN:-$repo/.run}")"
state="$run_dir/controlplane"
pki="$state/pki"

etcd_port="${CHARLM_ETCD_PORT:-16379}"
etcd_peer_port="${CHARLM_ETCD_PEER_PORT:-16380}"
apiserver_port="${CHARLM_APISERVER_PORT:-16443}"
kcm_port="${CHARLM_KCM_PORT:-16257}"
scheduler_port="${CHARLM_SCHEDULER_PORT:-16259}"

log() { printf 'controlplane: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

kubectl() { "$bin/kubectl" --kubeconfig="$state/kubeconfig" "$@"; }

pid_of() { cat "$state/pids/$1.pid" 2>/dev/null || true; }

# The process recorded for a component still runs the component's binary (a reused pid does not).
alive() {
  local pid exe
  pid="$(pid_of "$1")"
  [ -n "$pid" ] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null)" || return 1
  [ "$(basename "${exe% (deleted)}")" = "$1" ]
}

# start NAME BINARY ARGS...: in its own session (so it outlives the caller's terminal and process
# group), output to logs/NAME.log, pid to pids/NAME.pid. It does not inherit the state lock's fd
# (it would hold the lock for as long as it runs).
start() {
  local name="$1"
  shift
  setsid "$@" >"$state/logs/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$state/pids/$name.pid"
}

# One `up` or `down` at a time per state folder; `up` runs `down` itself, under the lock it holds.
lock_state() {
  [ "${CHARLM_CONTROLPLANE_LOCKED:-}" = "$state" ] && return 0
  mkdir -p "$state"
  exec 9>"$state/.lock"
  if ! flock -n 9; then
    log "waiting for another up/down on $state to finish"
    flock -w 600 9 || die "another up/down on $state held its lock for 600 s"
  fi
  export CHARLM_CONTROLPLANE_LOCKED="$state"
}

# The processes of this plane, found without pid files (a pid file lost, a folder removed while it
# ran): binaries of $bin whose arguments name this state folder.
plane_processes() {
  local p pid exe
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    [ "$pid" = "$$" ] && continue
    exe="$(readlink "$p/exe" 2>/dev/null)" || continue
    exe="${exe% (deleted)}"
    if [ "${exe%/*}" = "$bin" ]; then
      tr '\0' '\n' <"$p/cmdline" 2>/dev/null | grep -qF "$state/" && echo "$pid"
    fi
  done
  return 0
}

# wait_until WHAT SECONDS COMPONENT COMMAND...: polls COMMAND; fails early, with the log tail of
# the one that died, when any started component (one with a pid file) exits, and on timeout with
# COMPONENT's log tail.
wait_until() {
  local what="$1" seconds="$2" component="$3" f c
  shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    for f in "$state"/pids/*.pid; do
      [ -e "$f" ] || continue
      c="$(basename "$f" .pid)"
      if ! alive "$c"; then
        tail -n 30 "$state/logs/$c.log" >&2 || true
        die "$c exited while waiting for $what; its log: $state/logs/$c.log"
      fi
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      tail -n 30 "$state/logs/$component.log" >&2 || true
      die "timed out after ${seconds}s waiting for $what; log: $state/logs/$component.log"
    fi
    sleep 0.3
  done
}

api_ready() {
  curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$apiserver_port/readyz" >/dev/null 2>&1
}

port_busy() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_ready() {
  [ "$(kubectl get node "$1" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# A CA, the API server's serving certificate, client certificates per component, and the
# service-account signing key pair. Made once per state dir; a later `up` reuses them.
make_pki() {
  [ -f "$pki/.complete" ] && return 0
  log "making certificates in $pki"
  rm -rf "$pki"
  mkdir -p "$pki"
  (
    cd "$pki" || exit 1
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=charlm-e2e-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    client_cert() { # name, subject, extensions file
      openssl req -new -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$3" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr"
    }
    printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >server.ext
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >client.ext
    client_cert apiserver "/CN=kube-apiserver" server.ext
    client_cert admin "/O=system:masters/CN=charlm-e2e-admin" client.ext
    client_cert kube-controller-manager "/CN=system:kube-controller-manager" client.ext
    client_cert kube-scheduler "/CN=system:kube-scheduler" client.ext
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
    touch .complete
  )
}

# kubeconfig_for CERT-NAME FILE: a kubeconfig with the CA and the client certificate inlined.
kubeconfig_for() {
  local b64='base64 -w0'
  cat >"$2" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: charlm-e2e
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority-data: $($b64 <"$pki/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $($b64 <"$pki/$1.crt")
    client-key-data: $($b64 <"$pki/$1.key")
contexts:
- name: charlm-e2e
  context:
    cluster: charlm-e2e
    user: $1
current-context: charlm-e2e
EOF
  chmod 600 "$2"
}

# The nodes and the default StorageClass. CPU nodes are declared here only when kwok runs them;
# the real node's kubelet registers itself (as cpu-0, with the same labels).
cluster_manifest() {
  local cpu_nodes="$1" i
  for i in 0 1 2 3; do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: h100-$i
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: h100-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    charlm.dev/e2e-node: h100
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3
    nvidia.com/gpu.count: "8"
spec:
  taints:
  - key: nvidia.com/gpu
    value: present
    effect: NoSchedule
status:
  capacity: {cpu: "96", memory: 1Ti, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
  allocatable: {cpu: "96", memory: 1Ti, pods: "110", nvidia.com/gpu: "8", ephemeral-storage: 1Ti}
EOF
  done
  if [ "$cpu_nodes" = kwok ]; then
    for i in 0 1; do
      cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: cpu-$i
  annotations:
    kwok.x-k8s.io/node: fake
  labels:
    kubernetes.io/hostname: cpu-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    charlm.dev/e2e-node: cpu
status:
  capacity: {cpu: "16", memory: 64Gi, pods: "110", ephemeral-storage: 100Gi}
  allocatable: {cpu: "16", memory: 64Gi, pods: "110", ephemeral-storage: 100Gi}
EOF
    done
  fi
  # The in-tree hostPath provisioner of kube-controller-manager (--enable-hostpath-provisioner)
  # makes a directory /tmp/hostpath_pv/<uuid> per claim and deletes it with the claim.
  cat <<EOF
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: standard
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
}
