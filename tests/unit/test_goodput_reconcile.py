"""Goodput through reconcile(): stragglers replaced inside their domain, throughput sizing,
and rank maps that follow the topology after every re-form, over passes of fake reports."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

import pytest

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJobStatus, Rendezvous
from ddl_operator.core.reconcile import SIZING, STRAGGLER_REPLACED, Plan

from builders import Cluster, cond, make_ddljob, rack_nodes

REPLACE: Final[dict[str, Any]] = {"action": "Replace", "threshold": 1.2, "forSteps": 10}


def rack_of(node: str) -> str:
    return node.split("-")[0]


def train(
    cl: Cluster,
    step: int,
    slow: Mapping[str, float] = {},
    throughput: float = 100.0,
    seconds: float = 10.0,
) -> Plan:
    """Every member reports `step` at the current epoch (compute 0.5 s, or 0.5 x its `slow`
    factor, of a 1 s step); rank 0 reports the job's samples/s. Then one pass."""
    rdzv = cl.job.status.rendezvous
    assert rdzv is not None
    for m in rdzv.members:
        compute = 0.5 * slow.get(m.pod, 1.0)
        report = {
            "epoch": rdzv.epoch,
            "step": step,
            "stepSeconds": 1.0,
            "syncWaitRatio": 1.0 - compute,
            "throughput": throughput,
        }
        cl.pods[m.pod] = replace(cl.pods[m.pod], report=json.dumps(report))
    return cl.step(seconds=seconds)


def confirm(cl: Cluster, slow: Mapping[str, float], first: int = 100) -> Plan:
    """Reports at three steps 5 apart with `slow` workers: enough for forSteps 10."""
    plan = train(cl, first, slow)
    for step in (first + 5, first + 10):
        plan = train(cl, step, slow)
    return plan


def node_of(cl: Cluster, pod: str) -> str:
    node = cl.pods[pod].placed_on
    assert node is not None
    return node


def assert_round_trips(status: DDLJobStatus) -> None:
    """The status is strict JSON and reads back as written (what the API server stores)."""
    text = json.dumps(status.model_dump(by_alias=True, mode="json"), allow_nan=False)
    assert DDLJobStatus.model_validate_json(text) == status


def assert_contiguous(rdzv: Rendezvous | None) -> None:
    """Ranks of a node, and nodes of a rack, form one block each (and the grid says so)."""
    assert rdzv is not None and rdzv.members
    assert [m.rank for m in rdzv.members] == list(range(len(rdzv.members)))
    for key in (lambda m: m.node, lambda m: rack_of(m.node)):
        blocks = [
            key(m)
            for i, m in enumerate(rdzv.members)
            if i == 0 or key(m) != key(rdzv.members[i - 1])
        ]
        assert len(blocks) == len(set(blocks)), f"interleaved: {[m.node for m in rdzv.members]}"
    product = 1
    for size in rdzv.grid:
        product *= size
    assert product == rdzv.world_size


# -- straggler replacement ----------------------------------------------------------------------


def straggling(replicas: int = 3, racks: int = 2, per_rack: int = 4, **spec: Any) -> Cluster:
    job = make_ddljob(
        replicas=replicas,
        min_replicas=2,
        max_replicas=replicas,
        gpus=8,
        stragglers=REPLACE,
        failurePolicy={"backoffSeconds": 0},
        **spec,
    )
    cl = Cluster(job, rack_nodes(racks=racks, per_rack=per_rack))
    cl.settle()
    assert len(cl.members()) == replicas
    return cl


def test_a_straggler_is_replaced_by_a_node_of_its_rack_and_its_node_cools_down() -> None:
    cl = straggling()
    members = cl.members()
    slow, slow_node = members[1], node_of(cl, members[1])
    gang_rack = rack_of(slow_node)
    assert not train(cl, 100, {slow: 1.5}).delete
    assert not train(cl, 105, {slow: 1.5}).delete, "a streak of 5 steps is too short"
    plan = train(cl, 110, {slow: 1.5})
    assert plan.delete == [slow] and len(plan.create) == 1, "deleted and replaced at once"
    assert cl.job.status.epoch == 2 and slow not in cl.members(), "the gang re-forms without it"
    assert cl.job.status.restarts == 0, "a replacement is no restart"
    status, message = cond(cl, STRAGGLER_REPLACED)
    assert status == "True" and "rank 1" in message and slow_node in message
    assert [e.reason for e in plan.events].count(STRAGGLER_REPLACED) == 1
    watch = cl.job.status.stragglers
    assert watch is not None and [x.node for x in watch.cooling] == [slow_node]
    assert watch.replacements == 1
    cl.settle()
    new = next(p for p in cl.members() if p not in members)
    assert rack_of(node_of(cl, new)) == gang_rack and node_of(cl, new) != slow_node
    assert node_of(cl, new) in message, "placed where the condition said"
    assert len(cl.members()) == 3 and cl.job.status.epoch == 3
    assert_contiguous(cl.job.status.rendezvous)
    watch = cl.job.status.stragglers
    assert watch is not None and watch.placing_on is None
    assert_round_trips(cl.job.status)


def test_the_cooling_node_takes_none_of_the_jobs_new_workers_until_it_expires() -> None:
    cl = straggling()
    slow = cl.members()[1]
    slow_node = node_of(cl, slow)
    confirm(cl, {slow: 1.5})
    cl.settle()
    rack = {n.name for n in cl.base_nodes if rack_of(n.name) == rack_of(slow_node)}
    used = {node_of(cl, m) for m in cl.members()}
    assert rack - used == {slow_node}, "the cooling node is the rack's only free one"
    # Another member's node fails: the rack has room only on the cooling node.
    victim = next(m for m in cl.members() if node_of(cl, m) != slow_node)
    gone = node_of(cl, victim)
    cl.base_nodes = [replace(n, ready=False) if n.name == gone else n for n in cl.base_nodes]
    cl.settle()
    nodes = {node_of(cl, m) for m in cl.members()}
    assert len(nodes) == 3 and slow_node not in nodes, "the cooling node is avoided"
    # Past the cool-down the node is as good as any other again.
    cl.now += dt.timedelta(minutes=31)
    victim = next(m for m in cl.members() if rack_of(node_of(cl, m)) != rack_of(slow_node))
    cl.pods[victim] = replace(cl.pods[victim], phase="Failed", exit_code=1)
    cl.settle()
    assert slow_node in {node_of(cl, m) for m in cl.members()}
    watch = cl.job.status.stragglers
    assert watch is not None and watch.cooling == [], "expired entries leave the list"


def test_one_replacement_per_re_form_then_back_off_doubles() -> None:
    cl = straggling(replicas=5, racks=2, per_rack=4)
    members = cl.members()
    two_slow = {members[1]: 1.5, members[3]: 1.6}
    plan = confirm(cl, two_slow)
    assert len(plan.delete) == 1 and plan.delete[0] in two_slow, "one per re-form"
    assert plan.delete == [members[3]], "the slowest goes first"
    # Passes before the new epoch's reports change nothing: the streak starts over.
    assert not cl.step().delete
    cl.settle()
    first = cl.now
    plan = confirm(cl, {members[1]: 1.5}, first=200)
    assert not plan.delete, "the next replacement waits for the back-off"
    status, message = cond(cl, STRAGGLER_REPLACED)
    assert status == "False" and "back-off" in message and members[1] in message
    cl.now = first + dt.timedelta(minutes=5)
    plan = train(cl, 300, {members[1]: 1.5})
    assert plan.delete == [members[1]], "replaced once the back-off passed"
    cl.settle()
    second = cl.now
    slow = cl.members()[0]
    confirm(cl, {slow: 1.5}, first=400)
    cl.now = second + dt.timedelta(minutes=6)
    assert not train(cl, 500, {slow: 1.5}).delete, "the third waits 10 minutes, not 5"
    cl.now = second + dt.timedelta(minutes=10)
    assert train(cl, 510, {slow: 1.5}).delete == [slow]


def test_no_free_node_keeps_the_straggler_and_says_why() -> None:
    cl = straggling(racks=1, per_rack=3)
    slow = cl.members()[2]
    plan = confirm(cl, {slow: 1.5})
    assert not plan.delete and not plan.create and cl.job.status.epoch == 1
    status, message = cond(cl, STRAGGLER_REPLACED)
    assert status == "False" and "no node" in message and "has room" in message


def test_a_fixed_size_gang_stops_until_the_replacement_runs() -> None:
    job = make_ddljob(replicas=3, gpus=8, stragglers=REPLACE)
    cl = Cluster(job, rack_nodes(racks=2, per_rack=4))
    cl.settle()
    slow = cl.members()[0]
    plan = confirm(cl, {slow: 2.0})
    assert plan.delete == [slow]
    rdzv = cl.job.status.rendezvous
    assert rdzv is not None and rdzv.workers == 0, "fewer than minReplicas: all stop, checkpoint"
    cl.settle()
    assert len(cl.members()) == 3 and slow not in cl.members() and cl.job.status.epoch == 3
    assert_contiguous(cl.job.status.rendezvous)


def test_report_is_the_default_and_only_names_the_straggler() -> None:
    job = make_ddljob(replicas=3, min_replicas=2, max_replicas=3, gpus=8)
    cl = Cluster(job, rack_nodes(racks=2, per_rack=4))
    cl.settle()
    slow = cl.members()[1]
    for step in range(100, 400, 10):
        assert not train(cl, step, {slow: 1.5}).delete
    assert cond(cl, "Straggler")[0] == "True" and cl.job.status.epoch == 1
    assert cl.job.status.stragglers is None and cl.job.status.sizing is None
    assert all(x.type not in (STRAGGLER_REPLACED, SIZING) for x in cl.job.status.conditions)


def test_a_forged_watch_cannot_bar_replacements_for_good() -> None:
    cl = straggling()
    watch = cl.job.status.stragglers
    assert watch is not None
    forged = watch.model_copy(
        update={"replaced_epoch": 10**9, "last_replacement": "2999-01-01T00:00:00Z",
                "replacements": 1, "epoch": 10**9}
    )  # fmt: skip
    cl.job = cl.job.model_copy(
        update={"status": cl.job.status.model_copy(update={"stragglers": forged})}
    )
    slow = cl.members()[1]
    confirm(cl, {slow: 1.5})
    cl.now += dt.timedelta(minutes=5)
    assert train(cl, 200, {slow: 1.5}).delete == [slow], "clamped to now: one back-off at most"


# -- throughput sizing --------------------------------------------------------------------------


def sized(replicas: int = 4, **elastic: Any) -> Cluster:
    job = make_ddljob(
        replicas=replicas,
        gpus=8,
        failurePolicy={"backoffSeconds": 0},
        elastic={
            "minReplicas": 2,
            "maxReplicas": replicas,
            "scaling": "Throughput",
            "scalingSettleSeconds": 20,
            "scalingCoolDownSeconds": 600,
            **elastic,
        },
    )
    cl = Cluster(job, rack_nodes(racks=2, per_rack=2))
    cl.settle()
    return cl


def measure(cl: Cluster, throughput: float, first: int) -> Plan:
    """Rank 0 reports `throughput` at new steps, 10 s apart, until the size is judged."""
    workers = len(cl.members())
    step = first
    for _ in range(10):
        plan = train(cl, step, throughput=throughput)
        step += 10
        sizing = cl.job.status.sizing
        assert sizing is not None
        if any(r.workers == workers for r in sizing.tried) and sizing.measured:
            return plan
    raise AssertionError(f"{workers} workers were never measured")


def test_throughput_sizing_grows_one_at_a_time_while_it_pays() -> None:
    cl = sized()
    assert len(cl.members()) == 2, "starts at minReplicas"
    for workers, rate in ((2, 100.0), (3, 150.0)):
        plan = measure(cl, rate, first=100 * workers)
        assert any(e.reason == "Resizing" for e in plan.events)
        assert len(plan.create) == 1, "one worker more"
        cl.settle()
        assert len(cl.members()) == workers + 1
    measure(cl, 195.0, first=500)
    sizing = cl.job.status.sizing
    assert sizing is not None and sizing.target == 4
    assert [(r.workers, r.samples_per_second, r.kept) for r in sizing.tried] == [
        (2, 100.0, True), (3, 150.0, True), (4, 195.0, True)
    ]  # fmt: skip
    assert cond(cl, SIZING)[0] == "True" and not cl.step().create
    assert_round_trips(cl.job.status)


def test_a_growth_that_does_not_pay_is_undone_and_cools_down() -> None:
    cl = sized()
    measure(cl, 100.0, first=100)
    cl.settle()
    assert len(cl.members()) == 3
    plan = measure(cl, 110.0, first=200)  # 125 needed: half of linear scaling
    assert len(plan.delete) == 1 and len(cl.members()) == 2, "back to the best size"
    sizing = cl.job.status.sizing
    assert sizing is not None and sizing.target == 2 and sizing.hold_until is not None
    assert [(r.workers, r.kept) for r in sizing.tried] == [(2, True), (3, False)]
    assert "below the 125.0" in sizing.message
    cl.settle()
    assert len(cl.members()) == 2
    for step in range(300, 600, 10):  # 5 minutes of training at the best size
        assert not train(cl, step, throughput=100.0).create, "no growth in the cool-down"
    cl.now += dt.timedelta(minutes=6)
    plan = measure(cl, 100.0, first=700)
    assert len(plan.create) == 1, "after the cool-down it tries again"


def test_sizing_stays_within_a_lowered_replicas() -> None:
    cl = sized()
    measure(cl, 100.0, first=100)
    cl.settle()
    spec = cl.job.spec.model_copy(update={"replicas": 2})
    cl.job = cl.job.model_copy(update={"spec": spec})
    cl.settle()
    assert len(cl.members()) == 2


# -- rank maps follow the topology after every re-form ------------------------------------------


@pytest.mark.parametrize("lost", [0, 2, 5])
def test_ranks_stay_contiguous_after_shrink_and_growth(lost: int) -> None:
    job = make_ddljob(
        replicas=6, min_replicas=2, max_replicas=6, gpus=4, failurePolicy={"backoffSeconds": 0}
    )
    cl = Cluster(job, rack_nodes(racks=2, per_rack=2, gpus=8))
    cl.settle()
    assert_contiguous(cl.job.status.rendezvous)
    victim = cl.members()[lost]
    cl.pods[victim] = replace(cl.pods[victim], phase="Failed", exit_code=1)
    cl.step()
    assert len(cl.members()) == 5
    assert_contiguous(cl.job.status.rendezvous)
    cl.settle()
    assert len(cl.members()) == 6
    assert_contiguous(cl.job.status.rendezvous)


def test_ranks_stay_contiguous_after_a_straggler_is_replaced() -> None:
    job = make_ddljob(
        replicas=5, min_replicas=2, max_replicas=5, gpus=4, stragglers=REPLACE,
        failurePolicy={"backoffSeconds": 0},
    )  # fmt: skip
    cl = Cluster(job, rack_nodes(racks=2, per_rack=2, gpus=8))
    cl.settle()
    slow = cl.members()[0]
    assert confirm(cl, {slow: 1.5}).delete == [slow]
    assert_contiguous(cl.job.status.rendezvous)
    cl.settle()
    assert len(cl.members()) == 5 and slow not in cl.members()
    assert_contiguous(cl.job.status.rendezvous)
    rdzv = cl.job.status.rendezvous
    assert rdzv is not None and c.LABEL_RACK in rdzv.members[0].domains


def test_the_replacement_goes_to_the_node_the_decision_named() -> None:
    """The decision prefers the node with most room; placement alone would take the
    tightest fit. The replacement lands where the condition said."""
    cl = straggling(racks=1, per_rack=5)
    assert {node_of(cl, m) for m in cl.members()} == {"r0-n0", "r0-n1", "r0-n2"}
    cl.base_nodes = [replace(n, allocatable=16) if n.name == "r0-n3" else n for n in cl.base_nodes]
    slow = cl.members()[1]
    confirm(cl, {slow: 1.5})
    assert "replace it on r0-n3" in cond(cl, STRAGGLER_REPLACED)[1]
    cl.settle()
    new = next(m for m in cl.members() if m not in ("job-worker-0", "job-worker-1", "job-worker-2"))
    assert node_of(cl, new) == "r0-n3"
