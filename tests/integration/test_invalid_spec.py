"""Specs the API server accepts but a child cannot carry: a condition and an event that name
the field, no traceback loop, and the job runs once it is fixed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import submit, wait_for, worker_pods

from ddl_operator.core.validate import CHILD_REFUSED, CONDITION

from builders import make_ddljob, set_path
from kubetools import FakeCluster, Kubectl, OperatorProcess, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")

C0 = "spec.template.spec.containers.0"
INVALID = f'{{.status.conditions[?(@.type=="{CONDITION}")].status}}'


@pytest.fixture
def cluster(kubectl: Kubectl) -> Iterator[FakeCluster]:
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    yield fake
    fake.delete()


def _condition(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    status = kubectl.get_json("ddlj", name, "-n", ns)["status"]
    (condition,) = [x for x in status.get("conditions", []) if x["type"] == CONDITION]
    assert isinstance(condition, dict)
    return condition


def _events(kubectl: Kubectl, ns: str, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.get_json(
        "events", "-n", ns, f"--field-selector=reason={CONDITION},involvedObject.name={name}"
    )["items"]
    return items


# (case id, path, value, the job field the condition names, text of the pod's refusal)
REFUSED: list[tuple[str, str, Any, str, str]] = [
    (
        "mount-of-a-missing-volume",
        f"{C0}.volumeMounts",
        [{"name": "data", "mountPath": "/data"}],
        "spec.template.spec.containers[0].volumeMounts[0].name",
        'Not found: "data"',
    ),
    (
        "label-value-with-spaces",
        "spec.template.metadata.labels",
        {"app": "not a label value"},
        "spec.template.metadata.labels",
        "not a label value",
    ),
    (
        "hostname-with-underscores",
        "spec.template.spec.hostname",
        "Not_A_Host",
        "spec.template.spec.hostname",
        "Not_A_Host",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "field", "refusal"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_a_refused_worker_names_the_field_once(
    kubectl: Kubectl,
    namespace: str,
    cluster: FakeCluster,
    operator: OperatorProcess,
    path: str,
    value: Any,
    field: str,
    refusal: str,
) -> None:
    name = "refused"
    submit(kubectl, namespace, cluster, name, replicas=2, gpus=8, **_spec_at(path, value))
    wait_for(kubectl, namespace, name, INVALID, "True")
    condition = _condition(kubectl, namespace, name)
    assert condition["reason"] == CHILD_REFUSED
    assert condition["message"].startswith(f"{field}: "), condition["message"]
    assert refusal in condition["message"]
    assert worker_pods(kubectl, namespace, name) == []
    # Quiet afterwards: more than one old retry period passes with no status write, no
    # second event and no traceback for this job.
    version = kubectl.get_json("ddlj", name, "-n", namespace)["metadata"]["resourceVersion"]
    time.sleep(7)
    assert kubectl.get_json("ddlj", name, "-n", namespace)["metadata"]["resourceVersion"] == version
    (event,) = _events(kubectl, namespace, name)
    assert event["type"] == "Warning" and field in event["message"]
    assert f"reconcile of {namespace}/{name} failed" not in operator.log_path.read_text()


def _spec_at(path: str, value: Any) -> dict[str, Any]:
    """The keyword arguments of `submit` that set `path` (under spec) of the built job."""
    spec: dict[str, Any] = set_path(make_ddljob(), path, value)["spec"]
    return {"template": spec["template"]}


def test_a_fixed_spec_runs(kubectl: Kubectl, namespace: str, cluster: FakeCluster) -> None:
    name = "fixed"
    mount = [{"name": "data", "mountPath": "/data"}]
    submit(
        kubectl,
        namespace,
        cluster,
        name,
        replicas=2,
        gpus=8,
        **_spec_at(f"{C0}.volumeMounts", mount),
    )
    wait_for(kubectl, namespace, name, INVALID, "True")
    # The user adds the volume: the job is looked at again and runs.
    fixed = _spec_at(f"{C0}.volumeMounts", mount)
    fixed["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    submit(kubectl, namespace, cluster, name, replicas=2, gpus=8, **fixed)
    wait_for(kubectl, namespace, name, "{.status.phase}", "Running")
    status = kubectl.get_json("ddlj", name, "-n", namespace)["status"]
    assert CONDITION not in {x["type"] for x in status["conditions"]}
    assert len(worker_pods(kubectl, namespace, name)) == 2
