#!/usr/bin/env bash
# Re-pin the Kubernetes wrapper modules to another release: tools/k8s/pin.sh 1.36.3
# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging,
# which only works inside its own repo; a wrapper main module may carry the replace block instead.
# Two wrappers pin the same release: tools/k8s (control plane, kubectl) and tools/kubelet (the real
# node). The kubelet has its own module so that adding or re-building it does not change the control
# plane's cache key (tools/build.sh keys each module by its go.mod + go.sum).
set -euo pipefail
KV=${1#v}; SV="0.${KV#1.}"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
tools=$(cd "$(dirname "$0")/.." && pwd)

pin() {
  local module=$1; shift
  cd "$tools/$module"
  rm -f go.mod go.sum
  go mod init "kubemeter.invalid/tools/$module"
  go mod edit -go=1.26.0
  local dir; dir=$(go mod download -json "k8s.io/kubernetes@v$KV" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*#\1#p' "$dir/go.mod"); do
    go mod edit -replace="$m=$m@v$SV"
  done
  local gd; gd=$(sed -n 's/^godebug default=\(go[0-9.]*\).*/\1/p' "$dir/go.mod")
  if [ -n "$gd" ]; then go mod edit -godebug="default=$gd"; fi
  local args=()
  for cmd in "$@"; do args+=("k8s.io/kubernetes/cmd/$cmd@v$KV"); done
  go get -tool "${args[@]}"
  go mod tidy
}

pin k8s kube-apiserver kube-controller-manager kube-scheduler kubectl
pin kubelet kubelet
