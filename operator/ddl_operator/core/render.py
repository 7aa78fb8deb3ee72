"""Renders the children of a DDLJob: gated worker pods and the headless Service."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.affinity import requires

LABEL_SLOT: Final = f"{c.GROUP}/slot"
METRICS_PORT: Final = 9400


def pod_name(job: str, slot: int) -> str:
    """Deterministic worker pod name: creating it twice is a 409, never a duplicate."""
    return f"{job}-worker-{slot}"


def selector(job: str) -> str:
    """Label selector of a job's workers (status.selector, for the scale subresource)."""
    return f"{c.LABEL_JOB}={job},{c.LABEL_ROLE}=worker"


def owner_reference(job: DDLJob) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def worker_env(job: DDLJob) -> list[dict[str, Any]]:
    """The agent's contract: who it is, where the job is, and how to train."""
    spec = job.spec
    plain = {
        "DDL_JOB_NAME": job.metadata.name,
        "DDL_PROCS_PER_WORKER": str(spec.procs_per_worker),
        "DDL_CHECKPOINT_DIR": spec.checkpoint.directory(job.metadata.namespace, job.metadata.name),
        "DDL_CHECKPOINT_EVERY": str(spec.checkpoint.every_steps),
        "DDL_CHECKPOINT_KEEP": str(spec.checkpoint.keep),
        "DDL_ALLREDUCE_ALGORITHM": spec.allreduce.algorithm,
        "DDL_COMPRESSION": spec.allreduce.compression,
        "DDL_BUCKET_MB": str(spec.allreduce.bucket_mb),
        "DDL_METRICS_PORT": str(METRICS_PORT),
        "DDL_RENDEZVOUS_TIMEOUT": str(
            spec.elastic.rendezvous_timeout_seconds if spec.elastic else 300
        ),
    }
    return [
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_IP", "status.podIP"),
        _field_env("NODE_NAME", "spec.nodeName"),
        *({"name": k, "value": v} for k, v in plain.items()),
    ]


def worker_pod(job: DDLJob, slot: int, service_account: str | None = None) -> dict[str, Any]:
    """A worker pod, gated: it holds nothing until the whole gang is placed (when that is
    decided in the same pass, the placement is merged in before it is created)."""
    name = job.metadata.name
    template = copy.deepcopy(job.spec.template)
    meta = template.get("metadata") or {}
    spec: dict[str, Any] = template.get("spec") or {}
    labels = {
        **_users(meta.get("labels")),
        c.LABEL_JOB: name,
        c.LABEL_ROLE: "worker",
        LABEL_SLOT: str(slot),
    }
    spec["schedulingGates"] = [
        *(g for g in spec.get("schedulingGates", []) if g.get("name") != c.SCHEDULING_GATE),
        {"name": c.SCHEDULING_GATE},
    ]
    # The operator owns restarts (failurePolicy), so a failed worker stays failed for it to see.
    spec["restartPolicy"] = "Never"
    spec.setdefault("hostname", pod_name(name, slot))
    spec.setdefault("subdomain", name)
    if service_account and not spec.get("serviceAccountName"):
        spec["serviceAccountName"] = service_account
    containers = spec["containers"]
    main = containers[0]
    own = {e["name"] for e in main.get("env", [])}
    main["env"] = [*main.get("env", []), *(e for e in worker_env(job) if e["name"] not in own)]
    if not any(p.get("name") == "metrics" for p in main.get("ports", [])):
        main["ports"] = [
            *main.get("ports", []),
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ]
    _mount_shared_memory(spec, main)
    if job.spec.gpus_per_worker:
        resources = main.setdefault("resources", {})
        gpus = str(job.spec.gpus_per_worker)
        resources.setdefault("limits", {})[c.GPU_RESOURCE] = gpus
        resources.setdefault("requests", {})[c.GPU_RESOURCE] = gpus
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, slot),
            "namespace": job.metadata.namespace,
            "labels": labels,
            "annotations": _users(meta.get("annotations")),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": spec,
    }


def operator_key(key: str) -> bool:
    """Whether a label or annotation key is under the operator's prefix (its own to set)."""
    prefix, slash, _ = key.partition("/")
    return bool(slash) and (prefix == c.GROUP or prefix.endswith("." + c.GROUP))


def _users(values: object) -> dict[str, Any]:
    """The template's labels or annotations minus keys under the operator's prefix.

    Only the operator sets those on its children: a copied node or report annotation would
    make a new worker look placed, or reporting a failure, before it ever ran.
    """
    if not isinstance(values, Mapping):
        return {}
    return {k: v for k, v in values.items() if not (isinstance(k, str) and operator_key(k))}


SHM_VOLUME: Final = "ddl-shm"


def _mount_shared_memory(spec: dict[str, Any], main: dict[str, Any]) -> None:
    """A memory-backed /dev/shm for the worker, unless the template mounts its own.

    The ranks of one worker exchange the intra-node tier through shared memory, and data
    loader workers pass batches the same way; a container runtime's default /dev/shm is
    64 MiB. Memory-backed emptyDir pages count against the container's memory limit.
    """
    if any(m.get("mountPath") == "/dev/shm" for m in main.get("volumeMounts", [])):
        return
    spec["volumes"] = [
        *spec.get("volumes", []),
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
    ]
    main["volumeMounts"] = [
        *main.get("volumeMounts", []),
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
    ]


ANNOTATION_NODE: Final = f"{c.GROUP}/node"
# When placement pinned the pod: a pod the scheduler does not bind in time is re-placed.
ANNOTATION_PLACED_AT: Final = f"{c.GROUP}/placed-at"


def placement_patch(
    node: str,
    gates: Sequence[Mapping[str, Any]],
    placed_at: str,
    *,
    terms: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """A JSON merge patch pinning a gated pod to its node and lifting our gate.

    The pin is a required node affinity on the node's name (`metadata.name`), ANDed into
    each of the pod's own `terms`: a gated pod accepts such additions, so the stock
    kube-scheduler binds it with correct resource accounting while our placement decides
    the node. On the name, not the hostname label, as the DaemonSet controller pins its
    pods: kube-scheduler then checks that one node instead of filtering every node of the
    cluster for the label (its cost per pod grew with the cluster), and a node whose
    hostname label differs from its name still gets its workers. Other gates stay. An empty
    term matches no node and takes no additions, so it stays as it is.
    """
    pin = {"key": "metadata.name", "operator": "In", "values": [node]}
    pinned = [
        {**t, "matchFields": [*(t.get("matchFields") or []), pin]} if requires(t) else dict(t)
        for t in terms
    ]
    return {
        "metadata": {"annotations": {ANNOTATION_NODE: node, ANNOTATION_PLACED_AT: placed_at}},
        "spec": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": pinned or [{"matchFields": [pin]}]
                    }
                }
            },
            "schedulingGates": [g for g in gates if g.get("name") != c.SCHEDULING_GATE],
        },
    }


def pinned_creates(
    create: Sequence[Mapping[str, Any]], place: Sequence[tuple[str, Mapping[str, Any]]]
) -> tuple[list[dict[str, Any]], list[tuple[str, Mapping[str, Any]]]]:
    """The pods to create with their placement patches merged in (a pod placed in the pass
    that creates it is created pinned and ungated), and the patches left for existing pods."""
    patches = dict(place)
    created = [merge_patch(m, patches.pop(m["metadata"]["name"], {})) for m in create]
    return created, [(name, patch) for name, patch in place if name in patches]


def merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`target` with a JSON merge patch applied (RFC 7386, as the API server applies it):
    maps merge, null removes a key, anything else replaces."""
    merged = copy.deepcopy(dict(target))
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            inner = merged.get(key)
            merged[key] = merge_patch(inner if isinstance(inner, Mapping) else {}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def headless_service(job: DDLJob) -> dict[str, Any]:
    """Stable DNS names for workers ({pod}.{job}) and one scrape target list."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": {c.LABEL_JOB: name},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {c.LABEL_JOB: name, c.LABEL_ROLE: "worker"},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}],
        },
    }
