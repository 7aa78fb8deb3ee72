"""Tests of gang placement: table-driven policy cases and property tests of its invariants."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import groupby

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddl_operator.api.constants import (
    DEFAULT_TOPOLOGY_LEVELS,
    LABEL_HOSTNAME,
    LABEL_NVLINK_DOMAIN,
    LABEL_RACK,
    LABEL_ZONE,
)
from ddl_operator.core.placement import (
    GangRequest,
    Placement,
    Unplaceable,
    place,
    ring_cross_edges,
)
from ddl_operator.core.topology import NodeInfo

LEVELS = DEFAULT_TOPOLOGY_LEVELS


def make_nodes(
    zones: int = 2,
    racks_per_zone: int = 2,
    nodes_per_rack: int = 4,
    gpus: int = 8,
    nvlink_per_rack: int = 1,
    used: Mapping[str, int] | None = None,
) -> list[NodeInfo]:
    """A labelled cluster; node `z1-r0-n2` is node 2 of rack 0 of zone 1."""
    used = used or {}
    per_domain = -(-nodes_per_rack // nvlink_per_rack)
    nodes = []
    for z in range(zones):
        for r in range(racks_per_zone):
            for n in range(nodes_per_rack):
                name = f"z{z}-r{r}-n{n}"
                labels = {
                    LABEL_HOSTNAME: name,
                    LABEL_ZONE: f"z{z}",
                    LABEL_RACK: f"z{z}-r{r}",
                    LABEL_NVLINK_DOMAIN: f"z{z}-r{r}-v{n // per_domain}",
                }
                nodes.append(NodeInfo(name, labels, gpus, used.get(name, 0)))
    return nodes


def gang(
    workers: int,
    gpus: int = 8,
    *,
    least: int | None = None,
    required: str | None = None,
    procs: int | None = None,
    keep: Mapping[str, str] | None = None,
    per_node: int | None = None,
) -> GangRequest:
    return GangRequest(
        min_workers=workers if least is None else least,
        max_workers=workers,
        units_per_worker=gpus,
        levels=LEVELS,
        required=required,
        procs_per_worker=procs if procs is not None else max(gpus, 1),
        keep=keep or {},
        max_workers_per_node=per_node,
    )


def placed(nodes: Sequence[NodeInfo], request: GangRequest) -> Placement:
    result = place(nodes, request)
    assert isinstance(result, Placement), result
    return result


def refused(nodes: Sequence[NodeInfo], request: GangRequest) -> Unplaceable:
    result = place(nodes, request)
    assert isinstance(result, Unplaceable), result
    return result


def per_node(placement: Placement) -> dict[str, int]:
    return dict(Counter(w.node for w in placement.workers))


def domains_at(placement: Placement, level: str) -> list[str]:
    return [w.domains[level] for w in placement.workers]


# --- table-driven policy cases ---------------------------------------------------------------


def test_two_full_node_workers_land_on_two_nodes_of_one_rack() -> None:
    result = placed(make_nodes(), gang(2))
    assert len(result.nodes) == 2
    assert len(set(domains_at(result, LABEL_RACK))) == 1
    assert result.grid == (8, 2)
    assert [w.rank for w in result.workers] == [0, 1]
    assert all(w.pod is None for w in result.workers)


def test_small_workers_pack_onto_one_node() -> None:
    result = placed(make_nodes(), gang(4, gpus=2))
    assert per_node(result) == {result.nodes[0]: 4}
    assert result.grid == (8,)


def test_required_rack_too_small_names_the_level_and_the_largest_free() -> None:
    nodes = make_nodes(used={"z0-r0-n0": 4})  # every rack: 32 GPUs, except z0-r0: 28
    result = refused(nodes, gang(5, required=LABEL_RACK))
    assert result.short == "RequiredDomainTooSmall"
    assert result.reason == (
        "needs 40 GPUs (5 workers x 8) within one topology.kubernetes.io/rack; "
        "the largest rack (z0-r1) has 32 free GPUs"
    )


def test_fragmented_required_domain_says_how_many_workers_fit() -> None:
    nodes = make_nodes(zones=1, racks_per_zone=1, nodes_per_rack=2, used={"z0-r0-n0": 2})
    result = refused(nodes, gang(2, required=LABEL_RACK))
    assert "has 14 free GPUs (room for 1 worker)" in result.reason


def test_elastic_job_takes_as_many_workers_as_fit() -> None:
    busy = {f"z{z}-r{r}-n{n}": 8 for z in range(2) for r in range(2) for n in range(4)}
    for name in ["z0-r0-n0", "z0-r0-n1", "z1-r1-n0", "z1-r1-n1", "z1-r1-n2"]:
        del busy[name]
    result = placed(make_nodes(used=busy), gang(8, least=4))
    assert len(result.workers) == 5
    assert result.grid == (8, 5)


def test_elastic_job_prefers_the_required_domain_that_fits_most() -> None:
    busy = {"z0-r0-n0": 8, "z0-r0-n1": 8}
    result = placed(make_nodes(used=busy), gang(8, least=2, required=LABEL_RACK))
    assert len(result.workers) == 4
    assert set(domains_at(result, LABEL_RACK)) == {"z0-r1"}


def test_fewer_than_min_fit_holds_nothing_and_says_what_ran_out() -> None:
    busy = {f"z0-r0-n{n}": 8 for n in range(4)} | {"z0-r1-n0": 4, "z0-r1-n1": 8}
    nodes = make_nodes(zones=1, racks_per_zone=2, used=busy)  # free: 4 + 0 + 8 + 8
    result = refused(nodes, gang(4, least=3))
    assert result.short == "InsufficientCapacity"
    assert result.reason == (
        "needs at least 3 workers x 8 GPUs; the cluster has 20 free GPUs (room for 2 workers)"
    )


def test_no_node_big_enough_for_one_worker() -> None:
    nodes = make_nodes(zones=1, racks_per_zone=1, nodes_per_rack=2, gpus=4)
    result = refused(nodes, gang(2))
    assert result.short == "NoNodeFitsWorker"
    assert result.reason == (
        "needs workers of 8 GPUs; no ready node has 8 free (most free: 4 on z0-r0-n0)"
    )


def test_no_ready_node() -> None:
    nodes = [replace(n, ready=False) for n in make_nodes(zones=1, racks_per_zone=1)]
    assert refused(nodes, gang(1)).short == "NoReadyNodes"


def test_not_ready_and_cordoned_nodes_get_no_workers() -> None:
    nodes = make_nodes(zones=1, racks_per_zone=1)
    nodes[0] = replace(nodes[0], ready=False)
    nodes[1] = replace(nodes[1], schedulable=False)
    result = placed(nodes, gang(2))
    assert set(result.nodes) == {"z0-r0-n2", "z0-r0-n3"}


def test_kept_workers_stay_and_new_ones_pack_next_to_them() -> None:
    # Two 4-GPU workers already run on z1-r1-n1 (one) and z1-r1-n2 (one).
    used = {"z1-r1-n1": 4, "z1-r1-n2": 4}
    keep = {"job-w0": "z1-r1-n1", "job-w1": "z1-r1-n2"}
    result = placed(make_nodes(used=used), gang(6, gpus=4, keep=keep))
    assert per_node(result) == {"z1-r1-n1": 2, "z1-r1-n2": 2, "z1-r1-n0": 2}
    kept = {w.pod: (w.rank, w.node) for w in result.workers if w.pod}
    assert kept == {"job-w0": (0, "z1-r1-n1"), "job-w1": (2, "z1-r1-n2")}
    assert set(domains_at(result, LABEL_RACK)) == {"z1-r1"}


def test_kept_pods_keep_their_natural_order() -> None:
    keep = {"job-w10": "z0-r0-n0", "job-w2": "z0-r0-n0"}
    result = placed(make_nodes(used={"z0-r0-n0": 2}), gang(2, gpus=1, keep=keep))
    assert [w.pod for w in result.workers] == ["job-w2", "job-w10"]


def test_kept_worker_on_a_cordoned_node_stays() -> None:
    nodes = make_nodes(zones=1, racks_per_zone=1, used={"z0-r0-n3": 8})
    nodes[3] = replace(nodes[3], schedulable=False)
    result = placed(nodes, gang(2, keep={"job-w0": "z0-r0-n3"}))
    assert result.workers[0].node == "z0-r0-n3" and result.workers[0].pod == "job-w0"
    assert result.workers[1].node != "z0-r0-n3"


def test_shrink_to_only_kept_workers_places_nothing_new() -> None:
    keep = {"job-w0": "z0-r0-n0", "job-w1": "z1-r1-n3"}
    result = placed(make_nodes(used={"z0-r0-n0": 8, "z1-r1-n3": 8}), gang(2, keep=keep))
    assert [w.pod for w in result.workers] == ["job-w0", "job-w1"]


def test_kept_workers_split_across_the_required_level() -> None:
    keep = {"job-w0": "z0-r0-n0", "job-w1": "z1-r1-n3"}
    nodes = make_nodes(used={"z0-r0-n0": 8, "z1-r1-n3": 8})
    result = refused(nodes, gang(3, keep=keep, required=LABEL_ZONE))
    assert result.short == "KeptWorkersSplit"
    assert "span 2 topology.kubernetes.io/zone domains" in result.reason


def test_required_domain_of_kept_workers_too_small() -> None:
    keep = {"job-w0": "z0-r0-n0"}
    nodes = make_nodes(used={"z0-r0-n0": 8})
    result = refused(nodes, gang(5, keep=keep, required=LABEL_RACK))
    assert result.reason.endswith(
        "the rack of the running workers (z0-r0) has 24 free GPUs (room for 3 more workers) "
        "besides 1 running"
    )


def test_partly_used_nodes_are_used_best_fit() -> None:
    # Free: n0 8, n1 6, n2 2, n3 4. A 2-GPU worker takes the tightest node, n2.
    used = {"z0-r0-n1": 2, "z0-r0-n2": 6, "z0-r0-n3": 4}
    nodes = make_nodes(zones=1, racks_per_zone=1, used=used)
    assert placed(nodes, gang(1, gpus=2)).nodes == ("z0-r0-n2",)
    # Five 2-GPU workers need two nodes: the fullest-free one plus the tightest that finishes.
    assert per_node(placed(nodes, gang(5, gpus=2))) == {"z0-r0-n0": 4, "z0-r0-n2": 1}


def test_tightest_rack_that_fits_is_chosen() -> None:
    busy = {"z0-r0-n2": 8, "z0-r0-n3": 8}  # z0-r0 has 2 free nodes, every other rack 4
    result = placed(make_nodes(used=busy), gang(2))
    assert set(domains_at(result, LABEL_RACK)) == {"z0-r0"}


def test_among_domains_that_fit_fewer_nodes_beat_the_name_order() -> None:
    # Three 4-GPU workers: rack z0-r0 needs three nodes (4 free each), z0-r1 needs two.
    used = {"z0-r0-n0": 4, "z0-r0-n1": 4, "z0-r0-n2": 4, "z0-r0-n3": 8}
    used |= {"z0-r1-n0": 0, "z0-r1-n1": 4, "z0-r1-n2": 8, "z0-r1-n3": 8}
    nodes = make_nodes(zones=1, used=used)
    result = placed(nodes, gang(3, gpus=4))
    assert per_node(result) == {"z0-r1-n0": 2, "z0-r1-n1": 1}


def test_among_domains_that_fit_fewer_racks_beat_a_tighter_fit() -> None:
    # Five full-node workers. Zone z0 is the tighter fit (6 free nodes) but spreads them over
    # 3 racks of 2; zone z1 (8 free nodes) holds them in 2 racks.
    busy = [f"z0-r{r}-n{n}" for r in range(3) for n in (2, 3)]
    busy += [f"z1-r2-n{n}" for n in range(4)]
    nodes = make_nodes(racks_per_zone=3, used=dict.fromkeys(busy, 8))
    result = placed(nodes, gang(5))
    assert set(domains_at(result, LABEL_ZONE)) == {"z1"}
    assert len(set(domains_at(result, LABEL_RACK))) == 2


def test_fewest_nodes_inside_the_chosen_domain() -> None:
    # Zone z0: rack r0 has eight nodes with 1 free GPU each, rack r1 one node with 8 free.
    # Nine 1-GPU workers fit only in the zone, and need just 2 nodes there.
    nodes = make_nodes(
        zones=1,
        racks_per_zone=1,
        nodes_per_rack=8,
        used=dict.fromkeys([f"z0-r0-n{n}" for n in range(8)], 7),
    )
    nodes.append(NodeInfo("big", {LABEL_ZONE: "z0", LABEL_RACK: "z0-r1"}, allocatable=8, used=0))
    result = placed(nodes, gang(9, gpus=1))
    assert len(result.nodes) == 2
    assert per_node(result)["big"] == 8


def test_spanning_racks_keeps_ranks_contiguous() -> None:
    nodes = make_nodes(nvlink_per_rack=2)
    result = placed(nodes, gang(6))
    for level in (LABEL_HOSTNAME, LABEL_NVLINK_DOMAIN, LABEL_RACK, LABEL_ZONE):
        runs = [key for key, _ in groupby(domains_at(result, level))]
        assert len(runs) == len(set(runs)), level
    assert len(set(domains_at(result, LABEL_RACK))) == 2
    assert len(set(domains_at(result, LABEL_ZONE))) == 1
    assert ring_cross_edges(result, LABEL_RACK) == 2
    assert ring_cross_edges(result, LABEL_ZONE) == 0
    assert ring_cross_edges(result, LABEL_HOSTNAME) == 6


# Every node of the zone busy but z0-r0-n0 and z0-r0-n1 (NVLink domain z0-r0-v0).
THIS_NVLINK_ONLY = {
    name: 8 for name in ["z0-r0-n2", "z0-r0-n3"] + [f"z0-r1-n{n}" for n in range(4)]
}


@pytest.mark.parametrize(
    ("workers", "gpus", "procs", "used", "grid"),
    [
        # 8 full-node workers: 2 nodes per NVLink domain, 2 domains per rack, 2 racks.
        (8, 8, 8, {}, (8, 2, 2, 2)),
        # 2 workers x 4 procs on each of 2 nodes of one rack (the brief's example).
        (4, 4, 4, {"z0-r0-n0": 8, "z0-r0-n1": 8, "z0-r0-n2": 8}, (8, 2)),
        # 3 workers on one node and 1 on another: node groups are not equal, so the
        # innermost tier is the gcd (one worker's 4 processes), then all 4 workers.
        (4, 2, 4, {"z0-r0-n0": 2, "z0-r0-n1": 6, **THIS_NVLINK_ONLY}, (4, 4)),
        # Same with one process per worker: no tier but the whole world.
        (4, 2, 1, {"z0-r0-n0": 2, "z0-r0-n1": 6, **THIS_NVLINK_ONLY}, (4,)),
        (1, 1, 1, {}, (1,)),
    ],
)
def test_process_grid(
    workers: int, gpus: int, procs: int, used: dict[str, int], grid: tuple[int, ...]
) -> None:
    nodes = make_nodes(zones=1, nvlink_per_rack=2, used=used)
    result = placed(nodes, gang(workers, gpus=gpus, procs=procs))
    assert result.grid == grid
    product = 1
    for tier in result.grid:
        product *= tier
    assert product == workers * procs


def test_cpu_job_defaults_to_one_worker_per_node() -> None:
    result = placed(make_nodes(), gang(3, gpus=0, required=LABEL_RACK))
    assert len(result.nodes) == 3
    assert len(set(domains_at(result, LABEL_RACK))) == 1
    result = placed(make_nodes(), gang(6, gpus=0, per_node=4))
    assert sorted(per_node(result).values()) == [2, 4]


def test_cpu_job_too_big_for_its_rack() -> None:
    result = refused(make_nodes(), gang(5, gpus=0, required=LABEL_RACK))
    assert result.reason == (
        "needs 5 workers (at most 1 per node) within one topology.kubernetes.io/rack; "
        "the largest rack (z0-r0) has room for 4 workers"
    )


def test_node_without_the_required_label_is_its_own_domain() -> None:
    nodes = [NodeInfo(f"n{i}", {}, allocatable=8, used=0) for i in range(2)]
    assert refused(nodes, gang(2, required=LABEL_RACK)).short == "RequiredDomainTooSmall"
    result = placed(nodes, gang(2))
    assert result.workers[0].domains == {}
    assert ring_cross_edges(result, LABEL_RACK) == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_workers": 0}, "min_workers"),
        ({"min_workers": 3, "max_workers": 2}, "min_workers"),
        ({"units_per_worker": -1}, "units_per_worker"),
        ({"procs_per_worker": 0}, "procs_per_worker"),
        ({"levels": (LABEL_RACK,)}, "levels must start"),
        ({"levels": (LABEL_HOSTNAME, LABEL_RACK, LABEL_RACK)}, "distinct"),
        ({"required": "example.com/row"}, "not one of levels"),
        ({"keep": {"a": "n1", "b": "n2", "c": "n3"}}, "exceed max_workers"),
        ({"max_workers_per_node": 0}, "max_workers_per_node"),
    ],
)
def test_bad_requests_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(gang(2), **changes)  # type: ignore[arg-type]


def test_kept_worker_on_an_unknown_node_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="not in the snapshot"):
        place(make_nodes(), gang(2, keep={"job-w0": "gone"}))


# --- properties on random clusters -----------------------------------------------------------

OPTIONAL_LEVELS = (LABEL_NVLINK_DOMAIN, LABEL_RACK, LABEL_ZONE)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[NodeInfo], GangRequest]:
    """A small random cluster (some labels missing, some nodes down) and a request for it."""
    count = draw(st.integers(1, 12))
    nodes: list[NodeInfo] = []
    for i in range(count):
        labels = {LABEL_HOSTNAME: f"n{i}"}
        for level, values in ((LABEL_ZONE, 2), (LABEL_RACK, 3), (LABEL_NVLINK_DOMAIN, 2)):
            if draw(st.integers(0, 9)):  # a label is missing one time in ten
                labels[level] = f"{level[-4:]}{draw(st.integers(0, values - 1))}"
        gpus = draw(st.sampled_from([4, 8]))
        nodes.append(
            NodeInfo(
                f"n{i}",
                labels,
                allocatable=gpus,
                used=min(gpus, draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8]))),
                ready=draw(st.integers(0, 19)) > 0,
                schedulable=draw(st.integers(0, 19)) > 0,
            )
        )
    units = draw(st.sampled_from([0, 1, 1, 2, 2, 4, 8]))
    # Kept workers: on nodes with room for them, their units counted as used.
    keep: dict[str, str] = {}
    for pod in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, count - 1))
        if nodes[i].allocatable - nodes[i].used >= units:
            nodes[i] = replace(nodes[i], used=nodes[i].used + units)
            keep[f"w{pod}"] = f"n{i}"
    most = draw(st.integers(max(1, len(keep)), 10))
    request = GangRequest(
        min_workers=draw(st.sampled_from([1, max(1, most // 2), most])),
        max_workers=most,
        units_per_worker=units,
        levels=LEVELS,
        required=draw(st.sampled_from([None, None, *LEVELS])),
        procs_per_worker=draw(st.integers(1, 4)),
        keep=keep,
        max_workers_per_node=draw(st.sampled_from([None, 1, 3])),
    )
    return nodes, request


def slots(node: NodeInfo, kept: int, request: GangRequest) -> int:
    """New workers a node can take; written apart from the code under test."""
    if not (node.ready and node.schedulable):
        return 0
    room = 10**6
    if request.units_per_worker:
        room = (node.allocatable - node.used) // request.units_per_worker
    limit = request.max_workers_per_node or (1 if request.units_per_worker == 0 else 10**6)
    return max(0, min(room, limit - kept))


def domain_of(node: NodeInfo, levels: Sequence[str], index: int) -> tuple[str, ...]:
    return tuple(
        node.name if level == LABEL_HOSTNAME else node.labels.get(level, "own " + node.name)
        for level in levels[index:]
    )


def groups(nodes: Sequence[NodeInfo], index: int) -> dict[tuple[str, ...], list[NodeInfo]]:
    out: dict[tuple[str, ...], list[NodeInfo]] = {}
    for node in nodes:
        out.setdefault(domain_of(node, LEVELS, index), []).append(node)
    return out


def capacity(members: Sequence[NodeInfo], kept: Counter[str], request: GangRequest) -> int:
    return sum(kept[n.name] + slots(n, kept[n.name], request) for n in members)


def fewest_nodes(
    members: Sequence[NodeInfo], kept: Counter[str], request: GangRequest, workers: int
) -> int:
    """Kept workers' nodes plus the largest others until `workers` fit: the true minimum."""
    forced = [n for n in members if kept[n.name]]
    have = sum(kept[n.name] + slots(n, kept[n.name], request) for n in forced)
    count = len(forced)
    for room in sorted((slots(n, 0, request) for n in members if not kept[n.name]), reverse=True):
        if have >= workers:
            break
        have += room
        count += 1
    assert have >= workers
    return count


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_placement_invariants(case: tuple[list[NodeInfo], GangRequest]) -> None:
    nodes, request = case
    by_name = {n.name: n for n in nodes}
    kept = Counter(request.keep.values())
    top = LEVELS.index(request.required) if request.required else len(LEVELS)
    eligible = [
        members
        for members in (groups(nodes, top).values() if top < len(LEVELS) else [nodes])
        if all(any(n.name == name for n in members) for name in kept)
    ]
    best = max((capacity(m, kept, request) for m in eligible), default=0)
    expected = min(request.max_workers, best)

    result = place(nodes, request)

    # All or nothing, and the largest gang that fits.
    if expected < request.min_workers:
        assert isinstance(result, Unplaceable)
        assert result.reason and result.short.isalnum() and result.short[0].isupper()
        return
    assert isinstance(result, Placement), result
    workers = result.workers
    assert len(workers) == expected
    assert [w.rank for w in workers] == list(range(expected))

    # Kept workers stay where they are, each once; new workers never overcommit a node.
    assert {w.pod: w.node for w in workers if w.pod is not None} == dict(request.keep)
    new = Counter(w.node for w in workers if w.pod is None)
    for name, count in new.items():
        assert count <= slots(by_name[name], kept[name], request)

    # Each domain of each level holds a contiguous run of ranks.
    for index in range(len(LEVELS)):
        runs = [
            key for key, _ in groupby(domain_of(by_name[w.node], LEVELS, index) for w in workers)
        ]
        assert len(runs) == len(set(runs)), LEVELS[index]

    # The gang sits in one domain of the required level.
    if request.required is not None:
        assert len({domain_of(by_name[w.node], LEVELS, top) for w in workers}) == 1

    # The gang is in the lowest-level domain that can hold it (with every kept worker) ...
    shared = next(
        index
        for index in range(len(LEVELS) + 1)
        if index == len(LEVELS)
        or len({domain_of(by_name[w.node], LEVELS, index) for w in workers}) == 1
    )
    for index in range(shared):
        for members in groups(nodes, index).values():
            holds_kept = all(any(n.name == name for n in members) for name in kept)
            assert not (holds_kept and capacity(members, kept, request) >= expected), index
    # ... and on as few of that domain's nodes as possible.
    home = (
        nodes
        if shared == len(LEVELS)
        else groups(nodes, shared)[domain_of(by_name[workers[0].node], LEVELS, shared)]
    )
    assert len(result.nodes) == fewest_nodes(home, kept, request, expected)

    # The grid describes the world, innermost tier first.
    product = 1
    for tier in result.grid:
        assert tier >= 1
        product *= tier
    assert product == expected * request.procs_per_worker


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.integers(1, 30), st.booleans())
def test_full_nodes_change_no_placement_and_no_reason(
    case: tuple[list[NodeInfo], GangRequest], extra: int, down: bool
) -> None:
    """`place` skips nodes with nothing free (most of a busy cluster): adding such nodes, in
    racks of their own or beside the others, gives the same placement or the same reason."""
    nodes, request = case
    full = [
        NodeInfo(
            f"full{i}",
            {LABEL_HOSTNAME: f"full{i}", LABEL_RACK: f"rack{i % 4}", LABEL_ZONE: f"zone{i % 2}"},
            allocatable=8,
            used=8,
            ready=not (down and i % 3 == 0),
        )
        for i in range(extra)
    ]
    if request.units_per_worker == 0:
        return  # such a job takes a slot on any ready node, full or not
    alone, among = place(nodes, request), place([*full, *nodes], request)
    if isinstance(alone, Placement):
        assert among == alone
        return
    assert isinstance(among, Unplaceable)
    # Only a cluster with no usable node at all changes its reason, once some are added.
    assert among.short == alone.short or not any(n.usable for n in nodes)


def test_a_cluster_with_every_node_full_says_which_has_most_free() -> None:
    nodes = [NodeInfo(f"n{i}", {LABEL_HOSTNAME: f"n{i}", LABEL_RACK: "r0"}, 8, 8) for i in range(3)]
    request = GangRequest(1, 1, 8, LEVELS, LABEL_RACK, 1)
    result = place(nodes, request)
    assert isinstance(result, Unplaceable)
    assert result.short == "NoNodeFitsWorker"
    assert "most free: 0 on n0" in result.reason


@given(clusters())
def test_a_gang_kept_whole_orders_the_same_on_its_own_nodes(
    case: tuple[list[NodeInfo], GangRequest],
) -> None:
    """A re-form's rank order (every worker kept) depends only on the nodes the workers run
    on, so reconcile orders a running gang over those alone, not over the whole cluster."""
    nodes, request = case
    first = place(nodes, request)
    if not isinstance(first, Placement):
        return
    names = [w.pod or f"new-{w.rank}" for w in first.workers]
    keep = {name: w.node for name, w in zip(names, first.workers, strict=True)}
    added = Counter(w.node for w in first.workers if w.pod is None)
    running = [replace(n, used=n.used + added[n.name] * request.units_per_worker) for n in nodes]
    whole = replace(request, min_workers=len(keep), max_workers=len(keep), keep=keep)
    own = [n for n in running if n.name in set(keep.values())]
    assert place(own, whole) == place(running, whole)
