"""Runs a real Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler).

Everything binds to loopback on free ports; data, certificates, logs and process ids live in
one state directory, so the same directory can be stopped and started again and `down` from
another process finds what `up` left running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ddl_localcluster.pki import Pki, ensure_pki, write_kubeconfig

COMPONENTS: Final = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
TOOLS: Final = ("kubectl", "kwok", "helm")
REPO_ROOT: Final = Path(__file__).resolve().parents[2]
BUILD_COMMAND: Final = "make k8s   (or: scripts/build-k8s.sh)"
SERVICE_CIDR: Final = "10.96.0.0/16"


class ControlPlaneError(RuntimeError):
    """A component could not be found or started; the message says what to do."""


def pinned_versions() -> dict[str, str]:
    """The versions pinned in scripts/versions.env."""
    out: dict[str, str] = {}
    for line in (REPO_ROOT / "scripts" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def cache_dir() -> Path:
    """Where binaries and the default cluster state live (outside the repo)."""
    if env := os.environ.get("DDL_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ddl-operator"


def bin_dir() -> Path:
    """The pinned binaries: $DDL_K8S_BIN_DIR, else the versioned cache directory."""
    if env := os.environ.get("DDL_K8S_BIN_DIR"):
        return Path(env)
    v = pinned_versions()
    name = (
        f"k8s-{v['KUBERNETES_VERSION']}-etcd-{v['ETCD_VERSION']}"
        f"-kwok-{v['KWOK_VERSION']}-helm-{v['HELM_VERSION']}"
    )
    return cache_dir() / "bin" / name


def binary(name: str) -> Path:
    """Path of one pinned binary, or an error naming the command that builds it."""
    path = bin_dir() / name
    if not os.access(path, os.X_OK):
        raise ControlPlaneError(
            f"{name} not found at {path}. Build the pinned control plane with: {BUILD_COMMAND}, "
            "or point DDL_K8S_BIN_DIR at a directory of prebuilt binaries."
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _not_zombie(pid)


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, on_timeout: Callable[[], str]
) -> None:
    """Polls check() until true; on timeout raises with on_timeout()'s diagnosis."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


@dataclass
class ControlPlane:
    """One control plane's state directory and the processes started from it."""

    dir: Path

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def pki(self) -> Pki:
        return Pki(self.dir / "pki")

    def log(self, component: str) -> Path:
        return self.dir / "logs" / f"{component}.log"

    def log_tail(self, component: str, lines: int = 30) -> str:
        try:
            text = self.log(component).read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log for {component})"
        return "\n".join(text[-lines:])

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def running(self) -> dict[str, int]:
        """Components whose recorded process is still alive."""
        pids: dict[str, int] = self.state().get("pids", {})
        return {name: pid for name, pid in pids.items() if _alive(pid)}

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 300) -> str:
        """The pinned kubectl as admin; raises with its stderr when it fails."""
        proc = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def start_node_agent(self, cluster: Path, timeout: float = 120) -> None:
        """Starts the local node agent for a cluster description; waits for Ready nodes."""
        self.spawn(
            "nodeagent",
            [
                sys.executable,
                "-m",
                "ddl_localcluster.nodeagent",
                "run",
                "--kubeconfig",
                str(self.kubeconfig),
                "--cluster",
                str(cluster),
                "--state-dir",
                str(self.dir / "nodeagent"),
            ],
        )
        wait_for(
            "the node agent to register nodes",
            lambda: bool(json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]),
            timeout,
            lambda: self._diagnose("nodeagent"),
        )
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={timeout:.0f}s")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state()['ports']['apiserver']}"

    # -- start ------------------------------------------------------------------------------

    def start(
        self,
        timeout: float = 120.0,
        progress: Callable[[str], None] = lambda _: None,
        node_grace_seconds: int = 20,
    ) -> None:
        """Starts every component (fresh ports), waits until the API is usable.

        `node_grace_seconds`: how long a node may miss heartbeats before it is NotReady.
        """
        if self.running():
            raise ControlPlaneError(f"a control plane is already running from {self.dir}")
        paths = {name: binary(name) for name in COMPONENTS}
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        pki = ensure_pki(self.dir / "pki")
        ports = {
            "etcd": free_port(),
            "etcd-peer": free_port(),
            "apiserver": free_port(),
            "controller-manager": free_port(),
            "scheduler": free_port(),
        }
        state: dict[str, Any] = {"ports": ports, "pids": {}}
        self._save(state)
        server = f"https://127.0.0.1:{ports['apiserver']}"
        write_kubeconfig(self.kubeconfig, server, pki, "admin")
        kcm_cfg = write_kubeconfig(
            self.dir / "controller-manager.kubeconfig", server, pki, "controller-manager"
        )
        sched_cfg = write_kubeconfig(self.dir / "scheduler.kubeconfig", server, pki, "scheduler")
        try:
            progress(f"etcd on 127.0.0.1:{ports['etcd']}")
            self._spawn(state, "etcd", [str(paths["etcd"]), *self._etcd_args(ports)])
            wait_for(
                "etcd",
                lambda: self._http_ok(f"http://127.0.0.1:{ports['etcd']}/health"),
                timeout,
                lambda: self._diagnose("etcd"),
            )
            progress(f"kube-apiserver on {server}")
            self._spawn(
                state,
                "kube-apiserver",
                [str(paths["kube-apiserver"]), *self._apiserver_args(ports, pki)],
            )
            wait_for(
                "kube-apiserver /readyz",
                lambda: self._api_ok("/readyz"),
                timeout,
                lambda: self._diagnose("kube-apiserver"),
            )
            progress("kube-controller-manager and kube-scheduler")
            self._spawn(
                state,
                "kube-controller-manager",
                [
                    str(paths["kube-controller-manager"]),
                    f"--kubeconfig={kcm_cfg}",
                    f"--authentication-kubeconfig={kcm_cfg}",
                    f"--authorization-kubeconfig={kcm_cfg}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={ports['controller-manager']}",
                    "--leader-elect=false",
                    f"--service-account-private-key-file={pki.sa_key}",
                    f"--root-ca-file={pki.ca_cert}",
                    "--use-service-account-credentials=true",
                    f"--cluster-signing-cert-file={pki.ca_cert}",
                    f"--cluster-signing-key-file={pki.ca_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    # Node loss is noticed within seconds, so elastic tests stay short.
                    f"--node-monitor-grace-period={node_grace_seconds}s",
                    "--node-monitor-period=2s",
                ],
            )
            self._spawn(
                state,
                "kube-scheduler",
                [
                    str(paths["kube-scheduler"]),
                    f"--kubeconfig={sched_cfg}",
                    f"--authentication-kubeconfig={sched_cfg}",
                    f"--authorization-kubeconfig={sched_cfg}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={ports['scheduler']}",
                    "--leader-elect=false",
                ],
            )
            # Pods can be created once the controller-manager made the default ServiceAccount.
            wait_for(
                "the default ServiceAccount (kube-controller-manager)",
                lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
                timeout,
                lambda: self._diagnose("kube-controller-manager"),
            )
            wait_for(
                "kube-scheduler /healthz",
                lambda: self._http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"),
                timeout,
                lambda: self._diagnose("kube-scheduler"),
            )
        except BaseException:
            self.stop()
            raise

    def _etcd_args(self, ports: dict[str, int]) -> list[str]:
        client = f"http://127.0.0.1:{ports['etcd']}"
        peer = f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            "--name=default",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # Throwaway test data: skip fsync so two cores are not spent waiting on disk.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, ports: dict[str, int], pki: Pki) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki.cert('apiserver')}",
            f"--tls-private-key-file={pki.key('apiserver')}",
            f"--client-ca-file={pki.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # `kubectl logs`: the node agent serves the kubelet API on the host's loopback.
            "--kubelet-preferred-address-types=InternalDNS,InternalIP,Hostname",
            "--allow-privileged=true",
            # No real endpoint for the in-cluster "kubernetes" Service on loopback.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def _spawn(
        self,
        state: dict[str, Any],
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        with self.log(name).open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        state["pids"][name] = proc.pid
        self._save(state)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Starts another process that `stop` (and `ddl-cluster down`) will also stop."""
        self._spawn(self.state(), name, argv, env)

    def save(self, state: dict[str, Any]) -> None:
        """Records ports and process ids (what `down` reads)."""
        self._save(state)

    def _save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    def _diagnose(self, component: str) -> str:
        pid = self.state().get("pids", {}).get(component)
        status = "running" if pid and _alive(pid) else "not running"
        return (
            f"{component} is {status}; last lines of {self.log(component)}:\n"
            f"{self.log_tail(component)}"
        )

    # -- HTTP checks ------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.cert("admin")), str(self.pki.key("admin")))
        return ctx

    def _api_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(
                self.server + path, context=self.ssl_context(), timeout=5
            ) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    @staticmethod
    def _http_ok(url: str) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # -- stop -------------------------------------------------------------------------------

    def stop(self, grace: float = 15.0) -> None:
        """Stops every recorded process (whole process groups), last started first."""
        state = self.state()
        pids: dict[str, int] = state.get("pids", {})
        for name in reversed(list(pids)):
            stop_process_group(pids[name], grace)
        # A node agent that was killed cannot clean up its pods and network namespaces.
        from ddl_localcluster.nodeagent import cleanup

        cleanup(self.dir / "nodeagent")
        if state:
            state["pids"] = {}
            self._save(state)


def stop_process_group(pid: int, grace: float) -> None:
    """SIGTERM a session leader's group, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
