"""The job state machine, pass by pass, on an in-memory cluster."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.reconcile import Plan, WorkerPod, reconcile
from ddl_operator.core.render import LABEL_SLOT
from ddl_operator.core.topology import NodeInfo

from builders import make_ddljob

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def rack_nodes(racks: int = 2, per_rack: int = 2, gpus: int = 8) -> list[NodeInfo]:
    return [
        NodeInfo(
            name=f"r{r}-n{n}",
            labels={
                c.LABEL_HOSTNAME: f"r{r}-n{n}",
                c.LABEL_RACK: f"rack-{r}",
                c.LABEL_ZONE: "zone-a",
            },
            allocatable=gpus,
            used=0,
        )
        for r in range(racks)
        for n in range(per_rack)
    ]


class Cluster:
    """Applies plans the way the API server and kube-scheduler would, minus the network."""

    def __init__(self, job: dict[str, Any], nodes: list[NodeInfo]) -> None:
        self.job = DDLJob.model_validate(
            {**job, "metadata": {"name": job["metadata"]["name"], "uid": "u-1", "generation": 1}}
        )
        self.base_nodes = nodes
        self.pods: dict[str, WorkerPod] = {}
        self.now = T0
        self.ips = 0

    def nodes(self) -> list[NodeInfo]:
        gpus = self.job.spec.gpus_per_worker
        used: dict[str, int] = {}
        for p in self.pods.values():
            if p.placed_on and p.phase in ("Pending", "Running"):
                used[p.placed_on] = used.get(p.placed_on, 0) + gpus
        return [replace(n, used=n.used + used.get(n.name, 0)) for n in self.base_nodes]

    def step(self, seconds: float = 1.0) -> Plan:
        self.now += dt.timedelta(seconds=seconds)
        plan = reconcile(self.job, list(self.pods.values()), self.nodes(), self.now)
        for name in plan.delete:
            self.pods.pop(name, None)
        for manifest in plan.create:
            name = manifest["metadata"]["name"]
            assert name not in self.pods, f"duplicate pod {name}"
            gates = tuple(manifest["spec"]["schedulingGates"])
            slot = int(manifest["metadata"]["labels"][LABEL_SLOT])
            self.pods[name] = WorkerPod(name=name, slot=slot, gates=gates)
        for name, patch in plan.place:
            node = patch["spec"]["nodeSelector"][c.LABEL_HOSTNAME]
            self.pods[name] = replace(
                self.pods[name], assigned=node, gates=tuple(patch["spec"]["schedulingGates"])
            )
        self.job = self.job.model_copy(update={"status": plan.status})
        return plan

    def run_bound(self) -> None:
        """The scheduler binds placed pods and the kubelet starts them."""
        for name, p in list(self.pods.items()):
            if p.assigned and p.phase == "Pending":
                self.ips += 1
                self.pods[name] = replace(
                    p, node=p.assigned, phase="Running", ip=f"10.0.0.{self.ips}"
                )

    def settle(self, passes: int = 6) -> Plan:
        plan = self.step()
        for _ in range(passes):
            self.run_bound()
            plan = self.step()
        return plan

    def members(self) -> list[str]:
        rdzv = self.job.status.rendezvous
        return [m.pod for m in rdzv.members] if rdzv else []


def cond(cluster: Cluster, type_: str) -> tuple[str, str]:
    found = next(x for x in cluster.job.status.conditions if x.type == type_)
    return found.status, found.message


def test_gang_is_created_gated_then_placed_then_published() -> None:
    cl = Cluster(make_ddljob(replicas=2, gpus=8), rack_nodes(racks=2, per_rack=2))
    first = cl.step()
    assert len(first.create) == 2 and not first.place
    assert all(m["spec"]["schedulingGates"] == [{"name": c.SCHEDULING_GATE}] for m in first.create)
    assert cl.job.status.phase == "Pending"
    second = cl.step()
    assert len(second.place) == 2
    nodes = {p["spec"]["nodeSelector"][c.LABEL_HOSTNAME] for _, p in second.place}
    assert len(nodes) == 2 and len({n.split("-")[0] for n in nodes}) == 1, "one rack, two nodes"
    assert all(p["spec"]["schedulingGates"] == [] for _, p in second.place)
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
    cl.pods[first] = replace(cl.pods[first], report=final)
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
    cl.pods[rank0] = replace(cl.pods[rank0], report=report)
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
        cl.pods[name] = replace(cl.pods[name], report=report)
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
    cl.pods[members[1]] = replace(cl.pods[members[1]], report=failed)
    plan = cl.step()
    assert cl.job.status.epoch == 2 and cl.members() == members, "same workers, new epoch"
    assert cl.job.status.restarts == 1 and not plan.delete
    cl.step()
    assert cl.job.status.epoch == 2 and cl.job.status.restarts == 1, "counted once"
    cl.pods[members[0]] = replace(cl.pods[members[0]], report={**failed, "epoch": 2})
    cl.step()
    assert cl.job.status.phase == "Failed" and "maxRestarts" in cl.job.status.message
