"""The chart with `watch.allNamespaces=false`: the operator, with only the release's RBAC, runs
jobs in its namespaces, counts GPUs that other namespaces' pods hold, and leaves the rest alone."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator import submit, wait_for, worker_pods
from test_rbac import token_kubeconfig

from ddl_localcluster.controlplane import ControlPlane, binary

from kubetools import Kubectl, OperatorProcess, make_fake_cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "ddl-operator"
REFUSALS = ("403", "forbidden")  # what the API server's refusals look like in the log


@pytest.fixture
def other_namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    # Pods need the ServiceAccount the controller-manager makes in each new namespace.
    kubectl.run("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=60s")
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespaced_release(control_plane: ControlPlane, namespace: str) -> Iterator[tuple[str, str]]:
    """`helm install` watching `namespace` only; yields (release namespace, fullname)."""
    release_ns, name = f"ddl-system-{uuid.uuid4().hex[:5]}", f"ddl-{uuid.uuid4().hex[:5]}"
    helm = [str(binary("helm")), f"--kubeconfig={control_plane.kubeconfig}"]
    proc = subprocess.run(
        [
            *helm, "install", name, str(CHART), "-n", release_ns, "--create-namespace",
            f"--set=fullnameOverride={name}", "--set=watch.allNamespaces=false",
            f"--set=watch.namespaces={{{namespace}}}", "--skip-crds",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        yield release_ns, name
    finally:
        subprocess.run(
            [*helm, "uninstall", name, "-n", release_ns], capture_output=True, timeout=120
        )


def restricted_operator(
    cp: ControlPlane,
    kubectl: Kubectl,
    release: tuple[str, str],
    tmp_path: Path,
    *args: str,
    pod: str = "operator",
) -> OperatorProcess:
    """The operator as the chart deploys it: the release's ServiceAccount token, its flags,
    and the downward API's POD_NAME and POD_NAMESPACE."""
    release_ns, name = release
    token = kubectl.run("create", "token", name, "-n", release_ns, "--duration=1h").stdout.strip()
    return OperatorProcess(
        token_kubeconfig(cp, token, tmp_path / f"{pod}.kubeconfig"),
        tmp_path / f"{pod}.log",
        args=("--worker-service-account=ddl-worker", *args),
        env={
            "DDL_WORKER_CLUSTER_ROLE": f"{name}-worker",
            "POD_NAME": pod,
            "POD_NAMESPACE": release_ns,
        },
    )


def refusals(log: Path) -> list[str]:
    return [
        line for line in log.read_text().splitlines() if any(r in line.lower() for r in REFUSALS)
    ]


def gpu_pod(name: str, node: str, gpus: int) -> dict[str, Any]:
    """Another tenant's pod, bound straight to a node, holding its GPUs."""
    gpu = {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "other:latest", "resources": gpu}],
        },
    }


@pytest.mark.usefixtures("kwok", "crd_installed")
def test_operator_runs_jobs_in_its_namespaces_only(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    other_namespace: str,
    namespaced_release: tuple[str, str],
    tmp_path: Path,
    operator: OperatorProcess,
) -> None:
    operator.stop()  # the admin-credentialed operator steps aside for this test
    restricted = restricted_operator(
        control_plane, kubectl, namespaced_release, tmp_path, f"--namespace={namespace}"
    )
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=3, gpus=8)
    try:
        # Another namespace's pod holds every GPU of the first node; the operator must see it.
        busy = fake.nodes[0]
        kubectl.run(
            "create", "-n", other_namespace, "-f", "-", input=json.dumps(gpu_pod("x", busy, 8))
        )
        kubectl.run(
            "wait", "-n", other_namespace, "pod/x", "--for=jsonpath={.status.phase}=Running",
            "--timeout=60s",
        )  # fmt: skip
        restricted.start()
        submit(kubectl, other_namespace, fake, "elsewhere", replicas=1, gpus=8)
        submit(kubectl, namespace, fake, "mine", replicas=2, gpus=8)
        wait_for(kubectl, namespace, "mine", "{.status.phase}", "Running")

        status = kubectl.get_json("ddlj", "mine", "-n", namespace)["status"]
        placed = {m["node"] for m in status["rendezvous"]["members"]}
        assert placed == set(fake.nodes[1:]), f"placed on {placed}; {busy} was full"
        pods = worker_pods(kubectl, namespace, "mine")
        assert sorted(p["spec"].get("nodeName", "") for p in pods) == sorted(fake.nodes[1:])
        assert {p["spec"]["serviceAccountName"] for p in pods} == {"ddl-worker"}

        # The job outside the watched namespaces: untouched, no pods, no status.
        assert not worker_pods(kubectl, other_namespace, "elsewhere")
        assert "status" not in kubectl.get_json("ddlj", "elsewhere", "-n", other_namespace)
        assert not refusals(restricted.log_path), "\n".join(refusals(restricted.log_path))
    finally:
        restricted.stop()
        fake.delete()
        operator.start()


def wait_for_holder(kubectl: Kubectl, namespace: str, lease: str, holder: str) -> None:
    kubectl.run("wait", "--for=create", f"lease/{lease}", "-n", namespace, "--timeout=60s")
    proc = kubectl.run(
        "wait", f"lease/{lease}", "-n", namespace,
        f"--for=jsonpath={{.spec.holderIdentity}}={holder}", "--timeout=60s", check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        spec = kubectl.get_json("lease", lease, "-n", namespace)["spec"]
        raise AssertionError(f"{holder} never held {lease}: {spec}")


@pytest.mark.usefixtures("kwok", "crd_installed")
def test_replicas_elect_a_leader_on_the_charts_lease(
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    namespaced_release: tuple[str, str],
    tmp_path: Path,
    operator: OperatorProcess,
) -> None:
    """Two replicas as the chart runs them (`--leader-elect`, the release's token): one holds
    the Lease and reconciles, the standby answers its liveness probe, and takes over."""
    release_ns, name = namespaced_release
    operator.stop()
    args = (f"--namespace={namespace}", "--leader-elect", f"--leader-elect-name={name}")
    first, second = (
        restricted_operator(
            control_plane, kubectl, namespaced_release, tmp_path, *args, pod=f"{name}-{pod}"
        )
        for pod in ("a", "b")
    )
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    try:
        first.start()
        wait_for_holder(kubectl, release_ns, name, f"{name}-a")
        # The standby is live (its probe must pass, or the kubelet would restart it) and
        # leaves the Lease alone.
        second.start()
        submit(kubectl, namespace, fake, "led", replicas=2, gpus=8)
        wait_for(kubectl, namespace, "led", "{.status.phase}", "Running")
        lease = kubectl.get_json("lease", name, "-n", release_ns)["spec"]
        assert lease["holderIdentity"] == f"{name}-a", lease

        first.stop()  # hands the Lease back on the way out
        wait_for_holder(kubectl, release_ns, name, f"{name}-b")
        kubectl.run("scale", "ddlj/led", "-n", namespace, "--replicas=1")
        wait_for(kubectl, namespace, "led", "{.status.replicas}", "1")
        for candidate in (first, second):
            found = refusals(candidate.log_path)
            assert not found, "\n".join(found)
    finally:
        first.stop()
        second.stop()
        fake.delete()
        operator.start()
