"""What the state machine sees of a worker pod, read from its manifest as the API serves it.

Pure, and on plain JSON: a pass lists its pods without turning them into client models
(which costs milliseconds per pod, under the GIL, on every pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ddl_operator.api import constants as c
from ddl_operator.core.affinity import required_terms
from ddl_operator.core.reconcile import WorkerPod
from ddl_operator.core.render import ANNOTATION_NODE, ANNOTATION_PLACED_AT, LABEL_SLOT


def worker_view(pod: Mapping[str, Any]) -> WorkerPod:
    """The state machine's view of a worker pod."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    name = str(meta.get("name", ""))
    return WorkerPod(
        name=name,
        slot=slot(name, (meta.get("labels") or {}).get(LABEL_SLOT)),
        phase=status.get("phase") or "Pending",
        node=spec.get("nodeName") or None,
        assigned=annotations.get(ANNOTATION_NODE),
        placed_at=annotations.get(ANNOTATION_PLACED_AT),
        unscheduled=_unscheduled(status),
        gates=tuple({"name": g.get("name")} for g in spec.get("schedulingGates") or []),
        node_terms=required_terms(spec),
        deleting=meta.get("deletionTimestamp") is not None,
        ip=status.get("podIP") or None,
        exit_code=_exit_code(status),
        # Untrusted: the core parses it (core/reports.py) and ignores what it must.
        report=annotations.get(c.ANNOTATION_REPORT),
    )


def slot(name: str, label: str | None) -> int:
    """A worker's slot: its label, else the number its name ends with (labels are writable,
    names are not); -1 when neither reads as one."""
    for text in (label or "", name.rpartition("-")[2]):
        if text.isdecimal() and text.isascii() and len(text) <= 9:
            return int(text)
    return -1


def owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    """Whether the object with `uid` is among the pod's owners."""
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(ref, Mapping) and ref.get("uid") == uid for ref in refs)


def _unscheduled(status: Mapping[str, Any]) -> str:
    """The scheduler's word on why the pod is not bound (its PodScheduled=False message)."""
    for cond in status.get("conditions") or []:
        if (
            isinstance(cond, Mapping)
            and cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
        ):
            return str(cond.get("message") or cond.get("reason") or "")[:300]
    return ""


def _exit_code(status: Mapping[str, Any]) -> int | None:
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            code = terminated.get("exitCode")
            return code if isinstance(code, int) else None
    return None
