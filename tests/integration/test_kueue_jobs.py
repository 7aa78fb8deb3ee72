"""DDLJobs queued in Kueue, end to end: the session's operator owns their Workloads, the pinned
Kueue manager admits or evicts them, kwok nodes run the workers.

A 16-GPU ClusterQueue over kwok nodes with 32 GPUs: quota, not capacity, decides who runs. kwok's
pods never finish by themselves; a job ends when its workers are marked Succeeded, as their
kubelet would. kwok's pods have no agent that confirms a stop, so an evicted job's pods go after
the operator's grace (SUSPEND_GRACE_SECONDS).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_kueue import _create, _priority_classes, _queues, _wait, kueue_manager, test_id

from ddl_localcluster.kueue import KueueManager
from ddl_operator.api import constants as c
from ddl_operator.core import kueue as k
from ddl_operator.core.reconcile import SUSPEND_GRACE_SECONDS

from builders import make_ddljob
from kubetools import FakeCluster, Kubectl, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")
__all__ = ["kueue_manager", "test_id"]  # fixtures shared with test_kueue

# The operator notices Kueue within INSTALLED_TTL_SECONDS of its CRDs appearing.
START_S = 120
ADMITTED = '{.status.conditions[?(@.type=="KueueAdmitted")].status}'


@pytest.fixture
def pool(kubectl: Kubectl, test_id: str) -> Iterator[FakeCluster]:
    """One rack of 4 kwok nodes x 8 GPUs, labelled as the test's ResourceFlavor selects."""
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=4)
    kubectl.run("label", "nodes", "-l", f"ddl-test={fake.test_id}", f"ddl-test/pool={test_id}")
    yield fake
    fake.delete()


def _submit(
    kubectl: Kubectl, ns: str, fake: FakeCluster, name: str, queue: str, **template: Any
) -> None:
    """A queued 2x8 job, created suspended as Kueue-managed jobs should be."""
    job = make_ddljob(name=name, namespace=ns, replicas=2, gpus=8, suspend=True)
    job["metadata"]["labels"] = {k.LABEL_QUEUE_NAME: queue}
    job["spec"]["template"]["spec"].update(nodeSelector=fake.selector, **template)
    _create(kubectl, job)


def _job(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    return kubectl.get_json("ddlj", name, "-n", ns)


def _condition(job: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = (job.get("status") or {}).get("conditions") or []
    found: dict[str, Any] = next((x for x in conditions if x["type"] == kind), {})
    return found


def _pods(kubectl: Kubectl, ns: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.get_json("pods", "-n", ns, "-l", f"{c.LABEL_JOB}={name}")[
        "items"
    ]
    return items


def _workload(kubectl: Kubectl, ns: str, job: str) -> tuple[dict[str, Any], k.WorkloadStatus]:
    [obj] = kubectl.get_json("workloads.kueue.x-k8s.io", "-n", ns, "-l", f"{c.LABEL_JOB}={job}")[
        "items"
    ]
    return obj, k.workload_status(obj)


def _until(what: str, check: Any, timeout: float, show: Any) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} never happened: {show()}"
        time.sleep(1)


def _finish(kubectl: Kubectl, ns: str, name: str) -> None:
    """Every worker of the job Succeeded, as its kubelet would say when training ends."""
    for pod in _pods(kubectl, ns, name):
        kubectl.run(
            "patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": {"phase": "Succeeded"}}),
        )  # fmt: skip


def test_a_16_gpu_queue_runs_one_2x8_job_and_the_second_once_the_first_finished(
    kueue_manager: KueueManager, kubectl: Kubectl, namespace: str, test_id: str, pool: FakeCluster
) -> None:
    queue = _queues(kubectl, namespace, test_id, gpus=16)
    _submit(kubectl, namespace, pool, "first", queue)
    kubectl.wait_job(namespace, "first", "{.status.phase}", "Running", timeout=START_S)
    obj1, wl1 = _workload(kubectl, namespace, "first")
    assert wl1.may_run and wl1.admitted_count == 2
    assert obj1["metadata"]["ownerReferences"][0]["name"] == "first"
    _wait(kubectl, "workload", obj1["metadata"]["name"], "condition=PodsReady", namespace)
    # The workers stay inside the admitted flavor: its node label and toleration.
    pods = _pods(kubectl, namespace, "first")
    assert len(pods) == 2
    for pod in pods:
        assert pod["spec"]["nodeSelector"]["ddl-test/pool"] == test_id
        assert {"key": c.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in pod["spec"][
            "tolerations"
        ]
    assert _condition(_job(kubectl, namespace, "first"), k.JOB_CONDITION)["reason"] == "Admitted"

    # The second does not fit the quota: it holds nothing and says what it waits for.
    _submit(kubectl, namespace, pool, "second", queue)
    _until(
        "second says it waits for quota",
        lambda: (
            "insufficient"
            in _condition(_job(kubectl, namespace, "second"), k.JOB_CONDITION).get("message", "")
        ),
        60,
        lambda: _job(kubectl, namespace, "second").get("status"),
    )
    second = _job(kubectl, namespace, "second")
    assert second["status"]["phase"] == "Suspended" and second["spec"]["suspend"] is True
    assert _condition(second, k.JOB_CONDITION)["status"] == "False"
    assert "Kueue" in second["status"]["message"]
    assert not _pods(kubectl, namespace, "second")
    assert not _workload(kubectl, namespace, "second")[1].quota_reserved

    # The first ends: its Workload is Finished, its quota goes to the second.
    _finish(kubectl, namespace, "first")
    kubectl.wait_job(namespace, "first", "{.status.phase}", "Succeeded")
    _wait(kubectl, "workload", obj1["metadata"]["name"], "condition=Finished", namespace)
    kubectl.wait_job(namespace, "second", "{.status.phase}", "Running", timeout=90)
    assert _workload(kubectl, namespace, "second")[1].admitted_count == 2
    assert len(_pods(kubectl, namespace, "second")) == 2


def test_kueue_preempting_a_lower_priority_workload_suspends_its_job_cleanly(
    kueue_manager: KueueManager, kubectl: Kubectl, namespace: str, test_id: str, pool: FakeCluster
) -> None:
    _priority_classes(kubectl, test_id, low=100, high=1000)
    queue = _queues(kubectl, namespace, test_id, gpus=16, withinClusterQueue="LowerPriority")
    _submit(kubectl, namespace, pool, "low", queue, priorityClassName=f"ddl-low-{test_id}")
    kubectl.wait_job(namespace, "low", "{.status.phase}", "Running", timeout=START_S)
    assert _workload(kubectl, namespace, "low")[0]["spec"]["priority"] == 100
    running = _job(kubectl, namespace, "low")
    epoch = running["status"]["epoch"]

    _submit(kubectl, namespace, pool, "high", queue, priorityClassName=f"ddl-high-{test_id}")
    # The victim stops at a step boundary (a new epoch without members), then its pods go.
    kubectl.wait_job(namespace, "low", "{.status.phase}", "Suspended", timeout=60)
    _until(
        "the victim's pods are gone",
        lambda: not _pods(kubectl, namespace, "low"),
        SUSPEND_GRACE_SECONDS + 60,
        lambda: _job(kubectl, namespace, "low").get("status"),
    )
    kubectl.wait_job(namespace, "high", "{.status.phase}", "Running", timeout=90)
    low = _job(kubectl, namespace, "low")
    assert low["spec"]["suspend"] is True
    assert low["status"]["epoch"] == epoch + 1
    assert _condition(low, k.JOB_CONDITION)["status"] == "False"
    # What admission injected is undone, and the admission cleared as Kueue's integrations do.
    assert k.ANNOTATION_ADMISSION not in (low["metadata"].get("annotations") or {})
    assert "ddl-test/pool" not in low["spec"]["template"]["spec"]["nodeSelector"]
    _, wl_low = _workload(kubectl, namespace, "low")
    assert wl_low.admission is None and not wl_low.quota_reserved
    assert wl_low.conditions[k.REQUEUED].true
    assert _workload(kubectl, namespace, "high")[1].may_run

    # The preemptor ends; the victim is admitted again and resumes from its checkpoint.
    _finish(kubectl, namespace, "high")
    kubectl.wait_job(namespace, "low", "{.status.phase}", "Running", timeout=90)
    resumed = _job(kubectl, namespace, "low")
    assert resumed["status"]["restarts"] == 0, "an eviction is no failure"
    assert resumed["status"]["epoch"] > epoch + 1
    assert kubectl.run(
        "get", "ddlj", "low", "-n", namespace, "-o", f"jsonpath={ADMITTED}"
    ).stdout == ("True")
