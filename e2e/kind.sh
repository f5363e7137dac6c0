#!/usr/bin/env bash
# End-to-end on a kind cluster, for machines with a Docker engine (the project's CI machines have
# none; there the same flow runs on the local control plane, see e2e/README.md):
#   create a kind cluster → build both images from the Dockerfile → load them → helm install the
#   chart → apply examples/cpu-training.yaml (gpus: 0, a synthetic dataset, depth 2) → wait for
#   Succeeded → check the checkpoint on the PVC and sample from it in a pod → delete the training
#   and check that its pods and PVC are gone → the in-cluster suite (e2e/tests/in_cluster.rs, the
#   same Rust tests on either cluster) → delete the cluster.
# Any failing step stops the script with a message, prints what the cluster knows (status, events,
# logs) and deletes the cluster. KEEP_CLUSTER=1 keeps it for a look; CHARLM_KIND_TIMEOUT (seconds,
# default 1800) bounds the wait for the training.
#
# `e2e/kind.sh --real-node` runs the same flow on the local control plane's real node instead (no
# kind, no registry): `e2e/controlplane/up --cpu-nodes=real` must be running (CHARLM_RUN and the
# port variables as for up); the images come from e2e/images/build and reach the node with
# `e2e/controlplane/real-node load` (CHARLM_IMAGE_BINARIES=DIR: with the binaries in DIR instead of
# compiling them in the image); at the end the namespace and the Helm release go, the plane stays.
set -euo pipefail
real_node=0
[ "${1:-}" = --real-node ] && real_node=1
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${CHARLM_KIND_CLUSTER:-charlm-e2e}"
ns=charlm-e2e
training=charlm-cpu-demo
tag=e2e
timeout_s="${CHARLM_KIND_TIMEOUT:-1800}"
cache="${CHARLM_CACHE:-$HOME/.cache/charlm}"
KIND_VERSION=v0.33.0

step() { printf '\n== %s\n' "$*"; }
fail() {
  printf '\nkind e2e FAILED: %s\n' "$*" >&2
  exit 1
}

diagnose() {
  echo "---- what the cluster knows ----" >&2
  kubectl get clt,pods,pvc,svc -n "$ns" -o wide >&2 || true
  kubectl describe clt -n "$ns" >&2 || true
  kubectl get events -n "$ns" --sort-by=.lastTimestamp >&2 || true
  for pod in $(kubectl get pods -n "$ns" -o name 2>/dev/null); do
    echo "---- logs of $pod ----" >&2
    kubectl logs -n "$ns" "$pod" --all-containers --tail=60 >&2 || true
  done
  echo "---- operator logs ----" >&2
  kubectl logs -n charlm-system deploy/charlm-operator --tail=100 >&2 || true
}

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then diagnose; fi
  if [ "$real_node" = 1 ]; then
    if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
      kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
      helm uninstall charlm-operator -n charlm-system >/dev/null 2>&1 || true
    fi
    exit $rc
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "keeping cluster $cluster (kind delete cluster --name $cluster)"
  else
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  exit $rc
}

step "prerequisites"
if [ "$real_node" = 1 ]; then
  "$repo/e2e/controlplane/build" --real-node
  PATH="$("$repo/e2e/controlplane/bin-dir"):$PATH"
  export PATH KUBECONFIG="${CHARLM_RUN:-$repo/.run}/controlplane/kubeconfig"
  grep -qx cpu_nodes=real "${CHARLM_RUN:-$repo/.run}/controlplane/options" 2>/dev/null ||
    fail "no plane with a real node: run e2e/controlplane/up --cpu-nodes=real first"
  trap cleanup EXIT
  step "images (e2e/images/build: docker build --target operator / trainer)"
  # CHARLM_IMAGE_BINARIES (scripts/test sets it): the images take this release build's binaries
  # instead of compiling them in the image (e2e/images/build --binaries).
  "$repo/e2e/images/build" --tag "$tag" ${CHARLM_IMAGE_BINARIES:+--binaries "$CHARLM_IMAGE_BINARIES"} ||
    fail "building the images"
  "$repo/e2e/controlplane/real-node" load "charlm-operator:$tag" "charlm-trainer:$tag" ||
    fail "loading the images into the real node"
else
docker info >/dev/null 2>&1 || fail "no Docker engine answers (docker info); this test needs one"
# kubectl and helm come from the control plane build (Go modules); kind too, if it is missing.
"$repo/e2e/controlplane/build"
PATH="$("$repo/e2e/controlplane/bin-dir"):$PATH"
if ! command -v kind >/dev/null; then
  GOBIN="$cache/kind/$KIND_VERSION" go install "sigs.k8s.io/kind@$KIND_VERSION" \
    || fail "could not build kind $KIND_VERSION from the Go module proxy"
  PATH="$cache/kind/$KIND_VERSION:$PATH"
fi
export PATH

step "kind cluster $cluster"
trap cleanup EXIT
if ! kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 180s || fail "kind create cluster"
fi
kubectl config use-context "kind-$cluster" >/dev/null

step "images (docker build --target operator / trainer)"
DOCKER_BUILDKIT=1 docker build --target operator -t "charlm-operator:$tag" "$repo" || fail "building the operator image"
DOCKER_BUILDKIT=1 docker build --target trainer -t "charlm-trainer:$tag" "$repo" || fail "building the trainer image"
kind load docker-image --name "$cluster" "charlm-operator:$tag" "charlm-trainer:$tag" \
  || fail "loading the images into kind"
fi

step "helm install"
helm upgrade --install charlm-operator "$repo/charts/charlm-operator" \
  -n charlm-system --create-namespace --wait --timeout 5m \
  --set image.repository=charlm-operator --set image.tag="$tag" \
  --set trainerImage.repository=charlm-trainer --set trainerImage.tag="$tag" \
  || fail "helm install (the operator did not become ready)"

step "apply examples/cpu-training.yaml"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The worker pods pass the Pod Security Standard `restricted`: the namespace enforces it.
kubectl label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest >/dev/null
kubectl apply -n "$ns" -f "$repo/examples/cpu-training.yaml" || fail "kubectl apply of the CPU example"

step "wait for Succeeded (at most ${timeout_s}s)"
deadline=$((SECONDS + timeout_s))
phase=""
while [ $SECONDS -lt $deadline ]; do
  phase="$(kubectl get clt "$training" -n "$ns" -o jsonpath='{.status.phase}' 2>/dev/null || true)"
  kubectl get clt "$training" -n "$ns" --no-headers 2>/dev/null | sed 's/^/   /' || true
  case "$phase" in
    Succeeded) break ;;
    Failed) fail "the training failed: $(kubectl get clt "$training" -n "$ns" -o jsonpath='{.status.message}')" ;;
  esac
  sleep 15
done
[ "$phase" = Succeeded ] || fail "no Succeeded within ${timeout_s}s (phase: ${phase:-none})"
bpc="$(kubectl get clt "$training" -n "$ns" -o jsonpath='{.status.finalValBpc}')"
ckpt="$(kubectl get clt "$training" -n "$ns" -o jsonpath='{.status.latestCheckpoint}')"
[ -n "$bpc" ] || fail "Succeeded without status.finalValBpc"
[ -n "$ckpt" ] || fail "Succeeded without status.latestCheckpoint"
echo "final val bpc $bpc, checkpoint $ckpt"

step "the checkpoint on the PVC, and a sample from it"
pvc="$(kubectl get clt "$training" -n "$ns" -o jsonpath='{.status.checkpointPvc}')"
[ -n "$pvc" ] || fail "no status.checkpointPvc"
kubectl apply -n "$ns" -f - <<EOF || fail "creating the sampling pod"
apiVersion: v1
kind: Pod
metadata:
  name: charlm-sample
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 1000, fsGroup: 1000, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: sample
      image: charlm-trainer:$tag
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
      command: ["sh", "-c"]
      args:
        - ls /checkpoints && test -f /checkpoints/best/manifest.json &&
          charlm-trainer sample --checkpoint /checkpoints --prompt "12+30" --max-tokens 40 --temperature 0 --device cpu
      volumeMounts:
        - {name: checkpoints, mountPath: /checkpoints, readOnly: true}
        - {name: tmp, mountPath: /tmp}
  volumes:
    - {name: checkpoints, persistentVolumeClaim: {claimName: $pvc, readOnly: true}}
    - {name: tmp, emptyDir: {}}
EOF
kubectl wait -n "$ns" pod/charlm-sample --for=jsonpath='{.status.phase}'=Succeeded --timeout=300s \
  || fail "sampling from the checkpoint did not succeed"
sample="$(kubectl logs -n "$ns" charlm-sample)"
printf "   %s\n" "${sample//$'\n'/$'\n   '}"
echo "$sample" | grep -q '^step-' || fail "no step-* checkpoint directory on the PVC"
echo "$sample" | grep -q '^12+30' || fail "the sample does not start with its prompt"
kubectl delete pod -n "$ns" charlm-sample --wait=true >/dev/null

step "delete the training: pods and PVC go with it"
kubectl delete clt "$training" -n "$ns" --wait=true --timeout=120s || fail "deleting the training"
kubectl wait -n "$ns" pvc/"$pvc" --for=delete --timeout=120s || fail "the checkpoint PVC was not deleted"
left="$(kubectl get pods -n "$ns" -l charlm.dev/training="$training" -o name)"
[ -z "$left" ] || fail "worker pods left after deletion: $left"

step "the in-cluster suite (e2e/tests/in_cluster.rs: PVC datasets, kill and resume, 2-pod DNS, suspend and delete)"
if [ "$real_node" = 1 ]; then
  export CHARLM_KUBECONFIG="$KUBECONFIG"
else
  mkdir -p "$cache/kind"
  kind get kubeconfig --name "$cluster" >"$cache/kind/kubeconfig"
  export CHARLM_KUBECONFIG="$cache/kind/kubeconfig"
fi
# --workspace: the features scripts/test's build resolved, so nothing compiles twice.
CHARLM_E2E_TRAINER_IMAGE="charlm-trainer:$tag" \
  cargo test --release -q --workspace --test in_cluster -- --ignored --test-threads=1 ||
  fail "the in-cluster suite"

echo
echo "kind e2e passed"
