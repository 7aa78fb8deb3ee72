"""Test builders: DDLJob manifests as Python dicts, without YAML blobs."""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.affinity import required_terms
from ddl_operator.core.reconcile import Plan, WorkerPod, reconcile
from ddl_operator.core.render import (
    ANNOTATION_NODE,
    ANNOTATION_PLACED_AT,
    LABEL_SLOT,
)
from ddl_operator.core.topology import NodeInfo


def make_template(
    image: str = "ddl-worker:dev", command: list[str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "trainer"}},
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    "command": command or ["python", "-m", "ddl_worker", "agent"],
                }
            ]
        },
    }


def make_ddljob(
    name: str = "job",
    replicas: int = 2,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    gpus: int = 0,
    namespace: str | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A valid DDLJob; keyword arguments override top-level spec fields."""
    body: dict[str, Any] = {
        "replicas": replicas,
        "gpusPerWorker": gpus,
        "template": make_template(),
    }
    if min_replicas is not None or max_replicas is not None:
        body["elastic"] = {
            "minReplicas": min_replicas if min_replicas is not None else 1,
            "maxReplicas": max_replicas if max_replicas is not None else replicas,
        }
    body.update(copy.deepcopy(spec))
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": metadata, "spec": body}


def set_path(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Returns a copy with a dotted path set (a value of DELETE removes the key)."""
    out = copy.deepcopy(obj)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
    last = keys[-1]
    if value is DELETE:
        node.pop(last, None)
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return out


DELETE: Any = object()


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def rack_nodes(racks: int = 2, per_rack: int = 2, gpus: int = 8) -> list[NodeInfo]:
    return [
        NodeInfo(
            name=f"r{r}-n{n}",
            labels={
                c.LABEL_HOSTNAME: f"r{r}-n{n}",
                c.LABEL_RACK: f"rack-{r}",
                c.LABEL_ZONE: "zone-a",
            },
            allocatable=gpus,
            used=0,
        )
        for r in range(racks)
        for n in range(per_rack)
    ]


class Cluster:
    """Applies plans the way the API server and kube-scheduler would, minus the network."""

    def __init__(self, job: dict[str, Any], nodes: list[NodeInfo]) -> None:
        self.job = DDLJob.model_validate(
            {**job, "metadata": {"name": job["metadata"]["name"], "uid": "u-1", "generation": 1}}
        )
        self.base_nodes = nodes
        self.pods: dict[str, WorkerPod] = {}
        self.now = T0
        self.ips = 0

    def nodes(self) -> list[NodeInfo]:
        gpus = self.job.spec.gpus_per_worker
        used: dict[str, int] = {}
        for p in self.pods.values():
            if p.placed_on and p.phase in ("Pending", "Running"):
                used[p.placed_on] = used.get(p.placed_on, 0) + gpus
        return [replace(n, used=n.used + used.get(n.name, 0)) for n in self.base_nodes]

    def step(self, seconds: float = 1.0) -> Plan:
        self.now += dt.timedelta(seconds=seconds)
        plan = reconcile(self.job, list(self.pods.values()), self.nodes(), self.now)
        for name in plan.delete:
            self.pods.pop(name, None)
        for manifest in plan.create:
            name = manifest["metadata"]["name"]
            assert name not in self.pods, f"duplicate pod {name}"
            gates = tuple(manifest["spec"]["schedulingGates"])
            slot = int(manifest["metadata"]["labels"][LABEL_SLOT])
            annotations = manifest["metadata"].get("annotations") or {}
            self.pods[name] = WorkerPod(
                name=name,
                slot=slot,
                gates=gates,
                assigned=annotations.get(ANNOTATION_NODE),
                report=annotations.get(c.ANNOTATION_REPORT),
            )
        for name, patch in plan.place:
            node = pinned_node(patch)
            assert node is not None, patch
            self.pods[name] = replace(
                self.pods[name],
                assigned=node,
                gates=tuple(patch["spec"]["schedulingGates"]),
                placed_at=patch["metadata"]["annotations"].get(ANNOTATION_PLACED_AT),
            )
        self.job = self.job.model_copy(update={"status": plan.status})
        return plan

    def run_bound(self) -> None:
        """The scheduler binds placed pods and the kubelet starts them."""
        for name, p in list(self.pods.items()):
            if p.assigned and p.phase == "Pending":
                self.ips += 1
                self.pods[name] = replace(
                    p, node=p.assigned, phase="Running", ip=f"10.0.0.{self.ips}"
                )

    def settle(self, passes: int = 6) -> Plan:
        plan = self.step()
        for _ in range(passes):
            self.run_bound()
            plan = self.step()
        return plan

    def members(self) -> list[str]:
        rdzv = self.job.status.rendezvous
        return [m.pod for m in rdzv.members] if rdzv else []


def cond(cluster: Cluster, type_: str) -> tuple[str, str]:
    found = next(x for x in cluster.job.status.conditions if x.type == type_)
    return found.status, found.message


def pinned_node(manifest: Mapping[str, Any]) -> str | None:
    """The node a pod or placement patch is pinned to (render.placement_patch's pin on
    metadata.name, in every required node-affinity term), if any."""
    nodes = set()
    for term in required_terms(manifest.get("spec") or {}):
        pins = [
            f["values"]
            for f in term.get("matchFields") or []
            if f.get("key") == "metadata.name" and f.get("operator") == "In"
        ]
        if len(pins) != 1 or len(pins[0]) != 1:
            return None
        nodes.add(pins[0][0])
    return str(nodes.pop()) if len(nodes) == 1 else None
