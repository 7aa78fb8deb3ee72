"""Tests of what the node agent writes to the API: node conditions, Leases, tokens, KUBECONFIGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ddl_localcluster.nodeagent.heartbeat import (
    LEASE_NAMESPACE,
    LEASE_SECONDS,
    lease_object,
    lease_spec,
    node_conditions,
)
from ddl_localcluster.nodeagent.identity import (
    TOKEN_SECONDS,
    pod_cluster,
    pod_kubeconfig,
    service_account,
    token_request,
)

SINCE, NOW = "2026-01-01T00:00:00Z", "2026-01-01T00:10:00Z"


def test_a_healthy_node_reports_no_pressure_and_ready() -> None:
    conditions = node_conditions(SINCE, NOW)
    assert [(c["type"], c["status"]) for c in conditions] == [
        ("MemoryPressure", "False"),
        ("DiskPressure", "False"),
        ("PIDPressure", "False"),
        ("Ready", "True"),
    ]
    assert {c["lastHeartbeatTime"] for c in conditions} == {NOW}
    assert {c["lastTransitionTime"] for c in conditions} == {SINCE}
    assert conditions[-1]["reason"] == "KubeletReady"


def test_a_nodes_lease_is_held_by_the_node_and_owned_by_its_node_object() -> None:
    spec = lease_spec("gpu-r0-n0", "2026-01-01T00:10:00.000001Z")
    assert spec == {
        "holderIdentity": "gpu-r0-n0",
        "leaseDurationSeconds": LEASE_SECONDS,
        "renewTime": "2026-01-01T00:10:00.000001Z",
    }
    lease = lease_object("gpu-r0-n0", "node-uid", spec)
    assert lease["metadata"]["namespace"] == LEASE_NAMESPACE == "kube-node-lease"
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "gpu-r0-n0", "uid": "node-uid"}
    ]
    assert lease["spec"] == spec


@pytest.mark.parametrize(
    ("spec", "account"),
    [
        ({}, "default"),
        ({"serviceAccountName": ""}, "default"),
        ({"serviceAccountName": "trainer"}, "trainer"),
        ({"serviceAccountName": "trainer", "automountServiceAccountToken": True}, "trainer"),
        ({"serviceAccountName": "trainer", "automountServiceAccountToken": False}, None),
    ],
)
def test_service_account_of_a_pod(spec: dict[str, Any], account: str | None) -> None:
    assert service_account({"spec": spec}) == account


def test_the_token_request_binds_the_token_to_the_pod() -> None:
    request = token_request("job-w0", "0f0e-uid")
    assert request["kind"] == "TokenRequest"
    assert request["spec"] == {
        "expirationSeconds": TOKEN_SECONDS,
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": "job-w0", "uid": "0f0e-uid"},
    }


@pytest.mark.parametrize(
    ("server", "relayed", "cluster"),
    [
        ("https://127.0.0.1:6443", False, {"server": "https://127.0.0.1:6443"}),
        ("https://api.local:6443", False, {"server": "https://api.local:6443"}),
        # Through the relay on the pod's loopback, same port; the cert's name where it differs.
        ("https://127.0.0.1:6443", True, {"server": "https://127.0.0.1:6443"}),
        ("https://localhost:7443", True, {"server": "https://127.0.0.1:7443"}),
        (
            "https://api.local:6443",
            True,
            {"server": "https://127.0.0.1:6443", "tls-server-name": "api.local"},
        ),
        (
            "https://api.local",
            True,
            {"server": "https://127.0.0.1:443", "tls-server-name": "api.local"},
        ),
    ],
)
def test_where_a_pods_kubeconfig_points(
    server: str, relayed: bool, cluster: dict[str, str]
) -> None:
    assert pod_cluster(server, "/state/ca.crt", relayed) == {
        **cluster,
        "certificate-authority": "/state/ca.crt",
    }


def test_a_pods_kubeconfig_uses_its_token_file_in_its_namespace() -> None:
    cluster = {"server": "https://127.0.0.1:6443", "certificate-authority": "/ca"}
    config = pod_kubeconfig(cluster, "trainer", "team", Path("/pods/p/token"))
    assert config["current-context"] == "pod"
    assert config["contexts"] == [
        {"name": "pod", "context": {"cluster": "local", "user": "trainer", "namespace": "team"}}
    ]
    assert config["users"] == [{"name": "trainer", "user": {"tokenFile": "/pods/p/token"}}]
    assert config["clusters"] == [{"name": "local", "cluster": cluster}]
