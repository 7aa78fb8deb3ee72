"""Topology-aware gang placement: which nodes a job's workers go to, and in which rank order.

The model is Kueue's topology-aware scheduling, on an in-memory snapshot:

1. Size. The gang gets the largest worker count in [min_workers, max_workers] that one
   domain of the `required` level (or the whole cluster) can hold, counting the kept
   workers; below min_workers it gets nothing and an `Unplaceable` saying what ran out.
2. Domain. It goes into the lowest-level domain that holds it and all kept workers; among
   several at that level, the one that needs the fewest nodes, then the fewest NVLink
   domains, racks, ... inside it, then the tightest fit (least capacity left over, so large
   domains stay whole for large jobs), then by name.
3. Nodes. Inside that domain it uses the fewest nodes possible (kept workers' nodes always
   count). Among selections with that many nodes it descends level by level and takes
   children greedily: those with kept workers first, then the child that adds the most,
   and as soon as one child can finish the job, the smallest such child (best fit).

Ranks follow the tree walk, so each node's, NVLink domain's, rack's, ... ranks are contiguous
and the allreduce's tiers map onto the network's (DDL's process grid). Never overcommits.
"""

from __future__ import annotations

import bisect
import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from ddl_operator.api.constants import LABEL_HOSTNAME
from ddl_operator.core.topology import Domain, NodeInfo, build_tree, domain_key, level_name


@dataclass(frozen=True)
class GangRequest:
    """What one job asks for.

    `levels` are node label keys innermost first, starting with the node level;
    `required` is one of them and the whole gang must fit in one domain of it.
    `keep` maps running worker pods that must not move to their nodes; their units are
    already in the nodes' `used`. `max_workers` is the desired count (spec.replicas),
    `min_workers` the elastic floor (equal for fixed-size jobs).

    `max_workers_per_node` caps workers on one node, kept ones included. Unset, the
    resource is the only cap, except for a job with `units_per_worker == 0` (nothing to
    account): such a job gets one worker per ready node, because without a resource
    count there is no telling how many workers a node can run side by side.
    """

    min_workers: int
    max_workers: int
    units_per_worker: int
    levels: tuple[str, ...]
    required: str | None
    procs_per_worker: int
    resource_name: str = "GPUs"
    keep: Mapping[str, str] = field(default_factory=dict)
    max_workers_per_node: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 1 <= min_workers <= max_workers, got {self.min_workers}, {self.max_workers}"
            )
        if self.units_per_worker < 0:
            raise ValueError(f"units_per_worker must be >= 0, got {self.units_per_worker}")
        if self.procs_per_worker < 1:
            raise ValueError(f"procs_per_worker must be >= 1, got {self.procs_per_worker}")
        if not self.levels or self.levels[0] != LABEL_HOSTNAME:
            raise ValueError(f"levels must start with {LABEL_HOSTNAME}, got {self.levels}")
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be distinct, got {self.levels}")
        if self.required is not None and self.required not in self.levels:
            raise ValueError(f"required {self.required!r} is not one of levels {self.levels}")
        if len(self.keep) > self.max_workers:
            raise ValueError(
                f"{len(self.keep)} kept workers exceed max_workers {self.max_workers}; "
                "choose which to drop before placing"
            )
        if self.max_workers_per_node is not None and self.max_workers_per_node < 1:
            raise ValueError(f"max_workers_per_node must be >= 1, got {self.max_workers_per_node}")

    @property
    def per_node_limit(self) -> int | None:
        """The cap on workers per node that applies besides the resource, if any."""
        if self.max_workers_per_node is not None:
            return self.max_workers_per_node
        return 1 if self.units_per_worker == 0 else None


@dataclass(frozen=True)
class Assignment:
    """One worker: its rank, node, the node's topology labels, and its pod if it is kept."""

    rank: int
    node: str
    domains: Mapping[str, str]
    pod: str | None = None


@dataclass(frozen=True)
class Placement:
    """A placed gang: workers in rank order, and the process grid innermost tier first.

    `levels` are the request's levels, so that the domains of `workers` can be compared.
    """

    workers: tuple[Assignment, ...]
    grid: tuple[int, ...]
    levels: tuple[str, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        """The distinct nodes used, in rank order."""
        return tuple(dict.fromkeys(worker.node for worker in self.workers))


@dataclass(frozen=True)
class Unplaceable:
    """Why no gang of at least min_workers fits: a sentence, and a CamelCase reason."""

    reason: str
    short: str


def place(nodes: Sequence[NodeInfo], request: GangRequest) -> Placement | Unplaceable:
    """Place the largest gang that fits, or say why none of at least min_workers does.

    Kept workers' nodes must be in the snapshot (the caller drops workers whose node is
    gone). They stay put even on a node that is no longer ready or schedulable: running pods
    are not evicted by a cordon, they only get no new neighbours.
    """
    kept_on = _kept_by_node(nodes, request.keep)
    tree = build_tree(_with_room(nodes, request, kept_on), request.levels)
    domains = list(tree.walk())
    rooms = _measure(domains, kept_on, request)
    depth_of_required = (
        0
        if request.required is None
        else len(request.levels) - request.levels.index(request.required)
    )
    candidates = [
        domain
        for domain in _at_depth(domains, depth_of_required)
        if rooms[domain].forced == len(kept_on)
    ]
    if not candidates and kept_on:
        return _kept_split(domains, rooms, request, depth_of_required)
    roomiest = min(candidates, key=lambda d: (-rooms[d].cap, -rooms[d].free, d.path), default=tree)
    size = min(request.max_workers, rooms[roomiest].cap)
    if size < request.min_workers:
        return _explain(nodes, rooms[tree], request, roomiest, rooms[roomiest])
    new = size - len(request.keep)
    domain = _lowest_fit(domains, rooms, size, new, len(kept_on), depth_of_required)
    picks: list[tuple[NodeInfo, int]] = []
    _fill(domain, new, rooms, picks)
    workers = _rank(picks, kept_on, request.levels)
    return Placement(
        workers=workers,
        grid=_grid(workers, request.levels, request.procs_per_worker),
        levels=request.levels,
    )


def ring_cross_edges(placement: Placement, level: str) -> int:
    """Edges of the worker ring (rank r -> r+1 mod n) that leave a domain of `level`."""
    index = placement.levels.index(level)
    paths = [
        _path_from(worker.node, worker.domains, placement.levels, index)
        for worker in placement.workers
    ]
    if len(paths) < 2:
        return 0
    return sum(1 for here, there in zip(paths, paths[1:] + paths[:1], strict=True) if here != there)


@dataclass(eq=False, slots=True)
class _Room:
    """What one domain can take for one request.

    Nodes with kept workers ("forced") are always used; the others ("loose") are listed
    by how many new workers each can take, largest first, nodes with no room left out.
    """

    cap: int = 0
    free: int = 0
    kept: int = 0
    forced: int = 0
    forced_new: int = 0
    loose: list[int] = field(default_factory=list)
    first_pod: tuple[tuple[int, int, str], ...] | None = None
    _prefix: list[int] | None = None

    def nodes_needed(self, new: int) -> int:
        """Fewest nodes of this domain that take `new` more workers; assumes they fit."""
        short = new - self.forced_new
        if short <= 0:
            return self.forced
        if self._prefix is None:
            self._prefix = [0, *accumulate(self.loose)]
        return self.forced + bisect.bisect_left(self._prefix, short)


def _kept_by_node(nodes: Sequence[NodeInfo], keep: Mapping[str, str]) -> dict[str, list[str]]:
    """Kept pods grouped by node, each group in natural name order (w2 before w10)."""
    known = {node.name for node in nodes}
    kept_on: dict[str, list[str]] = {}
    for pod, node in keep.items():
        if node not in known:
            raise ValueError(f"kept worker {pod!r} is on node {node!r}, not in the snapshot")
        kept_on.setdefault(node, []).append(pod)
    for pods in kept_on.values():
        pods.sort(key=_natural)
    return kept_on


def _natural(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders digit runs by value, so rank-named pods keep their order."""
    return tuple(
        (1, int(part), "") if part.isdigit() else (0, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


def _with_room(
    nodes: Sequence[NodeInfo], request: GangRequest, kept_on: Mapping[str, list[str]]
) -> Sequence[NodeInfo]:
    """The nodes that can change a placement: on a busy cluster most are full, and building
    the tree over them costs more than the rest of `place` (a full node without kept workers
    adds no slot and no free unit to any domain, so leaving it out changes nothing)."""
    if request.units_per_worker <= 0:
        return nodes  # slots come from the per-node limit, not from free units
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        raise ValueError("a node appears twice in the snapshot")
    return [
        node
        for node in nodes
        if (node.ready and node.schedulable and node.allocatable > node.used)  # node.free > 0
        or node.name in kept_on
    ]


def _new_slots(node: NodeInfo, kept: int, request: GangRequest) -> int:
    """How many new workers fit on a node next to the `kept` ones already there."""
    if not node.usable:
        return 0
    limit = request.per_node_limit
    room = limit - kept if limit is not None else None
    if request.units_per_worker > 0:
        by_units = node.free // request.units_per_worker
        room = by_units if room is None else min(room, by_units)
    assert room is not None  # units_per_worker == 0 always comes with a per-node limit
    return max(0, room)


def _measure(
    domains: Sequence[Domain], kept_on: Mapping[str, list[str]], request: GangRequest
) -> dict[Domain, _Room]:
    """The room of every domain (`domains` in tree order), computed bottom-up."""
    rooms: dict[Domain, _Room] = {}
    for domain in reversed(domains):  # children before their parents
        node = domain.node
        if node is not None:
            pods = kept_on.get(node.name, [])
            slots = _new_slots(node, len(pods), request)
            room = _Room(cap=len(pods) + slots, free=node.free, kept=len(pods))
            if pods:
                room.forced, room.forced_new = 1, slots
                room.first_pod = _natural(pods[0])
            elif slots:
                room.loose = [slots]
        else:
            room = _Room()
            loose: list[int] = []
            firsts = []
            for child in domain.children:  # one loop, not one per field: this runs per domain
                part = rooms[child]
                room.cap += part.cap
                room.free += part.free
                room.kept += part.kept
                room.forced += part.forced
                room.forced_new += part.forced_new
                loose += part.loose
                if part.first_pod is not None:
                    firsts.append(part.first_pod)
            loose.sort(reverse=True)
            room.loose = loose
            room.first_pod = min(firsts, default=None)
        rooms[domain] = room
    return rooms


def _at_depth(domains: Sequence[Domain], depth: int) -> list[Domain]:
    return [domain for domain in domains if domain.depth == depth]


def _lowest_fit(
    domains: Sequence[Domain],
    rooms: Mapping[Domain, _Room],
    size: int,
    new: int,
    forced_nodes: int,
    top_depth: int,
) -> Domain:
    """The lowest-level domain that holds the gang and every kept worker."""
    by_depth: dict[int, list[Domain]] = {}
    for domain in domains:
        room = rooms[domain]
        if domain.depth >= top_depth and room.cap >= size and room.forced == forced_nodes:
            by_depth.setdefault(domain.depth, []).append(domain)
    fits = by_depth[max(by_depth)]
    return min(
        fits,
        key=lambda d: (
            rooms[d].nodes_needed(new),
            _spread(d, rooms, size),
            rooms[d].cap,
            rooms[d].free,
            d.path,
        ),
    )


def _spread(domain: Domain, rooms: Mapping[Domain, _Room], size: int) -> tuple[int, ...]:
    """About how many sub-domains of each level inside `domain` the gang needs, innermost
    level first (NVLink domains before racks): those with kept workers, then the roomiest."""
    by_depth: dict[int, list[_Room]] = {}
    for inner in domain.walk():
        if inner is not domain and inner.node is None:
            by_depth.setdefault(inner.depth, []).append(rooms[inner])
    counts = []
    for depth in sorted(by_depth, reverse=True):
        ordered = sorted(by_depth[depth], key=lambda room: (not room.forced, -room.cap))
        held = used = 0
        for room in ordered:
            if held >= size and not room.forced:
                break
            held, used = held + room.cap, used + 1
        counts.append(used)
    return tuple(counts)


def _top(lists: Iterable[list[int]], count: int) -> list[int]:
    """The `count` largest values of some lists that are each sorted largest first."""
    return list(heapq.merge(*lists, reverse=True))[:count]


def _fill(
    domain: Domain, new: int, rooms: Mapping[Domain, _Room], out: list[tuple[NodeInfo, int]]
) -> None:
    """Put `new` workers (and the kept ones) into a domain on its fewest possible nodes.

    Appends (node, new workers there) in rank order. With k the fewest nodes, any set of
    children whose k best nodes take `new` keeps the node count minimal; the greedy below
    looks for a small such set, and each chosen child then gets at most what its share of
    those k nodes takes, so by induction the total stays k.
    """
    node = domain.node
    if node is not None:
        out.append((node, new))
        return
    room = rooms[domain]
    budget = room.nodes_needed(new) - room.forced
    chosen = sorted(
        (child for child in domain.children if rooms[child].forced),
        key=lambda child: rooms[child].first_pod or (),
    )
    base = sum(rooms[child].forced_new for child in chosen)
    pool = _top((rooms[child].loose for child in chosen), budget)
    covered = base + sum(pool)
    others = [c for c in domain.children if not rooms[c].forced and rooms[c].loose]
    while covered < new:
        best: tuple[tuple[int, int, int, tuple[str, ...]], Domain, list[int]] | None = None
        for child in others:
            child_room = rooms[child]
            merged = _top((pool, child_room.loose), budget)
            total = base + sum(merged)
            key = (
                (0, child_room.cap, child_room.free, child.path)
                if total >= new
                else (1, -total, -child_room.cap, child.path)
            )
            if best is None or key < best[0]:
                best = (key, child, merged)
        assert best is not None, "the domain's own node count promised enough room"
        _, picked, pool = best
        chosen.append(picked)
        others.remove(picked)
        covered = base + sum(pool)
    # Share the budget of loose nodes: largest first, ties to the child chosen earlier.
    shares = Counter(
        index
        for _, index in sorted(
            (-slots, index)
            for index, child in enumerate(chosen)
            for slots in rooms[child].loose[:budget]
        )[:budget]
    )
    left = new
    for index, child in enumerate(chosen):
        child_room = rooms[child]
        can_take = child_room.forced_new + sum(child_room.loose[: shares[index]])
        take = min(can_take, left)
        if take or child_room.forced:
            _fill(child, take, rooms, out)
        left -= take
    assert left == 0, "chosen children took fewer workers than they promised"


def _rank(
    picks: Sequence[tuple[NodeInfo, int]],
    kept_on: Mapping[str, list[str]],
    levels: Sequence[str],
) -> tuple[Assignment, ...]:
    """Number the workers in tree order; on each node the kept pods come first."""
    workers: list[Assignment] = []
    for node, new in picks:
        domains = {level: node.labels[level] for level in levels if level in node.labels}
        pods: list[str | None] = [*kept_on.get(node.name, []), *([None] * new)]
        for pod in pods:
            workers.append(Assignment(rank=len(workers), node=node.name, domains=domains, pod=pod))
    return tuple(workers)


def _path_from(
    node: str, labels: Mapping[str, str], levels: Sequence[str], index: int
) -> tuple[str, ...]:
    """The identity of a node's domain at levels[index] (its names from that level out)."""
    return tuple(domain_key(node, labels, level) for level in levels[index:])


def _grid(workers: Sequence[Assignment], levels: Sequence[str], procs: int) -> tuple[int, ...]:
    """The process grid, innermost tier first; its product is the world size.

    Walking the levels outwards, each tier groups the ranks of one domain. When the used
    domains of a level differ in size (a node with 3 workers next to one with 1), the tier
    takes the largest group size that divides them all (their gcd): ranks are contiguous per
    domain, so every such group still lies inside one domain of that level, which is what
    the multi-dimensional allreduce needs (equal groups per tier, each on one tier of the
    network). Tiers of size 1 are dropped; the cluster is the last tier.
    """
    world = len(workers) * procs
    on_node = Counter(worker.node for worker in workers)
    labels = {worker.node: worker.domains for worker in workers}
    grid: list[int] = []
    block = 1
    for index in range(len(levels)):
        sizes: Counter[tuple[str, ...]] = Counter()
        for node, count in on_node.items():
            sizes[_path_from(node, labels[node], levels, index)] += count
        group = math.gcd(*sizes.values()) * procs
        if group > block:
            grid.append(group // block)
            block = group
    if world > block:
        grid.append(world // block)
    return tuple(grid) or (1,)


def _amount(count: int, request: GangRequest) -> str:
    """`2 workers x 8 GPUs`, or `4 workers` for a job with nothing to account."""
    workers = f"{count} worker{'s' if count != 1 else ''}"
    if request.units_per_worker == 0:
        return workers
    return f"{workers} x {request.units_per_worker} {request.resource_name}"


def _total(count: int, request: GangRequest) -> str:
    """`16 GPUs (2 workers x 8)`, or `4 workers`."""
    if request.units_per_worker == 0:
        return _amount(count, request)
    units = count * request.units_per_worker
    plural = "s" if count != 1 else ""
    return f"{units} {request.resource_name} ({count} worker{plural} x {request.units_per_worker})"


def _room_text(room: _Room, request: GangRequest) -> str:
    """What a domain offers: `12 free GPUs (room for 1 worker)`."""
    slots = room.cap - room.kept
    room_for = f"room for {slots} {'more ' if room.kept else ''}worker{'s' if slots != 1 else ''}"
    if request.units_per_worker == 0:
        text = room_for
    else:
        text = f"{room.free} free {request.resource_name}"
        if slots * request.units_per_worker != room.free or room.kept:
            text += f" ({room_for})"
    if room.kept:
        text += f" besides {room.kept} running"
    return text


def _per_node(request: GangRequest) -> str:
    limit = request.per_node_limit
    return f" (at most {limit} per node)" if limit is not None else ""


def _explain(
    nodes: Sequence[NodeInfo],
    cluster: _Room,
    request: GangRequest,
    roomiest: Domain,
    roomiest_room: _Room,
) -> Unplaceable:
    """Say which resource or level ran out for the smallest acceptable gang (`nodes`: the
    whole snapshot, full nodes included, for naming the most free one)."""
    least = request.min_workers
    at_least = "at least " if request.min_workers < request.max_workers else ""
    usable = [node for node in nodes if node.usable]
    if not usable and not cluster.kept:
        return Unplaceable("no node is ready and schedulable", "NoReadyNodes")
    units = request.units_per_worker
    if units > 0 and cluster.cap == cluster.kept:
        # Most of a busy cluster is full: the most free node is one with some, if any is.
        some = [node for node in usable if node.allocatable > node.used]
        most = min(some, key=lambda n: (-n.free, n.name), default=None)
        if most is None or most.free < units:
            if most is not None:
                most_text = f"most free: {most.free} on {most.name}"
            else:
                first = min((node.name for node in usable), default=None)
                most_text = f"most free: 0 on {first}" if first else "none is ready"
            return Unplaceable(
                f"needs workers of {units} {request.resource_name}; no ready node has "
                f"{units} free ({most_text})",
                "NoNodeFitsWorker",
            )
    if cluster.cap < least:
        return Unplaceable(
            f"needs {at_least}{_amount(least, request)}{_per_node(request)}; "
            f"the cluster has {_room_text(cluster, request)}",
            "InsufficientCapacity",
        )
    assert request.required is not None, "without a required level the cluster is the domain"
    name = level_name(request.required)
    which = (
        f"the {name} of the running workers ({roomiest.name})"
        if cluster.kept
        else f"the largest {name} ({roomiest.name})"
    )
    return Unplaceable(
        f"needs {at_least}{_total(least, request)}{_per_node(request)} within one "
        f"{request.required}; {which} has {_room_text(roomiest_room, request)}",
        "RequiredDomainTooSmall",
    )


def _kept_split(
    domains: Sequence[Domain], rooms: Mapping[Domain, _Room], request: GangRequest, depth: int
) -> Unplaceable:
    """The kept workers already span several domains of the required level."""
    spanned = sum(1 for domain in _at_depth(domains, depth) if rooms[domain].forced)
    return Unplaceable(
        f"the running workers span {spanned} {request.required} domains, but the whole gang "
        "must fit in one; the caller must let some of them go",
        "KeptWorkersSplit",
    )
