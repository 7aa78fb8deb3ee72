#!/usr/bin/env bash
# Builds the pinned control-plane binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm) from the Go module proxy into a cache outside the repo.
#
# Usage: scripts/build-k8s.sh            # build what is missing, print the bin directory
#        DDL_K8S_BIN_DIR=/opt/k8s/bin ... # use prebuilt binaries instead (only checked)
#
# Versions are pinned in scripts/versions.env. Nothing is downloaded except Go modules.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=versions.env
. "$here/versions.env"

BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

bin_dir=$("$here/k8s-bin-dir.sh")
missing=()
for b in "${BINARIES[@]}"; do
  [ -x "$bin_dir/$b" ] || missing+=("$b")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$bin_dir"
  exit 0
fi
if [ -n "${DDL_K8S_BIN_DIR:-}" ]; then
  echo "DDL_K8S_BIN_DIR=$DDL_K8S_BIN_DIR lacks: ${missing[*]}" >&2
  exit 1
fi

command -v go >/dev/null || { echo "go is required to build the control plane (install Go >= 1.24)" >&2; exit 1; }
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
mkdir -p "$bin_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '[build-k8s %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
start=$SECONDS

need() { for b in "$@"; do [[ " ${missing[*]} " == *" $b "* ]] && return 0; done; return 1; }

if need kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  log "kubernetes $KUBERNETES_VERSION: fetching go.mod"
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  staging_version="v0.${KUBERNETES_VERSION#v1.}"
  mkdir -p "$work/k8s"
  {
    echo "module ddl-operator.local/k8s-build"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    # Each staging module (k8s.io/api => ./staging/src/k8s.io/api) is published on its own
    # as k8s.io/<name> v0.Y.Z; point the replace at that release.
    sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$gomod"
    echo ")"
  } > "$work/k8s/go.mod"
  cat > "$work/k8s/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$work/k8s" && go mod tidy -e >/dev/null 2>&1 || true)
  # tidy drops requirements only reachable under the tools tag; resolve them explicitly.
  (cd "$work/k8s" && go get "k8s.io/kubernetes@$KUBERNETES_VERSION" >&2)
  log "building kube-apiserver kube-controller-manager kube-scheduler kubectl (slow the first time)"
  (cd "$work/k8s" && go build -trimpath -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
      -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2) \
      -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION \
      -X k8s.io/client-go/pkg/version.gitMajor=1 \
      -X k8s.io/client-go/pkg/version.gitMinor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)" \
      -o "$bin_dir/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
fi

if need etcd; then
  log "etcd $ETCD_VERSION"
  mkdir -p "$work/etcd"
  cp "$repo/tools/etcd/main.go" "$work/etcd/"
  (cd "$work/etcd" && go mod init ddl-operator.local/etcd-build >/dev/null 2>&1 \
     && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2 && go mod tidy >&2 \
     && go build -trimpath -ldflags "-s -w" -o "$bin_dir/etcd" .)
fi

if need kwok; then
  log "kwok $KWOK_VERSION"
  GOBIN="$bin_dir" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi

if need helm; then
  log "helm $HELM_VERSION"
  GOBIN="$bin_dir" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi

for b in "${BINARIES[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "build finished but $bin_dir/$b is missing" >&2; exit 1; }
done
log "done in $((SECONDS - start))s"
echo "$bin_dir"
