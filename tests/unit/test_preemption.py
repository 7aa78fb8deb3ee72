"""Preemption: shrink elastic victims inside the preemptor's domain first, suspend only then,
never for a job that would still not fit, never against equal priority or opt-outs."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest

from ddl_operator.api import constants as c
from ddl_operator.core.placement import GangRequest
from ddl_operator.core.preemption import (
    Eviction,
    InvalidRecord,
    NoPreemption,
    PreemptedRecord,
    Preemption,
    PreemptionPolicy,
    Running,
    encode_record,
    held_replicas,
    may_regrow,
    parse_record,
    preempt,
    record_for,
)
from ddl_operator.core.queueing import Demand, Slot
from ddl_operator.core.topology import NodeInfo

from builders import T0, rack_nodes

URGENT = 100
LOWER: PreemptionPolicy = "PreemptLowerPriority"


def demand(
    workers: int,
    priority: int = URGENT,
    rack: bool = True,
    units: int = 8,
    min_workers: int | None = None,
) -> Demand:
    request = GangRequest(
        min_workers=min_workers or workers,
        max_workers=workers,
        units_per_worker=units,
        levels=c.DEFAULT_TOPOLOGY_LEVELS,
        required=c.LABEL_RACK if rack else None,
        procs_per_worker=units,
    )
    return Demand(("ns", "urgent"), priority, T0 + dt.timedelta(hours=1), request)


def job(
    name: str,
    nodes: Sequence[str],
    min_workers: int | None = None,
    priority: int = 0,
    at: float = 0.0,
    units: int = 8,
    preemptible: bool = True,
) -> Running:
    """A running job with one worker per entry of `nodes` (rank order), created `at` s after T0;
    fixed-size unless `min_workers` is given."""
    workers = tuple((f"{name}-worker-{i}", node) for i, node in enumerate(nodes))
    return Running(
        key=("ns", name),
        priority=priority,
        created=T0 + dt.timedelta(seconds=at),
        units_per_worker=units,
        workers=workers,
        min_workers=min_workers if min_workers is not None else len(workers),
        preemptible=preemptible,
    )


def occupied(nodes: list[NodeInfo], jobs: Sequence[Running]) -> list[NodeInfo]:
    """The nodes with every job's workers counted in `used`."""
    used: Counter[str] = Counter()
    for running in jobs:
        for _, node in running.workers:
            used[node] += running.units_per_worker
    return [replace(n, used=used[n.name]) for n in nodes]


def plan(want: Demand, nodes: list[NodeInfo], jobs: Sequence[Running]) -> Preemption:
    result = preempt(want, occupied(nodes, jobs), jobs)
    assert isinstance(result, Preemption), result
    return result


def by_job(result: Preemption) -> dict[str, Eviction]:
    return {e.job[1]: e for e in result.victims}


def racks_of(result: Preemption) -> set[str]:
    return {w.domains[c.LABEL_RACK] for w in result.placement.workers}


def test_two_elastic_jobs_shrink_to_their_minimum_so_the_preemptor_fits_in_one_rack() -> None:
    nodes = rack_nodes(racks=2, per_rack=4)  # 64 GPUs, all taken
    a = job("a", ["r0-n0", "r0-n1", "r1-n0", "r1-n1"], min_workers=2)
    b = job("b", ["r0-n2", "r0-n3", "r1-n2", "r1-n3"], min_workers=2, at=5)
    result = plan(demand(4), nodes, [a, b])
    # Either rack costs the same; rack-1 holds their high ranks (rank 0 stays, like a scale-down).
    assert result.domain == "rack rack-1"
    assert racks_of(result) == {"rack-1"} and len(result.placement.workers) == 4
    victims = by_job(result)
    assert victims["a"].action == victims["b"].action == "Shrink"
    assert victims["a"].replicas == victims["b"].replicas == 2  # their minimum, not below
    assert victims["a"].pods == ("a-worker-2", "a-worker-3")  # the rack-1 ones
    assert victims["b"].pods == ("b-worker-2", "b-worker-3")
    assert result.units == 32
    assert "preempted by ns/urgent (priority 100)" in victims["a"].message
    assert "rack rack-1" in victims["a"].message
    # The capacity handed to the preemptor is the emptied rack.
    assert {n.name for n in result.nodes if n.free == 8} == {f"r1-n{i}" for i in range(4)}


def test_a_victim_without_workers_in_the_chosen_domain_is_not_touched() -> None:
    nodes = rack_nodes(racks=2, per_rack=2)
    here = job("here", ["r0-n0", "r0-n1"], min_workers=1, at=1)
    elsewhere = job("elsewhere", ["r1-n0", "r1-n1"], min_workers=1, at=9)  # younger
    result = plan(demand(1), nodes, [here, elsewhere])
    assert len(result.victims) == 1 and result.victims[0].replicas == 1
    assert result.victims[0].job[1] == "elsewhere"  # youngest first, and only it
    assert racks_of(result) == {"rack-1"}


def test_shrinking_never_goes_below_the_minimum_and_then_suspends() -> None:
    nodes = rack_nodes(racks=1, per_rack=4)
    a = job("a", ["r0-n0", "r0-n1", "r0-n2"], min_workers=2)  # 1 spare worker
    b = job("b", ["r0-n3"], at=5)
    result = plan(demand(2), nodes, [a, b])
    victims = by_job(result)
    assert victims["a"].replicas >= 2
    assert victims["b"].action == "Suspend" and victims["b"].pods == ("b-worker-0",)
    assert victims["a"].action == "Shrink" and victims["a"].pods == ("a-worker-2",)


def test_scattered_free_gpus_do_not_count() -> None:
    nodes = rack_nodes(racks=2, per_rack=2)
    # One free node per rack: 16 free GPUs, but no rack has 2 free nodes.
    e = job("e", ["r0-n1", "r1-n1"], min_workers=1)
    result = plan(demand(2), nodes, [e])
    # Removing one worker completes a rack (free node + freed node); both racks would do,
    # the higher rank goes, and nothing is taken from the other rack.
    assert by_job(result)["e"].pods == ("e-worker-1",)
    assert result.units == 8 and racks_of(result) == {"rack-1"}


def test_scattered_shrinking_does_not_count_so_a_whole_job_is_suspended() -> None:
    nodes = rack_nodes(racks=2, per_rack=2)
    old = job("old", ["r0-n0", "r0-n1"], min_workers=1, at=0)
    young = job("young", ["r1-n0", "r1-n1"], min_workers=1, at=10)
    # Shrinking both frees 16 GPUs, one node per rack: useless for a 2-worker gang in one rack.
    result = plan(demand(2), nodes, [old, young])
    assert [(e.job[1], e.action, e.replicas) for e in result.victims] == [("young", "Suspend", 0)]
    assert racks_of(result) == {"rack-1"}


def test_workers_of_one_node_go_together_when_they_are_smaller_than_the_preemptors() -> None:
    nodes = rack_nodes(racks=1, per_rack=2)
    # Four 4-GPU workers, two per node; the preemptor needs one whole 8-GPU node.
    small = job("small", ["r0-n0", "r0-n1", "r0-n0", "r0-n1"], min_workers=1, units=4)
    result = plan(demand(1), nodes, [small])
    removed = by_job(result)["small"]
    nodes_of = dict(small.workers)
    assert len(removed.pods) == 2 and len({nodes_of[p] for p in removed.pods}) == 1
    assert removed.replicas == 2


def test_non_elastic_jobs_are_suspended_only_when_shrinking_is_not_enough() -> None:
    nodes = rack_nodes(racks=1, per_rack=4)
    elastic = job("elastic", ["r0-n0", "r0-n1"], min_workers=1, priority=1, at=0)
    older = job("older", ["r0-n2"], priority=1, at=1)
    younger = job("younger", ["r0-n3"], priority=1, at=2)
    jobs = [elastic, older, younger]
    one = plan(demand(1), nodes, jobs)
    assert [(e.job[1], e.action) for e in one.victims] == [("elastic", "Shrink")]
    two = plan(demand(2), nodes, jobs)
    assert {(e.job[1], e.action) for e in two.victims} == {
        ("elastic", "Shrink"),
        ("younger", "Suspend"),
    }
    # Lower priority goes before youth.
    lowest = replace(older, priority=0)
    three = plan(demand(2), nodes, [elastic, lowest, younger])
    assert {(e.job[1], e.action) for e in three.victims} == {
        ("elastic", "Shrink"),
        ("older", "Suspend"),
    }


def test_suspensions_are_minimal() -> None:
    nodes = rack_nodes(racks=1, per_rack=3)
    # The cheapest job is small, so taking jobs in order would suspend it and then the big one;
    # the big one alone is enough.
    tiny = job("tiny", ["r0-n0"], priority=0, units=4)
    big = job("big", ["r0-n1", "r0-n2"], priority=1)
    result = plan(demand(2), nodes, [tiny, big])
    assert [(e.job[1], e.action) for e in result.victims] == [("big", "Suspend")]


def test_lower_priority_victims_shrink_first() -> None:
    nodes = rack_nodes(racks=1, per_rack=4)
    low = job("low", ["r0-n0", "r0-n1"], min_workers=1, priority=1, at=0)
    lower = job("lower", ["r0-n2", "r0-n3"], min_workers=1, priority=0, at=0)
    result = plan(demand(1), nodes, [low, lower])
    assert [(e.job[1], e.pods) for e in result.victims] == [("lower", ("lower-worker-1",))]


def test_no_preemption_when_the_preemptor_would_still_not_fit() -> None:
    nodes = rack_nodes(racks=2, per_rack=4)
    jobs = [job("a", ["r0-n0", "r0-n1", "r1-n0", "r1-n1"], min_workers=1)]
    result = preempt(demand(5), occupied(nodes, jobs), jobs)
    assert isinstance(result, NoPreemption) and result.short == "WouldNotFit"
    assert "rack" in result.reason
    # Freeing everything that may be freed is not enough either when the rest is protected.
    guarded = [*jobs, job("vip", ["r0-n2", "r0-n3", "r1-n2", "r1-n3"], priority=URGENT)]
    result = preempt(demand(3), occupied(nodes, guarded), guarded)
    assert isinstance(result, NoPreemption) and result.short == "WouldNotFit"


def test_nothing_to_do_when_it_fits() -> None:
    nodes = rack_nodes(racks=1, per_rack=2)
    jobs = [job("a", ["r0-n0"], priority=0)]
    result = preempt(demand(1), occupied(nodes, jobs), jobs)
    assert isinstance(result, NoPreemption) and result.short == "Fits"


@pytest.mark.parametrize(
    ("victim", "policy", "short"),
    [
        (job("a", ["r0-n0", "r0-n1"], min_workers=1, preemptible=False), LOWER, "NoVictims"),
        (job("a", ["r0-n0", "r0-n1"], min_workers=1), "Never", "PreemptionPolicyNever"),
        (job("a", ["r0-n0", "r0-n1"], min_workers=1, priority=URGENT), LOWER, "NoVictims"),
        (job("a", ["r0-n0", "r0-n1"], min_workers=1, priority=URGENT + 1), LOWER, "NoVictims"),
    ],
    ids=["preemptible-false", "policy-never", "equal-priority", "higher-priority"],
)
def test_protected_jobs_are_never_preempted(
    victim: Running, policy: PreemptionPolicy, short: str
) -> None:
    nodes = rack_nodes(racks=1, per_rack=2)
    result = preempt(demand(1), occupied(nodes, [victim]), [victim], policy)
    assert isinstance(result, NoPreemption) and result.short == short
    # The same job without the protection would have been shrunk.
    plain = replace(victim, preemptible=True, priority=0)
    assert isinstance(preempt(demand(1), occupied(nodes, [plain]), [plain]), Preemption)


def test_protected_jobs_are_skipped_in_favour_of_others() -> None:
    nodes = rack_nodes(racks=1, per_rack=4)
    guarded = job("guarded", ["r0-n0", "r0-n1"], min_workers=1, preemptible=False, at=9)
    peer = job("peer", ["r0-n2"], priority=URGENT)
    fair = job("fair", ["r0-n3"], at=0)
    result = plan(demand(1), nodes, [guarded, peer, fair])
    assert [(e.job[1], e.action) for e in result.victims] == [("fair", "Suspend")]


def test_the_preemptors_own_running_workers_stay_inside_the_chosen_domain() -> None:
    nodes = rack_nodes(racks=2, per_rack=2)
    victims = [job("v0", ["r0-n1"], at=1), job("v1", ["r1-n0", "r1-n1"], min_workers=1, at=9)]
    request = replace(demand(2).request, keep={"urgent-worker-0": "r0-n0"})
    want = replace(demand(2), request=request)
    used = occupied(nodes, victims)
    used = [replace(n, used=8) if n.name == "r0-n0" else n for n in used]
    result = preempt(want, used, victims)
    assert isinstance(result, Preemption)
    # v1 is cheaper (younger) but its workers are in the other rack.
    assert [(e.job[1], e.action) for e in result.victims] == [("v0", "Suspend")]


def test_the_decision_is_deterministic() -> None:
    nodes = rack_nodes(racks=3, per_rack=4)
    jobs = [
        job("a", ["r0-n0", "r1-n0", "r2-n0"], min_workers=1, at=1),
        job("b", ["r0-n1", "r1-n1", "r2-n1"], min_workers=1, at=1),
        job("c", ["r0-n2", "r1-n2", "r2-n2", "r0-n3"], min_workers=2, at=1),
        job("d", ["r1-n3", "r2-n3"], at=1),
    ]
    first = preempt(demand(3), occupied(nodes, jobs), jobs)
    assert isinstance(first, Preemption)
    shuffler = random.Random(7)
    for _ in range(10):
        shuffled_jobs, shuffled_nodes = list(jobs), occupied(nodes, jobs)
        shuffler.shuffle(shuffled_jobs)
        shuffler.shuffle(shuffled_nodes)
        again = preempt(demand(3), shuffled_nodes, shuffled_jobs)
        assert isinstance(again, Preemption)
        assert again.victims == first.victims and again.domain == first.domain
        assert again.placement == first.placement


def apply(result: Preemption, jobs: Sequence[Running]) -> list[Running]:
    """The running jobs once the victims let go of what the plan names."""
    gone = {pod for eviction in result.victims for pod in eviction.pods}
    left = []
    for running in jobs:
        workers = tuple(w for w in running.workers if w[0] not in gone)
        if workers:
            floor = min(running.min_workers, len(workers))
            left.append(replace(running, workers=workers, min_workers=floor))
    return left


def test_once_the_victims_let_go_the_preemptor_fits_and_nobody_else_is_preempted() -> None:
    nodes = rack_nodes(racks=3, per_rack=4)
    jobs = [
        job("a", ["r0-n0", "r1-n0", "r2-n0", "r0-n1"], min_workers=2, at=1),
        job("b", ["r1-n1", "r2-n1", "r0-n2"], min_workers=1, at=2),
        job("c", ["r1-n2", "r2-n2", "r0-n3"], at=3),
        job("d", ["r1-n3", "r2-n3"], at=4),
    ]
    for workers in (1, 2, 3, 4):
        result = plan(demand(workers), nodes, jobs)
        for eviction in result.victims:
            (victim,) = (j for j in jobs if j.key == eviction.job)
            if eviction.action == "Shrink":
                assert eviction.replicas >= victim.min_workers
                assert len(eviction.pods) + eviction.replicas == len(victim.workers)
        after = apply(result, jobs)
        again = preempt(demand(workers), occupied(nodes, after), after)
        assert isinstance(again, NoPreemption) and again.short == "Fits", workers


def test_without_a_required_level_the_smallest_disruption_anywhere_wins() -> None:
    nodes = rack_nodes(racks=2, per_rack=2)
    jobs = [job("a", ["r0-n0", "r1-n0"], min_workers=1), job("b", ["r0-n1", "r1-n1"], at=3)]
    result = plan(demand(1, rack=False), nodes, jobs)
    assert [(e.job[1], e.action, e.replicas) for e in result.victims] == [("a", "Shrink", 1)]
    assert result.domain.startswith("node ")


# --- the victim's record ------------------------------------------------------------------


def test_record_round_trips() -> None:
    eviction = Eviction(("ns", "low"), "Shrink", 2, ("low-worker-3", "low-worker-2"), 16, "m")
    record = record_for(eviction, ("team-a", "urgent"), T0)
    text = encode_record(record)
    assert json.loads(text) == {
        "at": "2026-01-01T00:00:00Z",
        "by": "team-a/urgent",
        "pods": ["low-worker-3", "low-worker-2"],
        "replicas": 2,
    }
    assert parse_record(text) == record
    assert parse_record(None) is None


GOOD = {"by": "ns/urgent", "replicas": 2, "pods": ["w-0"], "at": "2026-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"by":"ns/urgent","by":"ns/x","replicas":2,"pods":[],"at":"2026-01-01T00:00:00Z"}',
        json.dumps({**GOOD, "extra": 1}),
        json.dumps({k: v for k, v in GOOD.items() if k != "at"}),
        json.dumps({**GOOD, "replicas": True}),
        json.dumps({**GOOD, "replicas": -1}),
        json.dumps({**GOOD, "replicas": 10**9}),
        json.dumps({**GOOD, "replicas": 2.0}),
        '{"by": "ns/urgent", "replicas": NaN, "pods": [], "at": "2026-01-01T00:00:00Z"}',
        json.dumps({**GOOD, "by": "urgent"}),
        json.dumps({**GOOD, "by": "a/b/c"}),
        json.dumps({**GOOD, "by": "NS/Urgent"}),
        json.dumps({**GOOD, "by": "ns/"}),
        json.dumps({**GOOD, "pods": "w-0"}),
        json.dumps({**GOOD, "pods": ["w-0", "w-0"]}),
        json.dumps({**GOOD, "pods": ["bad name"]}),
        json.dumps({**GOOD, "pods": [1]}),
        json.dumps({**GOOD, "at": "2026-01-01T00:00:00"}),  # no zone
        json.dumps({**GOOD, "at": "yesterday"}),
        json.dumps({**GOOD, "at": 0}),
        json.dumps({**GOOD, "pods": [f"w-{i}" for i in range(10_000)]}),  # too long
    ],
)
def test_bad_records_are_rejected_without_echoing_them(raw: str) -> None:
    assert isinstance(parse_record(json.dumps(GOOD)), PreemptedRecord)
    result = parse_record(raw)
    assert isinstance(result, InvalidRecord), raw
    assert "urgent" not in result.reason.lower() and "w-0" not in result.reason


def test_a_record_cannot_be_built_invalid() -> None:
    with pytest.raises(ValueError, match="time zone"):
        PreemptedRecord(("ns", "a"), 1, (), dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="replicas"):
        PreemptedRecord(("ns", "a"), -1, (), T0)


def test_held_replicas_follow_the_record_within_the_jobs_bounds() -> None:
    record = PreemptedRecord(("ns", "urgent"), 2, (), T0)
    assert held_replicas(4, 1, None) == 4
    assert held_replicas(4, 1, record) == 2
    assert held_replicas(4, 3, record) == 3  # an edit never goes below minReplicas
    assert held_replicas(1, 1, replace(record, replicas=9)) == 1  # nor past spec.replicas
    assert held_replicas(4, 1, replace(record, replicas=0)) == 0  # suspended


def test_a_victim_regrows_only_when_the_queue_gives_it_room() -> None:
    record = PreemptedRecord(("ns", "urgent"), 2, (), T0)
    waiting = Slot(("ns", "low"), 2, 2, (), fits=False, waits_for="behind ns/urgent")
    assert not may_regrow(record, None)
    assert not may_regrow(record, waiting)
    assert may_regrow(record, replace(waiting, fits=True))
    assert may_regrow(None, None)
