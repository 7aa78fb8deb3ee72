"""The GPU queue on the real control plane: a large gang is not starved by later small jobs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import submit, wait_for, worker_pods

from kubetools import FakeCluster, Kubectl, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")


@pytest.fixture
def rack(kubectl: Kubectl) -> Iterator[FakeCluster]:
    """One rack of 4 nodes x 8 GPUs, private to the test."""
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=4)
    yield fake
    fake.delete()


def condition(kubectl: Kubectl, ns: str, name: str, kind: str) -> dict[str, Any]:
    status = kubectl.get_json("ddlj", name, "-n", ns).get("status") or {}
    found: dict[str, Any] = next((x for x in status.get("conditions", []) if x["type"] == kind), {})
    return found


def placed(kubectl: Kubectl, ns: str, name: str) -> int:
    return sum(1 for p in worker_pods(kubectl, ns, name) if not p["spec"].get("schedulingGates"))


def end(kubectl: Kubectl, ns: str, name: str) -> None:
    """The job and its workers go, as a finished job's GPUs free up."""
    kubectl.run("delete", "ddlj", name, "-n", ns, "--wait=false")
    kubectl.run("delete", "pods", "-n", ns, "-l", f"ddl-operator.dev/job={name}", "--wait=true")


def test_a_large_gang_gets_freed_gpus_before_later_small_jobs(
    kubectl: Kubectl, namespace: str, rack: FakeCluster
) -> None:
    for i in range(3):
        submit(kubectl, namespace, rack, f"small-{i}", replicas=1, gpus=8)
    for i in range(3):
        wait_for(kubectl, namespace, f"small-{i}", "{.status.phase}", "Running")
    # 8 GPUs free; the 4 x 8 gang waits for the rack to empty.
    submit(kubectl, namespace, rack, "big", replicas=4, gpus=8)
    deadline = time.monotonic() + 60
    while condition(kubectl, namespace, "big", "Unschedulable").get("status") != "True":
        assert time.monotonic() < deadline, kubectl.get_json("ddlj", "big", "-n", namespace)
        time.sleep(0.5)
    time.sleep(1.5)  # creation timestamps have whole seconds: the later jobs are younger
    for i in range(3, 5):
        submit(kubectl, namespace, rack, f"small-{i}", replicas=1, gpus=8)
    # The free node is held for the gang: the later small jobs wait and say where they stand.
    deadline = time.monotonic() + 60
    while condition(kubectl, namespace, "small-3", "Queued").get("status") != "True":
        assert time.monotonic() < deadline, kubectl.get_json("ddlj", "small-3", "-n", namespace)
        time.sleep(0.5)
    queued = condition(kubectl, namespace, "small-3", "Queued")
    # Jobs of other tests may wait too (the operator is shared); the gang is ahead of it.
    assert f"held for {namespace}/big" in queued["message"], queued
    assert placed(kubectl, namespace, "small-3") == 0
    assert placed(kubectl, namespace, "small-4") == 0
    # As the small jobs ahead end, their GPUs go to the gang, not to the jobs behind it.
    for i in range(3):
        end(kubectl, namespace, f"small-{i}")
        time.sleep(1.0)
        assert placed(kubectl, namespace, "small-3") == 0
        assert placed(kubectl, namespace, "small-4") == 0
    wait_for(kubectl, namespace, "big", "{.status.phase}", "Running")
    assert placed(kubectl, namespace, "small-3") == 0
    assert placed(kubectl, namespace, "small-4") == 0
    # Once the gang ends, the jobs behind it run in turn.
    end(kubectl, namespace, "big")
    for i in range(3, 5):
        wait_for(kubectl, namespace, f"small-{i}", "{.status.phase}", "Running")
    assert condition(kubectl, namespace, "small-3", "Queued").get("status") == "False"
