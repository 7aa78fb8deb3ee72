"""Preemption that shrinks before it evicts: which GPUs lower-priority jobs give up so that a
higher-priority pending job fits, decided on a snapshot.

Pure: the I/O layer passes the preemptor's `Demand`, the node capacities and the running jobs
(`Running`); `preempt` returns a `Preemption` plan or a `NoPreemption` saying why not.

Rules, in order:
1. Nothing happens for a job that fits already, whose PriorityClass says
   `preemptionPolicy: Never`, or that would still not fit after every eviction allowed. Only
   jobs of strictly lower priority with `preemptible` true are victims.
2. Shrink first. Elastic victims lose workers toward their `minReplicas`, never below. Freed
   GPUs only help where they form a placement with the free ones inside one domain, so the
   decision is made per domain: every domain at or inside `topology.required` (down to single
   nodes) is tried; inside it, workers are removed one node at a time, each step the one that
   opens room for a worker at the least cost (fewest workers removed per worker gained, then
   lowest priority, youngest, fewest GPUs). A victim with no worker in the domain is never
   touched. The domain that needs the fewest workers removed wins, then the one whose
   victims rank lowest, then fewer GPUs freed, then the smaller domain, then by name.
3. Only if no domain can be made to fit by shrinking: suspend whole jobs. Per domain, the
   jobs with workers there are taken lowest priority first, then youngest, until the rest
   fits (with shrinking of the others); then each suspension that turns out unneeded is
   dropped again, most important job first (Kueue's minimal-set pass). The domain with the
   fewest and lowest-ranked suspensions, then the fewest GPUs, wins.
4. Every plan is checked with `place` on the capacity after the evictions: the preemptor's
   gang (its `min_workers`, so that it takes no more from others than it must) lands inside
   the chosen domain. The plan carries that capacity (`nodes`) and the placement.

Hand-over: victims need time (a checkpoint, then a re-form at a new epoch) before their GPUs
are free. The caller counts GPUs of workers already leaving (pods named in a victim's record,
pods being deleted) as free in `nodes` and leaves those workers out of `running`; a second
pass during the hand-over then finds the preemptor fits and evicts nobody else. Until the
preemptor is placed, the caller should hold the plan's domain for it (its capacity is
`Preemption.nodes`), so that no job behind it backfills into what was freed.

Regrowth: a victim keeps a record in its annotation `ddl-operator.dev/preempted-by`
(`PreemptedRecord`: the preemptor, the workers it may run meanwhile, 0 for suspended, the
pods to remove, and when). While the record stands the victim runs `held_replicas` workers.
It grows back (or resumes) only when the queue lets it: its growth, up to spec.replicas, is a
pending `Demand` at the victim's own priority and age like any other, and the record is
cleared once `arrange` gives that demand a slot that fits (`may_regrow`). The preemptor,
ahead in the queue, is therefore never preempted back. Users can edit annotations, so
`parse_record` validates strictly and `held_replicas` clamps to [minReplicas, replicas].
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final, Literal

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.placement import GangRequest, Placement, place
from ddl_operator.core.queueing import Demand, JobKey, Slot
from ddl_operator.core.topology import Domain, NodeInfo, build_tree, level_name

if TYPE_CHECKING:
    from ddl_operator.core.reconcile import WorkerPod

PREEMPTED_BY: Final = f"{c.GROUP}/preempted-by"
PREEMPTED: Final = "Preempted"  # condition type and event reason on a victim
PreemptionPolicy = Literal["PreemptLowerPriority", "Never"]
Action = Literal["Shrink", "Suspend"]
PODS_NAMED: Final = 5  # pods listed in a message; the rest are counted

# (priority, -creation time, key): the lower, the sooner a job is preempted.
_Rank = tuple[int, float, JobKey]


@dataclass(frozen=True)
class Running:
    """A job that holds GPUs: its rank among victims and where each worker is.

    `workers` are (pod, node) in rank order. `min_workers` is the elastic floor
    (spec.elastic.minReplicas); for a fixed-size job, its replicas. Workers on nodes that
    are not in the snapshot free nothing there and are only dropped by a suspension.
    """

    key: JobKey
    priority: int
    created: dt.datetime
    units_per_worker: int
    workers: tuple[tuple[str, str], ...]
    min_workers: int
    preemptible: bool = True

    def __post_init__(self) -> None:
        pods = [pod for pod, _ in self.workers]
        if len(set(pods)) != len(pods):
            raise ValueError(f"{self.key}: a worker appears twice")
        if self.units_per_worker < 0:
            raise ValueError(f"{self.key}: units_per_worker must be >= 0")
        if self.min_workers < 1:
            raise ValueError(f"{self.key}: min_workers must be >= 1")

    @property
    def spare(self) -> int:
        """Workers that shrinking may take away."""
        return max(0, len(self.workers) - self.min_workers)

    @property
    def rank(self) -> _Rank:
        """Lower is preempted sooner: lowest priority, then youngest, then by key."""
        return (self.priority, -self.created.timestamp(), self.key)


@dataclass(frozen=True)
class Eviction:
    """What one victim gives up: shrink to `replicas` by removing `pods`, or suspend."""

    job: JobKey
    action: Action
    replicas: int  # workers it keeps; 0 when suspended
    pods: tuple[str, ...]  # removed, in rank order (all of them when suspended)
    units: int  # GPUs freed
    message: str  # for its Preempted condition and event


@dataclass(frozen=True)
class Preemption:
    """The plan: evictions, and where the preemptor lands once they are done."""

    preemptor: JobKey
    domain: str  # "rack rack-0", "node n3", "the cluster"
    victims: tuple[Eviction, ...]  # by job key
    nodes: tuple[NodeInfo, ...]  # the domain's capacity after the evictions
    placement: Placement

    @property
    def units(self) -> int:
        return sum(eviction.units for eviction in self.victims)


@dataclass(frozen=True)
class NoPreemption:
    """Why nobody is preempted: a sentence, and a CamelCase reason."""

    reason: str
    short: Literal["Fits", "PreemptionPolicyNever", "NoVictims", "WouldNotFit"]


@dataclass(frozen=True)
class _Choice:
    """Removals that make the preemptor fit in one domain."""

    domain: Domain
    suspended: tuple[Running, ...]
    removed: tuple[tuple[Running, str, str], ...]  # (victim, pod, node)
    placement: Placement
    nodes: tuple[NodeInfo, ...]

    def cost(self) -> tuple[Any, ...]:
        """Lower is less disruptive: suspensions first, then removals, then locality."""
        shrunk = sorted((v.rank for v, _, _ in self.removed), reverse=True)
        held = sorted((v.rank for v in self.suspended), reverse=True)
        return (
            len(self.suspended),
            held,
            sum(v.units_per_worker * len(v.workers) for v in self.suspended),
            len(self.removed),
            shrunk,
            sum(v.units_per_worker for v, _, _ in self.removed),
            -self.domain.depth,
            sorted(-_position(v, pod) for v, pod, _ in self.removed),  # high ranks go first
            self.domain.path,
        )


def _position(job: Running, pod: str) -> int:
    return next(rank for rank, (name, _) in enumerate(job.workers) if name == pod)


def preempt(
    preemptor: Demand,
    nodes: Sequence[NodeInfo],
    running: Sequence[Running],
    policy: PreemptionPolicy = "PreemptLowerPriority",
) -> Preemption | NoPreemption:
    """Decide which lower-priority workers make room for `preemptor`, or why none do.

    `nodes` count every placed worker's GPUs in `used`, as `place` expects. Deterministic:
    the input order of `nodes` and `running` does not matter.
    """
    request = preemptor.request
    if len({job.key for job in running}) != len(running):
        raise ValueError("a job appears twice among the running ones")
    if isinstance(place(nodes, request), Placement):
        return NoPreemption("it fits without preempting anyone", "Fits")
    if policy == "Never":
        return NoPreemption(
            "its PriorityClass has preemptionPolicy: Never", "PreemptionPolicyNever"
        )
    victims = sorted(
        (
            job
            for job in running
            if job.key != preemptor.key
            and job.preemptible
            and job.priority < preemptor.priority
            and job.units_per_worker > 0
            and job.workers
        ),
        key=lambda job: job.rank,
    )
    if not victims:
        return NoPreemption(
            f"no preemptible job of priority below {preemptor.priority} holds "
            f"{request.resource_name}",
            "NoVictims",
        )
    tree = build_tree(nodes, request.levels)
    domains = _candidates(tree, request, victims)
    choice = _best(_shrink(domain, victims, request) for domain in domains)
    if choice is None:
        choice = _best(_suspend(domain, victims, request) for domain in domains)
    if choice is None:
        return _would_not_fit(nodes, victims, request)
    return _plan(preemptor, choice)


def _candidates(tree: Domain, request: GangRequest, victims: Sequence[Running]) -> list[Domain]:
    """Domains at or inside the required level that hold the kept workers and could hold
    the gang if every victim there left (cheap upper bound; the rest is pruned)."""
    levels, required = request.levels, request.required
    top = 0 if required is None else len(levels) - levels.index(required)
    kept = set(request.keep.values())
    victim_units: Counter[str] = Counter()
    for victim in victims:
        for _, node in victim.workers:
            victim_units[node] += victim.units_per_worker
    out = []
    for domain in tree.walk():
        if domain.depth < top:
            continue
        members = list(domain.nodes())
        if not kept <= {n.name for n in members}:
            continue
        room = _Room(members, request, victim_units)
        if room.slots_total() >= room.need:
            out.append(domain)
    return out


class _Room:
    """Slots for the preemptor's new workers on some nodes, as GPUs are freed there."""

    def __init__(
        self, nodes: Sequence[NodeInfo], request: GangRequest, freed: Mapping[str, int]
    ) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.units = request.units_per_worker
        self.limit = request.per_node_limit
        self.kept = Counter(request.keep.values())
        self.need = request.min_workers - len(request.keep)
        self.freed: Counter[str] = Counter({n: freed.get(n, 0) for n in self.nodes})

    def slots(self, name: str, extra: int = 0) -> int:
        node = self.nodes[name]
        if not node.usable:
            return 0
        used = max(0, node.used - self.freed[name] - extra)
        count = max(0, node.allocatable - used) // self.units
        if self.limit is not None:
            count = min(count, max(0, self.limit - self.kept[name]))
        return count

    def slots_total(self) -> int:
        return sum(self.slots(name) for name in self.nodes)

    def view(self) -> tuple[NodeInfo, ...]:
        """The nodes with the freed GPUs given back, in the snapshot's tree order."""
        return tuple(
            replace(n, used=max(0, n.used - self.freed[n.name])) if self.freed[n.name] else n
            for n in self.nodes.values()
        )


def _shrink(
    domain: Domain,
    victims: Sequence[Running],
    request: GangRequest,
    suspended: Sequence[Running] = (),
) -> _Choice | None:
    """Remove the fewest, cheapest elastic workers in `domain` so the preemptor fits there,
    besides the `suspended` jobs' GPUs; None if it cannot."""
    members = list(domain.nodes())
    names = {n.name for n in members}
    gone: Counter[str] = Counter()
    for job in suspended:
        for _, node in job.workers:
            if node in names:
                gone[node] += job.units_per_worker
    room = _Room(members, request, gone)
    out = {job.key for job in suspended}
    budget = {job.key: job.spare for job in victims if job.key not in out and job.spare}
    # Removable workers per node, high ranks of a job first (what a scale-down drops first).
    on_node: dict[str, list[tuple[Running, str]]] = {}
    position = {pod: rank for job in victims for rank, (pod, _) in enumerate(job.workers)}
    for job in victims:
        if job.key in budget:
            for pod, node in reversed(job.workers):
                if node in names:
                    on_node.setdefault(node, []).append((job, pod))
    orders = {
        node: (
            sorted(items, key=lambda item: item[0].rank),
            # Largest workers first: fewest removals when victims' sizes differ.
            sorted(items, key=lambda item: (-item[0].units_per_worker, item[0].rank)),
        )
        for node, items in on_node.items()
    }
    removed: list[tuple[Running, str, str]] = []
    taken: set[str] = set()
    have = room.slots_total()
    while have < room.need:
        best: tuple[tuple[Any, ...], str, list[tuple[Running, str]]] | None = None
        for node in sorted(orders):
            for order in orders[node]:
                move = _move(room, node, order, taken, budget)
                if move is None:
                    continue
                picked, gain = move
                key = (
                    Fraction(len(picked), min(gain, room.need - have)),
                    max(job.rank for job, _ in picked),
                    sum(job.units_per_worker for job, _ in picked),
                    -max(position[pod] for _, pod in picked),  # high ranks go first
                    node,
                )
                if best is None or key < best[0]:
                    best = (key, node, picked)
        if best is None:
            return None
        _, node, picked = best
        for job, pod in picked:
            taken.add(pod)
            budget[job.key] -= 1
            room.freed[node] += job.units_per_worker
            removed.append((job, pod, node))
        have = room.slots_total()
    capacity = room.view()
    result = place(capacity, request)
    if not isinstance(result, Placement):
        return None
    return _Choice(domain, tuple(suspended), tuple(removed), result, capacity)


def _move(
    room: _Room,
    node: str,
    order: Sequence[tuple[Running, str]],
    taken: set[str],
    budget: Mapping[JobKey, int],
) -> tuple[list[tuple[Running, str]], int] | None:
    """The shortest run of `order` on `node` whose removal opens room for one more worker."""
    before = room.slots(node)
    picked: list[tuple[Running, str]] = []
    spent: Counter[JobKey] = Counter()
    extra = 0
    for job, pod in order:
        if pod in taken or spent[job.key] >= budget[job.key]:
            continue
        picked.append((job, pod))
        spent[job.key] += 1
        extra += job.units_per_worker
        after = room.slots(node, extra)
        if after > before:
            return picked, after - before
    return None


def _suspend(domain: Domain, victims: Sequence[Running], request: GangRequest) -> _Choice | None:
    """Suspend the lowest-ranked jobs with workers in `domain` until the preemptor fits
    there (shrinking the rest as needed), then drop the suspensions that are not needed."""
    names = {n.name for n in domain.nodes()}
    here = [job for job in victims if any(node in names for _, node in job.workers)]
    for count in range(1, len(here) + 1):
        chosen = _shrink(domain, victims, request, here[:count])
        if chosen is not None:
            break
    else:
        return None
    # here[:count - 1] did not fit, so the last one added stays; try the others, dearest first.
    keep = list(here[:count])
    for job in reversed(here[: count - 1]):
        trial = [other for other in keep if other is not job]
        fewer = _shrink(domain, victims, request, trial)
        if fewer is not None:
            keep, chosen = trial, fewer
    return chosen


def _best(choices: Iterable[_Choice | None]) -> _Choice | None:
    best: _Choice | None = None
    for choice in choices:
        if choice is not None and (best is None or choice.cost() < best.cost()):
            best = choice
    return best


def _would_not_fit(
    nodes: Sequence[NodeInfo], victims: Sequence[Running], request: GangRequest
) -> NoPreemption:
    """Say why even suspending every victim would not make room."""
    freed: Counter[str] = Counter()
    for job in victims:
        for _, node in job.workers:
            freed[node] += job.units_per_worker
    emptied = [replace(n, used=max(0, n.used - freed[n.name])) for n in nodes]
    result = place(emptied, request)
    why = result.reason if not isinstance(result, Placement) else "no single domain frees enough"
    return NoPreemption(
        f"it would not fit even if every lower-priority preemptible job let go: {why}",
        "WouldNotFit",
    )


def _plan(preemptor: Demand, choice: _Choice) -> Preemption:
    where = describe(choice.domain)
    by = f"{preemptor.key[0]}/{preemptor.key[1]} (priority {preemptor.priority})"
    resource = preemptor.request.resource_name
    evictions = []
    for job in choice.suspended:
        units = job.units_per_worker * len(job.workers)
        message = (
            f"preempted by {by}: suspended, freeing {units} {resource} for it in {where}; "
            "resumes when the queue has room"
        )
        pods = tuple(pod for pod, _ in job.workers)
        evictions.append(Eviction(job.key, "Suspend", 0, pods, units, message))
    shrunk: dict[JobKey, list[str]] = {}
    jobs = {}
    for job, pod, _ in choice.removed:
        shrunk.setdefault(job.key, []).append(pod)
        jobs[job.key] = job
    for key, removed in shrunk.items():
        job = jobs[key]
        gone = set(removed)
        pods = tuple(pod for pod, _ in job.workers if pod in gone)
        left = len(job.workers) - len(pods)
        units = job.units_per_worker * len(pods)
        message = (
            f"preempted by {by}: shrunk from {len(job.workers)} to {left} workers "
            f"(removing {_pods(pods)}), freeing {units} {resource} for it in {where}; "
            "grows back when the queue has room"
        )
        evictions.append(Eviction(key, "Shrink", left, pods, units, message))
    return Preemption(
        preemptor=preemptor.key,
        domain=where,
        victims=tuple(sorted(evictions, key=lambda e: e.job)),
        nodes=choice.nodes,
        placement=choice.placement,
    )


def _pods(pods: Sequence[str]) -> str:
    named = ", ".join(pods[:PODS_NAMED])
    more = len(pods) - PODS_NAMED
    return f"{named} and {more} more" if more > 0 else named


def describe(domain: Domain) -> str:
    """A domain in words: `rack rack-0`, `node n3`, `the cluster`."""
    if domain.level is None:
        return "the cluster"
    if domain.node is not None:
        return f"node {domain.name}"
    return f"{level_name(domain.level)} {domain.name}"


# --- The victim's record -------------------------------------------------------------------

MAX_RECORD_BYTES: Final = 32768
MAX_RECORD_REPLICAS: Final = 100_000
_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_MAX: Final = 63
_SUBDOMAIN_MAX: Final = 253
_RECORD_KEYS: Final = frozenset({"by", "replicas", "pods", "at"})


@dataclass(frozen=True)
class PreemptedRecord:
    """What the `preempted-by` annotation says: who preempted the job, the workers it may
    run until the queue lets it grow back (0: suspended), the pods removed, and when."""

    by: JobKey
    replicas: int
    pods: tuple[str, ...]
    at: dt.datetime

    def __post_init__(self) -> None:
        problem = _record_problem(self)
        if problem is not None:
            raise ValueError(problem)


@dataclass(frozen=True)
class InvalidRecord:
    """Why a record is ignored, in the operator's words (never echoing the input)."""

    reason: str


def record_for(eviction: Eviction, preemptor: JobKey, now: dt.datetime) -> PreemptedRecord:
    """The record to put on a victim as its eviction is carried out."""
    return PreemptedRecord(preemptor, eviction.replicas, eviction.pods, now)


def encode_record(record: PreemptedRecord) -> str:
    """The annotation's value: compact JSON, keys sorted, time in UTC."""
    at = record.at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    fields = {
        "by": f"{record.by[0]}/{record.by[1]}",
        "replicas": record.replicas,
        "pods": list(record.pods),
        "at": at,
    }
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)


def parse_record(raw: str | None) -> PreemptedRecord | InvalidRecord | None:
    """The record in an annotation's value; None if there is none. Never raises."""
    if raw is None:
        return None
    if len(raw.encode("utf-8", "replace")) > MAX_RECORD_BYTES:
        return InvalidRecord(f"the record is longer than {MAX_RECORD_BYTES} bytes")
    try:
        fields = json.loads(
            raw,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique,
        )
    except ValueError as error:
        reason = str(error) if isinstance(error, _Invalid) else "the record is not valid JSON"
        return InvalidRecord(reason)
    if not isinstance(fields, dict) or set(fields) != _RECORD_KEYS:
        return InvalidRecord(f"the record must be an object with exactly {sorted(_RECORD_KEYS)}")
    by, replicas, pods, at = fields["by"], fields["replicas"], fields["pods"], fields["at"]
    if not isinstance(by, str) or by.count("/") != 1:
        return InvalidRecord("by must be namespace/name")
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        return InvalidRecord("replicas must be an integer")
    if not isinstance(pods, list) or not all(isinstance(pod, str) for pod in pods):
        return InvalidRecord("pods must be a list of pod names")
    when = _timestamp(at)
    if when is None:
        return InvalidRecord("at must be an RFC 3339 time with a zone")
    namespace, name = by.split("/")
    try:
        return PreemptedRecord((namespace, name), replicas, tuple(pods), when)
    except ValueError as error:  # raised by _record_problem, whose reasons echo nothing
        return InvalidRecord(str(error))


def held_replicas(replicas: int, min_replicas: int, record: PreemptedRecord | None) -> int:
    """The workers a job runs with: spec.replicas, or while a record stands, its count
    clamped to [minReplicas, replicas] (an edited record never shrinks a job below its
    minimum nor grows it past its spec); 0 while suspended by preemption."""
    if record is None:
        return replicas
    if record.replicas == 0:
        return 0
    return max(min(min_replicas, replicas), min(record.replicas, replicas))


def may_regrow(record: PreemptedRecord | None, slot: Slot | None) -> bool:
    """Whether a victim may clear its record and grow back (or resume) now: only when the
    queue gives its growth demand a slot that fits, as for any pending job."""
    return record is None or (slot is not None and slot.fits)


class _Invalid(ValueError):
    """Raised from inside the JSON decoder's hooks, with a reason safe to show."""


def _refuse_constant(name: str) -> Any:
    raise _Invalid("the record has a number JSON does not allow")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Invalid("a key of the record appears twice")
    return out


def _timestamp(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _is_name(value: str, top: int) -> bool:
    """A DNS-1123 label (top 63) or subdomain (top 253): what Kubernetes names must be."""
    if not 0 < len(value) <= top:
        return False
    parts = value.split(".") if top > _LABEL_MAX else [value]
    return all(len(part) <= _LABEL_MAX and _LABEL.fullmatch(part) for part in parts)


def _record_problem(record: PreemptedRecord) -> str | None:
    namespace, name = record.by
    if not _is_name(namespace, _LABEL_MAX) or not _is_name(name, _SUBDOMAIN_MAX):
        return "by must name a job as namespace/name"
    if not 0 <= record.replicas <= MAX_RECORD_REPLICAS:
        return f"replicas must be in [0, {MAX_RECORD_REPLICAS}]"
    if not all(_is_name(pod, _SUBDOMAIN_MAX) for pod in record.pods):
        return "pods must be pod names"
    if len(set(record.pods)) != len(record.pods):
        return "a pod appears twice in pods"
    if record.at.tzinfo is None:
        return "at must carry a time zone"
    return None


__all__ = [
    "PREEMPTED",
    "PREEMPTED_BY",
    "Eviction",
    "InvalidRecord",
    "NoPreemption",
    "PreemptedRecord",
    "Preemption",
    "PreemptionPolicy",
    "Running",
    "describe",
    "encode_record",
    "held_replicas",
    "may_regrow",
    "parse_record",
    "preempt",
    "record_for",
]


def holding(
    key: JobKey,
    priority: int,
    created: dt.datetime,
    job: DDLJob,
    pods: Sequence[WorkerPod],
    leaving: frozenset[str] = frozenset(),
) -> Running | None:
    """What a job holds, as a candidate victim: its placed workers that are not leaving, rank
    order first (the members of its rendezvous), then by slot; None when it holds no GPUs
    or is finished."""
    spec = job.spec
    if spec.gpus_per_worker <= 0 or job.status.phase in ("Succeeded", "Failed"):
        return None
    members = job.status.rendezvous.members if job.status.rendezvous else []
    ranks = {m.pod: m.rank for m in members}
    staying = [p for p in pods if p.placed_on and not p.deleting and p.name not in leaving]
    if not staying:
        return None
    staying.sort(key=lambda p: (ranks.get(p.name, len(ranks) + p.slot), p.slot))
    return Running(
        key=key,
        priority=priority,
        created=created,
        units_per_worker=spec.gpus_per_worker,
        workers=tuple((p.name, p.placed_on or "") for p in staying),
        min_workers=max(1, min(spec.min_replicas, len(staying))),
        preemptible=spec.preemptible,
    )
