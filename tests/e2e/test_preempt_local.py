"""Preemption with real training: a high-priority job on a full rack shrinks an elastic
low-priority job to its minimum (a re-form that checkpoints first), the victim keeps training,
loses at most one checkpoint interval, grows back once the preemptor is done, and finishes
with a checkpoint that loads."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ddl_localcluster import demo
from ddl_localcluster.controlplane import ControlPlane
from ddl_worker.checkpoint import Checkpointer
from ddl_worker.env import JobIdentity

from kubetools import Kubectl

EVERY = 25  # checkpoint interval of the victim, in steps
STEPS = 1000  # enough that the victim is still training when the preemptor is done


@pytest.fixture
def one_rack(kubectl: Kubectl) -> Iterator[None]:
    """rack-1 cordoned: rack-0's 4 nodes x 2 GPUs are the whole cluster."""
    nodes = [n["metadata"]["name"] for n in kubectl.get_json("nodes")["items"]]
    spare = [n for n in nodes if "-r1-" in n]
    for node in spare:
        kubectl.run("cordon", node)
    yield
    for node in spare:
        kubectl.run("uncordon", node, check=False)


@pytest.fixture
def priority_classes(kubectl: Kubectl) -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:5]
    classes = {"low": f"e2e-low-{tag}", "high": f"e2e-high-{tag}"}
    for which, value in (("low", 100), ("high", 1000)):
        kubectl.run("create", "priorityclass", classes[which], f"--value={value}")
    yield classes
    for name in classes.values():
        kubectl.run("delete", "priorityclass", name, check=False)


def job(
    name: str, namespace: str, tmp: Path, klass: str, replicas: int, steps: int, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "ddl-operator.dev/v1alpha1",
        "kind": "DDLJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "gpusPerWorker": 2,
            "checkpoint": {"path": str(tmp / name), "everySteps": EVERY, "keep": 2},
            "failurePolicy": {"maxRestarts": 5, "backoffSeconds": 2},
            "template": {
                "spec": {
                    "priorityClassName": klass,
                    "containers": [
                        {
                            "name": "worker",
                            "image": "ddl-operator/worker:0.1.0",
                            "command": ["python", "-m", "ddl_worker", "agent", "--"],
                            "args": [
                                "python",
                                "examples/train_resnet.py",
                                "--steps",
                                str(steps),
                                "--max-steps-per-second",
                                "10",
                            ],
                        }
                    ],
                }
            },
            **spec,
        },
    }


def preempted(status: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = next(
        (x for x in status.get("conditions", []) if x["type"] == "Preempted"), {}
    )
    return found


@pytest.mark.usefixtures("one_rack")
def test_preempted_elastic_job_shrinks_keeps_training_and_regrows(
    local_cluster: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    tmp_path: Path,
    priority_classes: dict[str, str],
) -> None:
    low = job(
        "low",
        namespace,
        tmp_path,
        priority_classes["low"],
        replicas=4,
        steps=STEPS,
        elastic={"minReplicas": 2, "maxReplicas": 4, "rendezvousTimeoutSeconds": 120},
    )
    assert kubectl.apply(low).returncode == 0
    victim = demo.JobWatch(local_cluster, "low", namespace)
    start = demo.reformed(local_cluster, victim, 0)
    assert start.rendezvous["workers"] == 4, start.rendezvous
    victim.until("low trains past its first checkpoint", lambda s: s.get("step", 0) > EVERY, 120)

    high = job("high", namespace, tmp_path, priority_classes["high"], replicas=2, steps=80)
    assert kubectl.apply(high).returncode == 0
    shrunk = demo.reformed(local_cluster, victim, int(start.rendezvous["epoch"]))
    assert shrunk.rendezvous["workers"] == 2, shrunk.rendezvous  # its minimum, never below
    assert shrunk.redone <= EVERY, shrunk
    condition = preempted(victim.poll())
    assert condition.get("status") == "True" and condition["reason"] == "Shrunk", condition
    assert "high" in condition["message"], condition

    preemptor = demo.JobWatch(local_cluster, "high", namespace)
    preemptor.until("high runs", lambda s: s.get("phase") == "Running", 180)
    # The victim trains on while the preemptor runs: its step moves at epoch `shrunk`.
    at = int(victim.poll().get("step", 0))
    victim.until(
        "low trains while shrunk",
        lambda s: s.get("step", 0) > at + 10 or (s.get("rendezvous") or {}).get("workers") != 2,
        120,
    )
    assert victim.status["rendezvous"]["epoch"] == shrunk.rendezvous["epoch"], victim.status
    preemptor.until("high succeeds", lambda s: s.get("phase") == "Succeeded", 300, finished_ok=True)

    regrown = demo.reformed(local_cluster, victim, int(shrunk.rendezvous["epoch"]))
    assert regrown.rendezvous["workers"] == 4, regrown.rendezvous
    assert regrown.redone <= EVERY, regrown
    victim.until("low succeeds", lambda s: s.get("phase") == "Succeeded", 400, finished_ok=True)
    final = victim.status
    assert final["step"] == STEPS, final
    assert preempted(final).get("status") != "True", final

    loaded = Checkpointer(
        tmp_path / "low", job=JobIdentity(namespace, "low"), every=EVERY
    ).load_latest()
    assert loaded is not None and loaded.step == STEPS, loaded
    assert {"model", "optimizer", "sampler"} <= set(loaded.state), sorted(loaded.state)
    events = kubectl.get_json(
        "events", "-n", namespace, "--field-selector", "involvedObject.name=low"
    )["items"]
    print(json.dumps([e["message"] for e in events], indent=1))
