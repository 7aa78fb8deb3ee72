"""The local cluster for end-to-end tests: control plane, node agent, the operator chart."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from ddl_localcluster import demo
from ddl_localcluster.controlplane import ControlPlane

from kubetools import Kubectl


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """What `make demo` starts: 2 racks x 2 nodes x 2 GPUs and the operator as a pod."""
    cp = ControlPlane(tmp_path_factory.mktemp("local-cluster"))
    try:
        demo.start_cluster(cp)
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubectl(local_cluster: ControlPlane) -> Kubectl:
    return Kubectl(local_cluster.kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)
