#!/usr/bin/env bash
# Re-pin the Kubernetes wrapper module to another release: tools/k8s/pin.sh 1.36.3
# k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging,
# which only works inside its own repo; a wrapper main module may carry the replace block instead.
set -euo pipefail
KV=${1#v}; SV="0.${KV#1.}"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
cd "$(dirname "$0")"
rm -f go.mod go.sum
go mod init kubemeter.invalid/tools/k8s
go mod edit -go=1.26.0
dir=$(go mod download -json "k8s.io/kubernetes@v$KV" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*#\1#p' "$dir/go.mod"); do
  go mod edit -replace="$m=$m@v$SV"
done
gd=$(sed -n 's/^godebug default=\(go[0-9.]*\).*/\1/p' "$dir/go.mod")
if [ -n "$gd" ]; then go mod edit -godebug="default=$gd"; fi
go get -tool k8s.io/kubernetes/cmd/kube-apiserver@v$KV k8s.io/kubernetes/cmd/kube-controller-manager@v$KV \
  k8s.io/kubernetes/cmd/kube-scheduler@v$KV k8s.io/kubernetes/cmd/kubectl@v$KV
go mod tidy
