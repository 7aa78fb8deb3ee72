"""spec.suspend, pass by pass: stop at a step boundary, hold nothing, resume where it stopped."""

from __future__ import annotations

import json
from dataclasses import replace

from ddl_operator.core.reconcile import SUSPEND_GRACE_SECONDS, Plan

from builders import Cluster, cond, make_ddljob, rack_nodes


def _set_suspend(cl: Cluster, value: bool) -> None:
    spec = cl.job.spec.model_copy(update={"suspend": value})
    cl.job = cl.job.model_copy(update={"spec": spec})


def _report_stopped(cl: Cluster, epoch: int) -> None:
    """Every agent saw the epoch without members: it stopped its processes and waits."""
    for name, pod in cl.pods.items():
        report = {"epoch": epoch, "state": "Waiting", "message": "standby"}
        cl.pods[name] = replace(pod, report=json.dumps(report))


def _reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def _running(cl: Cluster) -> Cluster:
    cl.settle()
    assert cl.job.status.phase == "Running" and cl.job.status.epoch == 1
    return cl


def test_suspend_stops_the_gang_at_an_epoch_without_members_before_deleting() -> None:
    cl = _running(Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes()))
    _set_suspend(cl, True)
    plan = cl.step()
    status = cl.job.status
    assert not plan.delete, "the workers first checkpoint at a step boundary"
    assert status.epoch == 2 and status.rendezvous is not None
    assert status.rendezvous.workers == 0 and not status.rendezvous.members
    assert status.phase == "Suspended" and status.replicas == 0
    assert cond(cl, "Suspended")[0] == "True"
    assert cl.job.status.conditions[-1].reason == "Stopping"
    assert _reasons(plan) == ["Suspending"]
    again = cl.step()
    assert not again.delete and cl.job.status.epoch == 2, "the stop epoch is published once"
    _report_stopped(cl, epoch=2)
    plan = cl.step()
    assert sorted(plan.delete) == ["job-worker-0", "job-worker-1"] and not cl.pods
    suspended = next(x for x in cl.job.status.conditions if x.type == "Suspended")
    assert suspended.reason == "Suspended"
    assert _reasons(plan) == ["Suspended"]
    assert cond(cl, "Ready")[0] == "False" and cond(cl, "Placed")[0] == "False"


def test_a_suspended_job_holds_nothing_and_passes_stay_quiet() -> None:
    cl = _running(Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes()))
    _set_suspend(cl, True)
    cl.step()
    _report_stopped(cl, epoch=2)
    cl.step()
    for _ in range(3):
        plan = cl.step(seconds=600)
        assert not (plan.create or plan.place or plan.delete or plan.events)
        assert plan.requeue_after == 0, "only a spec change wakes a suspended job"
    assert all(n.used == 0 for n in cl.nodes()), "no GPUs held"
    assert cl.job.status.phase == "Suspended" and cl.job.status.epoch == 2
    assert "holding no pods" in cond(cl, "Suspended")[1]


def test_workers_that_never_confirm_are_deleted_after_the_grace() -> None:
    cl = _running(Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes()))
    _set_suspend(cl, True)
    cl.step()
    plan = cl.step(seconds=SUSPEND_GRACE_SECONDS - 5)
    assert not plan.delete and plan.requeue_after <= 5
    rank0 = "job-worker-0"
    _report_stopped(cl, epoch=2)
    cl.pods[rank0] = replace(cl.pods[rank0], report=json.dumps({"epoch": 1, "state": "Running"}))
    assert not cl.step().delete, "one worker still trains"
    plan = cl.step(seconds=5)
    assert sorted(plan.delete) == ["job-worker-0", "job-worker-1"]
    suspended = next(e for e in plan.events if e.reason == "Suspended")
    assert rank0 in suspended.message and "job-worker-1" not in suspended.message


def test_a_job_that_never_trained_is_suspended_at_once() -> None:
    job = make_ddljob(replicas=3, gpus=8, topology={"required": "topology.kubernetes.io/rack"})
    cl = Cluster(job, rack_nodes(racks=2, per_rack=2))  # 24 GPUs never fit one rack of 16
    cl.settle()
    assert cl.job.status.phase == "Pending" and len(cl.pods) == 3
    _set_suspend(cl, True)
    plan = cl.step()
    assert len(plan.delete) == 3 and not cl.pods
    assert cl.job.status.epoch == 0, "nothing trained, so there is no stop epoch"
    assert cond(cl, "Unschedulable")[0] == "False", "a suspended job does not ask for room"


def test_resume_creates_workers_again_at_the_next_epoch_without_a_restart() -> None:
    job = make_ddljob(replicas=2, gpus=8, failurePolicy={"maxRestarts": 0})
    cl = _running(Cluster(job, rack_nodes()))
    rank0 = cl.members()[0]
    report = {"epoch": 1, "state": "Running", "step": 300, "throughput": 100.0}
    cl.pods[rank0] = replace(cl.pods[rank0], report=json.dumps(report))
    cl.step()
    _set_suspend(cl, True)
    cl.step()
    _report_stopped(cl, epoch=2)
    cl.step()
    assert cl.job.status.step == 300 and cl.job.status.throughput == 0.0
    _set_suspend(cl, False)
    plan = cl.step()
    assert len(plan.create) == 2, "fresh gated workers"
    assert cond(cl, "Suspended") == (
        "False",
        "spec.suspend is false; the workers resume from the last checkpoint",
    )
    assert _reasons(plan).count("Resumed") == 1
    later = cl.settle()
    assert "Resumed" not in _reasons(later)
    status = cl.job.status
    assert status.phase == "Running" and status.epoch == 3, "epochs go on counting"
    assert status.restarts == 0, "maxRestarts=0 and still running: suspension is no failure"
    assert len(cl.members()) == 2


def test_suspension_does_not_use_up_the_elastic_patience() -> None:
    nodes = rack_nodes(racks=1, per_rack=2)
    job = make_ddljob(
        replicas=2,
        min_replicas=2,
        max_replicas=2,
        gpus=8,
        elastic={"minReplicas": 2, "maxReplicas": 2, "waitForCapacitySeconds": 120},
    )
    cl = Cluster(job, nodes[:1])  # room for one worker: below minReplicas, waiting
    cl.settle()
    assert cl.job.status.waiting_since is not None
    _set_suspend(cl, True)
    cl.step()
    assert cl.job.status.waiting_since is None
    cl.step(seconds=3600)
    _set_suspend(cl, False)
    cl.base_nodes = nodes
    cl.settle()
    assert cl.job.status.phase == "Running", "an hour suspended is not an hour of waiting"


def test_toggling_quickly_reforms_the_same_pods_each_time() -> None:
    cl = _running(Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes()))
    pods = sorted(cl.pods)
    for round_ in range(3):
        _set_suspend(cl, True)
        stopping = cl.step()
        assert not stopping.delete and not cl.members()
        _set_suspend(cl, False)
        resumed = cl.step()
        assert not (resumed.create or resumed.delete or resumed.place), "the pods are still there"
        assert sorted(cl.members()) == pods, "they re-form at the next epoch"
        assert cl.job.status.epoch == 1 + 2 * (round_ + 1)
        assert _reasons(stopping) == ["Suspending"] and "Resumed" in _reasons(resumed)
    assert cl.job.status.phase == "Running" and cl.job.status.restarts == 0


def test_a_gang_waiting_for_capacity_is_suspended_without_a_new_epoch() -> None:
    job = make_ddljob(replicas=2, gpus=8, failurePolicy={"backoffSeconds": 0})
    nodes = rack_nodes(racks=1, per_rack=2)
    cl = _running(Cluster(job, nodes))
    victim = cl.members()[0]
    cl.base_nodes = [
        replace(n, ready=False) if n.name == cl.pods[victim].node else n for n in nodes
    ]
    cl.step()
    assert cl.job.status.rendezvous is not None and cl.job.status.rendezvous.workers == 0
    epoch = cl.job.status.epoch
    _report_stopped(cl, epoch=epoch)
    _set_suspend(cl, True)
    plan = cl.step()
    assert cl.job.status.epoch == epoch and "Suspending" not in _reasons(plan)
    assert plan.delete and not cl.pods
