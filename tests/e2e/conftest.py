"""The local cluster for end-to-end tests: control plane, node agent, the operator chart."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddl_localcluster import demo, goodput, netns
from ddl_localcluster.controlplane import ControlPlane

from kubetools import Kubectl


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """What `make demo` starts, on 2 racks x 4 nodes x 2 GPUs (room in a rack for a straggler's
    replacement), and the operator as a pod."""
    cp = ControlPlane(tmp_path_factory.mktemp("local-cluster"))
    try:
        demo.start_cluster(cp, goodput.CLUSTER)
        yield cp
    finally:
        pids = list(cp.state().get("pids", {}).values())
        cp.stop()
    # What `make demo-down` promises: no process, network namespace or pod left behind.
    left = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not left, f"processes left after stop: {left}"
    spine = f"ddl{netns.tag(cp.dir / 'nodeagent')}-"
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert spine not in namespaces, f"network namespaces left: {namespaces}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cp.dir) not in ps, "a process started from the cluster directory survived"


@pytest.fixture(scope="session")
def kubectl(local_cluster: ControlPlane) -> Kubectl:
    return Kubectl(local_cluster.kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)
