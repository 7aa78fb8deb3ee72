"""`--no-queue-order` and `--no-preemption`: one controller pass each way, against a recording
fake of the Kubernetes edge, shows what each flag turns off."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from fakeruntime import JobWatchSink, fake_runtime

from ddl_operator import controller
from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.placement import GangRequest
from ddl_operator.core.preemption import PREEMPTED_BY, Running
from ddl_operator.core.queueing import Demand
from ddl_operator.core.reconcile import Plan, WorkerPod
from ddl_operator.core.topology import NodeInfo
from ddl_operator.kube import PriorityClasses, Snapshot
from ddl_operator.runtime import Runtime, Settings

from builders import T0, make_ddljob, rack_nodes

KEY = ("ml", "job")
HIGH = "high"


class FakeKube(JobWatchSink):
    """Serves one job with one gated worker (1 x 8 GPUs) on `nodes`; records writes."""

    def __init__(self, nodes: list[NodeInfo], klass: str = "") -> None:
        manifest = make_ddljob(replicas=1, gpus=8)
        if klass:
            manifest["spec"]["template"]["spec"]["priorityClassName"] = klass
        created = (T0 + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta = {"name": "job", "namespace": "ml", "uid": "u-1", "creationTimestamp": created}
        body = {**manifest, "metadata": meta}
        gate = ({"name": c.SCHEDULING_GATE},)
        self.snap = Snapshot(
            job=DDLJob.model_validate(body),
            body=body,
            pods=[WorkerPod(name="job-worker-0", slot=0, gates=gate)],
            nodes=nodes,
        )
        self.applied: list[Plan] = []
        self.annotated: list[tuple[str, dict[str, Any]]] = []

    def snapshot(self, namespace: str, name: str) -> Snapshot:
        return self.snap

    def node_infos(self, job: DDLJob) -> list[NodeInfo]:
        return self.snap.nodes

    def priority_classes(self, refresh: bool = False) -> PriorityClasses:
        return PriorityClasses(values={HIGH: 1000})

    def patch_annotations(self, body: Any, annotations: dict[str, Any]) -> None:
        self.annotated.append((body["metadata"]["name"], annotations))

    def apply(self, snap: Snapshot, plan: Plan, identity: Any = None) -> None:
        self.applied.append(plan)


def runtime(kube: FakeKube, **flags: bool) -> Runtime:
    # The executor starts no thread: the pass is called directly.
    return fake_runtime(kube, ThreadPoolExecutor(1), Settings(**flags))


def placed(kube: FakeKube) -> list[str]:
    (plan,) = kube.applied
    return [pod for pod, _ in plan.place]


def test_no_queue_order_lets_a_later_job_take_gpus_held_for_the_head() -> None:
    # Two free nodes of one rack; an older 4 x 8 gang waits for the rack and holds them.
    nodes = [replace(n, used=8 if i < 2 else 0) for i, n in enumerate(rack_nodes(1, 4))]
    levels = (c.LABEL_HOSTNAME, c.LABEL_RACK, c.LABEL_ZONE)
    head = Demand(("ml", "big"), 0, T0, GangRequest(4, 4, 8, levels, None, 1))
    for flags, expected in (({}, []), ({"queue_order": False}, ["job-worker-0"])):
        kube = FakeKube(nodes)
        rt = runtime(kube, **flags)
        rt.demands[head.key] = head
        controller.reconcile_job(rt, KEY)
        assert placed(kube) == expected, flags
        # Ordered, the job waits behind the head (filed); unordered, nothing is filed.
        assert (KEY in rt.demands) == (not expected)


def test_no_preemption_leaves_a_lower_priority_job_alone() -> None:
    # Both nodes run an elastic low-priority job (2 workers, min 1); a high one does not fit.
    nodes = [replace(n, used=8) for n in rack_nodes(racks=1, per_rack=2)]
    low = Running(
        key=("ml", "low"),
        priority=0,
        created=T0,
        units_per_worker=8,
        workers=(("low-worker-0", nodes[0].name), ("low-worker-1", nodes[1].name)),
        min_workers=1,
    )
    for flags, victims in (({}, ["low"]), ({"preemption": False}, [])):
        kube = FakeKube(nodes, klass=HIGH)
        rt = runtime(kube, **flags)
        rt.holders[low.key] = low
        controller.reconcile_job(rt, KEY)
        assert [name for name, _ in kube.annotated] == victims, flags
        assert all(PREEMPTED_BY in annotations for _, annotations in kube.annotated)
        assert placed(kube) == []  # the victim's GPUs free only once its pass lets them go
