#!/usr/bin/env bash
# Builds the pinned Kueue manager (sigs.k8s.io/kueue/cmd/kueue) from the Go module proxy and
# copies its CRDs (config/components/crd/bases in the module source) next to it, in the same
# cache as the control-plane binaries but in a directory of its own, so that a Kueue version
# change does not rebuild Kubernetes.
#
# Usage: scripts/build-kueue.sh              # build what is missing, print the directory
#        DDL_KUEUE_DIR=/opt/kueue ...          # use a prebuilt directory instead (only checked)
#
# The directory holds `kueue` (the manager) and `crds/*.yaml`. Nothing is downloaded except Go
# modules. The version is pinned in scripts/versions.env.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"

if [ -n "${DDL_KUEUE_DIR:-}" ]; then
  dir=$DDL_KUEUE_DIR
else
  cache=${DDL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ddl-operator}
  dir="$cache/bin/kueue-$KUEUE_VERSION"
fi

complete() { [ -x "$dir/kueue" ] && [ -f "$dir/crds/kueue.x-k8s.io_workloads.yaml" ]; }
if complete; then
  echo "$dir"
  exit 0
fi
if [ -n "${DDL_KUEUE_DIR:-}" ]; then
  echo "DDL_KUEUE_DIR=$DDL_KUEUE_DIR lacks kueue or crds/kueue.x-k8s.io_workloads.yaml" >&2
  exit 1
fi

command -v go >/dev/null || { echo "go is required to build Kueue (install Go >= 1.25)" >&2; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
log() { printf '[build-kueue %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
start=$SECONDS
module="sigs.k8s.io/kueue@$KUEUE_VERSION"

log "$module: fetching the module source"
src=$(go mod download -json "$module" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
[ -d "$src/config/components/crd/bases" ] || { echo "$src has no config/components/crd/bases" >&2; exit 1; }

# Write into a staging directory and rename at the end, so an interrupted build leaves nothing
# that looks complete.
stage="$dir.partial"
rm -rf "$stage"
mkdir -p "$stage/crds"
trap 'rm -rf "$stage"' EXIT

log "copying CRDs from $src/config/components/crd/bases"
cp "$src"/config/components/crd/bases/*.yaml "$stage/crds/"
chmod u+w "$stage"/crds/*.yaml

log "building the manager (slow the first time)"
GOBIN="$stage" go install -trimpath -ldflags "-s -w \
    -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION \
    -X sigs.k8s.io/kueue/pkg/version.GitCommit=module-proxy" \
  "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"

rm -rf "$dir"
mv "$stage" "$dir"
trap - EXIT
complete || { echo "build finished but $dir is incomplete" >&2; exit 1; }
log "done in $((SECONDS - start))s"
echo "$dir"
