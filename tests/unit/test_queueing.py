"""Queue order and the head's reservation: large gangs are not starved, backfill never delays."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace

import pytest

from ddl_operator.api import constants as c
from ddl_operator.core.placement import GangRequest, Placement, place
from ddl_operator.core.queueing import (
    Demand,
    JobKey,
    arrange,
    priority_class_name,
    priority_of,
    queue_key,
    reserve,
)
from ddl_operator.core.reconcile import pending_request, reconcile
from ddl_operator.core.topology import NodeInfo

from builders import T0, Cluster, make_ddljob, pinned_node, rack_nodes


def demand(
    name: str,
    workers: int = 1,
    at: float = 0.0,
    priority: int = 0,
    rack: bool = True,
    min_workers: int | None = None,
) -> Demand:
    """A job of `workers` x 8 GPUs created `at` seconds after T0, kept inside one rack."""
    request = GangRequest(
        min_workers=min_workers or workers,
        max_workers=workers,
        units_per_worker=8,
        levels=c.DEFAULT_TOPOLOGY_LEVELS,
        required=c.LABEL_RACK if rack else None,
        procs_per_worker=8,
    )
    return Demand(("ns", name), priority, T0 + dt.timedelta(seconds=at), request)


def busy(nodes: list[NodeInfo], *names: str) -> list[NodeInfo]:
    return [replace(n, used=n.allocatable) if n.name in names else n for n in nodes]


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ([demand("a", at=2), demand("b", at=1)], ["b", "a"]),  # older first
        ([demand("a", at=1), demand("b", at=2, priority=10)], ["b", "a"]),  # priority first
        ([demand("b", at=1), demand("a", at=1)], ["a", "b"]),  # then by name
        ([demand("low", priority=-5), demand("none")], ["none", "low"]),  # negative ranks below
    ],
)
def test_order_is_priority_then_age_then_name(jobs: list[Demand], expected: list[str]) -> None:
    assert [d.key[1] for d in sorted(jobs, key=queue_key)] == expected
    assert [k[1] for k in arrange(jobs, rack_nodes()).order] == expected


def test_priority_is_the_templates_priority_class_value() -> None:
    classes = {"urgent": 1000, "batch": 10}
    assert priority_class_name({"spec": {"priorityClassName": "urgent"}}) == "urgent"
    assert priority_class_name({"spec": {"containers": []}}) is None
    assert priority_class_name({"spec": {"priorityClassName": 7}}) is None
    assert priority_of("urgent", classes) == 1000
    assert priority_of(None, classes) == 0
    assert priority_of(None, classes, global_default=10) == 10
    assert priority_of("gone", classes, global_default=10) == 10


def test_jobs_that_fit_claim_in_order_so_no_later_job_takes_their_gpus() -> None:
    nodes = rack_nodes(racks=1, per_rack=2)  # 16 GPUs
    first, second = demand("first", 2, at=1), demand("second", 1, at=2)
    queue = arrange([second, first], nodes)
    assert queue.slots[first.key].fits and queue.slots[first.key].nodes == tuple(nodes)
    later = queue.slots[second.key]
    assert not later.fits, "the older job's two nodes are spoken for"
    assert sum(n.free for n in later.nodes) == 0
    assert later.waits_for.startswith("position 2 of 2")


def test_the_head_reserves_the_rack_closest_to_fitting() -> None:
    nodes = busy(rack_nodes(racks=2, per_rack=4), "r0-n0", "r0-n1", "r0-n2", "r1-n0")
    big = demand("big", 4)
    reservation = reserve(nodes, big.request)
    assert reservation is not None
    assert reservation.domain == "rack rack-1", "3 of 4 nodes free beat 1 of 4"
    assert reservation.nodes == {"r1-n1": 8, "r1-n2": 8, "r1-n3": 8}
    assert reservation.missing == 1
    small = demand("small", 1, at=5)
    queue = arrange([big, small], nodes)
    head = queue.slots[big.key]
    assert not head.fits and head.reservation == reservation
    assert "rack rack-1" in head.waits_for and "24 held" in head.waits_for
    behind = queue.slots[small.key]
    assert behind.fits, "rack-0's free node is outside the reservation"
    claim = place(behind.nodes, small.request)
    assert isinstance(claim, Placement) and claim.nodes == ("r0-n3",)


def test_the_head_does_not_wait_in_a_rack_only_other_tenants_fill() -> None:
    # Both racks are full: rack-0 of other tenants' pods, rack-1 of the queue's jobs.
    nodes = busy(rack_nodes(racks=2, per_rack=4), *(f"r{r}-n{n}" for r in (0, 1) for n in range(4)))
    tenants = {f"r0-n{n}": 8 for n in range(4)}
    big = demand("big", 4)
    plain = reserve(nodes, big.request)
    assert plain is not None and plain.domain == "rack rack-0", "a tie, broken by name"
    reservation = reserve(nodes, big.request, tenants)
    assert reservation is not None and reservation.domain == "rack rack-1"
    head = arrange([big], nodes, lasting=tenants).slots[big.key]
    assert head.reservation == reservation
    # Where other tenants fill every rack, the head still reserves (they may end).
    everywhere = {n.name: 8 for n in nodes}
    fallback = reserve(nodes, big.request, everywhere)
    assert fallback is not None and fallback.domain == "rack rack-0"


def test_a_small_job_that_only_fits_inside_the_reservation_waits_and_says_for_whom() -> None:
    nodes = busy(rack_nodes(racks=2, per_rack=4), "r0-n0", "r0-n1", "r0-n2", "r0-n3", "r1-n0")
    queue = arrange([demand("big", 4), demand("small", 1, at=5)], nodes)
    small = queue.slots[("ns", "small")]
    assert not small.fits and small.reservation is None, "only the head reserves"
    assert "held for ns/big" in small.waits_for


def test_the_reservation_is_one_domain_of_the_required_level_or_the_whole_pool() -> None:
    nodes = busy(rack_nodes(racks=2, per_rack=4), "r0-n0", "r0-n1", "r1-n0", "r1-n1")
    # 4 nodes free, 2 per rack. A gang that may span racks collects freed GPUs anywhere
    # rather than waiting for one rack to drain.
    anywhere = reserve(nodes, demand("spread", 5, rack=False).request)
    assert anywhere is not None and anywhere.domain == "the cluster"
    assert anywhere.held == 32 and anywhere.missing == 1
    # One that must fit a rack waits in one rack (a tie here, broken by name), not a node.
    in_rack = reserve(nodes, demand("rack", 3).request)
    assert in_rack is not None and in_rack.domain == "rack rack-0"
    assert in_rack.nodes == {"r0-n2": 8, "r0-n3": 8} and in_rack.missing == 1


def test_a_gang_no_domain_could_ever_hold_reserves_nothing_and_blocks_nobody() -> None:
    nodes = busy(rack_nodes(racks=2, per_rack=2), "r0-n0")
    huge, small = demand("huge", 3), demand("small", 1, at=1)  # racks hold 2 nodes
    queue = arrange([huge, small], nodes)
    assert queue.slots[huge.key].reservation is None
    assert "no domain could hold it even empty" in queue.slots[huge.key].waits_for
    assert queue.slots[small.key].fits


def test_an_elastic_head_reserves_for_its_minimum() -> None:
    nodes = busy(rack_nodes(racks=1, per_rack=4), "r0-n0", "r0-n1", "r0-n2")
    elastic = demand("elastic", 4, min_workers=2)
    reservation = reserve(nodes, elastic.request)
    assert reservation is not None and reservation.missing == 1


def test_a_higher_priority_job_is_not_held_back_by_a_lower_head() -> None:
    nodes = busy(rack_nodes(racks=1, per_rack=4), "r0-n0", "r0-n1")
    low_big = demand("low-big", 4, at=1, priority=0)
    urgent = demand("urgent", 2, at=9, priority=100)
    low_small = demand("low-small", 1, at=2, priority=0)
    queue = arrange([low_big, low_small, urgent], nodes)
    assert queue.order[0] == urgent.key and queue.slots[urgent.key].fits
    assert not queue.slots[low_small.key].fits, "the urgent job took the rest"


def test_each_priority_has_its_own_head() -> None:
    nodes = busy(rack_nodes(racks=2, per_rack=4), "r0-n0", "r0-n1", "r1-n0")
    high = demand("high", 4, priority=10)
    low = demand("low", 4, at=1)
    later = demand("later", 1, at=2)
    queue = arrange([high, low, later], nodes)
    high_res, low_res = queue.slots[high.key].reservation, queue.slots[low.key].reservation
    assert high_res is not None and high_res.domain == "rack rack-1"
    assert low_res is not None and low_res.domain == "rack rack-0"
    assert not queue.slots[later.key].fits, "both heads hold what is free"


def test_until_decides_only_up_to_the_asking_job() -> None:
    jobs = [demand(f"j{i}", 1, at=i) for i in range(5)]
    queue = arrange(jobs, rack_nodes(), until=("ns", "j1"))
    assert len(queue.order) == 5 and set(queue.slots) == {("ns", "j0"), ("ns", "j1")}
    assert queue.slots[("ns", "j1")].position == 2


def test_a_job_listed_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        arrange([demand("a"), demand("a", at=1)], rack_nodes())


@dataclass
class Simulation:
    """Jobs arrive, claim through the queue (or greedily), run for a while and end."""

    nodes: list[NodeInfo]
    queued: bool = True
    pending: list[Demand] = field(default_factory=list)
    running: dict[JobKey, tuple[tuple[str, ...], float]] = field(default_factory=dict)
    started: dict[JobKey, float] = field(default_factory=dict)
    placed: dict[JobKey, tuple[str, ...]] = field(default_factory=dict)
    durations: dict[JobKey, float] = field(default_factory=dict)
    now: float = 0.0

    def submit(self, job: Demand, runs_for: float) -> None:
        self.pending.append(job)
        self.durations[job.key] = runs_for

    def occupy(self, node: str, until: float) -> None:
        """A job that already runs on one node."""
        self.running[("ns", f"on-{node}")] = ((node,), until)

    def snapshot(self) -> list[NodeInfo]:
        used: dict[str, int] = {}
        for on, _ in self.running.values():
            for node in on:
                used[node] = used.get(node, 0) + 8
        return [replace(n, used=used.get(n.name, 0)) for n in self.nodes]

    def step(self, to: float) -> None:
        self.now = to
        for key, (_, ends) in list(self.running.items()):
            if ends <= to:
                del self.running[key]
        arrived = [d for d in self.pending if d.created <= T0 + dt.timedelta(seconds=to)]
        if self.queued:
            queue = arrange(arrived, self.snapshot())
            claims = [
                (d, place(queue.slots[d.key].nodes, d.request))
                for d in sorted(arrived, key=queue_key)
                if queue.slots[d.key].fits
            ]
            for d, claim in claims:
                self._start(d, claim)
        else:  # whichever pass comes first takes the GPUs (what the operator did before)
            for d in sorted(arrived, key=queue_key):
                self._start(d, place(self.snapshot(), d.request))
        assert all(n.used <= n.allocatable for n in self.snapshot()), "overcommitted"

    def _start(self, job: Demand, claim: object) -> None:
        if not isinstance(claim, Placement):
            return
        self.pending.remove(job)
        self.running[job.key] = (claim.nodes, self.now + self.durations[job.key])
        self.started[job.key] = self.now
        self.placed[job.key] = claim.nodes


def _starvation(queued: bool) -> Simulation:
    """A 4x8 job that needs one rack arrives on a full cluster, behind a stream of 1x8 jobs."""
    sim = Simulation(rack_nodes(racks=2, per_rack=4), queued=queued)
    # One node frees per second: rack-0's at t=1, 3, 5, 7 and rack-1's at t=2, 4, 6, 8.
    for n in range(4):
        sim.occupy(f"r0-n{n}", until=1 + 2 * n)
        sim.occupy(f"r1-n{n}", until=2 + 2 * n)
    sim.submit(demand("big", 4, at=0.5), runs_for=100)
    for i in range(40):  # a new 1x8 job every half second, each runs 30 s
        sim.submit(demand(f"small-{i:02}", 1, at=0.6 + i / 2), runs_for=30)
    for tick in range(1, 41):
        sim.step(tick / 2)
    return sim


def test_a_large_gang_gets_its_gpus_as_they_free_before_later_small_jobs() -> None:
    sim = _starvation(queued=True)
    big = ("ns", "big")
    assert sim.started.get(big) == 7.0, "rack-0's last node frees at t=7; big starts then"
    assert sim.placed[big] == ("r0-n0", "r0-n1", "r0-n2", "r0-n3")
    smalls = {k: at for k, at in sim.started.items() if k[1].startswith("small")}
    assert all(not sim.placed[k][0].startswith("r0-") for k in smalls), "none took big's rack"
    assert sorted(smalls.values()) == [2.0, 4.0, 6.0, 8.0], "they backfilled rack-1 meanwhile"


def test_without_the_queue_the_large_gang_starves() -> None:
    sim = _starvation(queued=False)
    assert ("ns", "big") not in sim.started, "every freed node went to a later small job"


def test_backfill_does_not_delay_the_head() -> None:
    def run(with_small: bool) -> Simulation:
        sim = Simulation(rack_nodes(racks=2, per_rack=4))
        for n in range(3):  # rack-0: three nodes busy until t=5, one free; rack-1 full
            sim.occupy(f"r0-n{n}", until=5)
        for n in range(4):
            sim.occupy(f"r1-n{n}", until=10 + n)
        sim.submit(demand("big", 4, at=1), runs_for=50)
        if with_small:
            sim.submit(demand("small", 1, at=2), runs_for=100)
        for t in range(1, 12):
            sim.step(t)
        return sim

    alone, crowded = run(with_small=False), run(with_small=True)
    assert alone.started[("ns", "big")] == crowded.started[("ns", "big")] == 5
    small = ("ns", "small")
    assert crowded.started[small] == 10, "it waits for rack-1, outside big's rack"
    assert crowded.placed[small] == ("r1-n0",)


def test_without_the_reservation_backfill_would_delay_the_head() -> None:
    nodes = busy(rack_nodes(racks=2, per_rack=4), "r0-n0", "r0-n1", "r0-n2")
    nodes = busy(nodes, *(f"r1-n{n}" for n in range(4)))
    queue = arrange([demand("big", 4, at=1), demand("small", 1, at=2)], nodes)
    greedy = place(nodes, demand("small", 1).request)
    assert isinstance(greedy, Placement) and greedy.nodes == ("r0-n3",), "the only free node"
    assert not queue.slots[("ns", "small")].fits, "the queue keeps it for big"


def test_reconcile_places_only_where_its_slot_allows_and_says_what_it_waits_for() -> None:
    cl = Cluster(make_ddljob(name="small", replicas=1, gpus=8), rack_nodes(racks=2, per_rack=4))
    cl.base_nodes = busy(cl.base_nodes, "r0-n0", "r0-n1", "r0-n2", *(f"r1-n{n}" for n in range(4)))
    pods, nodes = list(cl.pods.values()), cl.nodes()
    request = pending_request(cl.job, pods, nodes, cl.now)  # no worker exists yet
    assert request is not None and (request.min_workers, request.units_per_worker) == (1, 8)
    small = Demand(("default", "small"), 0, T0 + dt.timedelta(seconds=9), request)
    queue = arrange([demand("big", 4, at=1), small], nodes)
    plan = reconcile(cl.job, pods, nodes, cl.now, queue=queue.slots[small.key])
    assert len(plan.create) == 1 and not plan.place, "r0-n3 is free but held for big"
    queued = next(x for x in plan.status.conditions if x.type == "Queued")
    assert queued.status == "True" and "position 2 of 2" in queued.message
    assert "held for ns/big" in plan.status.message
    cl.job = cl.job.model_copy(update={"status": plan.status})
    alone = arrange([small], nodes)
    plan = reconcile(cl.job, pods, nodes, cl.now, queue=alone.slots[small.key])
    assert [pinned_node(p) for _, p in plan.place] == ["r0-n3"]
    queued = next(x for x in plan.status.conditions if x.type == "Queued")
    assert (queued.status, queued.reason) == ("False", "Claimed")


def test_a_job_with_nothing_to_place_asks_the_queue_for_nothing() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes())
    cl.settle()
    assert pending_request(cl.job, list(cl.pods.values()), cl.nodes(), cl.now) is None
    spec = cl.job.spec.model_copy(update={"suspend": True})
    fresh = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes())  # no worker yet
    suspended = fresh.job.model_copy(update={"spec": spec})
    assert pending_request(suspended, [], fresh.nodes(), fresh.now) is None
    assert pending_request(fresh.job, [], fresh.nodes(), fresh.now)


def test_a_job_ahead_claims_and_reserves_only_among_the_nodes_it_may_use() -> None:
    """Two pools (node selectors): a head waiting in its pool neither claims nor withholds
    the other pool, where a job behind it fits; a fitting job ahead claims in its own only."""
    nodes = busy(rack_nodes(racks=2, per_rack=2), "r0-n0")  # rack-0: pool A, rack-1: pool B
    pool_a = frozenset({"r0-n0", "r0-n1"})
    pool_b = frozenset({"r1-n0", "r1-n1"})
    head = replace(demand("head", 2, at=1), eligible=pool_a)  # one free node in its pool
    ahead = replace(demand("ahead", 2, at=2), eligible=pool_b)
    later = replace(demand("later", 1, at=3), eligible=pool_b)
    queue = arrange([head, ahead, later], nodes)
    assert not queue.slots[head.key].fits  # pool B would hold it, but is not its to use
    reservation = queue.slots[head.key].reservation
    assert reservation is not None and set(reservation.nodes) == {"r0-n1"}
    assert queue.slots[ahead.key].fits
    assert not queue.slots[later.key].fits  # the job ahead took pool B first
    assert arrange([head, later], nodes).slots[later.key].fits


def test_a_job_no_domain_could_hold_does_not_take_the_head_of_its_line() -> None:
    """A job whose nodes are gone waits for ever; the next job of its priority still reserves,
    so later small jobs cannot take the GPUs it waits for."""
    nodes = busy(rack_nodes(racks=1, per_rack=4), "r0-n0", "r0-n1", "r0-n2")
    stranded = replace(demand("stranded", 1, at=0), eligible=frozenset())
    gang = demand("gang", 4, at=1)
    later = demand("later", 1, at=2)
    queue = arrange([stranded, gang, later], nodes)
    reservation = queue.slots[gang.key].reservation
    assert reservation is not None and set(reservation.nodes) == {"r0-n3"}
    assert not queue.slots[later.key].fits
    assert "no domain could hold it" in queue.slots[stranded.key].waits_for


def test_each_node_pool_has_its_own_head() -> None:
    """A head waiting in one pool does not keep the first waiting job of another pool (same
    priority) from reserving there."""
    nodes = busy(rack_nodes(racks=2, per_rack=2), "r0-n0", "r1-n0")
    pool_a, pool_b = frozenset({"r0-n0", "r0-n1"}), frozenset({"r1-n0", "r1-n1"})
    head_a = replace(demand("head-a", 2, at=0), eligible=pool_a)
    head_b = replace(demand("head-b", 2, at=1), eligible=pool_b)
    later_b = replace(demand("later-b", 1, at=2), eligible=pool_b)
    queue = arrange([head_a, head_b, later_b], nodes)
    assert queue.slots[head_b.key].reservation is not None
    assert not queue.slots[later_b.key].fits
