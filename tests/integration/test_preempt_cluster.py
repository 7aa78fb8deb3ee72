"""Preemption on the real control plane: a high-priority job shrinks elastic jobs before it
suspends any, lands inside one rack, and its victims come back once it is gone."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import wait_for, worker_pods

from builders import make_ddljob
from kubetools import FakeCluster, Kubectl, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")


@pytest.fixture
def high_class(kubectl: Kubectl) -> Iterator[str]:
    name = f"ddl-high-{uuid.uuid4().hex[:5]}"
    kubectl.run("create", "priorityclass", name, "--value=1000")
    yield name
    kubectl.run("delete", "priorityclass", name, check=False)


@pytest.fixture
def two_racks(kubectl: Kubectl, namespace: str) -> Iterator[FakeCluster]:
    """rack-0: 4 free nodes; rack-1: 4 nodes whose GPUs another tenant's pods hold."""
    fake = make_fake_cluster(kubectl, zones=1, racks=2, nodes=4)
    for node in fake.nodes:
        if "-r1-" in node:
            kubectl.run("create", "-f", "-", input=json.dumps(tenant_pod(node, namespace)))
    yield fake
    fake.delete()


def tenant_pod(node: str, namespace: str) -> dict[str, Any]:
    gpu = {"requests": {"nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"tenant-{node}", "namespace": namespace},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "other:latest", "resources": gpu}],
        },
    }


def status(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.get_json("ddlj", name, "-n", ns).get("status") or {}
    return found


def condition(kubectl: Kubectl, ns: str, name: str, kind: str) -> dict[str, Any]:
    conditions = status(kubectl, ns, name).get("conditions", [])
    found: dict[str, Any] = next((x for x in conditions if x["type"] == kind), {})
    return found


def members(kubectl: Kubectl, ns: str, name: str) -> list[dict[str, Any]]:
    rendezvous = status(kubectl, ns, name).get("rendezvous") or {}
    found: list[dict[str, Any]] = rendezvous.get("members") or []
    return found


def until(what: str, check: Any, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def submit(
    kubectl: Kubectl, ns: str, fake: FakeCluster, name: str, klass: str = "", **kw: Any
) -> None:
    job = make_ddljob(name=name, namespace=ns, **kw)
    spec = job["spec"]["template"]["spec"]
    spec["nodeSelector"] = fake.selector
    if klass:
        spec["priorityClassName"] = klass
    proc = kubectl.apply(job)
    assert proc.returncode == 0, proc.stderr


def high_job(kubectl: Kubectl, ns: str, fake: FakeCluster, name: str, klass: str) -> None:
    """2 x 8 GPUs inside one rack, at high priority."""
    rack = {"required": "topology.kubernetes.io/rack"}
    submit(kubectl, ns, fake, name, klass, replicas=2, gpus=8, topology=rack)


def end(kubectl: Kubectl, ns: str, name: str) -> None:
    kubectl.run("delete", "ddlj", name, "-n", ns, "--wait=false")
    kubectl.run("delete", "pods", "-n", ns, "-l", f"ddl-operator.dev/job={name}", "--wait=true")


def test_shrinks_two_elastic_jobs_to_their_minimum_and_they_grow_back(
    kubectl: Kubectl, namespace: str, two_racks: FakeCluster, high_class: str
) -> None:
    for name in ("low-a", "low-b"):
        submit(kubectl, namespace, two_racks, name, replicas=2, min_replicas=1, gpus=8)
        wait_for(kubectl, namespace, name, "{.status.phase}", "Running")
    # rack-0's 4 nodes hold 2 x 2 workers of low jobs; rack-1 belongs to another tenant. One
    # victim alone frees one node: both must shrink for 2 free nodes in one rack.
    high_job(kubectl, namespace, two_racks, "high", high_class)
    wait_for(kubectl, namespace, "high", "{.status.phase}", "Running", timeout=120)
    placed = {m["node"] for m in members(kubectl, namespace, "high")}
    assert all("-r0-" in n for n in placed), f"not inside rack-0: {placed}"
    for name in ("low-a", "low-b"):
        preempted = condition(kubectl, namespace, name, "Preempted")
        assert preempted.get("status") == "True", (name, preempted)
        assert preempted["reason"] == "Shrunk" and "high" in preempted["message"], preempted
        assert len(members(kubectl, namespace, name)) == 1  # its minimum, never below
        assert status(kubectl, namespace, name)["phase"] in ("Running", "Rescaling")
    # The high-priority job ends: the victims grow back to their replicas by themselves.
    end(kubectl, namespace, "high")
    for name in ("low-a", "low-b"):
        until(f"{name} back at 2 workers", lambda n=name: len(members(kubectl, namespace, n)) == 2)
        wait_for(kubectl, namespace, name, "{.status.phase}", "Running")
        restored = condition(kubectl, namespace, name, "Preempted")
        assert restored.get("status") == "False" and restored["reason"] == "Restored"


def test_suspends_a_fixed_size_job_when_shrinking_cannot_help_and_it_resumes(
    kubectl: Kubectl, namespace: str, two_racks: FakeCluster, high_class: str
) -> None:
    for name in ("fixed-old", "fixed-young"):
        submit(kubectl, namespace, two_racks, name, replicas=2, gpus=8)
        wait_for(kubectl, namespace, name, "{.status.phase}", "Running")
        time.sleep(1.1)  # creation timestamps have whole seconds
    high_job(kubectl, namespace, two_racks, "urgent", high_class)
    # Nothing elastic: the youngest of the lowest priority is suspended, the other untouched.
    wait_for(kubectl, namespace, "fixed-young", "{.status.phase}", "Suspended", timeout=120)
    preempted = condition(kubectl, namespace, "fixed-young", "Preempted")
    assert preempted.get("status") == "True" and preempted["reason"] == "Suspended", preempted
    assert "urgent" in preempted["message"]
    wait_for(kubectl, namespace, "urgent", "{.status.phase}", "Running", timeout=120)
    assert not worker_pods(kubectl, namespace, "fixed-young")  # it holds nothing meanwhile
    assert len(members(kubectl, namespace, "fixed-old")) == 2
    assert condition(kubectl, namespace, "fixed-old", "Preempted") == {}
    end(kubectl, namespace, "urgent")
    wait_for(kubectl, namespace, "fixed-young", "{.status.phase}", "Running", timeout=120)
    assert len(members(kubectl, namespace, "fixed-young")) == 2


def test_never_preempts_a_job_that_is_not_preemptible(
    kubectl: Kubectl, namespace: str, two_racks: FakeCluster, high_class: str
) -> None:
    for name in ("keep-a", "keep-b"):
        submit(kubectl, namespace, two_racks, name, replicas=2, min_replicas=1, gpus=8,
               preemptible=False)  # fmt: skip
        wait_for(kubectl, namespace, name, "{.status.phase}", "Running")
    high_job(kubectl, namespace, two_racks, "eager", high_class)
    wait_for(kubectl, namespace, "eager", "{.status.conditions[?(@.type=='Unschedulable')].status}",
             "True")  # fmt: skip
    time.sleep(5)
    for name in ("keep-a", "keep-b"):
        assert len(members(kubectl, namespace, name)) == 2
        assert condition(kubectl, namespace, name, "Preempted") == {}
    assert status(kubectl, namespace, "eager").get("phase") != "Running"
