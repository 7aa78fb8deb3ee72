"""The local control plane itself: restart on the same data, clean shutdown."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ddl_localcluster.controlplane import ControlPlane

from kubetools import Kubectl

REPO = Path(__file__).resolve().parents[2]


def _pids_of(cp: ControlPlane) -> list[int]:
    return list(cp.state().get("pids", {}).values())


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_restart_keeps_data_on_fresh_ports(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp")
    cp.start()
    try:
        kubectl = Kubectl(cp.kubeconfig)
        kubectl.run("create", "configmap", "survivor", "--from-literal=k=v")
        cp.stop()
        assert not cp.running()
        cp.start()
        data = kubectl.get_json("configmap", "survivor")["data"]
        assert data == {"k": "v"}
    finally:
        pids = _pids_of(cp)
        cp.stop()
    assert not [p for p in pids if _alive(p)]


def test_make_cluster_up_and_down_leave_nothing_running(tmp_path: Path) -> None:
    env = {**os.environ, "DDL_CLUSTER_DIR": str(tmp_path / "cluster")}
    up = subprocess.run(
        ["make", "-s", "cluster-up"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr + up.stdout
    assert "export KUBECONFIG=" in up.stdout
    cp = ControlPlane(tmp_path / "cluster")
    pids = _pids_of(cp)
    assert len(pids) == 4 and all(_alive(p) for p in pids)
    Kubectl(cp.kubeconfig).run("get", "namespaces")
    down = subprocess.run(
        ["make", "-s", "cluster-down"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, down.stderr
    left = [p for p in pids if _alive(p)]
    assert not left, f"processes left behind: {left}"
    # Nothing else started from this state directory survives either.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps
