"""Fixtures for tests against the real control plane (built by `make k8s`)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_localcluster.controlplane import ControlPlane, binary

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "ddljobs.ddl-operator.dev.yaml"


@dataclass
class Kubectl:
    """The real kubectl against one control plane."""

    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def apply(self, obj: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", *flags, input=yaml.safe_dump(obj), check=False)

    def get_json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.run("get", *args, "-o", "json").stdout)
        return out


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One control plane per test session; fails (never skips) when it cannot start."""
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    cp.start()
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
    kubectl.run(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/ddljobs.ddl-operator.dev"
    )


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    if not os.environ.get("DDL_KEEP_NAMESPACES"):
        kubectl.run("delete", "namespace", name, "--wait=false", check=False)
