"""spec.suspend on the real control plane: the pods go, the GPUs free, the job comes back.

kwok's pods "run" without an agent, so no worker ever reports that it stopped: the pods go
when the operator's grace (SUSPEND_GRACE_SECONDS) has passed, as they would for workers that
never confirm.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from ddl_operator.api import constants as c
from ddl_operator.core.reconcile import SUSPEND_GRACE_SECONDS

from builders import make_ddljob
from kubetools import FakeCluster, Kubectl, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")

SUSPENDED_REASON = '{.status.conditions[?(@.type=="Suspended")].reason}'


def _submit(kubectl: Kubectl, ns: str, fake: FakeCluster, name: str, **spec: Any) -> None:
    job = make_ddljob(name=name, namespace=ns, **spec)
    job["spec"]["template"]["spec"]["nodeSelector"] = fake.selector
    proc = kubectl.apply(job)
    assert proc.returncode == 0, proc.stderr


def _suspend(kubectl: Kubectl, ns: str, name: str, value: bool) -> None:
    patch = json.dumps({"spec": {"suspend": value}})
    kubectl.run("patch", "ddlj", name, "-n", ns, "--type=merge", "-p", patch)


def _status(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = kubectl.get_json("ddlj", name, "-n", ns).get("status", {})
    return status


def _pods(kubectl: Kubectl, ns: str, name: str) -> dict[str, str]:
    """Worker pod name -> uid."""
    items = kubectl.get_json("pods", "-n", ns, "-l", f"{c.LABEL_JOB}={name}")["items"]
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in items}


def _events(kubectl: Kubectl, ns: str, reason: str) -> str:
    return kubectl.run("get", "events", "-n", ns, f"--field-selector=reason={reason}").stdout


def _until_no_pods(kubectl: Kubectl, ns: str, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _pods(kubectl, ns, name):
        assert time.monotonic() < deadline, f"{name} still has pods: {_status(kubectl, ns, name)}"
        time.sleep(1)


def test_suspend_frees_the_gpus_and_resume_reforms_at_a_new_epoch(
    kubectl: Kubectl, namespace: str
) -> None:
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    try:
        _submit(kubectl, namespace, fake, "sus", replicas=2, gpus=8)
        kubectl.wait_job(namespace, "sus", "{.status.phase}", "Running")
        assert _status(kubectl, namespace, "sus")["epoch"] == 1

        _suspend(kubectl, namespace, "sus", True)
        kubectl.wait_job(namespace, "sus", "{.status.phase}", "Suspended", timeout=30)
        stopping = _status(kubectl, namespace, "sus")
        assert stopping["epoch"] == 2 and stopping["rendezvous"]["workers"] == 0
        kubectl.wait_job(
            namespace, "sus", SUSPENDED_REASON, "Suspended", timeout=SUSPEND_GRACE_SECONDS + 30
        )
        _until_no_pods(kubectl, namespace, "sus", timeout=60)
        assert "Suspending" in _events(kubectl, namespace, "Suspending")

        # Nothing held: another job gets the same 16 GPUs while this one is suspended.
        _submit(kubectl, namespace, fake, "other", replicas=2, gpus=8)
        kubectl.wait_job(namespace, "other", "{.status.phase}", "Running")
        kubectl.run("delete", "ddlj", "other", "-n", namespace)
        _until_no_pods(kubectl, namespace, "other", timeout=60)

        _suspend(kubectl, namespace, "sus", False)
        kubectl.wait_job(namespace, "sus", "{.status.phase}", "Running", timeout=90)
        resumed = _status(kubectl, namespace, "sus")
        assert resumed["epoch"] == 3, "epochs go on counting"
        assert resumed["restarts"] == 0, "a suspension is no failure"
        assert len(resumed["rendezvous"]["members"]) == 2 and len(_pods(kubectl, namespace, "sus"))
        suspended = next(x for x in resumed["conditions"] if x["type"] == "Suspended")
        assert (suspended["status"], suspended["reason"]) == ("False", "Resumed")
        assert "Resumed" in _events(kubectl, namespace, "Resumed")
    finally:
        fake.delete()


def test_toggling_quickly_keeps_the_pods_and_counts_no_restart(
    kubectl: Kubectl, namespace: str
) -> None:
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    try:
        _submit(kubectl, namespace, fake, "flip", replicas=2, gpus=8)
        kubectl.wait_job(namespace, "flip", "{.status.phase}", "Running")
        pods = _pods(kubectl, namespace, "flip")
        for _ in range(3):
            _suspend(kubectl, namespace, "flip", True)
            _suspend(kubectl, namespace, "flip", False)
        _suspend(kubectl, namespace, "flip", True)
        kubectl.wait_job(namespace, "flip", "{.status.phase}", "Suspended", timeout=30)
        _suspend(kubectl, namespace, "flip", False)
        kubectl.wait_job(namespace, "flip", "{.status.phase}", "Running", timeout=30)
        status = _status(kubectl, namespace, "flip")
        assert status["restarts"] == 0 and status["epoch"] >= 3
        assert _pods(kubectl, namespace, "flip") == pods, "re-formed within the grace: same pods"
        assert sorted(m["pod"] for m in status["rendezvous"]["members"]) == sorted(pods)
    finally:
        fake.delete()
