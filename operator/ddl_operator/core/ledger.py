"""The in-memory GPU ledger behind the operator's cache: node facts, per-pod charges, per-node
totals and the reservations placement has assumed but no watch event has confirmed yet.

Pure: the cache (cache.py) feeds it parsed watch events; placement reads free capacity from
it. Only what accounting needs is kept of a pod (node, GPUs, uid, job), never the object.
Reservations follow kube-scheduler's assume cache: placement records them at once, so two
jobs never claim the same GPUs between a placement and the event that shows it, and the
event for the same pod (same uid) charging the same node confirms them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from ddl_operator.api import constants as c
from ddl_operator.core.affinity import affinity_allows
from ddl_operator.core.capacity import (
    Container,
    OwnerRef,
    PodClaim,
    charged_node,
    effective_gpus,
    gpu_quantity,
    our_worker,
)
from ddl_operator.core.topology import NodeInfo

PodKey = tuple[str, str]  # (namespace, name)
JobKey = tuple[str, str]  # (namespace, name)

# An assumption nobody confirms (the pod went away unseen, the write's outcome is unknown)
# stops holding GPUs after this long.
ASSUME_TTL_SECONDS: Final = 60.0
_BLOCKING_EFFECTS: Final = ("NoSchedule", "NoExecute")


# -- pods -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodCharge:
    """GPUs a pod holds on a node; `job` is set for the operator's own workers."""

    node: str
    gpus: int
    uid: str
    job: JobKey | None = None


def _containers(items: object) -> tuple[Container, ...]:
    out: list[Container] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        resources = item.get("resources") or {}
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        out.append(
            Container(
                gpus=gpu_quantity(requests.get(c.GPU_RESOURCE) or limits.get(c.GPU_RESOURCE) or 0),
                sidecar=item.get("restartPolicy") == "Always",
            )
        )
    return tuple(out)


def pod_claim(pod: Mapping[str, Any]) -> PodClaim:
    """A pod manifest (as the API serves it) as capacity counting sees it."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    return PodClaim(
        node_name=spec.get("nodeName") or None,
        containers=_containers(spec.get("containers")),
        init_containers=_containers(spec.get("initContainers")),
        labels=meta.get("labels") or {},
        annotations=meta.get("annotations") or {},
        owners=tuple(
            OwnerRef(
                str(ref.get("apiVersion", "")),
                str(ref.get("kind", "")),
                str(ref.get("name", "")),
                bool(ref.get("controller")),
            )
            for ref in meta.get("ownerReferences") or []
            if isinstance(ref, Mapping)
        ),
    )


def pod_key(pod: Mapping[str, Any]) -> PodKey:
    meta = pod.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def worker_job(pod: Mapping[str, Any]) -> JobKey | None:
    """The job a pod claims to be a worker of (by its labels: enough to wake that job up)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    job = labels.get(c.LABEL_JOB)
    if labels.get(c.LABEL_ROLE) != "worker" or not job:
        return None
    return (str(meta.get("namespace", "")), str(job))


def pod_charge(pod: Mapping[str, Any]) -> PodCharge | None:
    """What a non-terminal pod holds, or None when it holds no GPUs anywhere yet."""
    claim = pod_claim(pod)
    node = charged_node(claim)
    gpus = effective_gpus(claim) if node else 0
    if not node or gpus <= 0:
        return None
    uid = str((pod.get("metadata") or {}).get("uid", ""))
    return PodCharge(node, gpus, uid, worker_job(pod) if our_worker(claim) else None)


# -- nodes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Taint:
    key: str
    value: str
    effect: str


@dataclass(frozen=True)
class NodeFacts:
    """What placement reads of a node; heartbeats change none of it."""

    name: str
    labels: Mapping[str, str]
    allocatable: int
    ready: bool
    unschedulable: bool = False
    taints: tuple[Taint, ...] = ()


def node_facts(node: Mapping[str, Any]) -> NodeFacts:
    """A node manifest as placement sees it."""
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    ready = any(
        cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in status.get("conditions") or []
        if isinstance(cond, Mapping)
    )
    taints = tuple(
        Taint(str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect", "")))
        for t in spec.get("taints") or []
        if isinstance(t, Mapping)
    )
    return NodeFacts(
        name=str(meta.get("name", "")),
        labels=dict(meta.get("labels") or {}),
        allocatable=gpu_quantity((status.get("allocatable") or {}).get(c.GPU_RESOURCE, 0)),
        ready=ready,
        unschedulable=bool(spec.get("unschedulable")),
        taints=taints,
    )


def tolerated(taint: Taint, tolerations: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a pod with `tolerations` may be scheduled onto a node with `taint`."""
    if taint.effect not in _BLOCKING_EFFECTS:
        return True
    for tol in tolerations:
        if tol.get("effect") not in (None, "", taint.effect):
            continue
        key = tol.get("key")
        if tol.get("operator") == "Exists" and key in (None, "", taint.key):
            return True
        if key == taint.key and (tol.get("value") or "") == taint.value:
            return True
    return False


def node_info(
    facts: NodeFacts,
    used: int,
    tolerations: Sequence[Mapping[str, Any]] = (),
    node_selector: Mapping[str, str] | None = None,
    node_terms: Sequence[Mapping[str, Any]] = (),
) -> NodeInfo:
    """A node for one job's placement: the template's nodeSelector, required node affinity
    and tolerations narrow where its workers may go (else a worker pinned to a node the
    scheduler will not bind it to waits out the bind deadline)."""
    wanted = node_selector or {}
    return NodeInfo(
        name=facts.name,
        labels=facts.labels,
        allocatable=facts.allocatable,
        used=used,
        ready=facts.ready,
        schedulable=not facts.unschedulable
        and all(facts.labels.get(k) == v for k, v in wanted.items())
        and affinity_allows(facts.name, facts.labels, node_terms)
        and all(tolerated(t, tolerations) for t in facts.taints),
    )


# -- the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumed:
    """A reservation placement made; it holds until confirmed, forgotten or expired."""

    charge: PodCharge
    expires: float


@dataclass(frozen=True)
class Change:
    """What one update did to the totals: nodes whose usage fell (capacity freed) and rose."""

    freed: frozenset[str] = frozenset()
    taken: frozenset[str] = frozenset()

    def __or__(self, other: Change) -> Change:
        return Change(self.freed | other.freed, self.taken | other.taken)


class Ledger:
    """GPUs in use per node from observed pods plus assumed reservations (not thread-safe:
    the cache serialises access).

    A pod's effective charge is its assumption while there is one, else what was observed.
    """

    def __init__(self) -> None:
        self._observed: dict[PodKey, PodCharge] = {}
        self._assumed: dict[PodKey, Assumed] = {}
        self._used: dict[str, int] = {}
        self._jobs: dict[str, dict[JobKey, int]] = {}  # node -> our jobs' pods charged there
        self._foreign: dict[str, int] = {}  # node -> GPUs of pods that are not our workers

    # -- reading ------------------------------------------------------------------------------

    def used(self, node: str) -> int:
        return self._used.get(node, 0)

    def usage(self) -> dict[str, int]:
        """GPUs in use per node (nodes with none left out)."""
        return dict(self._used)

    @property
    def totals(self) -> Mapping[str, int]:
        """`usage()` without the copy: read-only, and live (read it under the same lock)."""
        return MappingProxyType(self._used)

    def jobs_on(self, node: str) -> set[JobKey]:
        """The operator's jobs with a worker charged to `node`."""
        return set(self._jobs.get(node, {}))

    def foreign(self) -> dict[str, int]:
        """GPUs per node held by pods that are not the operator's workers (other tenants,
        other controllers): nothing in the GPU queue says when they end."""
        return dict(self._foreign)

    def observed(self) -> dict[PodKey, PodCharge]:
        return dict(self._observed)

    def assumed(self) -> dict[PodKey, Assumed]:
        return dict(self._assumed)

    def __len__(self) -> int:
        return len(self._observed.keys() | self._assumed.keys())

    # -- updates ------------------------------------------------------------------------------

    def observe(self, key: PodKey, charge: PodCharge | None) -> Change:
        """A pod was added or changed (`charge` None: it holds no GPUs)."""
        before = self._effective(key)
        if charge is None:
            self._observed.pop(key, None)
        else:
            self._observed[key] = charge
        assumed = self._assumed.get(key)
        if assumed is not None and _confirms(charge, assumed.charge):
            del self._assumed[key]
        return self._moved(before, self._effective(key))

    def delete(self, key: PodKey, uid: str) -> Change:
        """A pod is gone (or finished). An assumption made for another incarnation of the
        same name (a recreated worker) stays."""
        before = self._effective(key)
        self._observed.pop(key, None)
        assumed = self._assumed.get(key)
        if assumed is not None and (not uid or not assumed.charge.uid or assumed.charge.uid == uid):
            del self._assumed[key]
        return self._moved(before, self._effective(key))

    def assume(
        self, key: PodKey, charge: PodCharge, now: float, ttl: float = ASSUME_TTL_SECONDS
    ) -> Change:
        """Placement put a pod on a node: count it there now."""
        before = self._effective(key)
        observed = self._observed.get(key)
        if _confirms(observed, charge):
            self._assumed.pop(key, None)  # the event came first: nothing to assume
        else:
            self._assumed[key] = Assumed(charge, now + ttl)
        return self._moved(before, self._effective(key))

    def forget(self, key: PodKey) -> Change:
        """Drop an assumption whose write did not happen."""
        if key not in self._assumed:
            return Change()
        before = self._effective(key)
        del self._assumed[key]
        return self._moved(before, self._effective(key))

    def expire(self, now: float) -> Change:
        """Drop assumptions no event confirmed in time."""
        change = Change()
        for key in [k for k, a in self._assumed.items() if a.expires <= now]:
            change |= self.forget(key)
        return change

    def replace(self, charges: Mapping[PodKey, PodCharge]) -> Change:
        """A relist: the observed pods are exactly `charges`; assumptions stay unless the
        list confirms them."""
        change = Change()
        for key in self._observed.keys() - charges.keys():
            before = self._effective(key)
            del self._observed[key]
            change |= self._moved(before, self._effective(key))
        for key, charge in charges.items():
            change |= self.observe(key, charge)
        return change

    # -- internals ----------------------------------------------------------------------------

    def _effective(self, key: PodKey) -> PodCharge | None:
        assumed = self._assumed.get(key)
        return assumed.charge if assumed is not None else self._observed.get(key)

    def _moved(self, before: PodCharge | None, after: PodCharge | None) -> Change:
        if before == after:
            return Change()
        if before is not None:
            self._add(before, -1)
        if after is not None:
            self._add(after, +1)
        freed = before.node if before and (after is None or _less(after, before)) else None
        taken = after.node if after and (before is None or _less(before, after)) else None
        return Change(frozenset([freed] if freed else []), frozenset([taken] if taken else []))

    def _add(self, charge: PodCharge, sign: int) -> None:
        _bump(self._used, charge.node, sign * charge.gpus)
        if charge.job is None:
            _bump(self._foreign, charge.node, sign * charge.gpus)
            return
        jobs = self._jobs.setdefault(charge.node, {})
        count = jobs.get(charge.job, 0) + sign
        if count > 0:
            jobs[charge.job] = count
        else:
            jobs.pop(charge.job, None)
            if not jobs:
                del self._jobs[charge.node]


def _bump(totals: dict[str, int], node: str, delta: int) -> None:
    """Adds delta to a node's total; a node at zero leaves the map."""
    total = totals.get(node, 0) + delta
    if total:
        totals[node] = total
    else:
        totals.pop(node, None)


def _less(a: PodCharge, b: PodCharge) -> bool:
    """Whether moving from `b` to `a` frees something on `b`'s node."""
    return a.node != b.node or a.gpus < b.gpus


def _confirms(observed: PodCharge | None, assumed: PodCharge) -> bool:
    """An observation confirms an assumption when it is the same pod charged to the same
    node (the pod is then counted from what the API says)."""
    return (
        observed is not None
        and observed.node == assumed.node
        and (not assumed.uid or observed.uid == assumed.uid)
    )


def free_nodes(
    facts: Iterable[NodeFacts],
    usage: Mapping[str, int],
    tolerations: Sequence[Mapping[str, Any]] = (),
    node_selector: Mapping[str, str] | None = None,
    node_terms: Sequence[Mapping[str, Any]] = (),
) -> list[NodeInfo]:
    """Every node with the GPUs in use on it (`usage`: a ledger's totals), as one job's
    placement sees it."""
    return [
        node_info(f, usage.get(f.name, 0), tolerations, node_selector, node_terms) for f in facts
    ]
