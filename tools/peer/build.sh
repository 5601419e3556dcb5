#!/usr/bin/env bash
# Builds the peer pipeline for `make bench` (bench/bench_peer.py): Bento from its Go module, with
# only the components the benchmark uses (main.go), into the same cache as tools/build.sh, keyed by
# go.mod + go.sum. Idempotent: a warm run only re-links.
#   tools/peer/build.sh            build if missing, link bento into $KUBEMETER_TOOLS_BIN
#   tools/peer/build.sh --binary   print the path the binary is linked at
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KUBEMETER_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubemeter-tools}
bin=${KUBEMETER_TOOLS_BIN:-$cache/bin}
if [ "${1:-}" = "--binary" ]; then echo "$bin/bento"; exit 0; fi

# Go never reaches past the module proxy and never rewrites the committed go.mod/go.sum.
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
export GOPROXY=${GOPROXY_OVERRIDE:-https://proxy.golang.org}
mkdir -p "$cache" "$bin"

key=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-16)
out="$cache/peer-$key"
if [ ! -x "$out/bento" ]; then
  started=$SECONDS
  echo "building the peer (Bento) into $out" >&2
  (cd "$here" && go build -trimpath -ldflags "-s -w" -o "$out.tmp/bento" .)
  rm -rf "$out" && mv "$out.tmp" "$out"
  echo "built the peer in $((SECONDS - started)) s" >&2
fi
ln -sfn "$out/bento" "$bin/bento"
