"""The operator under the chart's RBAC: it runs a job, and is refused what it does not need."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_operator import submit, wait_for, worker_pods

from ddl_localcluster.controlplane import ControlPlane, binary

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
        assert can("patch", "pods") == "yes"
        assert can("create", "pods") == "no"
        assert can("get", "secrets") == "no"
    finally:
        restricted.stop()
        fake.delete()
        operator.start()
