"""The generated CRD against the real API server: schema, CEL rules, columns, scale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from builders import DELETE, make_ddljob, set_path
from kubetools import Kubectl

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("crd_installed")


def test_crd_is_established(kubectl: Kubectl) -> None:
    crd = kubectl.get_json("crd", "ddljobs.ddl-operator.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True"
    assert conditions.get("NamesAccepted") == "True"


def test_examples_are_accepted_by_server_side_apply(kubectl: Kubectl, namespace: str) -> None:
    # examples/ also holds the local cluster's description, which is not a Kubernetes object.
    manifests = [
        path
        for path in sorted((REPO / "examples").glob("*.yaml"))
        if any(doc and doc.get("kind") for doc in yaml.safe_load_all(path.read_text()))
    ]
    assert len(manifests) >= 3
    for path in manifests:
        proc = kubectl.run("apply", "--server-side", "-n", namespace, "-f", str(path), check=False)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


# (case id, path to change, new value, text the API server's refusal must contain)
INVALID: list[tuple[str, str, Any, str]] = [
    ("replicas-string", "spec.replicas", "four", "spec.replicas"),
    ("replicas-zero", "spec.replicas", 0, "spec.replicas"),
    ("negative-gpus", "spec.gpusPerWorker", -1, "spec.gpusPerWorker"),
    ("missing-template", "spec.template", DELETE, "spec.template"),
    ("no-containers", "spec.template.spec.containers", [], "spec.template.spec.containers"),
    ("unknown-algorithm", "spec.allreduce.algorithm", "Butterfly", "spec.allreduce.algorithm"),
    ("unknown-compression", "spec.allreduce.compression", "INT4", "spec.allreduce.compression"),
    ("bucket-too-large", "spec.allreduce.bucketMB", 4096, "spec.allreduce.bucketMB"),
    (
        "bad-level-label",
        "spec.topology.levels",
        ["kubernetes.io/hostname", "Not A Label!"],
        "spec.topology.levels",
    ),
    (
        "levels-not-from-node",
        "spec.topology.levels",
        ["topology.kubernetes.io/rack"],
        "spec.topology.levels",
    ),
    ("required-not-a-level", "spec.topology.required", "example.com/pod", "spec.topology.required"),
    (
        "duplicate-levels",
        "spec.topology.levels",
        ["kubernetes.io/hostname", "kubernetes.io/hostname"],
        "spec.topology.levels",
    ),
    ("every-steps-zero", "spec.checkpoint.everySteps", 0, "spec.checkpoint.everySteps"),
    ("negative-restarts", "spec.failurePolicy.maxRestarts", -1, "spec.failurePolicy.maxRestarts"),
    ("unknown-field", "spec.replcias", 3, "replcias"),
    ("procs-differ-from-gpus", "spec.processesPerWorker", 3, "spec.processesPerWorker"),
]


@pytest.mark.parametrize(
    ("path", "value", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_ddljob_is_refused_naming_the_field(
    kubectl: Kubectl, namespace: str, path: str, value: Any, expected: str
) -> None:
    job = set_path(make_ddljob(name="bad", gpus=2, namespace=namespace), path, value)
    proc = kubectl.apply(job)
    assert proc.returncode != 0, f"accepted an invalid DDLJob ({path}={value!r})"
    assert expected in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("replicas", "low", "high", "expected"),
    [(5, 1, 4, "spec.replicas"), (2, 3, 4, "spec.replicas"), (3, 4, 2, "spec.elastic.minReplicas")],
)
def test_elastic_range_is_enforced(
    kubectl: Kubectl, namespace: str, replicas: int, low: int, high: int, expected: str
) -> None:
    job = make_ddljob(
        name="bad", replicas=replicas, min_replicas=low, max_replicas=high, namespace=namespace
    )
    proc = kubectl.apply(job)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr


def test_defaults_are_applied_by_the_server(kubectl: Kubectl, namespace: str) -> None:
    proc = kubectl.apply(make_ddljob(name="defaults", namespace=namespace))
    assert proc.returncode == 0, proc.stderr
    spec = kubectl.get_json("ddlj", "defaults", "-n", namespace)["spec"]
    assert spec["allreduce"] == {"algorithm": "Auto", "compression": "None", "bucketMB": 25}
    assert spec["topology"]["levels"][0] == "kubernetes.io/hostname"
    assert spec["failurePolicy"]["nonRetryableExitCodes"] == [42]


def test_get_prints_the_printer_columns(kubectl: Kubectl, namespace: str) -> None:
    assert kubectl.apply(make_ddljob(name="cols", namespace=namespace)).returncode == 0
    header = kubectl.run("get", "ddlj", "-n", namespace).stdout.splitlines()[0].split()
    assert header == [
        "NAME",
        "PHASE",
        "READY",
        "REPLICAS",
        "EPOCH",
        "THROUGHPUT",
        "SYNC-WAIT",
        "AGE",
    ]
    # The category lists DDLJobs too.
    assert "cols" in kubectl.run("get", "ddl", "-n", namespace).stdout


def test_scale_changes_spec_replicas(kubectl: Kubectl, namespace: str) -> None:
    job = make_ddljob(
        name="elastic", replicas=2, min_replicas=1, max_replicas=8, namespace=namespace
    )
    assert kubectl.apply(job).returncode == 0
    kubectl.run("scale", "ddlj/elastic", "-n", namespace, "--replicas=6")
    assert kubectl.get_json("ddlj", "elastic", "-n", namespace)["spec"]["replicas"] == 6
    # The scale subresource answers what an HPA reads.
    raw = kubectl.run(
        "get",
        "--raw",
        f"/apis/ddl-operator.dev/v1alpha1/namespaces/{namespace}/ddljobs/elastic/scale",
    ).stdout
    scale = json.loads(raw)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 6
    refused = kubectl.run("scale", "ddlj/elastic", "-n", namespace, "--replicas=9", check=False)
    assert refused.returncode != 0 and "spec.replicas" in refused.stderr
