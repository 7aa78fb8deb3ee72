"""The victim's side of preemption, pass by pass: it shrinks to what its record holds (or is
suspended), says who preempted it, and grows back only once the queue lets it."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any
from unittest.mock import patch

import pytest
from kubernetes import client

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob, DDLJobStatus
from ddl_operator.core.placement import GangRequest
from ddl_operator.core.preemption import PREEMPTED_BY, PreemptedRecord, encode_record
from ddl_operator.core.queueing import Demand, Slot, arrange
from ddl_operator.core.reconcile import Plan, WorkerPod, pending_request, reconcile
from ddl_operator.core.topology import NodeInfo
from ddl_operator.kube import Kube, Snapshot

import builders
from builders import T0, Cluster, cond, make_ddljob, rack_nodes

KEY = ("default", "job")
URGENT = ("default", "urgent")


class Shared(Cluster):
    """The victim on a cluster it shares: GPUs other jobs hold (`others`, node -> GPUs),
    jobs ahead of it in the queue (`ahead`), and each pass's slot from its own pending
    request, as the controller's claim step computes it."""

    def __init__(self, job: dict[str, Any], nodes: list[NodeInfo]) -> None:
        super().__init__(job, nodes)
        self.others: dict[str, int] = {}
        self.ahead: list[Demand] = []
        self.slot: Slot | None = None

    def nodes(self) -> list[NodeInfo]:
        return [replace(n, used=n.used + self.others.get(n.name, 0)) for n in super().nodes()]

    def annotate(self, key: str, value: str | None) -> None:
        annotations = dict(self.job.metadata.annotations)
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
        meta = self.job.metadata.model_copy(update={"annotations": annotations})
        self.job = self.job.model_copy(update={"metadata": meta})

    def _decide(
        self, job: DDLJob, pods: list[WorkerPod], nodes: list[NodeInfo], now: dt.datetime
    ) -> Plan:
        request = pending_request(job, pods, nodes, now)
        self.slot = None
        if request is not None:
            mine = Demand(KEY, priority=0, created=T0, request=request)
            self.slot = arrange([*self.ahead, mine], nodes, until=KEY).slots[KEY]
        return reconcile(job, pods, nodes, now, queue=self.slot)

    def step(self, seconds: float = 1.0) -> Plan:
        with patch.object(builders, "reconcile", self._decide):
            plan = super().step(seconds)
        for key, value in plan.annotations.items():  # the job's own merge patch
            self.annotate(key, value)
        return plan


def _victim(min_replicas: int = 2) -> Shared:
    """A 4x8-GPU elastic job training on all 32 GPUs of two racks."""
    job = make_ddljob(replicas=4, min_replicas=min_replicas, max_replicas=4, gpus=8)
    cl = Shared(job, rack_nodes(racks=2, per_rack=2))
    cl.settle()
    assert cl.job.status.phase == "Running" and len(cl.members()) == 4
    return cl


def _preempt(cl: Shared, replicas: int, pods: list[str]) -> None:
    """What the preemptor's claim step does: the record on the victim."""
    record = PreemptedRecord(URGENT, replicas, tuple(pods), T0)
    cl.annotate(PREEMPTED_BY, encode_record(record))


def _urgent(workers: int) -> Demand:
    """The preemptor, waiting: `workers` x 8 GPUs, inside one rack if it fits in one."""
    request = GangRequest(
        min_workers=workers,
        max_workers=workers,
        units_per_worker=8,
        levels=(c.LABEL_HOSTNAME, c.LABEL_RACK),
        required=c.LABEL_RACK if workers <= 2 else None,
        procs_per_worker=1,
    )
    return Demand(URGENT, priority=1000, created=T0, request=request)


def _reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def _preempted(cl: Cluster) -> tuple[str, str, str]:
    found = next(x for x in cl.job.status.conditions if x.type == "Preempted")
    return found.status, found.reason, found.message


def test_the_record_shrinks_the_job_to_its_pods_at_a_new_epoch() -> None:
    cl = _victim()
    before = cl.members()
    named = before[:2]  # the lowest ranks: not what a scale-down would choose
    nodes_of = {name: cl.pods[name].node for name in named}
    cl.ahead = [_urgent(2)]  # the preemptor waits for the GPUs it was promised
    _preempt(cl, 2, named)
    plan = cl.step()
    assert sorted(plan.delete) == sorted(named), "the record's pods go, not the high ranks"
    assert not plan.create and not plan.annotations
    status = cl.job.status
    assert status.epoch == 2 and sorted(cl.members()) == sorted(before[2:])
    assert status.restarts == 0, "a preemption is no failure"
    assert _preempted(cl)[:2] == ("True", "Shrunk")
    assert "preempted by default/urgent" in _preempted(cl)[2]
    assert _reasons(plan).count("Preempted") == 1
    warning = next(e for e in plan.events if e.reason == "Preempted")
    assert warning.type == "Warning" and "default/urgent" in warning.message
    assert cond(cl, "Placed") == ("True", "2/2 workers placed")
    # The urgent job takes the freed nodes; the victim trains on with two and stays quiet.
    cl.ahead = []
    for node in nodes_of.values():
        cl.others[node or ""] = 8
    for _ in range(4):
        cl.run_bound()
        later = cl.step(seconds=30)
        assert not (later.create or later.delete or later.place or later.annotations)
        assert "Preempted" not in _reasons(later), "one event per record"
    assert cl.job.status.phase == "Running" and cl.job.status.epoch == 2
    assert PREEMPTED_BY in cl.job.metadata.annotations
    assert "grows back" in cl.job.status.message


@pytest.mark.parametrize(("recorded", "kept"), [(1, 3), (0, 0), (3, 3), (9, 4)])
def test_an_edited_record_never_shrinks_below_min_replicas(recorded: int, kept: int) -> None:
    cl = _victim(min_replicas=3)
    named = cl.members()[:3]
    cl.ahead = [_urgent(2)]
    _preempt(cl, recorded, named)
    plan = cl.step()
    if kept == 0:  # 0 is a suspension, not a shrink below the minimum
        assert cl.job.status.phase == "Suspended"
        return
    assert len(cl.pods) == kept and cl.job.status.epoch == (1 if kept == 4 else 2)
    assert set(plan.delete) <= set(named), "only pods the record names are removed"
    assert len(cl.members()) == kept
    assert not plan.create


def test_a_record_of_zero_replicas_suspends_the_job_and_says_it_was_preempted() -> None:
    cl = _victim()
    cl.ahead = [_urgent(4)]
    _preempt(cl, 0, list(cl.pods))
    plan = cl.step()
    status = cl.job.status
    assert not plan.delete, "the workers first checkpoint at a step boundary"
    assert status.phase == "Suspended" and status.rendezvous is not None
    assert status.rendezvous.workers == 0 and status.epoch == 2
    assert _preempted(cl)[:2] == ("True", "Suspended")
    assert "preempted by default/urgent" in _preempted(cl)[2]
    assert cond(cl, "Suspended")[0] == "True" and "default/urgent" in cond(cl, "Suspended")[1]
    assert sorted(_reasons(plan)) == ["Preempted", "Suspending"]
    for name, pod in cl.pods.items():  # every agent stopped at the stop epoch
        report = {"epoch": 2, "state": "Waiting", "message": "standby"}
        cl.pods[name] = replace(pod, report=json.dumps(report))
    plan = cl.step()
    assert len(plan.delete) == 4 and not cl.pods
    assert _reasons(plan) == ["Suspended"]
    quiet = cl.step(seconds=60)
    assert not (quiet.create or quiet.events or quiet.annotations)
    assert quiet.requeue_after > 0, "the queue's verdict can change without a spec change"
    assert "when the queue has room" in cond(cl, "Suspended")[1]


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"by": "default/urgent", "replicas": 2}',
        '{"at": "2026-01-01T00:00:00Z", "by": "no-slash", "pods": [], "replicas": 2}',
        '{"at": "2026-01-01T00:00:00", "by": "default/urgent", "pods": [], "replicas": 2}',
        '{"at": "2026-01-01T00:00:00Z", "by": "default/urgent", "pods": [], "replicas": -1}',
    ],
)
def test_an_invalid_record_is_ignored_with_a_condition(raw: str) -> None:
    cl = _victim()
    cl.annotate(PREEMPTED_BY, raw)
    plan = cl.step()
    assert not (plan.delete or plan.create or plan.annotations)
    assert len(cl.members()) == 4 and cl.job.status.epoch == 1
    status, reason, message = _preempted(cl)
    assert (status, reason) == ("False", "InvalidRecord") and PREEMPTED_BY in message
    assert raw not in message, "the condition never echoes the annotation"
    assert _reasons(plan) == ["InvalidPreemptionRecord"]
    assert not cl.step().events, "said once"


def test_regrowth_clears_the_record_and_grows_back_at_the_next_epoch() -> None:
    cl = _victim()
    named = cl.members()[:2]
    freed = sorted(cl.pods[name].node or "" for name in named)
    cl.ahead = [_urgent(2)]
    _preempt(cl, 2, named)
    cl.step()
    cl.ahead = []
    cl.others = dict.fromkeys(freed, 8)  # the urgent job runs there
    cl.step()
    assert cl.slot is not None and not cl.slot.fits
    assert PREEMPTED_BY in cl.job.metadata.annotations
    cl.others = {}  # the urgent job ended
    plan = cl.step()
    assert plan.annotations == {PREEMPTED_BY: None}, "the record is cleared"
    assert PREEMPTED_BY not in cl.job.metadata.annotations
    assert _preempted(cl)[:2] == ("False", "Restored")
    assert _reasons(plan).count("Restored") == 1
    assert len(plan.create) == 2, "back to spec.replicas"
    after = cl.settle()
    assert "Restored" not in _reasons(after) and not after.annotations
    status = cl.job.status
    assert status.phase == "Running" and len(cl.members()) == 4 and status.epoch == 3
    assert status.restarts == 0 and _preempted(cl)[0] == "False"


def test_no_regrowth_while_the_preemptor_is_ahead_in_the_queue() -> None:
    cl = _victim()
    named = cl.members()[:2]
    cl.ahead = [_urgent(2)]
    _preempt(cl, 2, named)
    cl.step()
    for _ in range(5):  # the freed GPUs are free, but the urgent job comes first
        plan = cl.step(seconds=10)
        assert cl.slot is not None and not cl.slot.fits
        assert not (plan.create or plan.annotations)
    assert _preempted(cl)[:2] == ("True", "Shrunk") and len(cl.members()) == 2


def test_the_record_holds_through_the_pass_that_carries_it_out() -> None:
    """Even with room at once, the shrink happens first: clearing the record then would
    keep the very workers the preemptor waits for."""
    cl = _victim()
    cl.base_nodes = [*cl.base_nodes, *rack_nodes(racks=3, per_rack=2)[4:]]  # a free rack
    named = cl.members()[:2]
    _preempt(cl, 2, named)
    plan = cl.step()
    assert cl.slot is not None and cl.slot.fits
    assert sorted(plan.delete) == sorted(named) and not plan.annotations
    assert _preempted(cl)[:2] == ("True", "Shrunk")
    regrow = cl.step()
    assert regrow.annotations == {PREEMPTED_BY: None} and len(regrow.create) == 2


def test_pending_request_asks_for_the_growth_back_to_spec_replicas() -> None:
    cl = _victim()
    named = cl.members()[:2]
    cl.ahead = [_urgent(2)]
    _preempt(cl, 2, named)
    cl.step()
    request = pending_request(cl.job, list(cl.pods.values()), cl.nodes(), cl.now)
    assert request is not None, "all its workers are placed, yet it waits to grow"
    assert request.max_workers == 4 and request.min_workers == 3
    assert set(request.keep) == set(cl.pods) and not set(request.keep) & set(named)


def test_a_suspended_victim_asks_for_its_whole_gang_and_resumes() -> None:
    cl = _victim()
    cl.ahead = [_urgent(4)]
    _preempt(cl, 0, list(cl.pods))
    cl.step()
    cl.step(seconds=60)  # past the grace: the pods go
    assert not cl.pods
    request = pending_request(cl.job, [], cl.nodes(), cl.now)
    assert request is not None and not request.keep
    assert (request.min_workers, request.max_workers) == (2, 4)
    cl.others = {n.name: 8 for n in cl.base_nodes}  # the urgent job holds everything
    cl.ahead = []
    held = cl.step(seconds=60)
    assert not (held.create or held.annotations) and cl.job.status.phase == "Suspended"
    cl.others = {}
    plan = cl.step()
    assert plan.annotations == {PREEMPTED_BY: None} and len(plan.create) == 4
    assert {"Restored", "Resumed"} <= set(_reasons(plan))
    assert cond(cl, "Suspended") == (
        "False",
        "the queue has room; the workers resume from the last checkpoint",
    )
    cl.settle()
    assert cl.job.status.phase == "Running" and len(cl.members()) == 4


def test_removing_the_annotation_by_hand_restores_the_job() -> None:
    cl = _victim()
    cl.ahead = [_urgent(2)]
    _preempt(cl, 2, cl.members()[:2])
    cl.step()
    cl.annotate(PREEMPTED_BY, None)
    plan = cl.step()
    assert _preempted(cl)[:2] == ("False", "Restored") and len(plan.create) == 2
    assert _reasons(plan).count("Restored") == 1
    assert "Restored" not in _reasons(cl.step())


class _Custom:
    """The custom-objects API as Kube.apply uses it: records calls, bumps resourceVersion."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []

    def patch_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        *_, name, patch = args
        self.calls.append(("patch", patch, kwargs.get("_content_type")))
        annotations = {k: v for k, v in patch["metadata"]["annotations"].items() if v}
        meta = {"name": name, "namespace": "default", "resourceVersion": "8"}
        return {"metadata": {**meta, "annotations": annotations}, "status": {"phase": "Running"}}

    def replace_namespaced_custom_object_status(self, *args: Any) -> dict[str, Any]:
        body = args[-1]
        self.calls.append(("status", body, None))
        return {"metadata": {**body["metadata"], "resourceVersion": "9"}}


def test_apply_patches_the_annotations_then_writes_the_status_over_the_result() -> None:
    body = {
        **make_ddljob(),
        "metadata": {
            "name": "job",
            "namespace": "default",
            "resourceVersion": "7",
            "annotations": {PREEMPTED_BY: "{}", "keep": "me"},
        },
        "status": {"phase": "Running"},
    }
    kube = Kube(client.ApiClient(), cache=None)  # type: ignore[arg-type]
    custom = _Custom()
    kube.custom = custom  # type: ignore[assignment]
    snap = Snapshot(job=DDLJob.model_validate(body), body=body, pods=[], nodes=[])
    plan = Plan(status=DDLJobStatus(phase="Rescaling"), annotations={PREEMPTED_BY: None})
    assert kube.apply(snap, plan) == "9"
    (patch, patched, content), (write, status, _) = custom.calls
    assert (patch, write) == ("patch", "status")
    assert patched == {"metadata": {"annotations": {PREEMPTED_BY: None}, "resourceVersion": "7"}}
    assert content == "application/merge-patch+json", "None removes the key in a merge patch"
    assert status["metadata"]["resourceVersion"] == "8", "written over the patched job"
    assert status["status"]["phase"] == "Rescaling"
