#!/usr/bin/env bash
# Prints the directory holding the pinned control-plane binaries (may not exist yet).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/versions.env"
if [ -n "${DDL_K8S_BIN_DIR:-}" ]; then
  echo "$DDL_K8S_BIN_DIR"
else
  cache=${DDL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ddl-operator}
  echo "$cache/bin/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION"
fi
