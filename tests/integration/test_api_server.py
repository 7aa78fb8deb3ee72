"""The generated CRD against the real API server: schema, CEL rules, columns, scale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_operator.api import constants as c
from ddl_operator.core.validate import max_job_name_length

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


TS = "spec.template.spec"
C0 = f"{TS}.containers.0"  # a path to set
F0 = f"{TS}.containers[0]"  # the same field as the API server names it
GPU = c.GPU_RESOURCE
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
    ("max-replicas-too-large", "spec.elastic", {"minReplicas": 1, "maxReplicas": 10001},
     "spec.elastic.maxReplicas"),
    # The job's name is its children's: job label value, Service name, hostname prefix.
    ("name-longer-than-a-label", "metadata.name", "a" * 70, "metadata.name"),
    ("name-with-a-dot", "metadata.name", "my.job", "metadata.name"),
    ("name-starting-with-a-digit", "metadata.name", "1job", "metadata.name"),
    ("name-too-long-for-hostnames", "metadata.name", "a" * 54, "metadata.name"),
    # The template: what the operator reads or extends has its type; containers have images.
    ("container-without-image", f"{C0}.image", DELETE, f"{F0}.image"),
    ("empty-image", f"{C0}.image", "", f"{F0}.image"),
    ("env-not-a-list", f"{C0}.env", "X", f"{F0}.env"),
    ("env-without-name", f"{C0}.env", [{"value": "1"}], f"{F0}.env[0].name"),
    ("volume-mounts-not-a-list", f"{C0}.volumeMounts", "x", f"{F0}.volumeMounts"),
    ("ports-not-a-list", f"{C0}.ports", {"metrics": 1}, f"{F0}.ports"),
    ("quantity-not-a-quantity", f"{C0}.resources", {"limits": {"cpu": "lots"}},
     f"{F0}.resources.limits.cpu"),
    ("labels-not-a-map", "spec.template.metadata.labels", ["a"], "spec.template.metadata.labels"),
    ("label-value-not-a-string", "spec.template.metadata.labels", {"a": 1},
     "spec.template.metadata.labels.a"),
    ("gate-without-name", f"{TS}.schedulingGates", [{}], f"{TS}.schedulingGates[0].name"),
    ("node-selector-not-a-map", f"{TS}.nodeSelector", ["a"], f"{TS}.nodeSelector"),
    # GPUs come from gpusPerWorker (2 here) alone.
    ("gpu-limit-differs", f"{C0}.resources", {"limits": {GPU: 4}}, f"{TS}.containers"),
    ("gpu-request-differs", f"{C0}.resources", {"requests": {GPU: "1"}}, f"{TS}.containers"),
    ("gpus-on-a-sidecar", f"{TS}.containers",
     [{"name": "worker", "image": "w"},
      {"name": "side", "image": "s", "resources": {"limits": {GPU: 1}}}],
     f"{TS}.containers"),
    ("gpus-on-an-init-container", f"{TS}.initContainers",
     [{"name": "fetch", "image": "f", "resources": {"limits": {GPU: 1}}}],
     f"{TS}.initContainers"),
]  # fmt: skip


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


def _accepted(kubectl: Kubectl, job: dict[str, Any]) -> bool:
    proc = kubectl.run("create", "--dry-run=server", "-f", "-", input=json.dumps(job), check=False)
    return proc.returncode == 0


@pytest.mark.parametrize(
    ("replicas", "most"), [(1, None), (2, None), (10, None), (2, 11), (64, 100), (2, 1000)]
)
def test_the_name_limit_follows_the_jobs_size(
    kubectl: Kubectl, namespace: str, replicas: int, most: int | None
) -> None:
    """The longest name the API server takes is the one whose hostnames fit, for its size."""
    elastic = {"min_replicas": 1, "max_replicas": most} if most else {}
    limit = max_job_name_length(most or replicas)
    for length, ok in ((limit, True), (limit + 1, False)):
        job = make_ddljob(name="a" * length, replicas=replicas, namespace=namespace, **elastic)
        assert _accepted(kubectl, job) == ok, (length, replicas, most)


def test_growing_a_job_past_its_names_limit_is_refused(kubectl: Kubectl, namespace: str) -> None:
    name = "a" * max_job_name_length(4)
    job = make_ddljob(name=name, replicas=2, min_replicas=1, max_replicas=4, namespace=namespace)
    assert kubectl.apply(job).returncode == 0
    bigger = set_path(job, "spec.elastic.maxReplicas", 40)
    proc = kubectl.apply(bigger)
    assert proc.returncode != 0 and "metadata.name" in proc.stderr, proc.stderr


def test_template_fields_the_schema_does_not_type_are_kept(
    kubectl: Kubectl, namespace: str
) -> None:
    """Typing the fields the operator reads prunes nothing else of the user's template."""
    job = make_ddljob(name="kept", gpus=2, namespace=namespace)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container.update(
        workingDir="/opt/ddl",
        securityContext={"runAsNonRoot": True},
        env=[{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        resources={"limits": {GPU: 2, "memory": "4Gi"}, "requests": {GPU: "2", "cpu": 1}},
        volumeMounts=[{"name": "data", "mountPath": "/data", "readOnly": True}],
    )
    job["spec"]["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    job["spec"]["template"]["spec"]["priorityClassName"] = "high"
    assert kubectl.apply(job).returncode == 0
    stored = kubectl.get_json("ddlj", "kept", "-n", namespace)["spec"]["template"]
    assert stored["spec"]["containers"][0] == container
    assert stored["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    assert stored["spec"]["priorityClassName"] == "high"


def test_managed_by_cannot_be_set_changed_or_removed_after_creation(
    kubectl: Kubectl, namespace: str
) -> None:
    plain = make_ddljob(name="plain", namespace=namespace)
    handed = make_ddljob(name="handed", namespace=namespace, managedBy="kueue.x-k8s.io/multikueue")
    assert kubectl.apply(plain).returncode == 0
    assert kubectl.apply(handed).returncode == 0
    for job, value in (
        (plain, "kueue.x-k8s.io/multikueue"),
        (handed, c.CONTROLLER_NAME),
        (handed, DELETE),
    ):
        proc = kubectl.apply(set_path(job, "spec.managedBy", value))
        assert proc.returncode != 0 and "managedBy is immutable" in proc.stderr, proc.stderr
