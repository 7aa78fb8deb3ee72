"""Helpers for tests against a real cluster: kubectl, the operator and kwok as processes,
and kwok GPU nodes private to a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ddl_localcluster.controlplane import binary

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "ddljobs.ddl-operator.dev.yaml"


# The integration control plane's node-monitor grace. kwok heartbeats its nodes every 20-25 s
# when idle and later after a busy test (40 s seen); shorter graces let healthy nodes flap
# NotReady and jobs re-form in any test that runs longer than that.
NODE_GRACE_SECONDS: Final = 90


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
        # JSON, not YAML: PyYAML leaves strings like "12e45" unquoted, which kubectl's YAML
        # reader then takes for numbers.
        return self.run("apply", "-f", "-", *flags, input=json.dumps(obj), check=False)

    def wait_job(self, ns: str, name: str, jsonpath: str, value: str, timeout: int = 60) -> None:
        """kubectl wait on a DDLJob field; on timeout, fail with the job's status."""
        proc = self.run(
            "wait",
            "-n",
            ns,
            f"ddlj/{name}",
            f"--for=jsonpath={jsonpath}={value}",
            f"--timeout={timeout}s",
            check=False,
            timeout=timeout + 10,
        )
        if proc.returncode != 0:
            status = self.get_json("ddlj", name, "-n", ns).get("status")
            raise AssertionError(f"{name}: {jsonpath} never became {value}: {status}")

    def get_json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.run("get", *args, "-o", "json").stdout)
        return out


class OperatorProcess:
    """The operator as users run it: `python -m ddl_operator` against the control plane."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.args, self.env = args, env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0

    def start(self, timeout: float = 60) -> None:
        from ddl_localcluster.controlplane import free_port, wait_for

        liveness, self.metrics_port = free_port(), free_port()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ddl_operator",
                    f"--liveness-port={liveness}",
                    f"--metrics-port={self.metrics_port}",
                    *self.args,
                ],
                env={**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=2):
                    return True
            except OSError:
                return False

        wait_for("operator liveness", healthy, timeout, self.log_tail)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no operator log)"


class KwokProcess:
    """kwok plays the kubelet of fake nodes annotated kwok.x-k8s.io/node=fake."""

    def __init__(self, kubeconfig: Path, log_path: Path) -> None:
        self.kubeconfig, self.log_path = kubeconfig, log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from ddl_localcluster.controlplane import free_port

        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(binary("kwok")),
                    f"--kubeconfig={self.kubeconfig}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    "--cidr=10.244.0.0/16",
                    "--node-ip=10.244.0.1",
                    f"--server-address=127.0.0.1:{free_port()}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)


def fake_node(name: str, labels: dict[str, str], gpus: int) -> dict[str, Any]:
    """A kwok-managed node with GPU capacity and topology labels."""
    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {"kubernetes.io/hostname": name, "type": "kwok", **labels},
        },
        "status": {"allocatable": capacity, "capacity": capacity},
    }


@dataclass
class FakeCluster:
    """A labelled set of kwok nodes private to one test (selected by a test-id label)."""

    kubectl: Kubectl
    test_id: str
    nodes: list[str]

    @property
    def selector(self) -> dict[str, str]:
        return {"ddl-test": self.test_id}

    def delete(self) -> None:
        self.kubectl.run(
            "delete", "nodes", "-l", f"ddl-test={self.test_id}", "--wait=false", check=False
        )


def make_fake_cluster(
    kubectl: Kubectl, zones: int = 2, racks: int = 2, nodes: int = 4, gpus: int = 8
) -> FakeCluster:
    test_id = f"t{uuid.uuid4().hex[:6]}"
    docs, names = [], []
    for z in range(zones):
        for r in range(racks):
            for n in range(nodes):
                name = f"n{test_id}-z{z}-r{r}-{n}"
                names.append(name)
                docs.append(
                    fake_node(
                        name,
                        {
                            "ddl-test": test_id,
                            "topology.kubernetes.io/zone": f"zone-{z}",
                            "topology.kubernetes.io/rack": f"z{z}-rack-{r}",
                            "ddl-operator.dev/nvlink-domain": f"{name}-nvl",
                        },
                        gpus,
                    )
                )
    kubectl.run(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )
    kubectl.run(
        "wait", "--for=condition=Ready", "--timeout=60s", "node", "-l", f"ddl-test={test_id}"
    )
    return FakeCluster(kubectl, test_id, names)
