"""The operator under the chart's RBAC: it runs a job, and is refused what it does not need."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from test_operator import submit, wait_for, worker_pods

from ddl_localcluster.controlplane import ControlPlane, binary
from ddl_operator.api import constants as c
from ddl_operator.core.render import ANNOTATION_NODE

from kubetools import Kubectl, OperatorProcess, make_fake_cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "ddl-operator"


def token_kubeconfig(cp: ControlPlane, token: str, path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": cp.server, "certificate-authority": str(cp.pki.ca_cert)},
            }
        ],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def chart_release(control_plane: ControlPlane, kubectl: Kubectl) -> Iterator[tuple[str, str]]:
    """`helm install` of the chart; yields (release namespace, fullname)."""
    release_ns, name = f"ddl-system-{uuid.uuid4().hex[:5]}", f"ddl-{uuid.uuid4().hex[:5]}"
    helm = [str(binary("helm")), f"--kubeconfig={control_plane.kubeconfig}"]
    proc = subprocess.run(
        [
            *helm,
            "install",
            name,
            str(CHART),
            "-n",
            release_ns,
            "--create-namespace",
            f"--set=fullnameOverride={name}",
            "--skip-crds",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        yield release_ns, name
    finally:
        subprocess.run(
            [*helm, "uninstall", name, "-n", release_ns], capture_output=True, timeout=120
        )


@pytest.mark.usefixtures("kwok", "crd_installed")
def test_operator_runs_a_job_with_only_the_charts_rbac(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    chart_release: tuple[str, str],
    tmp_path: Path,
    operator: OperatorProcess,
) -> None:
    release_ns, name = chart_release
    operator.stop()  # the admin-credentialed operator steps aside for this test
    token = kubectl.run("create", "token", name, "-n", release_ns, "--duration=1h").stdout.strip()
    as_operator = token_kubeconfig(control_plane, token, tmp_path / "operator.kubeconfig")
    restricted = OperatorProcess(
        as_operator,
        tmp_path / "operator.log",
        args=("--worker-service-account=ddl-worker",),
        env={"DDL_WORKER_CLUSTER_ROLE": f"{name}-worker"},
    )
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    restricted.start()
    try:
        submit(kubectl, namespace, fake, "rbac", replicas=2, gpus=8)
        wait_for(kubectl, namespace, "rbac", "{.status.phase}", "Running")
        pods = worker_pods(kubectl, namespace, "rbac")
        assert {p["spec"]["serviceAccountName"] for p in pods} == {"ddl-worker"}
        binding = kubectl.get_json("rolebinding", "ddl-worker", "-n", namespace)
        assert binding["roleRef"]["name"] == f"{name}-worker"

        me = Kubectl(as_operator)
        for verb_args in (
            ("get", "secrets", "-n", namespace),
            ("get", "secrets", "-n", release_ns),
            ("create", "deployment", "x", "--image=x", "-n", namespace),
            ("delete", "node", fake.nodes[0]),
            (
                "create",
                "clusterrolebinding",
                "x",
                "--clusterrole=cluster-admin",
                f"--serviceaccount={release_ns}:{name}",
            ),
            ("create", "configmap", "x", "-n", namespace),
        ):
            proc = me.run(*verb_args, check=False)
            assert proc.returncode != 0 and "forbidden" in proc.stderr.lower(), (verb_args, proc)
        # Workers may read their job and annotate pods, nothing more.
        worker = f"system:serviceaccount:{namespace}:ddl-worker"

        def can(*args: str) -> str:
            proc = kubectl.run(
                "auth", "can-i", *args, f"--as={worker}", "-n", namespace, check=False
            )
            return proc.stdout.strip()

        assert can("get", "ddljobs.ddl-operator.dev") == "yes"
        assert can("patch", "pods") == "yes"  # narrowed to its own pod's report by the policy
        assert can("get", "pods") == "no"
        assert can("create", "pods") == "no"
        assert can("get", "secrets") == "no"
    finally:
        restricted.stop()
        fake.delete()
        operator.start()


REPORT = c.ANNOTATION_REPORT


def _pod(name: str, namespace: str) -> dict[str, Any]:
    """A gated pod of the worker account (never scheduled: the test is about admission)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": "trainer"},
            "annotations": {"example.com/keep": "1"},
        },
        "spec": {
            "serviceAccountName": "ddl-worker",
            "schedulingGates": [{"name": c.SCHEDULING_GATE}],
            "containers": [{"name": "worker", "image": "ddl-worker:dev"}],
        },
    }


def _as(cp: ControlPlane, token: str, path: Path) -> client.CoreV1Api:
    """The agent's own client (ddl_worker.kube) with the given token."""
    return client.CoreV1Api(config.new_client_from_config(str(token_kubeconfig(cp, token, path))))


def _refusal(call: Any, *args: Any, **kwargs: Any) -> str:
    """The API server's message refusing a call ('' if it was allowed)."""
    try:
        call(*args, **kwargs)
    except client.ApiException as err:
        assert err.status == 403, err
        message: str = json.loads(err.body)["message"]
        return message
    return ""


@pytest.mark.usefixtures("crd_installed")
def test_a_worker_may_change_only_its_own_pods_report(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    chart_release: tuple[str, str],
    tmp_path: Path,
) -> None:
    """The chart's admission policy, on the API server: a token bound to pod `mine` may write
    the report annotation of `mine` and nothing else, of `mine` or of any other pod."""
    _, name = chart_release
    kubectl.run("create", "serviceaccount", "ddl-worker", "-n", namespace)
    kubectl.run(
        "create", "rolebinding", "ddl-worker", "-n", namespace, f"--clusterrole={name}-worker",
        f"--serviceaccount={namespace}:ddl-worker",
    )  # fmt: skip
    for pod in ("mine", "theirs"):
        kubectl.run("create", "-f", "-", input=json.dumps(_pod(pod, namespace)))
    uid = kubectl.get_json("pod", "mine", "-n", namespace)["metadata"]["uid"]
    token = kubectl.run(
        "create", "token", "ddl-worker", "-n", namespace, "--duration=1h",
        "--bound-object-kind=Pod", "--bound-object-name=mine", f"--bound-object-uid={uid}",
    ).stdout.strip()  # fmt: skip
    worker = _as(control_plane, token, tmp_path / "worker.kubeconfig")
    report = {"metadata": {"annotations": {REPORT: '{"epoch": 1}'}}}

    # The policy is live once the API server has loaded it (no condition says so).
    deadline = time.monotonic() + 30
    while not _refusal(worker.patch_namespaced_pod, "theirs", namespace, report):
        assert time.monotonic() < deadline, "the worker policy never took effect"
        kubectl.run("annotate", "pod", "theirs", "-n", namespace, f"{REPORT}-", "--overwrite")
        time.sleep(0.5)

    container = {"spec": {"containers": [{"name": "worker", "image": "attacker:latest"}]}}
    refused: list[tuple[str, Any, str]] = [
        ("theirs", report, "only its own pod (mine), not theirs"),
        ("theirs", container, "only its own pod (mine), not theirs"),
        ("theirs", {"metadata": {"labels": {"app": "x"}}}, "only its own pod"),
        ("mine", container, "may not change its pod's spec"),
        ("mine", {"metadata": {"labels": {"app": "x"}}}, "may not change its pod's spec, labels"),
        ("mine", {"metadata": {"labels": {"x": "1"}, **report["metadata"]}}, "labels"),
        ("mine", {"metadata": {"annotations": {ANNOTATION_NODE: "n1"}}}, f"only the {REPORT}"),
        ("mine", [{"op": "remove", "path": "/metadata/annotations/example.com~1keep"}], REPORT),
        ("mine", {"spec": {"nodeSelector": {c.LABEL_HOSTNAME: "n1"}}}, "spec"),
        ("mine", {"metadata": {"finalizers": ["example.com/hold"]}}, "finalizers"),
    ]
    for pod, patch, expected in refused:
        message = _refusal(worker.patch_namespaced_pod, pod, namespace, patch)
        assert expected in message, (pod, patch, message)
    # Lifting its own gate is a spec change too (merge patch: the list is replaced).
    message = _refusal(
        worker.patch_namespaced_pod, "mine", namespace, {"spec": {"schedulingGates": []}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    assert "spec" in message, message

    # Its own report, as the agent writes it (and again, replaced).
    worker.patch_namespaced_pod("mine", namespace, report)
    worker.patch_namespaced_pod("mine", namespace, {"metadata": {"annotations": {REPORT: "{}"}}})
    stored = kubectl.get_json("pod", "mine", "-n", namespace)["metadata"]
    assert stored["annotations"] == {"example.com/keep": "1", REPORT: "{}"}
    assert stored["labels"] == {"app": "trainer"}
    theirs = kubectl.get_json("pod", "theirs", "-n", namespace)
    assert REPORT not in theirs["metadata"]["annotations"]
    assert theirs["spec"]["containers"][0]["image"] == "ddl-worker:dev"

    # A token of the account that is bound to no pod may change no pod at all.
    unbound = _as(
        control_plane,
        kubectl.run("create", "token", "ddl-worker", "-n", namespace).stdout.strip(),
        tmp_path / "unbound.kubeconfig",
    )
    assert "bound to no pod" in _refusal(unbound.patch_namespaced_pod, "mine", namespace, report)
    # RBAC still refuses the rest: reading, deleting, the status subresource.
    for call, args in (
        (worker.read_namespaced_pod, ("mine", namespace)),
        (worker.delete_namespaced_pod, ("mine", namespace)),
        (worker.patch_namespaced_pod_status, ("mine", namespace, {"status": {"phase": "Failed"}})),
    ):
        assert "cannot" in _refusal(call, *args)
