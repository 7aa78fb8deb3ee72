"""The operator against the real API server, kube-scheduler and kwok GPU nodes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from ddl_operator.api import constants as c

from builders import make_ddljob
from kubetools import FakeCluster, Kubectl, OperatorProcess, fake_node, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")


@pytest.fixture
def cluster(kubectl: Kubectl) -> Iterator[FakeCluster]:
    """2 zones x 2 racks x 4 nodes x 8 GPUs, private to the test."""
    fake = make_fake_cluster(kubectl)
    yield fake
    fake.delete()


def submit(
    kubectl: Kubectl,
    ns: str,
    fake: FakeCluster,
    name: str,
    affinity: dict[str, Any] | None = None,
    **kw: Any,
) -> None:
    job = make_ddljob(name=name, namespace=ns, **kw)
    job["spec"]["template"]["spec"]["nodeSelector"] = fake.selector
    if affinity is not None:
        job["spec"]["template"]["spec"]["affinity"] = affinity
    proc = kubectl.apply(job)
    assert proc.returncode == 0, proc.stderr


def wait_for(
    kubectl: Kubectl, ns: str, name: str, jsonpath: str, value: str, timeout: int = 60
) -> None:
    kubectl.wait_job(ns, name, jsonpath, value, timeout)


def worker_pods(kubectl: Kubectl, ns: str, name: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = kubectl.get_json("pods", "-n", ns, "-l", f"{c.LABEL_JOB}={name}")[
        "items"
    ]
    return pods


def nodes_of(pods: list[dict[str, Any]]) -> set[str]:
    return {p["spec"].get("nodeName", "") for p in pods}


def test_16_gpu_job_lands_on_two_nodes_of_one_rack(
    kubectl: Kubectl, namespace: str, cluster: FakeCluster
) -> None:
    submit(kubectl, namespace, cluster, "pack", replicas=2, gpus=8)
    wait_for(kubectl, namespace, "pack", "{.status.phase}", "Running")
    pods = worker_pods(kubectl, namespace, "pack")
    nodes = nodes_of(pods)
    assert len(nodes) == 2 and "" not in nodes
    assert len({n.rsplit("-", 1)[0] for n in nodes}) == 1, f"not one rack: {nodes}"
    status = kubectl.get_json("ddlj", "pack", "-n", namespace)["status"]
    assert status["epoch"] == 1 and status["rendezvous"]["grid"] == [8, 2]
    assert [m["rank"] for m in status["rendezvous"]["members"]] == [0, 1]
    assert all(not p["spec"].get("schedulingGates") for p in pods)


def test_a_job_managed_by_another_controller_is_left_alone(
    kubectl: Kubectl, namespace: str, cluster: FakeCluster
) -> None:
    submit(kubectl, namespace, cluster, "theirs", managedBy="kueue.x-k8s.io/multikueue")
    submit(kubectl, namespace, cluster, "ours", managedBy=c.CONTROLLER_NAME)
    wait_for(kubectl, namespace, "ours", "{.status.phase}", "Running")
    # By the time a job submitted after it runs, a pass for "theirs" would have made pods.
    assert worker_pods(kubectl, namespace, "theirs") == []
    assert "status" not in kubectl.get_json("ddlj", "theirs", "-n", namespace)


def test_job_larger_than_any_rack_stays_gated_and_says_why(
    kubectl: Kubectl, namespace: str, cluster: FakeCluster
) -> None:
    submit(
        kubectl,
        namespace,
        cluster,
        "huge",
        replicas=5,
        gpus=8,
        topology={"required": "topology.kubernetes.io/rack"},
    )
    wait_for(
        kubectl,
        namespace,
        "huge",
        '{.status.conditions[?(@.type=="Unschedulable")].status}',
        "True",
    )
    job = kubectl.get_json("ddlj", "huge", "-n", namespace)
    cond = next(x for x in job["status"]["conditions"] if x["type"] == "Unschedulable")
    assert "rack" in cond["message"] and "40" in cond["message"], cond["message"]
    pods = worker_pods(kubectl, namespace, "huge")
    assert len(pods) == 5
    assert all(p["spec"].get("schedulingGates") and not p["spec"].get("nodeName") for p in pods)
    events = kubectl.run(
        "get", "events", "-n", namespace, "--field-selector=reason=Unschedulable"
    ).stdout
    assert "rack" in events


def test_competing_jobs_never_half_place(kubectl: Kubectl, namespace: str) -> None:
    """The loser waits gated and is placed later by a patch: the API server takes the node
    pin ANDed into each of the template's own required node-affinity terms (ORed)."""
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=4, gpus=8)
    test_label = {"key": "ddl-test", "operator": "In", "values": [fake.test_id]}
    absent = {"key": "example.com/no-such-label", "operator": "Exists"}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [absent]},
                    {"matchExpressions": [test_label]},
                ]
            }
        }
    }
    try:
        rack = {"required": "topology.kubernetes.io/rack"}
        for name in ("left", "right"):
            submit(kubectl, namespace, fake, name, affinity, replicas=3, gpus=8, topology=rack)
        deadline = time.monotonic() + 40
        running: list[str] = []
        while time.monotonic() < deadline and not running:
            for name in ("left", "right"):
                if (
                    kubectl.get_json("ddlj", name, "-n", namespace).get("status", {}).get("phase")
                    == "Running"
                ):
                    running.append(name)
            time.sleep(0.5)
        assert len(running) == 1, "exactly one of two 24-GPU gangs fits a 32-GPU rack"
        loser = "right" if running == ["left"] else "left"
        pods = worker_pods(kubectl, namespace, loser)
        assert all(p["spec"].get("schedulingGates") for p in pods), "loser holds no GPUs"
        kubectl.run("delete", "ddlj", running[0], "-n", namespace)
        wait_for(kubectl, namespace, loser, "{.status.phase}", "Running")
        for pod in worker_pods(kubectl, namespace, loser):
            terms = pod["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"]
            pin = {"key": "metadata.name", "operator": "In", "values": [pod["spec"]["nodeName"]]}
            assert [t.get("matchFields") for t in terms] == [[pin], [pin]], terms
            assert [t["matchExpressions"] for t in terms] == [[absent], [test_label]], terms
    finally:
        fake.delete()


def test_node_loss_shrinks_and_capacity_grows_back(kubectl: Kubectl, namespace: str) -> None:
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=3, gpus=8)
    try:
        submit(
            kubectl,
            namespace,
            fake,
            "elastic",
            replicas=3,
            min_replicas=2,
            max_replicas=3,
            gpus=8,
            failurePolicy={"backoffSeconds": 0},
        )
        wait_for(kubectl, namespace, "elastic", "{.status.epoch}", "1")
        status = kubectl.get_json("ddlj", "elastic", "-n", namespace)["status"]
        victim = status["rendezvous"]["members"][2]["node"]
        labels = kubectl.get_json("node", victim)["metadata"]["labels"]
        kubectl.run("delete", "node", victim)
        wait_for(kubectl, namespace, "elastic", "{.status.epoch}", "2")
        status = kubectl.get_json("ddlj", "elastic", "-n", namespace)["status"]
        assert status["rendezvous"]["workers"] == 2
        assert victim not in {m["node"] for m in status["rendezvous"]["members"]}
        # The node comes back: the job grows to 3 at the next epoch.
        kubectl.run("apply", "-f", "-", input=yaml.safe_dump(fake_node(victim, labels, gpus=8)))
        wait_for(kubectl, namespace, "elastic", "{.status.rendezvous.workers}", "3", timeout=60)
        assert kubectl.get_json("ddlj", "elastic", "-n", namespace)["status"]["epoch"] == 3
    finally:
        fake.delete()


def test_kubectl_scale_grows_and_shrinks(
    kubectl: Kubectl, namespace: str, cluster: FakeCluster
) -> None:
    submit(
        kubectl, namespace, cluster, "scaled", replicas=2, min_replicas=1, max_replicas=6, gpus=8
    )
    wait_for(kubectl, namespace, "scaled", "{.status.epoch}", "1")
    kubectl.run("scale", "ddlj/scaled", "-n", namespace, "--replicas=4")
    wait_for(kubectl, namespace, "scaled", "{.status.rendezvous.workers}", "4")
    kubectl.run("scale", "ddlj/scaled", "-n", namespace, "--replicas=1")
    wait_for(kubectl, namespace, "scaled", "{.status.rendezvous.workers}", "1")
    status = kubectl.get_json("ddlj", "scaled", "-n", namespace)["status"]
    assert status["restarts"] == 0 and status["epoch"] == 3


def test_operator_killed_mid_reconcile_makes_no_duplicates(
    kubectl: Kubectl, namespace: str, cluster: FakeCluster, operator: OperatorProcess
) -> None:
    for round_ in range(3):
        name = f"restart-{round_}"
        submit(kubectl, namespace, cluster, name, replicas=4, gpus=2)
        time.sleep(0.3 * round_)  # kill at different points of the first passes
        operator.kill()
        operator.start()
        wait_for(kubectl, namespace, name, "{.status.phase}", "Running")
        pods = worker_pods(kubectl, namespace, name)
        assert len(pods) == 4, [p["metadata"]["name"] for p in pods]
        kubectl.run("delete", "ddlj", name, "-n", namespace)


def test_deleting_the_job_removes_its_pods(
    kubectl: Kubectl, namespace: str, cluster: FakeCluster
) -> None:
    submit(kubectl, namespace, cluster, "gone", replicas=2, gpus=8)
    wait_for(kubectl, namespace, "gone", "{.status.phase}", "Running")
    kubectl.run("delete", "ddlj", "gone", "-n", namespace)
    kubectl.run(
        "wait",
        "--for=delete",
        "pods",
        "-n",
        namespace,
        "-l",
        f"{c.LABEL_JOB}=gone",
        "--timeout=60s",
    )
    assert worker_pods(kubectl, namespace, "gone") == []


def test_64_worker_job_binds_quickly(kubectl: Kubectl, namespace: str) -> None:
    fake = make_fake_cluster(kubectl, zones=1, racks=4, nodes=16, gpus=8)
    try:
        started = time.monotonic()
        submit(kubectl, namespace, fake, "big", replicas=64, gpus=8)
        wait_for(kubectl, namespace, "big", "{.status.phase}", "Running", timeout=120)
        elapsed = time.monotonic() - started
        print(f"\n64-worker job: apply -> all bound and running in {elapsed:.1f}s")
        pods = worker_pods(kubectl, namespace, "big")
        assert len(pods) == 64 and len(nodes_of(pods)) == 64
    finally:
        fake.delete()
