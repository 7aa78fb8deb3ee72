"""Node registration and liveness: the Node object, its Ready status posts, its Lease renewals."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ddl_localcluster.nodeagent.api import ApiError, KubeApi, micro_timestamp, timestamp
from ddl_localcluster.topology import NodeSpec, node_object

HEARTBEAT_SECONDS: Final = 5.0
STATUS_SECONDS: Final = 10.0
LEASE_SECONDS: Final = 40
LEASE_NAMESPACE: Final = "kube-node-lease"
LEASES_PATH: Final = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
# The conditions a kubelet posts besides Ready, each False with its usual reason.
PRESSURE: Final = {
    "MemoryPressure": "KubeletHasSufficientMemory",
    "DiskPressure": "KubeletHasNoDiskPressure",
    "PIDPressure": "KubeletHasSufficientPID",
}


@dataclass
class NodeState:
    """One simulated node: whether it beats (up) and whether its Node object exists."""

    spec: NodeSpec
    host_ip: str
    up: bool = True
    registered: bool = False
    uid: str = ""
    ready_since: str = ""
    status_due: float = 0.0

    @property
    def beating(self) -> bool:
        return self.up and self.registered


def node_conditions(ready_since: str, now: str) -> list[dict[str, Any]]:
    """A healthy node's conditions: no pressure, Ready since ready_since, heard from now."""
    conditions = [
        {
            "type": kind,
            "status": "False",
            "reason": reason,
            "lastHeartbeatTime": now,
            "lastTransitionTime": ready_since,
        }
        for kind, reason in PRESSURE.items()
    ]
    conditions.append(
        {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "ddl node agent is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": ready_since,
        }
    )
    return conditions


def lease_spec(node: str, renew_time: str) -> dict[str, Any]:
    return {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": renew_time}


def lease_object(node: str, node_uid: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A node's Lease, owned by its Node so it goes when the Node goes."""
    owner = {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
        "spec": dict(spec),
    }


class Heartbeats:
    """Registers the agent's nodes and keeps the Lease and Ready condition of each one fresh."""

    def __init__(
        self,
        api: KubeApi,
        nodes: Mapping[str, NodeState],
        kubelet_port: int,
        say: Callable[[str], None],
    ) -> None:
        self.api, self.nodes, self.kubelet_port, self.say = api, nodes, kubelet_port, say
        self._beat = threading.Event()

    def register(self, node: NodeState) -> None:
        """Creates (or updates) the Node, posts its capacity and Ready, renews its Lease."""
        obj = node_object(node.spec, node.host_ip, self.kubelet_port)
        try:
            created = self.api.call("POST", "/api/v1/nodes", obj)
        except ApiError as err:
            if err.status != 409:
                raise
            created = self.api.patch(
                f"/api/v1/nodes/{node.spec.name}", {"metadata": {"labels": node.spec.labels()}}
            )
        node.uid = created["metadata"]["uid"]
        node.registered = node.up = True
        node.ready_since = timestamp()
        self.post_status(node, obj["status"])
        self.renew_lease(node)

    def resume(self, node: NodeState) -> None:
        """A node that was down beats again: Ready (since now) and its Lease at once."""
        node.up = True
        node.ready_since = timestamp()
        self.post_status(node)
        self.renew_lease(node)
        self._beat.set()

    def deregister(self, node: NodeState) -> None:
        """Stops the node's heartbeats and deletes its Lease and Node (each if still there)."""
        node.registered = node.up = False
        for path in (f"{LEASES_PATH}/{node.spec.name}", f"/api/v1/nodes/{node.spec.name}"):
            with contextlib.suppress(ApiError):
                self.api.call("DELETE", path)

    def post_status(self, node: NodeState, extra: Mapping[str, Any] | None = None) -> None:
        conditions = node_conditions(node.ready_since, timestamp())
        self.api.patch(
            f"/api/v1/nodes/{node.spec.name}/status",
            {"status": {**(extra or {}), "conditions": conditions}},
        )
        node.status_due = time.monotonic() + STATUS_SECONDS

    def renew_lease(self, node: NodeState) -> None:
        """Renews the node's Lease, creating it when it does not exist (yet, or any more)."""
        name = node.spec.name
        spec = lease_spec(name, micro_timestamp())
        try:
            self.api.patch(f"{LEASES_PATH}/{name}", {"spec": spec})
        except ApiError as err:
            if err.status != 404:
                raise
            self.api.call("POST", LEASES_PATH, lease_object(name, node.uid, spec))

    def run(self, stop: threading.Event) -> None:
        """Beats every HEARTBEAT_SECONDS (or when woken) until stop is set."""
        while not stop.is_set():
            for node in list(self.nodes.values()):
                if not node.beating:
                    continue
                try:
                    self.renew_lease(node)
                    if time.monotonic() >= node.status_due:
                        self.post_status(node)
                except (ApiError, OSError) as err:
                    self.say(f"heartbeat of {node.spec.name} failed: {err}")
            self._beat.wait(HEARTBEAT_SECONDS)
            self._beat.clear()
