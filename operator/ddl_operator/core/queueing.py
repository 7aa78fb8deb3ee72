"""Queue order among jobs waiting for GPUs, and a reservation that keeps large gangs from starving.

Pure: the I/O layer resolves each job's priority and passes the pending demands with the node
capacities; the serialised claim step calls `arrange` and lets a job place workers only on
the capacity its `Slot` allows (`Slot.nodes`, passed to `reconcile` as the job's nodes).

Order: priority, higher first; then creation time, older first; then namespace and name.
The priority is the value of the PriorityClass the worker template names
(`spec.template.spec.priorityClassName`), the Kubernetes way: the same number the scheduler
and kubelet use for the pods, no second knob to keep consistent. No name means the cluster's
globalDefault class, or 0 (`priority_of`).

No starvation: backfill in space, not time. Walking the order, a job that fits claims where
placement would put it, so no job behind takes those GPUs first. The first job of each
priority that does not fit (that priority's head) reserves a domain of its topology.required
level (the whole pool when unset) that could hold its gang if emptied, where the fewest of its
workers are missing now, and never one only other tenants' pods fill: the free GPUs there are
withheld from every job behind it, so they pile up for the
head as running jobs end. Jobs behind backfill on what is left; outside the head's reservation
they cannot delay it. A job behind a head that does not fit reserves nothing: it becomes head
in turn, so its wait is bounded too. Why space: the operator does not know how long jobs run
(a DDLJob has no walltime), so it cannot promise a start time as Slurm's backfill does; it can
promise that GPUs freed in the head's domain go to the head.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from ddl_operator.core.placement import GangRequest, Placement, Unplaceable, place
from ddl_operator.core.topology import Domain, NodeInfo, build_tree, level_name

JobKey = tuple[str, str]  # namespace, name
_Line = tuple[int, "frozenset[str] | None"]  # a priority within one node pool
DEFAULT_PRIORITY: Final = 0  # Kubernetes' priority for pods without a class and no default


@dataclass(frozen=True)
class Demand:
    """One job that wants GPUs: its order in the queue and the gang it asks for."""

    key: JobKey
    priority: int
    created: dt.datetime
    request: GangRequest
    # The nodes its workers may run on (node selector, tolerations); None: any. A job ahead
    # claims and reserves only among its own nodes, so pools it cannot use stay free.
    eligible: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.request.units_per_worker <= 0:
            raise ValueError(f"{self.key}: the queue orders GPU claims; this job asks for none")


@dataclass(frozen=True)
class Reservation:
    """The free GPUs of one domain, held for a head that does not fit yet."""

    domain: str  # "rack rack-0", "node n3", "the cluster"
    nodes: Mapping[str, int]  # node -> GPUs withheld from the jobs behind
    missing: int  # workers of the smallest gang that do not fit there yet

    @property
    def held(self) -> int:
        return sum(self.nodes.values())


@dataclass(frozen=True)
class Slot:
    """Where one job stands: its position and the capacity it may claim now.

    `nodes` is the snapshot minus what the jobs ahead claim or reserve; `waits_for` is empty
    when the job fits in it, else a sentence for its condition.
    """

    key: JobKey
    position: int  # 1-based, in queue order
    pending: int  # jobs in the queue
    nodes: tuple[NodeInfo, ...]
    fits: bool
    reservation: Reservation | None = None
    waits_for: str = ""


@dataclass(frozen=True)
class Queue:
    """The order of every pending job, and the slots decided (up to `until`)."""

    order: tuple[JobKey, ...]
    slots: Mapping[JobKey, Slot]


def queue_key(demand: Demand) -> tuple[int, dt.datetime, JobKey]:
    """Priority (higher first), then creation time (older first), then namespace/name."""
    return (-demand.priority, demand.created, demand.key)


def priority_class_name(template: Mapping[str, Any]) -> str | None:
    """The PriorityClass a worker template names, if any (the I/O layer resolves it)."""
    spec = template.get("spec")
    name = spec.get("priorityClassName") if isinstance(spec, Mapping) else None
    return name if isinstance(name, str) and name else None


def priority_of(
    name: str | None, classes: Mapping[str, int], global_default: int | None = None
) -> int:
    """A job's priority from the cluster's PriorityClasses (name -> value), as the API
    server's Priority admission resolves a pod's: the named class's value; no name, the
    globalDefault class's value or 0. A name that no class has ranks as no name: the pods'
    creation is refused and the job says why, so it claims nothing either way."""
    if name is not None and name in classes:
        return classes[name]
    return global_default if global_default is not None else DEFAULT_PRIORITY


def arrange(
    demands: Sequence[Demand],
    nodes: Sequence[NodeInfo],
    until: JobKey | None = None,
    lasting: Mapping[str, int] | None = None,
) -> Queue:
    """Walk the queue in order: jobs that fit claim, each priority's first job that does not
    fit reserves. Stops after `until`'s slot when given (the claim step needs one job's).

    `nodes` count every placed pod's GPUs in `used`, as `reconcile` expects.
    """
    ordered = sorted(demands, key=queue_key)
    slots: dict[JobKey, Slot] = {}
    for slot in walk(ordered, nodes, lasting):
        slots[slot.key] = slot
        if slot.key == until:
            break
    return Queue(order=tuple(d.key for d in ordered), slots=slots)


def walk(
    ordered: Sequence[Demand], nodes: Sequence[NodeInfo], lasting: Mapping[str, int] | None = None
) -> Iterator[Slot]:
    """The slots of `ordered` (in queue order), one at a time: a caller that needs only the
    first few jobs' stops there, and one that keeps the generator can go on later.

    `lasting`: GPUs per node held by pods outside the queue's knowledge (see `reserve`)."""
    order = tuple(d.key for d in ordered)
    if len(set(order)) != len(order):
        raise ValueError("a job appears twice in the queue")
    claimed: Counter[str] = Counter()  # GPUs that fitting jobs ahead will place on a node
    withheld: Counter[str] = Counter()  # GPUs that heads ahead reserve on a node
    # (priority, nodes it may use) -> its head: jobs of other node pools keep their own.
    heads: dict[_Line, JobKey] = {}
    holders: list[tuple[JobKey, Reservation]] = []
    for position, demand in enumerate(ordered, 1):
        view = tuple(_minus(nodes, claimed + withheld))
        if demand.eligible is not None:
            view = tuple(n for n in view if n.name in demand.eligible)
        result = place(view, demand.request)
        if isinstance(result, Placement):
            units = demand.request.units_per_worker
            claimed.update({w.node: units for w in result.workers if w.pod is None})
            yield Slot(demand.key, position, len(order), view, fits=True)
            continue
        reservation = None
        line = (demand.priority, demand.eligible)
        if line not in heads:
            reservation = reserve(view, demand.request, lasting)
            if reservation is not None:
                # A job no domain could hold even empty heads nothing: it would only
                # keep the next job of its line from reserving.
                heads[line] = demand.key
                withheld.update(reservation.nodes)
                holders.append((demand.key, reservation))
        why = _waits_for(demand, result, reservation, nodes, claimed, holders, heads)
        where = f"position {position} of {len(order)}: "
        yield Slot(demand.key, position, len(order), view, False, reservation, where + why)


def reserve(
    nodes: Sequence[NodeInfo], request: GangRequest, lasting: Mapping[str, int] | None = None
) -> Reservation | None:
    """The domain a gang that does not fit waits in, with its free GPUs; None if no domain
    could hold the gang even when emptied (reserving would only idle GPUs).

    The domain is one of topology.required's level (the whole pool when unset) that could
    hold the gang if its pods ended: the one where the fewest of the smallest gang's workers
    are missing now, then by name. Kept workers' nodes must lie inside it. Not a smaller
    domain: anything inside the required one is a placement the job accepts, and draining a
    smaller one (waiting for the particular jobs on it to end) keeps its freed GPUs idle for
    longer than collecting the gang's GPUs as they free anywhere the job may go.

    GPUs in `lasting` (other tenants' pods: nothing says when they end, unlike the jobs of
    the queue) stay when a domain is emptied, so the head does not wait in a rack that only
    they fill, holding its free GPUs for nothing. Only when no domain could hold the gang
    around them is every pod assumed to end.
    """
    tree = build_tree(nodes, request.levels)
    if lasting:
        found = _reserve(tree, request, lasting)
        if found is not None:
            return found
    return _reserve(tree, request, {})


def _reserve(tree: Domain, request: GangRequest, lasting: Mapping[str, int]) -> Reservation | None:
    levels, required = request.levels, request.required
    top = 0 if required is None else len(levels) - levels.index(required)
    kept = Counter(request.keep.values())
    inside = replace(request, required=None)
    units = request.units_per_worker
    best: tuple[int, tuple[str, ...], Domain] | None = None
    for domain in tree.walk():
        if domain.depth != top:
            continue
        members = list(domain.nodes())
        if not set(kept) <= {n.name for n in members}:
            continue
        emptied = [_with_used(n, kept[n.name] * units + lasting.get(n.name, 0)) for n in members]
        if isinstance(place(emptied, inside), Unplaceable):
            continue
        missing = request.min_workers - _fits_now(members, inside)
        if best is None or (missing, domain.path) < best[:2]:
            best = (missing, domain.path, domain)
    if best is None:
        return None
    missing, _, domain = best
    held = {n.name: n.free for n in domain.nodes() if n.free > 0}
    return Reservation(domain=_describe(domain), nodes=held, missing=missing)


def _fits_now(nodes: Sequence[NodeInfo], request: GangRequest) -> int:
    """The most workers (kept ones included) of the gang that fit on these nodes now."""
    floor = max(1, len(request.keep))
    if floor > request.min_workers:
        return len(request.keep)
    probe = replace(request, min_workers=floor, max_workers=request.min_workers)
    result = place(nodes, probe)
    return len(result.workers) if isinstance(result, Placement) else len(request.keep)


def _with_used(node: NodeInfo, used: int) -> NodeInfo:
    return node if node.used == used else replace(node, used=used)


def _minus(nodes: Sequence[NodeInfo], taken: Mapping[str, int]) -> list[NodeInfo]:
    return [replace(n, used=n.used + taken[n.name]) if taken.get(n.name) else n for n in nodes]


def _describe(domain: Domain) -> str:
    if domain.level is None:
        return "the cluster"
    if domain.node is not None:
        return f"node {domain.name}"
    return f"{level_name(domain.level)} {domain.name}"


def _name(key: JobKey) -> str:
    return f"{key[0]}/{key[1]}"


def _waits_for(
    demand: Demand,
    result: Unplaceable,
    reservation: Reservation | None,
    nodes: Sequence[NodeInfo],
    claimed: Counter[str],
    holders: Sequence[tuple[JobKey, Reservation]],
    heads: Mapping[_Line, JobKey],
) -> str:
    """Why a job does not fit, in words for its condition."""
    request = demand.request
    need = request.min_workers * request.units_per_worker
    if reservation is not None:
        return (
            f"first in line: {result.reason}; the free GPUs of {reservation.domain} are held for "
            f"it as they free ({reservation.held} held, {reservation.missing} of "
            f"{request.min_workers} workers still missing there)"
        )
    head = heads.get((demand.priority, demand.eligible))
    if head is None:
        return f"first in line: {result.reason}; no domain could hold it even empty"
    if holders and isinstance(place(_minus(nodes, claimed), request), Placement):
        names = ", ".join(_name(key) for key, _ in holders)
        return f"{need} GPUs would fit, but the free ones are held for {names}, ahead in the queue"
    return f"behind {_name(head)}: {result.reason}"


__all__ = [
    "DEFAULT_PRIORITY",
    "Demand",
    "JobKey",
    "Queue",
    "Reservation",
    "Slot",
    "arrange",
    "priority_class_name",
    "priority_of",
    "queue_key",
    "reserve",
]
