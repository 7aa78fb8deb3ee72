"""One reconcile pass of the controller with an invalid spec, against a recording fake of the
Kubernetes edge: the pass ends with an InvalidSpec status instead of an exception."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fakeruntime import JobWatchSink, fake_runtime
from kubernetes import client

from ddl_operator import controller
from ddl_operator.api.models import DDLJob
from ddl_operator.core.reconcile import Plan
from ddl_operator.core.topology import NodeInfo
from ddl_operator.core.validate import CHILD_REFUSED, CONDITION, UNUSABLE_TEMPLATE
from ddl_operator.kube import PriorityClasses, Snapshot
from ddl_operator.runtime import Runtime

from builders import make_ddljob, set_path


class FakeKube(JobWatchSink):
    """Serves one snapshot; records plans; refuses pod creation with `refusal` if set."""

    def __init__(self, manifest: dict[str, Any], refusal: dict[str, Any] | None = None) -> None:
        body = {**manifest, "metadata": {"name": "job", "namespace": "ml", "uid": "u-1"}}
        self.snap = Snapshot(
            job=DDLJob.model_validate(body),
            body=body,
            pods=[],
            nodes=[
                NodeInfo(name="n0", labels={"kubernetes.io/hostname": "n0"}, allocatable=8, used=0)
            ],
        )
        self.refusal = refusal
        self.applied: list[Plan] = []
        self.patches: list[dict[str, Any]] = []

    def snapshot(self, namespace: str, name: str) -> Snapshot:
        return self.snap

    def node_infos(self, job: DDLJob) -> list[NodeInfo]:
        return list(self.snap.nodes)

    def priority_classes(self) -> PriorityClasses:
        return PriorityClasses()

    def patch_job(self, body: Any, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append(patch)
        return dict(body)

    def apply(self, snap: Snapshot, plan: Plan, identity: Any = None) -> None:
        if plan.create and self.refusal is not None:
            err = client.ApiException(status=422, reason="Unprocessable Entity")
            err.body = json.dumps(self.refusal)
            raise err
        self.applied.append(plan)


@pytest.fixture
def kube(request: pytest.FixtureRequest) -> Iterator[FakeKube]:
    yield FakeKube(*request.param)


@pytest.fixture
def runtime(kube: FakeKube) -> Iterator[Runtime]:
    """The operator's runtime around the fakes (built by hand: no cluster, no loop)."""
    executor = ThreadPoolExecutor(1)
    yield fake_runtime(kube, executor)
    executor.shutdown()


def _invalid(plan: Plan) -> str:
    (condition,) = [x for x in plan.status.conditions if x.type == CONDITION]
    return f"{condition.reason}: {condition.message}"


UNUSABLE = set_path(make_ddljob(), "spec.template.spec.containers.0.env", "X")
MOUNT = set_path(
    make_ddljob(),
    "spec.template.spec.containers.0.volumeMounts",
    [{"name": "d", "mountPath": "/d"}],
)
POD_REFUSED = {
    "kind": "Status",
    "code": 422,
    "reason": "Invalid",
    "message": 'Pod "job-worker-0" is invalid',
    "details": {
        "kind": "Pod",
        "name": "job-worker-0",
        "causes": [
            {"field": "spec.containers[0].volumeMounts[0].name", "message": 'Not found: "d"'}
        ],
    },
}


@pytest.mark.parametrize("kube", [(UNUSABLE,)], indirect=True)
def test_an_unusable_template_is_reported_not_raised(kube: FakeKube, runtime: Runtime) -> None:
    outcome = controller.reconcile_job(runtime, ("ml", "job"))
    assert outcome == controller.Outcome()  # looked at again when it changes
    (plan,) = kube.applied
    assert not plan.create and not plan.place and not plan.delete
    assert _invalid(plan) == (
        f"{UNUSABLE_TEMPLATE}: spec.template.spec.containers[0].env: "
        "must be a list, not the string 'X'"
    )
    assert [e.reason for e in plan.events] == [CONDITION]


@pytest.mark.parametrize("kube", [(MOUNT, POD_REFUSED)], indirect=True)
def test_a_refused_worker_pod_is_reported_not_raised(kube: FakeKube, runtime: Runtime) -> None:
    assert controller.reconcile_job(runtime, ("ml", "job")) == controller.Outcome()
    (plan,) = kube.applied
    assert not plan.create and not plan.place  # the rest of the plan still applies
    assert _invalid(plan).startswith(
        f"{CHILD_REFUSED}: spec.template.spec.containers[0].volumeMounts[0].name: Not found"
    )
    assert CONDITION in [e.reason for e in plan.events]


OTHER_REFUSED = {**POD_REFUSED, "details": {"kind": "ServiceAccount", "name": "ddl-worker"}}


@pytest.mark.parametrize("kube", [(MOUNT, OTHER_REFUSED)], indirect=True)
def test_a_refusal_that_is_not_the_specs_fault_still_raises(
    kube: FakeKube, runtime: Runtime
) -> None:
    with pytest.raises(client.ApiException):
        controller.reconcile_job(runtime, ("ml", "job"))
    assert kube.applied == []


def _queued(suspend: bool) -> dict[str, Any]:
    return set_path(make_ddljob(gpus=8), "spec.suspend", suspend)


@pytest.mark.parametrize("kube", [(_queued(False),)], indirect=True)
def test_a_queued_job_without_kueue_is_suspended_before_anything_runs(
    kube: FakeKube, runtime: Runtime
) -> None:
    kube.snap = _labelled(kube.snap)
    outcome = controller.reconcile_job(runtime, ("ml", "job"))
    # Suspended first; the pass ends on the stale read (the patch's event brings the next).
    assert kube.patches == [{"spec": {"suspend": True}}]
    assert not kube.applied and outcome.requeue_after is not None


@pytest.mark.parametrize("kube", [(_queued(True),)], indirect=True)
def test_a_queued_job_without_kueue_holds_nothing_and_says_so(
    kube: FakeKube, runtime: Runtime
) -> None:
    kube.snap = _labelled(kube.snap)
    outcome = controller.reconcile_job(runtime, ("ml", "job"))
    assert not kube.patches
    (plan,) = kube.applied
    assert not plan.create and not plan.place
    (cond,) = [x for x in plan.status.conditions if x.type == "KueueAdmitted"]
    assert (cond.status, cond.reason) == ("False", "KueueNotInstalled")
    assert "install Kueue" in cond.message and plan.status.phase == "Suspended"
    assert [e.reason for e in plan.events if e.type == "Warning"] == ["KueueAdmitted"]
    # Looked at again now and then: installing Kueue lets it run.
    assert outcome.requeue_after == controller.KUEUE_RECHECK_SECONDS


def _labelled(snap: Snapshot) -> Snapshot:
    body = {**snap.body, "metadata": {**snap.body["metadata"], "labels": {
        "kueue.x-k8s.io/queue-name": "team"}}}  # fmt: skip
    return Snapshot(DDLJob.model_validate(body), body, snap.pods, snap.nodes)
