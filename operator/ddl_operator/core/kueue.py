"""Kueue for a queued DDLJob: the Workload it owns, what Kueue wrote back, and the status
writes an owner makes (pure).

A DDLJob labelled `kueue.x-k8s.io/queue-name` is admitted by Kueue (kueue.x-k8s.io/v1beta2,
Kueue v0.17) the way Kueue's own job integrations are: the operator creates one Workload with
one pod set ("workers": count = replicas, minCount = the elastic minimum, so Kueue may admit
fewer), waits until Kueue admits it, then places the admitted count of workers on nodes that
carry the admitted ResourceFlavor's node labels and tolerate what it tolerates. When Kueue
evicts the Workload (preemption, a stopped queue), the operator stops the job and, once no
worker runs, clears the admission so Kueue can queue the Workload again; when the job ends it
marks the Workload Finished.

Kueue's webhooks may be absent, so the Workload built here is complete: every request Kueue
counts is spelled out (limits stand in for missing requests, as the API server will default the
pods), and nothing relies on defaulting. Everything read from the API is checked; a shape Kueue's
API cannot produce raises WorkloadShapeError naming the field.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ddl_operator.api import constants as c
from ddl_operator.api.models import Condition as JobCondition
from ddl_operator.api.models import DDLJob, DDLJobStatus
from ddl_operator.core.render import LABEL_SLOT, owner_reference, pod_name, worker_pod

GROUP: Final = "kueue.x-k8s.io"
API_VERSION: Final = f"{GROUP}/v1beta2"
KIND: Final = "Workload"
LABEL_QUEUE_NAME: Final = f"{GROUP}/queue-name"
LABEL_JOB_UID: Final = f"{GROUP}/job-uid"
POD_SET: Final = "workers"

# Workload condition types (apis/kueue/v1beta2/workload_types.go).
QUOTA_RESERVED: Final = "QuotaReserved"
ADMITTED: Final = "Admitted"
EVICTED: Final = "Evicted"
PREEMPTED: Final = "Preempted"
REQUEUED: Final = "Requeued"
FINISHED: Final = "Finished"
PODS_READY: Final = "PodsReady"
# Eviction reasons after which Kueue's integrations mark the Workload Requeued=True.
REQUEUE_REASONS: Final = ("Preempted", "NodeFailures")
# The field manager Kueue writes admission with; clearing it must apply as the same manager
# (server-side apply removes only fields the applier owns).
ADMISSION_FIELD_MANAGER: Final = "kueue-admission"
# Conditions Kueue carries in every admission write (pkg/workload admissionManagedConditions).
ADMISSION_CONDITIONS: Final = (
    QUOTA_RESERVED,
    "BlockedOnPreemptionGates",
    EVICTED,
    ADMITTED,
    PREEMPTED,
    REQUEUED,
    "DeactivationTarget",
    FINISHED,
)
# Status fields Kueue's admission writes carry besides admission and the conditions.
_ADMISSION_STATUS_FIELDS: Final = (
    "requeueState",
    "accumulatedPastExecutionTimeSeconds",
    "schedulingStats",
    "clusterName",
    "nominatedClusterNames",
    "unhealthyNodes",
    "preemptionGates",
    "resourceRequests",
    "admissionChecks",
)

_DNS_SUBDOMAIN: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS_SUBDOMAIN_MAX: Final = 253
_NAME_HASH: Final = 5
_TOLERATION_OPERATORS: Final = ("Exists", "Equal")
_TAINT_EFFECTS: Final = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
_CONDITION_STATUSES: Final = ("True", "False", "Unknown")


class WorkloadShapeError(ValueError):
    """An object read from the API does not have the shape Kueue's API gives it (or a job's
    queue label is unusable); the message names the field."""


# -- the Workload -------------------------------------------------------------------------------


def queue_name(job: DDLJob) -> str | None:
    """The LocalQueue a job asks for (its kueue.x-k8s.io/queue-name label), None without one."""
    # Labels are not a typed field of ObjectMeta (extra="allow" keeps them as an attribute).
    labels = getattr(job.metadata, "labels", None) or {}
    if not isinstance(labels, Mapping):
        raise WorkloadShapeError("metadata.labels: must be an object")
    value = labels.get(LABEL_QUEUE_NAME)
    if value is None:
        return None
    if not (
        isinstance(value, str)
        and len(value) <= _DNS_SUBDOMAIN_MAX
        and _DNS_SUBDOMAIN.fullmatch(value)
    ):
        raise WorkloadShapeError(
            f"metadata.labels[{LABEL_QUEUE_NAME}]: {value!r} is not a LocalQueue name "
            "(a DNS subdomain: lower-case letters, digits, '-' and '.')"
        )
    return value


def workload_name(job: DDLJob) -> str:
    """Deterministic Workload name: `ddljob-NAME-HASH`, the hash of the job's name and uid, so a
    re-created job of the same name never adopts an old job's Workload."""
    digest = hashlib.sha256(f"{job.metadata.name}/{job.metadata.uid}".encode()).hexdigest()
    prefix = f"ddljob-{job.metadata.name}"[: _DNS_SUBDOMAIN_MAX - _NAME_HASH - 1].rstrip("-.")
    return f"{prefix}-{digest[:_NAME_HASH]}"


@dataclass(frozen=True)
class Priority:
    """A resolved priority: the value Kueue orders and preempts by, and the class it came from
    (a scheduling.k8s.io PriorityClass or a kueue.x-k8s.io WorkloadPriorityClass)."""

    value: int
    class_name: str | None = None
    workload_priority_class: bool = False

    def __post_init__(self) -> None:
        if not -(2**31) <= self.value < 2**31:
            raise WorkloadShapeError(f"priority {self.value} does not fit an int32")

    def ref(self) -> dict[str, str] | None:
        if self.class_name is None:
            return None
        if self.workload_priority_class:
            return {"group": GROUP, "kind": "WorkloadPriorityClass", "name": self.class_name}
        return {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": self.class_name}


def pod_set_template(job: DDLJob) -> dict[str, Any]:
    """The pod template Kueue counts: a worker as render.py makes it, without what belongs to
    one slot (name, hostname, slot label) or to the operator's placement (its scheduling gate),
    with every container's limits standing in for its missing requests."""
    pod = worker_pod(job, 0)
    meta = pod["metadata"]
    spec = pod["spec"]
    if spec.get("hostname") == pod_name(job.metadata.name, 0):
        del spec["hostname"]
    gates = [g for g in spec.get("schedulingGates", []) if g.get("name") != c.SCHEDULING_GATE]
    if gates:
        spec["schedulingGates"] = gates
    else:
        spec.pop("schedulingGates", None)
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind) or []:
            _requests_from_limits(container)
    labels = {k: v for k, v in meta["labels"].items() if k != LABEL_SLOT}
    out_meta: dict[str, Any] = {"labels": labels}
    if meta.get("annotations"):
        out_meta["annotations"] = meta["annotations"]
    return {"metadata": out_meta, "spec": spec}


def _requests_from_limits(container: dict[str, Any]) -> None:
    resources = container.get("resources")
    if not isinstance(resources, dict) or not resources.get("limits"):
        return
    resources["requests"] = {**resources["limits"], **(resources.get("requests") or {})}


def workload(job: DDLJob, queue: str, priority: Priority | None = None) -> dict[str, Any]:
    """The Workload a queued job owns (controller ownerReference, so it goes with the job)."""
    spec = job.spec
    pod_set: dict[str, Any] = {
        "name": POD_SET,
        "count": spec.replicas,
        "template": pod_set_template(job),
    }
    if spec.elastic is not None and spec.elastic.min_replicas < spec.replicas:
        pod_set["minCount"] = spec.elastic.min_replicas
    body: dict[str, Any] = {"queueName": queue, "podSets": [pod_set], "active": True}
    if priority is not None:
        body["priority"] = priority.value
        if (ref := priority.ref()) is not None:
            body["priorityClassRef"] = ref
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": workload_name(job),
            "namespace": job.metadata.namespace,
            "labels": {
                c.LABEL_JOB: job.metadata.name,
                LABEL_QUEUE_NAME: queue,
                **({LABEL_JOB_UID: job.metadata.uid} if job.metadata.uid else {}),
            },
            "ownerReferences": [owner_reference(job)],
        },
        "spec": body,
    }


# -- reading a Workload -------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str

    @property
    def true(self) -> bool:
        return self.status == "True"


@dataclass(frozen=True)
class Admission:
    """What Kueue reserved for the workers' pod set."""

    cluster_queue: str
    count: int
    # resource name -> ResourceFlavor name
    flavors: Mapping[str, str] = field(default_factory=dict)

    @property
    def flavor_names(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.flavors.values())))

    @property
    def flavor(self) -> str | None:
        """The flavor the GPUs come from; else the only flavor assigned; None if none is."""
        if c.GPU_RESOURCE in self.flavors:
            return self.flavors[c.GPU_RESOURCE]
        names = self.flavor_names
        return names[0] if len(names) == 1 else None


@dataclass(frozen=True)
class PodSetUpdate:
    """What admission checks add to the workers (status.admissionChecks[].podSetUpdates)."""

    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class WorkloadStatus:
    """A Workload's status as the owner acts on it."""

    name: str
    conditions: Mapping[str, Condition]
    admission: Admission | None
    updates: PodSetUpdate = field(default_factory=PodSetUpdate)

    def _true(self, kind: str) -> bool:
        cond = self.conditions.get(kind)
        return cond is not None and cond.true

    @property
    def quota_reserved(self) -> bool:
        return self._true(QUOTA_RESERVED) and self.admission is not None

    @property
    def admitted(self) -> bool:
        """Admitted: quota reserved and every admission check ready; the job may run."""
        return self._true(ADMITTED) and self.quota_reserved

    @property
    def evicted(self) -> Condition | None:
        """The Evicted condition while it is True: the job must stop, then clear admission."""
        cond = self.conditions.get(EVICTED)
        return cond if cond is not None and cond.true else None

    @property
    def preempted(self) -> Condition | None:
        cond = self.conditions.get(PREEMPTED)
        return cond if cond is not None and cond.true else None

    @property
    def finished(self) -> bool:
        return self._true(FINISHED)

    @property
    def may_run(self) -> bool:
        """Workers may run (and be placed): admitted, neither evicted nor finished."""
        return self.admitted and self.evicted is None and not self.finished

    @property
    def admitted_count(self) -> int:
        """Workers Kueue admitted (0 unless the job may run)."""
        return self.admission.count if self.may_run and self.admission else 0

    def waiting_for(self) -> str:
        """Why the job does not run yet, in words for its condition (empty when it may run)."""
        if self.finished:
            return "the Workload is finished"
        if (ev := self.evicted) is not None:
            return f"evicted by Kueue ({ev.reason}): {ev.message}"
        if self.may_run:
            return ""
        if self.quota_reserved:
            cond = self.conditions.get(ADMITTED)
            detail = f": {cond.message}" if cond is not None and cond.message else ""
            return f"quota reserved, waiting for admission checks{detail}"
        cond = self.conditions.get(QUOTA_RESERVED)
        if cond is not None and cond.message:
            return f"waiting for Kueue quota ({cond.reason}): {cond.message}"
        return f"waiting for Kueue to consider Workload {self.name}"


def workload_status(obj: Mapping[str, Any]) -> WorkloadStatus:
    """Reads a Workload (as the API returns it) strictly."""
    if not isinstance(obj, Mapping):
        raise WorkloadShapeError(f"Workload: must be an object, not {_kind(obj)}")
    meta = _obj(obj, "metadata", "metadata")
    name = _str(meta, "name", "metadata.name")
    spec = _obj(obj, "spec", "spec")
    count = _pod_set_count(spec)
    status = _obj(obj, "status", "status", required=False)
    conditions = _conditions(status, "status.conditions")
    admission = None
    raw = status.get("admission")
    if raw is not None:
        admission = _admission(raw, count, "status.admission")
    return WorkloadStatus(
        name=name,
        conditions=conditions,
        admission=admission,
        updates=_pod_set_updates(status, "status.admissionChecks"),
    )


def _pod_set_count(spec: Mapping[str, Any]) -> int:
    pod_sets = _list(spec, "podSets", "spec.podSets")
    for i, item in enumerate(pod_sets):
        where = f"spec.podSets[{i}]"
        ps = _as_obj(item, where)
        if ps.get("name", "main") == POD_SET:
            return _int(ps, "count", f"{where}.count", minimum=0)
    raise WorkloadShapeError(f"spec.podSets: has no pod set named {POD_SET!r}")


def _admission(raw: object, spec_count: int, where: str) -> Admission:
    adm = _as_obj(raw, where)
    cluster_queue = _str(adm, "clusterQueue", f"{where}.clusterQueue")
    assignments = _list(adm, "podSetAssignments", f"{where}.podSetAssignments")
    for i, item in enumerate(assignments):
        at = f"{where}.podSetAssignments[{i}]"
        psa = _as_obj(item, at)
        if _str(psa, "name", f"{at}.name") != POD_SET:
            continue
        count = spec_count
        if psa.get("count") is not None:
            count = _int(psa, "count", f"{at}.count", minimum=0)
            if count > spec_count:
                raise WorkloadShapeError(
                    f"{at}.count: {count} is more than the pod set's count {spec_count}"
                )
        flavors = _str_map(psa, "flavors", f"{at}.flavors")
        return Admission(cluster_queue, count, flavors)
    raise WorkloadShapeError(f"{where}.podSetAssignments: has no assignment for {POD_SET!r}")


def _conditions(status: Mapping[str, Any], where: str) -> dict[str, Condition]:
    out: dict[str, Condition] = {}
    for i, item in enumerate(_list(status, "conditions", where, required=False)):
        at = f"{where}[{i}]"
        cond = _as_obj(item, at)
        kind = _str(cond, "type", f"{at}.type")
        value = _str(cond, "status", f"{at}.status")
        if value not in _CONDITION_STATUSES:
            raise WorkloadShapeError(f"{at}.status: {value!r} is not True, False or Unknown")
        if kind in out:
            raise WorkloadShapeError(f"{at}.type: {kind!r} appears twice")
        out[kind] = Condition(
            type=kind,
            status=value,
            reason=_str(cond, "reason", f"{at}.reason", required=False),
            message=_str(cond, "message", f"{at}.message", required=False),
            last_transition_time=_str(
                cond, "lastTransitionTime", f"{at}.lastTransitionTime", required=False
            ),
        )
    return out


def _pod_set_updates(status: Mapping[str, Any], where: str) -> PodSetUpdate:
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    selector: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    for i, item in enumerate(_list(status, "admissionChecks", where, required=False)):
        at = f"{where}[{i}]"
        check = _as_obj(item, at)
        for j, raw in enumerate(_list(check, "podSetUpdates", f"{at}.podSetUpdates", False)):
            up_at = f"{at}.podSetUpdates[{j}]"
            update = _as_obj(raw, up_at)
            if _str(update, "name", f"{up_at}.name") != POD_SET:
                continue
            labels.update(_str_map(update, "labels", f"{up_at}.labels"))
            annotations.update(_str_map(update, "annotations", f"{up_at}.annotations"))
            _merge_labels(
                selector, _str_map(update, "nodeSelector", f"{up_at}.nodeSelector"), up_at
            )
            tolerations.extend(_tolerations(update, f"{up_at}.tolerations"))
    return PodSetUpdate(labels, annotations, selector, _unique(tolerations))


# -- placement inside the admitted flavor -------------------------------------------------------


@dataclass(frozen=True)
class FlavorPlacement:
    """Where admitted workers may go: nodes with all of `node_labels`, and the `tolerations`
    the workers get (with the template's own), as Kueue's integrations inject them."""

    flavors: tuple[str, ...]
    node_labels: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]

    def node_selector(self, template_selector: Mapping[str, str] | None) -> dict[str, str]:
        """The template's nodeSelector narrowed to the flavor; a key both set differently
        matches no node, which is an error (Kueue refuses such a job at admission too)."""
        out = dict(template_selector or {})
        _merge_labels(out, self.node_labels, "the template's nodeSelector")
        return out

    def all_tolerations(
        self, template_tolerations: Sequence[Mapping[str, Any]] | None
    ) -> list[Mapping[str, Any]]:
        return list(_unique([*(template_tolerations or []), *self.tolerations]))


def resource_flavor(obj: Mapping[str, Any]) -> tuple[str, dict[str, str], list[dict[str, Any]]]:
    """A ResourceFlavor's name, node labels and tolerations, read strictly."""
    if not isinstance(obj, Mapping):
        raise WorkloadShapeError(f"ResourceFlavor: must be an object, not {_kind(obj)}")
    name = _str(_obj(obj, "metadata", "metadata"), "name", "metadata.name")
    where = f"ResourceFlavor {name}: spec"
    spec = _obj(obj, "spec", where, required=False)
    return (
        name,
        _str_map(spec, "nodeLabels", f"{where}.nodeLabels"),
        _tolerations(spec, f"{where}.tolerations"),
    )


def flavor_placement(
    status: WorkloadStatus, flavors: Iterable[Mapping[str, Any]]
) -> FlavorPlacement:
    """Node labels and tolerations for the admitted workers: the union over the flavors
    assigned to the pod set (one per resource) plus what admission checks added.

    `flavors` are ResourceFlavor objects (all or some of the cluster's); a flavor the
    admission names but `flavors` lacks raises (not in the cache yet: retry later)."""
    if status.admission is None:
        raise WorkloadShapeError(f"Workload {status.name} has no admission to place")
    known: dict[str, tuple[dict[str, str], list[dict[str, Any]]]] = {}
    for obj in flavors:
        name, flavor_labels, flavor_tolerations = resource_flavor(obj)
        known[name] = (flavor_labels, flavor_tolerations)
    node_labels: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    for name in status.admission.flavor_names:
        if name not in known:
            raise WorkloadShapeError(
                f"Workload {status.name} is admitted on ResourceFlavor {name!r}, "
                "which is not among the flavors read"
            )
        labels, tols = known[name]
        _merge_labels(node_labels, labels, f"ResourceFlavor {name}")
        tolerations.extend(tols)
    _merge_labels(node_labels, status.updates.node_selector, "an admission check's update")
    tolerations.extend(status.updates.tolerations)
    return FlavorPlacement(status.admission.flavor_names, node_labels, _unique(tolerations))


def _merge_labels(into: dict[str, str], more: Mapping[str, str], what: str) -> None:
    for key, value in more.items():
        if into.get(key, value) != value:
            raise WorkloadShapeError(
                f"{what} asks for node label {key}={value} where {key}={into[key]} is "
                "already required: no node can have both"
            )
        into[key] = value


def _tolerations(parent: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(_list(parent, "tolerations", where, required=False)):
        at = f"{where}[{i}]"
        tol = _as_obj(item, at)
        unknown = set(tol) - {"key", "operator", "value", "effect", "tolerationSeconds"}
        if unknown:
            raise WorkloadShapeError(f"{at}: unknown fields {sorted(unknown)}")
        operator = _str(tol, "operator", f"{at}.operator", required=False) or "Equal"
        if operator not in _TOLERATION_OPERATORS:
            raise WorkloadShapeError(f"{at}.operator: {operator!r} is not Exists or Equal")
        effect = _str(tol, "effect", f"{at}.effect", required=False)
        if effect not in _TAINT_EFFECTS:
            raise WorkloadShapeError(f"{at}.effect: {effect!r} is not a taint effect")
        clean: dict[str, Any] = {"operator": operator}
        if key := _str(tol, "key", f"{at}.key", required=False):
            clean["key"] = key
        if value := _str(tol, "value", f"{at}.value", required=False):
            if operator == "Exists":
                raise WorkloadShapeError(f"{at}.value: must be empty with operator Exists")
            clean["value"] = value
        if effect:
            clean["effect"] = effect
        if tol.get("tolerationSeconds") is not None:
            clean["tolerationSeconds"] = _int(tol, "tolerationSeconds", f"{at}.tolerationSeconds")
        out.append(clean)
    return out


def _unique(items: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    out: list[Mapping[str, Any]] = []
    for item in items:
        if item not in out:
            out.append(item)
    return tuple(out)


# -- what the owner writes ----------------------------------------------------------------------


def condition(
    kind: str, status: bool, reason: str, message: str, now: dt.datetime
) -> dict[str, Any]:
    """A metav1.Condition as Kueue's CRD requires it (all five fields)."""
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": _timestamp(now),
    }


def _status_apply(
    obj: Mapping[str, Any], status: dict[str, Any], strict: bool = False
) -> dict[str, Any]:
    """A status apply body for `obj` (its uid, and with `strict` its resourceVersion, make the
    write conditional: a Workload that changed meanwhile answers 409 and is read again)."""
    meta = obj.get("metadata") or {}
    out_meta = {"name": meta.get("name"), "namespace": meta.get("namespace")}
    if meta.get("uid"):
        out_meta["uid"] = meta["uid"]
    if strict and meta.get("resourceVersion"):
        out_meta["resourceVersion"] = meta["resourceVersion"]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": out_meta, "status": status}


def pods_ready_apply(
    obj: Mapping[str, Any], ready: bool, message: str, now: dt.datetime
) -> dict[str, Any]:
    """Server-side apply body (status subresource, the operator's own field manager, e.g.
    `ddl-operator-PodsReady`) that sets PodsReady: True once the admitted workers all run."""
    reason = "PodsReady" if ready else "Pending"
    existing = _existing(obj, PODS_READY)
    cond = condition(PODS_READY, ready, reason, message, now)
    if existing is not None and existing.get("status") == cond["status"]:
        cond["lastTransitionTime"] = existing.get("lastTransitionTime", cond["lastTransitionTime"])
    return _status_apply(obj, {"conditions": [cond]})


def finished_apply(
    obj: Mapping[str, Any], succeeded: bool, message: str, now: dt.datetime
) -> dict[str, Any]:
    """Server-side apply body (status subresource, the operator's own field manager, e.g.
    `ddl-operator-Finished`) that marks the Workload Finished; Kueue then releases its quota."""
    reason = "Succeeded" if succeeded else "Failed"
    return _status_apply(obj, {"conditions": [condition(FINISHED, True, reason, message, now)]})


def clear_admission_apply(obj: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """Server-side apply body, to send as field manager `kueue-admission` with force, that
    clears an evicted Workload's admission once none of its workers runs any more - what
    Kueue's own integrations do (jobframework: UnsetQuotaReservationWithCondition and
    SetRequeuedCondition, written with PatchAdmissionStatus).

    The body carries every other field that manager writes, so applying it removes only the
    admission; QuotaReserved and Admitted turn False, Requeued records why. It carries the
    Workload's resourceVersion too (Kueue's own write is as strict): if Kueue changed the
    Workload meanwhile the apply answers 409 and the owner reads it again.
    """
    status = workload_status(obj)
    evicted = status.evicted
    if evicted is None:
        raise WorkloadShapeError(f"Workload {status.name} is not evicted; its admission stays")
    raw: Mapping[str, Any] = obj.get("status") or {}
    body: dict[str, Any] = {k: copy.deepcopy(raw[k]) for k in _ADMISSION_STATUS_FIELDS if k in raw}
    kept = [
        copy.deepcopy(cond)
        for cond in raw.get("conditions") or []
        if cond.get("type") in ADMISSION_CONDITIONS
        and cond.get("type") not in (QUOTA_RESERVED, ADMITTED, REQUEUED)
    ]
    requeued = condition(
        REQUEUED, evicted.reason in REQUEUE_REASONS, evicted.reason, evicted.message, now
    )
    if (old := _existing(obj, REQUEUED)) is not None and old.get("status") == requeued["status"]:
        requeued["lastTransitionTime"] = old.get(
            "lastTransitionTime", requeued["lastTransitionTime"]
        )
    conditions = [
        *kept,
        condition(QUOTA_RESERVED, False, "Pending", evicted.message, now),
        requeued,
    ]
    if ADMITTED in status.conditions:
        conditions.append(
            condition(ADMITTED, False, "NoReservation", "The workload has no reservation", now)
        )
        if status.conditions[ADMITTED].true:
            body["accumulatedPastExecutionTimeSeconds"] = int(
                raw.get("accumulatedPastExecutionTimeSeconds") or 0
            ) + _seconds_since(status.conditions[ADMITTED].last_transition_time, now)
    body["conditions"] = conditions
    return _status_apply(obj, body, strict=True)


def _existing(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond
    return None


def _timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds_since(stamp: str, now: dt.datetime) -> int:
    try:
        then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return 0
    return max(0, int((now - then).total_seconds()))


# -- the owner's part for one job --------------------------------------------------------------

# The job's condition saying what Kueue decided (reason Admitted, Pending, Evicted, Finished,
# KueueNotInstalled or InvalidQueueName; the message says what it waits for).
JOB_CONDITION: Final = "KueueAdmitted"
# What admission changed on the job (JSON: the replicas and the worker template's nodeSelector
# and tolerations as they were), so eviction can undo it - Kueue's own integrations restore
# a stopped job's pod sets the same way (jobframework RestorePodSetsInfo).
ANNOTATION_ADMISSION: Final = f"{c.GROUP}/kueue-admission"
# Field managers of the operator's Workload status writes (server-side apply, one per condition).
PODS_READY_MANAGER: Final = "ddl-operator-PodsReady"
FINISHED_MANAGER: Final = "ddl-operator-Finished"
_TERMINAL: Final = ("Succeeded", "Failed")
_HOLDING: Final = ("Pending", "Running", "Unknown")


@dataclass(frozen=True)
class Injected:
    """What the job looked like before admission changed it (ANNOTATION_ADMISSION)."""

    replicas: int
    node_selector: Mapping[str, str] | None
    tolerations: tuple[Mapping[str, Any], ...] | None

    def encode(self) -> str:
        return json.dumps(
            {
                "replicas": self.replicas,
                "nodeSelector": None if self.node_selector is None else dict(self.node_selector),
                "tolerations": None if self.tolerations is None else list(self.tolerations),
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def injected(job: DDLJob) -> Injected | None:
    """The job's record of what admission changed; None without one. Users can edit
    annotations, so a record that does not parse raises WorkloadShapeError naming it."""
    raw = job.metadata.annotations.get(ANNOTATION_ADMISSION)
    if raw is None:
        return None
    where = f"metadata.annotations[{ANNOTATION_ADMISSION}]"
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise WorkloadShapeError(f"{where}: not JSON ({err})") from None
    record = _as_obj(value, where)
    selector = (
        None if record.get("nodeSelector") is None else _str_map(record, "nodeSelector", where)
    )
    tolerations = None
    if record.get("tolerations") is not None:
        # Kept as the user wrote them (the API server checks them when they go back).
        items = _list(record, "tolerations", f"{where}.tolerations")
        tolerations = tuple(
            dict(_as_obj(t, f"{where}.tolerations[{i}]")) for i, t in enumerate(items)
        )
    return Injected(_int(record, "replicas", f"{where}.replicas", 1), selector, tolerations)


def original(job: DDLJob) -> Injected:
    """The job as its user wrote it: the record if admission changed it, else as it is."""
    if (record := injected(job)) is not None:
        return record
    spec = job.spec.template.get("spec") or {}
    tols = spec.get("tolerations")
    return Injected(
        job.spec.replicas,
        None if spec.get("nodeSelector") is None else dict(spec["nodeSelector"]),
        None if tols is None else tuple(tols),
    )


def as_written(job: DDLJob) -> DDLJob:
    """`job` with what admission changed undone: the Workload is built from this."""
    was = original(job)
    template = copy.deepcopy(job.spec.template)
    pod_spec = template.setdefault("spec", {})
    if was.node_selector is None:
        pod_spec.pop("nodeSelector", None)
    else:
        pod_spec["nodeSelector"] = dict(was.node_selector)
    if was.tolerations is None:
        pod_spec.pop("tolerations", None)
    else:
        pod_spec["tolerations"] = [dict(t) for t in was.tolerations]
    spec = job.spec.model_copy(update={"replicas": was.replicas, "template": template})
    return job.model_copy(update={"spec": spec})


@dataclass(frozen=True)
class StatusWrite:
    """A server-side apply of a Workload's status subresource. Forced, as Kueue's own
    integrations write (ForceOwnership): a condition Kueue's admission manager wrote before
    (it carries Finished and the rest in every admission write) is taken over, not refused."""

    body: dict[str, Any]
    field_manager: str
    force: bool = False


@dataclass
class OwnerStep:
    """What the operator does about a queued job's Workload in one pass (before reconcile)."""

    # The job's KueueAdmitted condition: (status, reason, message).
    condition: tuple[bool, str, str]
    create: dict[str, Any] | None = None  # the Workload to create
    delete_stale: bool = False  # the pending Workload no longer matches the job: recreate it
    writes: list[StatusWrite] = field(default_factory=list)
    # A merge patch on the job (spec.suspend, replicas, the worker template, the record). The
    # pass ends after it: the snapshot it read is stale, and the patch's event brings the next.
    job_patch: dict[str, Any] | None = None

    @property
    def holds(self) -> bool:
        """The job must hold nothing this pass (its message says why)."""
        return not self.condition[0]


def owner_step(
    job: DDLJob,
    queue: str,
    obj: Mapping[str, Any] | None,
    flavors: Iterable[Mapping[str, Any]],
    pod_phases: Iterable[str],
    priority: Priority | None,
    now: dt.datetime,
) -> OwnerStep:
    """Decides the owner's writes for a job labelled with `queue`, given its Workload as read
    (None if there is none yet), the ResourceFlavors its admission names, and the phases of
    the job's worker pods (jobframework's reconcile, for one pod set):

    - no Workload: create it; the job stays suspended until it is admitted;
    - admitted: inject the flavor's node labels and tolerations into the worker template, run
      the admitted count (partial admission lowers spec.replicas; the record keeps the old),
      unsuspend; PodsReady once the gang trains;
    - not admitted (pending, evicted, deactivated): suspend; once no worker pod is left, undo
      the injection and, if Kueue evicted it, clear the admission so it queues again;
    - the job ended: mark the Workload Finished.
    """
    terminal = job.status.phase in _TERMINAL
    if obj is None:
        if terminal:
            return OwnerStep((False, "Finished", f"the job {job.status.phase.lower()}"))
        name = workload_name(job)
        return OwnerStep(
            (False, "Pending", f"waiting for Kueue to consider Workload {name}"),
            create=workload(as_written(job), queue, priority),
            job_patch=_suspend_patch(job),
        )
    status = workload_status(obj)
    if terminal:
        step = OwnerStep((False, "Finished", f"the job {job.status.phase.lower()}"))
        if not status.finished:
            succeeded = job.status.phase == "Succeeded"
            body = finished_apply(obj, succeeded, job.status.message or job.status.phase, now)
            step.writes.append(StatusWrite(body, FINISHED_MANAGER, force=True))
        return step
    if status.may_run:
        return _admitted_step(job, obj, status, flavors, now)
    holding = any(phase in _HOLDING for phase in pod_phases)
    reason = "Evicted" if status.evicted else "Finished" if status.finished else "Pending"
    step = OwnerStep((False, reason, status.waiting_for()))
    if not job.spec.suspend:
        step.job_patch = _suspend_patch(job)
        return step
    if holding:
        return step  # reconcile is stopping the workers; the next pass goes on from here
    if injected(job) is not None:
        step.job_patch = _restore_patch(job)
    if status.evicted is not None and status.quota_reserved:
        step.writes.append(
            StatusWrite(clear_admission_apply(obj, now), ADMISSION_FIELD_MANAGER, True)
        )
    elif not status.quota_reserved and _stale(obj, as_written(job)):
        step.delete_stale = True
    return step


def hold(job: DDLJob, reason: str, message: str) -> OwnerStep:
    """A queued job that cannot have a Workload (Kueue not installed, an unusable queue
    label): it holds nothing and says why."""
    return OwnerStep((False, reason, message), job_patch=_suspend_patch(job))


def owner_priority(
    name: str | None, values: Mapping[str, int], global_default: int | None
) -> Priority | None:
    """The Workload's priority: the template's PriorityClass, else the cluster's default
    one, else none (Kueue counts 0)."""
    if name is not None and name in values:
        return Priority(values[name], name)
    return Priority(global_default) if global_default is not None else None


def owned(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether a Workload found by name names the job as its owner."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(r, Mapping) and r.get("uid") == uid for r in refs)


def _admitted_step(
    job: DDLJob,
    obj: Mapping[str, Any],
    status: WorkloadStatus,
    flavors: Iterable[Mapping[str, Any]],
    now: dt.datetime,
) -> OwnerStep:
    assert status.admission is not None
    placement = flavor_placement(status, flavors)
    was = original(job)
    count = min(status.admitted_count, was.replicas)
    on = ", ".join(placement.flavors) or "no flavor"
    partial = f" of {was.replicas}" if count < was.replicas else ""
    step = OwnerStep(
        (
            True,
            "Admitted",
            f"admitted by ClusterQueue {status.admission.cluster_queue}: "
            f"{count}{partial} workers on {on}",
        )
    )
    pod_spec = job.spec.template.get("spec") or {}
    selector = placement.node_selector(was.node_selector)
    tolerations = placement.all_tolerations(was.tolerations)
    record = was.encode()
    if (
        job.spec.suspend
        or job.spec.replicas != count
        or (pod_spec.get("nodeSelector") or {}) != selector
        or list(pod_spec.get("tolerations") or []) != tolerations
        or job.metadata.annotations.get(ANNOTATION_ADMISSION) != record
    ):
        step.job_patch = _job_patch(
            job, False, count, selector or None, tolerations or None, record
        )
        return step
    rendezvous = job.status.rendezvous
    ready = job.status.phase == "Running" and rendezvous is not None and rendezvous.workers > 0
    cond = status.conditions.get(PODS_READY)
    if ready and (cond is None or not cond.true):
        message = (
            f"{rendezvous.workers if rendezvous else 0} workers train at epoch {job.status.epoch}"
        )
        step.writes.append(
            StatusWrite(pods_ready_apply(obj, True, message, now), PODS_READY_MANAGER, True)
        )
    return step


def _suspend_patch(job: DDLJob) -> dict[str, Any] | None:
    if job.spec.suspend:
        return None
    return _job_patch(job, True)


def _restore_patch(job: DDLJob) -> dict[str, Any]:
    was = original(job)
    return _job_patch(
        job,
        True,
        was.replicas,
        None if was.node_selector is None else dict(was.node_selector),
        None if was.tolerations is None else list(was.tolerations),
        None,
    )


_KEEP: Final[Any] = object()


def _job_patch(
    job: DDLJob,
    suspend: bool,
    replicas: int | None = None,
    selector: Any = _KEEP,
    tolerations: Any = _KEEP,
    record: Any = _KEEP,
) -> dict[str, Any]:
    """A merge patch on the job (the I/O edge makes it conditional on the resourceVersion
    the job was read at)."""
    spec: dict[str, Any] = {"suspend": suspend}
    if replicas is not None:
        spec["replicas"] = replicas
    pod_spec: dict[str, Any] = {}
    if selector is not _KEEP:
        # A merge patch merges maps: keys the new selector lacks are removed explicitly.
        old = (job.spec.template.get("spec") or {}).get("nodeSelector") or {}
        pod_spec["nodeSelector"] = (
            None if selector is None and not old else {**dict.fromkeys(old), **(selector or {})}
        )
    if tolerations is not _KEEP:
        pod_spec["tolerations"] = tolerations
    if pod_spec:
        spec["template"] = {"spec": pod_spec}
    if record is _KEEP:
        return {"spec": spec}
    return {"metadata": {"annotations": {ANNOTATION_ADMISSION: record}}, "spec": spec}


def _stale(obj: Mapping[str, Any], job: DDLJob) -> bool:
    """Whether a Workload asks for other counts than the job (the user changed replicas or
    the elastic minimum while it waited): Kueue's integrations then recreate it."""
    want = workload(job, "", None)["spec"]["podSets"][0]
    sets = (obj.get("spec") or {}).get("podSets") or []
    have = next((s for s in sets if isinstance(s, Mapping) and s.get("name") == POD_SET), None)
    if have is None:
        return True
    return (have.get("count"), have.get("minCount")) != (want["count"], want.get("minCount"))


def with_condition(
    status: DDLJobStatus, state: tuple[bool, str, str], now: dt.datetime
) -> DDLJobStatus:
    """`status` carrying the KueueAdmitted condition (its transition time kept while its
    status stays); a job Kueue holds says why in its message too."""
    ok, reason, message = state
    value = "True" if ok else "False"
    old = next((x for x in status.conditions if x.type == JOB_CONDITION), None)
    since = (
        old.last_transition_time
        if old is not None and old.status == value and old.last_transition_time
        else _timestamp(now)
    )
    cond = JobCondition(
        type=JOB_CONDITION, status=value, reason=reason, message=message[:1024],
        last_transition_time=since,
    )  # fmt: skip
    kept = [x for x in status.conditions if x.type != JOB_CONDITION]
    update: dict[str, Any] = {"conditions": [*kept, cond]}
    if not ok and status.phase not in _TERMINAL:
        update["message"] = f"Kueue: {message}"
    return status.model_copy(update=update)


def condition_news(status: DDLJobStatus, state: tuple[bool, str, str]) -> bool:
    """Whether the KueueAdmitted condition turns or changes reason (worth one event)."""
    old = next((x for x in status.conditions if x.type == JOB_CONDITION), None)
    value = "True" if state[0] else "False"
    return old is None or (old.status, old.reason) != (value, state[1])


# -- strict readers -----------------------------------------------------------------------------


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _as_obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise WorkloadShapeError(f"{where}: must be an object, not {_kind(value)}")
    return value


def _obj(
    parent: Mapping[str, Any], key: str, where: str, required: bool = True
) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise WorkloadShapeError(f"{where}: is missing")
        return {}
    return _as_obj(value, where)


def _list(parent: Mapping[str, Any], key: str, where: str, required: bool = True) -> list[Any]:
    value = parent.get(key)
    if value is None:
        if required:
            raise WorkloadShapeError(f"{where}: is missing")
        return []
    if not isinstance(value, list):
        raise WorkloadShapeError(f"{where}: must be a list, not {_kind(value)}")
    return value


def _str(parent: Mapping[str, Any], key: str, where: str, required: bool = True) -> str:
    value = parent.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise WorkloadShapeError(f"{where}: must be a non-empty string, not {value!r}")
    return value


def _int(parent: Mapping[str, Any], key: str, where: str, minimum: int | None = None) -> int:
    value = parent.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WorkloadShapeError(f"{where}: must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise WorkloadShapeError(f"{where}: {value} is below {minimum}")
    return value


def _str_map(parent: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    value = parent.get(key)
    if value is None:
        return {}
    mapping = _as_obj(value, where)
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise WorkloadShapeError(f"{where}: must map strings to strings, not {k!r}: {v!r}")
    return dict(mapping)
