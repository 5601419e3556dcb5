#!/usr/bin/env bash
# Builds the test-infrastructure binaries (control plane, kwok, helm, kubeconform, the real node:
# kubelet, containerd + ctr + shim, CNI plugins, pause; Prometheus) from the wrapper Go modules in
# tools/*/ into a cache outside the clone, keyed by each module's go.mod, go.sum and own sources,
# then fetches the Kafka broker's jars (tools/kafka/fetch.sh).
# Idempotent: a binary whose key is already built is reused, so a warm run takes seconds.
#   tools/build.sh            build what is missing, link it into $KUBEMETER_TOOLS_BIN
#   tools/build.sh --bin-dir  print that directory
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KUBEMETER_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubemeter-tools}
bin=${KUBEMETER_TOOLS_BIN:-$cache/bin}
if [ "${1:-}" = "--bin-dir" ]; then echo "$bin"; exit 0; fi

# Go never reaches past the module proxy and never rewrites the committed go.mod/go.sum.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
export GOPROXY=${GOPROXY_OVERRIDE:-https://proxy.golang.org}
mkdir -p "$cache" "$bin"

k8s_version=$(sed -n 's#^[[:space:]]*k8s.io/kubernetes v\([0-9.]*\).*#\1#p' "$here/k8s/go.mod")
k8s_minor=$(echo "$k8s_version" | cut -d. -f2)
helm_version=$(sed -n 's#^[[:space:]]*helm.sh/helm/v3 \(v[0-9.]*\).*#\1#p' "$here/helm/go.mod")
k8s_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags="$k8s_ldflags -X $p.gitVersion=v$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor -X $p.gitTreeState=clean"
done
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags="$helm_ldflags -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
done

# Go names a binary after the package path's last element, skipping a /vN major suffix.
binary_name() { local b; b=$(basename "$1"); [[ $b =~ ^v[0-9]+$ ]] && b=$(basename "$(dirname "$1")"); echo "$b"; }

# module | ldflags | packages; $tags overrides the build tags. One build of a module at a time per
# cache (several clones may run this at once): the lock is taken before the check.
build() {
  local module=$1 ldflags=$2; shift 2
  local sources=("$here/$module/go.mod" "$here/$module/go.sum")
  for f in "$here/$module"/*.go; do [ -e "$f" ] && sources+=("$f"); done
  local key; key=$(cat "${sources[@]}" | sha256sum | cut -c1-16)
  local out="$cache/$module-$key"
  (
    flock 9
    local missing=0
    for pkg in "$@"; do [ -x "$out/$(binary_name "$pkg")" ] || missing=1; done
    if [ $missing = 1 ]; then
      local started=$SECONDS
      echo "building $module ($*) into $out" >&2
      (cd "$here/$module" && go build -trimpath -tags "${tags:-selinux,notest,grpcnotrace}" -ldflags "$ldflags" -o "$out.tmp/" "$@")
      rm -rf "$out" && mv "$out.tmp" "$out"
      echo "built $module in $((SECONDS - started)) s" >&2
    fi
  ) 9>"$cache/$module.lock"
  for pkg in "$@"; do ln -sfn "$out/$(binary_name "$pkg")" "$bin/$(binary_name "$pkg")"; done
}

started=$SECONDS
build etcd "-s -w" go.etcd.io/etcd/server/v3
ln -sfn "$(readlink "$bin/server")" "$bin/etcd" && rm -f "$bin/server"
build kwok "-s -w" sigs.k8s.io/kwok/cmd/kwok
# kwok v0.8 has no built-in stages: ship the upstream "fast" set that kwokctl uses, from the module.
kwok_dir=$(cd "$here/kwok" && go mod download -json sigs.k8s.io/kwok | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
stages="$(dirname "$(readlink "$bin/kwok")")/stages.yaml"
if [ ! -s "$stages" ]; then
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"; cat "$kwok_dir/kustomize/stage/$f"
  done > "$stages"
fi
ln -sfn "$stages" "$bin/kwok-stages.yaml"
build kubeconform "-s -w" github.com/yannh/kubeconform/cmd/kubeconform
build helm "$helm_ldflags" helm.sh/helm/v3/cmd/helm
build k8s "$k8s_ldflags" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
# The real node (testbed/realnode.py). The kubelet has its own wrapper module pinned to the same
# release (tools/k8s/pin.sh pins both), so building it leaves the control plane's cache key alone.
kubelet_version=$(sed -n 's#^[[:space:]]*k8s.io/kubernetes v\([0-9.]*\).*#\1#p' "$here/kubelet/go.mod")
if [ "$kubelet_version" != "$k8s_version" ]; then
  echo "tools/kubelet pins Kubernetes $kubelet_version, tools/k8s $k8s_version; run tools/k8s/pin.sh $k8s_version" >&2
  exit 1
fi
build kubelet "$k8s_ldflags" k8s.io/kubernetes/cmd/kubelet
containerd_version=$(sed -n 's#^[[:space:]]*github.com/containerd/containerd/v2 \(v[0-9.]*\).*#\1#p' "$here/containerd/go.mod")
tags="no_btrfs,no_devmapper,no_zfs,no_aufs,urfave_cli_no_docs" build containerd \
  "-s -w -X github.com/containerd/containerd/v2/version.Version=$containerd_version" \
  github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr \
  github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
build cni "-s -w" github.com/containernetworking/plugins/plugins/main/loopback \
  github.com/containernetworking/plugins/plugins/main/tap github.com/containernetworking/plugins/plugins/ipam/host-local
build pause "-s -w" kubemeter.invalid/tools/pause
# Prometheus, the real server the Prometheus-source tests scrape with (tests/plugins/prometheus.py).
# remove_all_sd keeps only static, file and HTTP service discovery (the tests use static targets;
# the cloud SDKs would double the build); no embedded web UI (the tests use the HTTP API only).
prometheus_version=$(sed -n 's#^[[:space:]]*github.com/prometheus/prometheus v0\.\([0-9]*\)\([0-9][0-9]\)\.\([0-9]*\).*#\1.\2.\3#p' "$here/prometheus/go.mod")
tags=remove_all_sd build prometheus \
  "-s -w -X github.com/prometheus/common/version.Version=$prometheus_version -X github.com/prometheus/common/version.Branch=kubemeter-tools" \
  github.com/prometheus/prometheus/cmd/prometheus
"$here/kafka/fetch.sh"  # the Kafka broker's jars (Maven Central, no Go)
echo "tools ready in $bin ($((SECONDS - started)) s)" >&2
