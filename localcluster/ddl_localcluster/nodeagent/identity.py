"""A pod's service-account identity: a pod-bound token and a KUBECONFIG that uses it."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from ddl_localcluster.nodeagent.api import KubeApi, write_private
from ddl_localcluster.nodeagent.lifecycle import PodRun

TOKEN_SECONDS: Final = 24 * 3600
# Refreshed at 80% of its life, like the kubelet; clients that re-read tokenFile follow.
TOKEN_REFRESH_FRACTION: Final = 0.8
LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost")


def service_account(pod: Mapping[str, Any]) -> str | None:
    """The account whose token the pod gets, or None when it opted out of one."""
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken") is False:
        return None
    return str(spec.get("serviceAccountName") or "default")


def token_request(pod_name: str, pod_uid: str) -> dict[str, Any]:
    """A TokenRequest bound to the pod: the token dies with it."""
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": TOKEN_SECONDS,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid},
        },
    }


def pod_cluster(server: str, ca_file: str, relayed: bool) -> dict[str, Any]:
    """The kubeconfig cluster a pod uses: the API server, or the relay on the pod's loopback."""
    cluster: dict[str, Any] = {"server": server, "certificate-authority": ca_file}
    if relayed:
        # The relay listens on the pod's own loopback; the name still matches the cert.
        parts = urllib.parse.urlsplit(server)
        cluster["server"] = f"https://127.0.0.1:{parts.port or 443}"
        if parts.hostname and parts.hostname not in LOOPBACK_NAMES:
            cluster["tls-server-name"] = parts.hostname
    return cluster


def pod_kubeconfig(
    cluster: Mapping[str, Any], account: str, namespace: str, token_file: Path
) -> dict[str, Any]:
    """A kubeconfig with one context: the pod's account, reading its token from token_file."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": dict(cluster)}],
        "users": [{"name": account, "user": {"tokenFile": str(token_file)}}],
        "contexts": [
            {
                "name": "pod",
                "context": {"cluster": "local", "user": account, "namespace": namespace},
            }
        ],
        "current-context": "pod",
    }


def write_identity(api: KubeApi, run: PodRun, pod: Mapping[str, Any], relayed: bool) -> Path | None:
    """Requests the pod's token, writes it and its KUBECONFIG; None when it has no token."""
    account = service_account(pod)
    if account is None:
        run.token_refresh_at = float("inf")
        return None
    answer = api.call(
        "POST",
        f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{account}/token",
        token_request(run.name, run.uid),
    )
    token_file, kubeconfig = run.dir / "token", run.dir / "kubeconfig"
    write_private(token_file, answer["status"]["token"].encode())
    run.token_refresh_at = time.monotonic() + TOKEN_REFRESH_FRACTION * TOKEN_SECONDS
    cluster = pod_cluster(api.server, str(api.ca_file.resolve()), relayed)
    config = pod_kubeconfig(cluster, account, run.namespace, token_file)
    write_private(kubeconfig, yaml.safe_dump(config, sort_keys=False).encode())
    return kubeconfig
