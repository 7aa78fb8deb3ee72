"""End to end on the local cluster: real training in worker pods, the operator as a pod
from the Helm chart, and chaos (killed pods, a node gone NotReady, the operator killed)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ddl_localcluster.controlplane import ControlPlane
from ddl_operator.api import constants as c

from builders import make_ddljob
from e2e_helpers import node_agent
from holds import Hold
from kubetools import Kubectl


def training_job(
    namespace: str,
    tmp: Path,
    name: str = "train",
    steps: int = 60,
    hold: Hold | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """The example trainer for steps; with hold, it waits at hold.step until released."""
    job = make_ddljob(name=name, namespace=namespace, gpus=2, **spec)
    job["spec"].setdefault("checkpoint", {"path": str(tmp / name), "everySteps": 10})
    job["spec"]["template"]["spec"]["containers"][0].update(
        command=["python", "-m", "ddl_worker", "agent", "--"],
        args=[
            "python",
            "examples/train_resnet.py",
            "--steps",
            str(steps),
            *(hold.args() if hold else []),
        ],
    )
    return job


def status(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.get_json("ddlj", name, "-n", ns).get("status", {})
    return found


def wait_for(
    kubectl: Kubectl, ns: str, name: str, jsonpath: str, value: str, timeout: int = 180
) -> None:
    kubectl.wait_job(ns, name, jsonpath, value, timeout)


def wait_until(
    kubectl: Kubectl, ns: str, name: str, what: str, check: Any, timeout: float = 180
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = status(kubectl, ns, name)
        if check(st):
            return st
        time.sleep(1)
    raise AssertionError(f"{name}: {what} not reached in {timeout:.0f}s: {st}")


def worker_pods(kubectl: Kubectl, ns: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.get_json("pods", "-n", ns, "-l", f"{c.LABEL_JOB}={name}")[
        "items"
    ]
    return items


def operator_pods(kubectl: Kubectl) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.get_json(
        "pods", "-n", "ddl-system", "-l", "app.kubernetes.io/name=ddl-operator"
    )["items"]
    return items


def wait_for_replacement_operator(kubectl: Kubectl, killed_uid: str, timeout: float = 180) -> None:
    """Until an operator pod other than the killed one is Ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in operator_pods(kubectl):
            conditions = pod.get("status", {}).get("conditions", [])
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            if pod["metadata"]["uid"] != killed_uid and ready:
                return
        time.sleep(0.5)
    raise AssertionError(f"no replacement operator pod became Ready in {timeout:.0f}s")


def test_operator_runs_from_the_chart_under_its_rbac(kubectl: Kubectl) -> None:
    pods = operator_pods(kubectl)
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running"
    assert pods[0]["spec"]["serviceAccountName"] == "ddl-ddl-operator"


def test_job_trains_to_completion(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    assert kubectl.apply(training_job(namespace, tmp_path, steps=60)).returncode == 0
    wait_for(kubectl, namespace, "train", "{.status.phase}", "Succeeded", timeout=240)
    st = status(kubectl, namespace, "train")
    assert st["step"] == 60 and st["throughput"] > 0 and 0 <= st["syncWaitRatio"] <= 1
    assert st["rendezvous"]["grid"] == [2, 2], "2 workers x 2 processes on 2 nodes"
    assert st["restarts"] == 0


def test_killed_worker_pod_is_survived(kubectl: Kubectl, namespace: str, tmp_path: Path) -> None:
    hold = Hold.at(30, tmp_path / "hold")
    job = training_job(
        namespace,
        tmp_path,
        steps=200,
        hold=hold,
        # A member left waiting after rank 0 finished gives up (and ends) within a minute.
        elastic={"minReplicas": 1, "maxReplicas": 2, "rendezvousTimeoutSeconds": 60},
        failurePolicy={"backoffSeconds": 1, "maxRestarts": 5},
    )
    assert kubectl.apply(job).returncode == 0
    held = hold.wait_held()
    assert held["worldSize"] == 4, held  # 2 workers x 2 processes, waiting at step 30
    st = status(kubectl, namespace, "train")
    assert st["epoch"] == held["epoch"]
    victim = st["rendezvous"]["members"][1]["pod"]
    kubectl.run("delete", "pod", victim, "-n", namespace, "--wait=false")
    hold.release()  # 170 steps left: the deletion lands long before the end
    wait_for(kubectl, namespace, "train", "{.status.phase}", "Succeeded", timeout=300)
    final = status(kubectl, namespace, "train")
    assert final["step"] == 200
    assert final["epoch"] > held["epoch"], f"no re-form after the pod was deleted: {final}"
    assert final["restarts"] >= 1, final


def test_node_not_ready_shrinks_then_grows_back(
    kubectl: Kubectl, namespace: str, tmp_path: Path, local_cluster: ControlPlane
) -> None:
    nodes = sorted(n["metadata"]["name"] for n in kubectl.get_json("nodes")["items"])
    spare = nodes[2:]
    for node in spare:  # leave room for exactly two workers
        kubectl.run("cordon", node)
    # Held at step 20 until released: the gang waits there before the node goes, and the
    # shrunk gang (resumed from the checkpoint at 20) waits there again until the node is back.
    hold = Hold.at(20, tmp_path / "hold")
    try:
        job = training_job(
            namespace,
            tmp_path,
            steps=200,
            hold=hold,
            elastic={"minReplicas": 1, "maxReplicas": 2},
            failurePolicy={"backoffSeconds": 1, "maxRestarts": 5},
        )
        assert kubectl.apply(job).returncode == 0
        held = hold.wait_held()
        assert held["worldSize"] == 4, held
        st = status(kubectl, namespace, "train")
        # Not the operator's node: a dead node keeps its pods for 300 s before eviction, and
        # this test is about the job, not about the operator's own failover.
        (operator,) = operator_pods(kubectl)
        operator_node = operator["spec"].get("nodeName")
        lost = next(m["node"] for m in st["rendezvous"]["members"] if m["node"] != operator_node)
        node_agent(local_cluster, "node-down", lost, "--kill-pods")
        st = wait_until(
            kubectl,
            namespace,
            "train",
            "shrunk to 1 worker",
            lambda s: (s.get("rendezvous") or {}).get("workers") == 1,
            timeout=120,
        )
        shrunk_epoch = st["epoch"]
        # The shrunk gang trains: it resumed from step 20 and waits at the hold again.
        shrunk = hold.wait_held(120, when=lambda m: m["epoch"] >= shrunk_epoch)
        assert shrunk["worldSize"] == 2 and shrunk["step"] == 20, shrunk
        node_agent(local_cluster, "node-up", lost)
        st = wait_until(
            kubectl,
            namespace,
            "train",
            "grown back to 2 workers",
            lambda s: (s.get("rendezvous") or {}).get("workers") == 2 and s["epoch"] > shrunk_epoch,
            timeout=180,
        )
        hold.release()
        wait_for(kubectl, namespace, "train", "{.status.phase}", "Succeeded", timeout=400)
        assert status(kubectl, namespace, "train")["step"] == 200
    finally:
        hold.release()
        for node in spare:
            kubectl.run("uncordon", node, check=False)


def test_deleting_the_job_removes_every_pod(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    hold = Hold.at(5, tmp_path / "hold")  # never released: the job is mid-run when deleted
    assert kubectl.apply(training_job(namespace, tmp_path, steps=100, hold=hold)).returncode == 0
    hold.wait_held()
    kubectl.run("delete", "ddlj", "train", "-n", namespace)
    kubectl.run(
        "wait",
        "--for=delete",
        "pods",
        "-n",
        namespace,
        "-l",
        f"{c.LABEL_JOB}=train",
        "--timeout=120s",
    )
    assert worker_pods(kubectl, namespace, "train") == []


def test_operator_pod_killed_mid_run_makes_no_duplicates(
    kubectl: Kubectl, namespace: str, tmp_path: Path
) -> None:
    hold = Hold.at(10, tmp_path / "hold")
    assert kubectl.apply(training_job(namespace, tmp_path, steps=150, hold=hold)).returncode == 0
    most = [0]
    done = threading.Event()

    def watch_pod_count() -> None:
        while not done.is_set():
            live = [
                p
                for p in worker_pods(kubectl, namespace, "train")
                if not p["metadata"].get("deletionTimestamp")
            ]
            most[0] = max(most[0], len(live))
            time.sleep(0.3)

    counter = threading.Thread(target=watch_pod_count, daemon=True)
    counter.start()
    try:
        hold.wait_held()
        (killed,) = operator_pods(kubectl)
        kubectl.run(
            "delete",
            "pod",
            "-n",
            "ddl-system",
            killed["metadata"]["name"],
            "--grace-period=0",
            "--force",
        )
        # Release only once the replacement operator runs: it takes over a job mid-run.
        wait_for_replacement_operator(kubectl, killed["metadata"]["uid"])
        hold.release()
        wait_for(kubectl, namespace, "train", "{.status.phase}", "Succeeded", timeout=300)
    finally:
        hold.release()
        done.set()
        counter.join()
    assert most[0] == 2, f"saw {most[0]} worker pods at once"
    assert len(operator_pods(kubectl)) == 1, "the Deployment brought one operator back"
    names = sorted(p["metadata"]["name"] for p in worker_pods(kubectl, namespace, "train"))
    assert names == ["train-worker-0", "train-worker-1"], json.dumps(names)
