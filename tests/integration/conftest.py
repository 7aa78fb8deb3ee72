"""Fixtures for tests against the real control plane (built by `make k8s`)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from ddl_localcluster.controlplane import ControlPlane

from kubetools import CRD_FILE, NODE_GRACE_SECONDS, Kubectl, KwokProcess, OperatorProcess


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane per test session; fails (never skips) when it cannot start."""
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    cp.start(node_grace_seconds=NODE_GRACE_SECONDS)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    return Kubectl(control_plane.kubeconfig)


@pytest.fixture(scope="session")
def crd_installed(kubectl: Kubectl) -> None:
    kubectl.run("apply", "--server-side", "-f", str(CRD_FILE))
    # Right after the apply the CRD may have no conditions yet, which `kubectl wait` reports
    # as an error rather than waiting: ask again until it is Established.
    for attempt in range(10):
        proc = kubectl.run(
            "wait", "--for=condition=Established", "--timeout=30s",
            "crd/ddljobs.ddl-operator.dev", check=attempt == 9,
        )  # fmt: skip
        if proc.returncode == 0:
            return
        time.sleep(1)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    if not os.environ.get("DDL_KEEP_NAMESPACES"):
        kubectl.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def operator(
    control_plane: ControlPlane, crd_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("operator") / "log")
    op.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture(scope="session")
def kwok(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KwokProcess]:
    k = KwokProcess(control_plane.kubeconfig, tmp_path_factory.mktemp("kwok") / "log")
    k.start()
    try:
        yield k
    finally:
        k.stop()
