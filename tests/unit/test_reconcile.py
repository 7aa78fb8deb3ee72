"""The job state machine, pass by pass, on an in-memory cluster."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJobStatus, Topology
from ddl_operator.core.reconcile import BIND_DEADLINE_SECONDS
from ddl_operator.core.render import ANNOTATION_NODE, pinned_creates

from builders import Cluster, cond, make_ddljob, pinned_node, rack_nodes


def test_a_gang_that_fits_is_created_pinned_in_one_pass_then_published() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes(racks=2, per_rack=2))
    first = cl.step()
    assert len(first.create) == 2 and len(first.place) == 2
    created, patches = pinned_creates(first.create, first.place)
    assert not patches, "nothing left to patch: the pods are created placed"
    nodes = {pinned_node(m) for m in created}
    assert len(nodes) == 2 and len({n.split("-")[0] for n in nodes}) == 1, "one rack, two nodes"
    assert all(m["spec"]["schedulingGates"] == [] for m in created)
    assert all(m["metadata"]["annotations"][ANNOTATION_NODE] in nodes for m in created)
    assert cl.job.status.phase == "Placing" and cl.job.status.epoch == 0
    cl.run_bound()
    cl.step()
    status = cl.job.status
    assert status.phase == "Running" and status.epoch == 1
    assert status.rendezvous is not None and status.rendezvous.grid == [8, 2]
    assert status.rendezvous.master_addr.startswith("10.0.0.")
    assert [m.rank for m in status.rendezvous.members] == [0, 1]
    assert cond(cl, "Ready")[0] == "True"


def test_passes_are_idempotent() -> None:
    cl = Cluster(make_ddljob(replicas=3, gpus=8), rack_nodes())
    cl.settle()
    before = cl.job.status
    plan = cl.step()
    assert not (plan.create or plan.delete or plan.place)
    assert plan.status.epoch == before.epoch and plan.status.rendezvous == before.rendezvous


def test_too_large_for_any_rack_stays_gated_with_a_reason() -> None:
    job = make_ddljob(replicas=3, gpus=8, topology={"required": c.LABEL_RACK})
    cl = Cluster(job, rack_nodes(racks=2, per_rack=2))
    plan = cl.settle()
    assert not plan.place and all(p.gated for p in cl.pods.values())
    status, message = cond(cl, "Unschedulable")
    assert status == "True"
    assert "rack" in message and "24" in message and "16" in message, message
    assert cl.job.status.phase == "Pending"
    assert not any(e.reason == "Unschedulable" for e in cl.step().events), "said once"


def test_elastic_job_runs_with_what_fits_and_grows_when_capacity_returns() -> None:
    nodes = rack_nodes(racks=1, per_rack=4)
    job = make_ddljob(replicas=4, min_replicas=2, max_replicas=4, gpus=8)
    cl = Cluster(job, nodes[:3])
    cl.settle()
    assert cl.job.status.phase == "Running"
    assert len(cl.members()) == 3 and cl.job.status.epoch == 1
    assert cond(cl, "Unschedulable")[0] == "True"
    cl.base_nodes = nodes  # a node comes back
    cl.settle()
    assert len(cl.members()) == 4 and cl.job.status.epoch == 2
    assert cl.job.status.phase == "Running"


def test_lost_worker_shrinks_then_is_replaced_after_backoff() -> None:
    job = make_ddljob(
        replicas=3,
        min_replicas=2,
        max_replicas=3,
        gpus=8,
        failurePolicy={"maxRestarts": 3, "backoffSeconds": 30},
    )
    cl = Cluster(job, rack_nodes())
    cl.settle()
    assert cl.job.status.epoch == 1 and len(cl.members()) == 3
    victim = cl.members()[1]
    cl.pods[victim] = replace(cl.pods[victim], phase="Failed", exit_code=1)
    plan = cl.step()
    assert victim in plan.delete and not plan.create, "replacement waits for the backoff"
    assert cl.job.status.epoch == 2 and victim not in cl.members() and len(cl.members()) == 2
    assert cl.job.status.restarts == 1
    assert any(e.reason == "WorkerLost" for e in plan.events)
    cl.step()
    assert cl.job.status.restarts == 1, "a loss is counted once"
    cl.step(seconds=31)
    cl.settle()
    assert len(cl.members()) == 3 and cl.job.status.epoch == 3
    assert cl.job.status.phase == "Running"


def test_fixed_size_job_stops_everyone_and_restarts_the_gang() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8, failurePolicy={"backoffSeconds": 0}), rack_nodes())
    cl.settle()
    victim = cl.members()[0]
    cl.pods[victim] = replace(cl.pods[victim], phase="Failed", exit_code=137)
    cl.step()
    rdzv = cl.job.status.rendezvous
    assert rdzv is not None and rdzv.workers == 0 and cl.job.status.epoch == 2
    cl.settle()
    assert len(cl.members()) == 2 and cl.job.status.epoch == 3


def test_node_loss_counts_as_lost_worker() -> None:
    nodes = rack_nodes(racks=1, per_rack=3)
    cl = Cluster(make_ddljob(replicas=3, min_replicas=1, max_replicas=3, gpus=8), nodes)
    cl.settle()
    gone = cl.pods[cl.members()[2]].node
    cl.base_nodes = [replace(n, ready=False) if n.name == gone else n for n in nodes]
    plan = cl.step()
    assert len(cl.members()) == 2 and gone not in {m.node for m in cl.job.status.rendezvous.members}
    assert any("not ready" in e.message for e in plan.events)


def test_non_retryable_exit_code_fails_the_job_at_once() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes())
    cl.settle()
    victim, survivor = cl.members()
    cl.pods[victim] = replace(cl.pods[victim], phase="Failed", exit_code=c.EXIT_CODE_PERMANENT)
    plan = cl.step()
    assert cl.job.status.phase == "Failed"
    assert "non-retryable" in cl.job.status.message
    assert plan.delete == [survivor], "running workers are stopped, the failed one kept for logs"


def test_restarts_beyond_the_limit_fail_the_job() -> None:
    job = make_ddljob(replicas=2, gpus=8, failurePolicy={"maxRestarts": 0, "backoffSeconds": 0})
    cl = Cluster(job, rack_nodes())
    cl.settle()
    victim = cl.members()[0]
    cl.pods[victim] = replace(cl.pods[victim], phase="Failed", exit_code=1)
    cl.step()
    assert cl.job.status.phase == "Failed" and "maxRestarts" in cl.job.status.message
    assert cl.job.status.restarts == 1, "the field agrees with the message"
    assert cl.job.status.message.startswith("1 restarts")


def test_members_finishing_one_by_one_complete_the_job_without_reforming() -> None:
    cl = Cluster(make_ddljob(replicas=2, min_replicas=1, max_replicas=2, gpus=8), rack_nodes())
    cl.settle()
    first, second = cl.members()
    cl.pods[first] = replace(cl.pods[first], phase="Succeeded", exit_code=0)
    plan = cl.step()
    assert cl.job.status.phase == "Running" and cl.job.status.epoch == 1
    assert not (plan.create or plan.place or plan.delete), "no replacement for a finished worker"
    final = {"epoch": 1, "state": "Succeeded", "step": 60, "throughput": 99.5, "syncWaitRatio": 0.3}
    cl.pods[first] = replace(cl.pods[first], report=json.dumps(final))
    cl.pods[second] = replace(cl.pods[second], phase="Succeeded", exit_code=0)
    cl.step()
    assert cl.job.status.phase == "Succeeded"
    assert (cl.job.status.step, cl.job.status.throughput) == (60, 99.5), "rank 0's last report"
    assert cl.step().status.phase == "Succeeded"


@pytest.mark.parametrize(("start", "end"), [(3, 2), (2, 4)])
def test_scale_changes_membership_without_counting_a_restart(start: int, end: int) -> None:
    job = make_ddljob(replicas=start, min_replicas=1, max_replicas=4, gpus=8)
    cl = Cluster(job, rack_nodes())
    cl.settle()
    assert len(cl.members()) == start
    spec = cl.job.spec.model_copy(update={"replicas": end})
    cl.job = cl.job.model_copy(update={"spec": spec})
    cl.settle()
    assert len(cl.members()) == end and len(cl.pods) == end
    assert cl.job.status.epoch == 2 and cl.job.status.restarts == 0


def test_rank0_report_reaches_the_status() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes())
    cl.settle()
    rank0 = cl.members()[0]
    report = {"epoch": 1, "step": 40, "throughput": 512.5, "syncWaitRatio": 0.12}
    cl.pods[rank0] = replace(cl.pods[rank0], report=json.dumps(report))
    status = cl.step().status
    assert (status.step, status.throughput, status.sync_wait_ratio) == (40, 512.5, 0.12)


@pytest.mark.parametrize(("slow", "expected"), [(1.1, False), (1.5, True)])
def test_straggler_is_named_by_compute_time(slow: float, expected: bool) -> None:
    cl = Cluster(make_ddljob(replicas=4, gpus=8), rack_nodes())
    cl.settle()
    members = cl.members()
    for i, name in enumerate(members):
        # Everyone's step takes 1 s; the slow one computes longer and waits less.
        compute = 0.5 * (slow if i == 2 else 1.0)
        report = {"epoch": 1, "stepSeconds": 1.0, "syncWaitRatio": 1.0 - compute}
        cl.pods[name] = replace(cl.pods[name], report=json.dumps(report))
    plan = cl.step()
    status, message = cond(cl, "Straggler")
    assert (status == "True") is expected
    if expected:
        assert "rank 2" in message and members[2] in message and "50% slower" in message
        assert any(e.reason == "Straggler" for e in plan.events)


def test_failed_training_restarts_the_gang_at_a_new_epoch() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8, failurePolicy={"maxRestarts": 1}), rack_nodes())
    cl.settle()
    members = cl.members()
    failed = {"epoch": 1, "state": "Failed", "message": "rank 3 exited with code 1"}
    cl.pods[members[1]] = replace(cl.pods[members[1]], report=json.dumps(failed))
    plan = cl.step()
    assert cl.job.status.epoch == 2 and cl.members() == members, "same workers, new epoch"
    assert cl.job.status.restarts == 1 and not plan.delete
    cl.step()
    assert cl.job.status.epoch == 2 and cl.job.status.restarts == 1, "counted once"
    cl.pods[members[0]] = replace(cl.pods[members[0]], report=json.dumps({**failed, "epoch": 2}))
    cl.step()
    assert cl.job.status.phase == "Failed" and "maxRestarts" in cl.job.status.message


def strict_json(status: DDLJobStatus) -> str:
    """The status as the API server gets it; raises on NaN or infinity."""
    return json.dumps(
        status.model_dump(by_alias=True, exclude_none=True, mode="json"), allow_nan=False
    )


def test_a_bad_report_is_ignored_with_one_warning_for_its_pod() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes())
    cl.settle()
    rank0, other = cl.members()
    good = {"epoch": 1, "state": "Running", "step": 10, "throughput": 100.0, "syncWaitRatio": 0.1}
    cl.pods[rank0] = replace(cl.pods[rank0], report=json.dumps(good))
    cl.step()
    bad = '{"epoch": 1, "state": "Running", "step": 11, "throughput": NaN}'
    cl.pods[rank0] = replace(cl.pods[rank0], report=bad)
    warnings = [e for _ in range(4) for e in cl.step().events if e.reason == "ReportRejected"]
    assert len(warnings) == 1 and rank0 in warnings[0].message and "NaN" in warnings[0].message
    status, message = cond(cl, "ReportRejected")
    assert status == "True" and message.startswith(f"{rank0}: ")
    assert (cl.job.status.step, cl.job.status.throughput) == (10, 100.0), "the last good report"
    assert cl.job.status.phase == "Running"
    strict_json(cl.job.status)
    # A second pod going bad gets its own warning; the first is not repeated.
    cl.pods[other] = replace(cl.pods[other], report="{")
    events = [e for e in cl.step().events if e.reason == "ReportRejected"]
    assert [other in e.message for e in events] == [True]
    # Fixed, then broken differently: a new warning, since what is wrong changed.
    cl.pods[rank0] = replace(cl.pods[rank0], report=json.dumps(good))
    cl.step()
    assert rank0 not in cond(cl, "ReportRejected")[1]
    cl.pods[rank0] = replace(cl.pods[rank0], report=json.dumps({**good, "state": "Exploded"}))
    events = [e for e in cl.step().events if e.reason == "ReportRejected"]
    assert len(events) == 1 and rank0 in events[0].message and "state" in events[0].message


@pytest.mark.parametrize(
    "raw",
    [
        '{"epoch": 1, "state": "Running", "step": Infinity}',
        '{"epoch": 1, "state": "Running", "step": 1e999}',
        '{"epoch": 1, "state": "Running", "step": ' + "9" * 400 + "}",
        '{"epoch": 1, "state": "Running", "throughput": 1e999}',
        '{"epoch": 1, "state": "Running", "throughput": -Infinity}',
        '{"epoch": 1, "state": "Running", "syncWaitRatio": NaN}',
        '{"epoch": 1, "state": "Failed", "stepSeconds": 1e999}',
        '{"epoch": ' + "1" * 30 + ', "state": "Failed"}',
        '{"epoch": 1, "state": ["Failed"]}',
        "[" * 5000,
        "null",
    ],
)
def test_overflowing_reports_never_fail_the_pass(raw: str) -> None:
    cl = Cluster(make_ddljob(replicas=3, gpus=8), rack_nodes())
    cl.settle()
    for name in cl.members():
        cl.pods[name] = replace(cl.pods[name], report=raw)
    for _ in range(3):
        plan = cl.step()
        strict_json(plan.status)
    assert cl.job.status.phase == "Running" and cl.job.status.restarts == 0
    assert cond(cl, "ReportRejected")[0] == "True"


def test_tiny_compute_times_name_no_straggler() -> None:
    cl = Cluster(make_ddljob(replicas=3, gpus=8), rack_nodes())
    cl.settle()
    for name, seconds in zip(cl.members(), (1e-320, 1e-320, 1e6), strict=True):
        report = {"epoch": 1, "stepSeconds": seconds, "syncWaitRatio": 0.0}
        cl.pods[name] = replace(cl.pods[name], report=json.dumps(report))
    strict_json(cl.step().status)
    assert cond(cl, "Straggler")[0] == "False"


def test_forged_operator_annotations_in_the_template_do_not_reach_workers() -> None:
    forged = {
        ANNOTATION_NODE: "r1-n1",
        c.ANNOTATION_REPORT: json.dumps({"epoch": 0, "state": "Failed", "message": "forged"}),
    }
    job = make_ddljob(replicas=2, gpus=8)
    job["spec"]["template"]["metadata"]["annotations"] = forged
    cl = Cluster(job, rack_nodes())
    created = cl.step().create
    assert all(not (m["metadata"]["annotations"].keys() & forged.keys()) for m in created)
    cl.settle()
    assert cl.job.status.phase == "Running" and cl.job.status.restarts == 0


def _require(cl: Cluster, level: str) -> None:
    topology = cl.job.spec.topology.model_copy(update={"required": level})
    cl.job = cl.job.model_copy(
        update={"spec": cl.job.spec.model_copy(update={"topology": topology})}
    )


def _racks(cl: Cluster) -> set[str]:
    rdzv = cl.job.status.rendezvous
    assert rdzv is not None
    return {m.domains[c.LABEL_RACK] for m in rdzv.members}


@pytest.mark.parametrize("victim", range(4))
def test_required_domain_set_on_a_spread_job_reforms_inside_one_domain(victim: int) -> None:
    job = make_ddljob(replicas=4, min_replicas=2, max_replicas=4, gpus=8)
    cl = Cluster(job, rack_nodes(racks=2, per_rack=2))
    cl.settle()
    assert len(_racks(cl)) == 2
    _require(cl, c.LABEL_RACK)
    plan = cl.step()
    assert not plan.delete and cl.job.status.epoch == 1, "a label rule does not evict"
    status, message = cond(cl, "DomainSplit")
    assert status == "True" and "span 2 topology.kubernetes.io/rack domains" in message
    assert [e.reason for e in plan.events].count("DomainSplit") == 1
    assert not any(e.reason == "DomainSplit" for e in cl.step().events), "said once"
    lost = cl.members()[victim]
    cl.pods[lost] = replace(cl.pods[lost], phase="Failed", exit_code=1)
    plan = cl.step()  # failed before: AssertionError in _publish, on every pass
    assert cl.job.status.epoch == 2 and len(cl.members()) == 2 and len(_racks(cl)) == 1
    released = [p for p in plan.delete if p != lost]
    assert len(released) == 1 and released[0] not in cl.members()
    assert any(e.reason == "DomainSplit" and released[0] in e.message for e in plan.events)
    cl.step(seconds=60)
    cl.settle()
    assert len(_racks(cl)) == 1 and cond(cl, "DomainSplit")[0] == "False"
    assert cl.job.status.phase == "Running" and cl.job.status.restarts == 1


def test_a_relabelled_node_splits_the_gang_and_the_survivors_regroup() -> None:
    nodes = rack_nodes(racks=2, per_rack=3)
    job = make_ddljob(replicas=3, min_replicas=1, max_replicas=3, gpus=8)
    job["spec"]["topology"] = {"required": c.LABEL_RACK}
    job["spec"]["failurePolicy"] = {"backoffSeconds": 0}
    cl = Cluster(job, nodes)
    cl.settle()
    assert _racks(cl) == {"rack-0"}
    moved = cl.pods[cl.members()[2]].node
    cl.base_nodes = [
        replace(n, labels={**n.labels, c.LABEL_RACK: "rack-1"}) if n.name == moved else n
        for n in nodes
    ]
    cl.step()
    assert cond(cl, "DomainSplit")[0] == "True"
    first = cl.members()[0]
    cl.pods[first] = replace(cl.pods[first], phase="Failed", exit_code=1)
    cl.step()
    assert len(cl.members()) == 1 and _racks(cl) == {"rack-0"}, "the moved one is released"
    cl.settle()
    # rack-0 is down to two nodes: the job runs with what fits there and says why.
    assert len(cl.members()) == 2 and _racks(cl) == {"rack-0"}
    assert all(cl.pods[m].node != moved for m in cl.members())
    status, message = cond(cl, "Unschedulable")
    assert status == "True" and "rack" in message


def test_a_gang_that_does_not_fit_is_created_gated_and_placed_once_it_does() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes(racks=2, per_rack=2))
    full = cl.base_nodes
    cl.base_nodes = [replace(n, used=8) for n in full]
    first = cl.step()
    assert len(first.create) == 2 and not first.place
    assert all(m["spec"]["schedulingGates"] == [{"name": c.SCHEDULING_GATE}] for m in first.create)
    assert cl.job.status.phase == "Pending"
    cl.base_nodes = full
    second = cl.step()
    assert not second.create and len(second.place) == 2
    assert all(p["spec"]["schedulingGates"] == [] for _, p in second.place)


def test_fewer_workers_than_the_smallest_gang_waits_for_them() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8, failurePolicy={"backoffSeconds": 0}), rack_nodes())
    free = cl.base_nodes
    cl.base_nodes = [replace(n, used=8) for n in free]
    cl.step()
    gated = sorted(cl.pods)
    cl.pods[gated[1]] = replace(cl.pods[gated[1]], deleting=True)
    cl.base_nodes = free
    plan = cl.step()  # failed before: ValueError from GangRequest (min 2 > max 1)
    assert len(plan.create) == 1  # the gated one and the new one are placed together
    assert sorted(name for name, _ in plan.place) == sorted(
        {gated[0], plan.create[0]["metadata"]["name"]}
    )
    cl.pods.pop(gated[1])
    cl.settle()
    assert cl.job.status.phase == "Running" and len(cl.members()) == 2


def test_a_spec_that_slipped_past_the_schema_is_refused_with_a_condition() -> None:
    job = make_ddljob(replicas=2, gpus=8, topology={"levels": [c.LABEL_RACK, c.LABEL_HOSTNAME]})
    cl = Cluster(job, rack_nodes())
    plan = cl.step()
    assert not (plan.create or plan.place or plan.delete)
    status, message = cond(cl, "InvalidSpec")
    assert status == "True" and "spec.topology.levels" in message
    assert [e.reason for e in plan.events] == ["InvalidSpec"]
    assert not cl.step().events, "said once"
    cl.job = cl.job.model_copy(
        update={"spec": cl.job.spec.model_copy(update={"topology": Topology()})}
    )
    cl.settle()
    assert cl.job.status.phase == "Running"
    assert all(x.type != "InvalidSpec" for x in cl.job.status.conditions)


def test_a_placed_pod_the_scheduler_never_binds_is_placed_again() -> None:
    """Another scheduler took the GPUs, or CPU/memory/affinity do not fit: the pinned pods
    hold GPUs forever unless re-placed; the event carries the scheduler's reason."""
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes(racks=2, per_rack=2))
    cl.step()
    cl.step()
    pinned = sorted(n for n, p in cl.pods.items() if p.assigned and not p.gated)
    assert len(pinned) == 2
    why = "0/4 nodes are available: 4 Insufficient memory."
    for name in pinned:
        cl.pods[name] = replace(cl.pods[name], unscheduled=why)
    assert not cl.step(BIND_DEADLINE_SECONDS - 5).delete, "within the deadline: wait"
    plan = cl.step(10)
    assert sorted(plan.delete) == pinned
    replaced = [e for e in plan.events if e.reason == "WorkerReplaced"]
    assert len(replaced) == 2 and all(why in e.message for e in replaced), replaced
    assert f"within {BIND_DEADLINE_SECONDS}s" in replaced[0].message
    assert cl.job.status.restarts == 0, "never a member: no restart"
    cl.step()  # new workers for the empty slots, created gated and placed again
    assert len(cl.pods) == 2 and not any(p.unscheduled for p in cl.pods.values())
    cl.settle()
    assert cl.job.status.phase == "Running" and len(cl.members()) == 2
