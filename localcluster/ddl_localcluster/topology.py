"""The local cluster's description (racks x nodes x GPUs, link rate) and its Node objects."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ddl_operator.api import constants as c

# tc's rate units (tc-rate(8)): bit-based and byte-based, decimal and binary prefixes.
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]i?)?(bit|bps)$")
_PREFIX: Final = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
_DELAY = re.compile(r"^\d+(?:\.\d+)?(us|ms|s)$")


class TopologyError(ValueError):
    """The cluster description is invalid; the message names the field."""


def rate_bits(rate: str) -> int:
    """Bits per second of a tc rate such as `200mbit` or `25mbps` (bytes)."""
    m = _RATE.match(rate.strip().lower())
    if not m:
        raise TopologyError(f"network.linkRate: {rate!r} is not a tc rate such as 200mbit")
    number, prefix, unit = m.groups()
    bits = float(number) * _PREFIX[prefix or ""] * (8 if unit == "bps" else 1)
    return int(bits)


@dataclass(frozen=True)
class NodeSpec:
    """One simulated machine."""

    name: str
    index: int
    rack: str
    zone: str
    gpus: int
    cpu: str
    memory: str
    max_pods: int
    extra_labels: dict[str, str] = field(default_factory=dict)

    @property
    def nvlink_domain(self) -> str:
        """All GPUs of a node share one NVLink domain, as on a DGX-style host."""
        return f"{self.name}-nvl"

    def labels(self) -> dict[str, str]:
        return {
            **self.extra_labels,
            c.LABEL_HOSTNAME: self.name,
            c.LABEL_NVLINK_DOMAIN: self.nvlink_domain,
            c.LABEL_RACK: self.rack,
            c.LABEL_ZONE: self.zone,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.max_pods),
            c.GPU_RESOURCE: str(self.gpus),
        }


# The YAML keys, camelCase like Kubernetes objects, and the dataclass fields they fill.
_KEYS: Final = {
    "racks": "racks",
    "nodesPerRack": "nodes_per_rack",
    "gpusPerNode": "gpus_per_node",
    "zone": "zone",
    "nodeName": "node_name",
    "cpu": "cpu",
    "memory": "memory",
    "maxPods": "max_pods",
    "labels": "labels",
}
_NETWORK_KEYS: Final = {"subnet": "subnet", "linkRate": "link_rate", "linkDelay": "link_delay"}


@dataclass(frozen=True)
class ClusterSpec:
    """racks x nodes_per_rack machines with gpus_per_node GPUs each, in one zone.

    link_rate shapes each node's uplink (tc tbf), so traffic between nodes is the slow tier
    and traffic inside a node is not shaped at all.
    """

    racks: int = 2
    nodes_per_rack: int = 2
    gpus_per_node: int = 4
    zone: str = "zone-a"
    node_name: str = "gpu-r{rack}-n{node}"
    cpu: str = "8"
    memory: str = "32Gi"
    max_pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    subnet: str = "10.213.0.0/16"
    link_rate: str | None = "200mbit"
    link_delay: str | None = None

    def __post_init__(self) -> None:
        if self.racks < 1 or self.nodes_per_rack < 1:
            raise TopologyError("racks and nodesPerRack must be at least 1")
        if self.gpus_per_node < 0:
            raise TopologyError("gpusPerNode must not be negative")
        net = ipaddress.ip_network(self.subnet)
        # One /24 per node inside the subnet, the last one kept for the spine.
        if net.version != 4 or net.prefixlen > 16:
            raise TopologyError(f"network.subnet: {self.subnet} must be an IPv4 /16 or larger")
        if self.racks * self.nodes_per_rack > 254:
            raise TopologyError("at most 254 nodes fit one subnet")
        if self.link_rate is not None:
            rate_bits(self.link_rate)
        if self.link_delay is not None and not _DELAY.match(self.link_delay):
            raise TopologyError(f"network.linkDelay: {self.link_delay!r} is not like 2ms")
        names = [n.name for n in self.nodes()]
        if len(set(names)) != len(names):
            raise TopologyError(f"nodeName {self.node_name!r} gives duplicate names")

    def nodes(self) -> list[NodeSpec]:
        out = []
        for r in range(self.racks):
            for n in range(self.nodes_per_rack):
                index = r * self.nodes_per_rack + n
                out.append(
                    NodeSpec(
                        name=self.node_name.format(rack=r, node=n, index=index),
                        index=index,
                        rack=f"rack-{r}",
                        zone=self.zone,
                        gpus=self.gpus_per_node,
                        cpu=self.cpu,
                        memory=self.memory,
                        max_pods=self.max_pods,
                        extra_labels=dict(self.labels),
                    )
                )
        return out

    def replace(self, **changes: Any) -> ClusterSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterSpec:
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "network":
                for nkey, nvalue in (value or {}).items():
                    if nkey not in _NETWORK_KEYS:
                        raise TopologyError(
                            f"network.{nkey}: unknown field (known: {', '.join(_NETWORK_KEYS)})"
                        )
                    kwargs[_NETWORK_KEYS[nkey]] = None if nvalue is None else str(nvalue)
            elif key in _KEYS:
                kwargs[_KEYS[key]] = value
            else:
                raise TopologyError(
                    f"{key}: unknown field (known: {', '.join([*_KEYS, 'network'])})"
                )
        return cls(**kwargs)

    @classmethod
    def load(cls, path: Path) -> ClusterSpec:
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise TopologyError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(data)
        except TypeError as err:
            raise TopologyError(f"{path}: {err}") from err


def node_object(node: NodeSpec, address: str, kubelet_port: int) -> dict[str, Any]:
    """The Node a kubelet would register for this machine (conditions are the agent's).

    InternalDNS "localhost" is where the API server reaches the agent's kubelet endpoint (the
    control plane prefers it: the InternalIP lives in a namespace the host cannot route to).
    """
    capacity = node.capacity()
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": node.labels()},
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": address},
                {"type": "InternalDNS", "address": "localhost"},
                {"type": "Hostname", "address": node.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "osImage": "ddl-operator local node",
                "kubeletVersion": "ddl-nodeagent",
                "containerRuntimeVersion": "local://",
                "kernelVersion": os.uname().release,
                "machineID": node.name,
                "systemUUID": node.name,
                "bootID": "",
            },
        },
    }
