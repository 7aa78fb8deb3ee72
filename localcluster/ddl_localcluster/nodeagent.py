"""Local node agent: registers simulated GPU nodes and runs the pods bound to them as processes.

A stand-in for the kubelet of the local cluster. It keeps each node's Lease and Ready condition
fresh, runs the first container of every pod bound to its nodes as a local process (in the
pod's own network namespace where root allows, see netns.py), gives the process the pod's
service-account identity through a KUBECONFIG with a pod-bound token, reports pod status like a
kubelet, honours deletion and restart policies, and takes node-down/up/delete commands on a
unix socket in its state directory.

    python -m ddl_localcluster.nodeagent run --kubeconfig K --cluster CLUSTER.yaml --state-dir D
    python -m ddl_localcluster.nodeagent node-down NAME [--kill-pods] --state-dir D
    python -m ddl_localcluster.nodeagent teardown --state-dir D   # after a crash
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ddl_localcluster import netns
from ddl_localcluster.controlplane import REPO_ROOT, cache_dir
from ddl_localcluster.kubeletapi import ContainerLog, KubeletApi, LogError
from ddl_localcluster.topology import ClusterSpec, NodeSpec, TopologyError, node_object

HEARTBEAT_SECONDS: Final = 5.0
STATUS_SECONDS: Final = 10.0
LEASE_SECONDS: Final = 40
LEASE_NAMESPACE: Final = "kube-node-lease"
SYNC_SECONDS: Final = 0.5
TOKEN_SECONDS: Final = 24 * 3600
CONFIG_RETRY_SECONDS: Final = 5.0
BACKOFF_FIRST: Final = 10.0
BACKOFF_MAX: Final = 300.0
# A container that ran this long without trouble restarts without back-off again (kubelet).
BACKOFF_RESET_SECONDS: Final = 600.0
DEFAULT_GRACE: Final = 30
SHUTDOWN_GRACE: Final = 5.0
SOCKET_NAME: Final = "agent.sock"
TERMINAL: Final = ("Succeeded", "Failed")
DEFAULT_CLUSTER: Final = REPO_ROOT / "examples" / "local-cluster.yaml"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_private(path: Path, data: bytes) -> None:
    """Atomically replaces path with data readable by the owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


# -- API client -------------------------------------------------------------------------------


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _named(config: Mapping[str, Any], section: str, name: str) -> dict[str, Any]:
    for entry in config.get(section) or []:
        if entry.get("name") == name:
            value: dict[str, Any] = entry.get(section[:-1]) or {}
            return value
    raise ValueError(f"kubeconfig has no {section[:-1]} named {name!r}")


def _material(section: Mapping[str, Any], key: str, base: Path, dest: Path) -> Path:
    """A file with a kubeconfig's certificate or key, whether inlined (-data) or referenced."""
    if f"{key}-data" in section:
        _write_private(dest, base64.b64decode(section[f"{key}-data"]))
        return dest
    if key in section:
        return base / str(section[key])
    raise ValueError(f"kubeconfig has neither {key} nor {key}-data")


class KubeApi:
    """The few JSON calls a kubelet makes, with the identity of one kubeconfig."""

    def __init__(self, kubeconfig: Path, state_dir: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context = _named(config, "contexts", config["current-context"])
        cluster = _named(config, "clusters", context["cluster"])
        user = _named(config, "users", context["user"])
        base = kubeconfig.resolve().parent
        self.server: str = str(cluster["server"]).rstrip("/")
        self.ca_file = _material(cluster, "certificate-authority", base, state_dir / "ca.crt")
        self.ssl = ssl.create_default_context(cafile=str(self.ca_file))
        self.headers = {"Accept": "application/json"}
        if "client-certificate" in user or "client-certificate-data" in user:
            cert = _material(user, "client-certificate", base, state_dir / "client.crt")
            key = _material(user, "client-key", base, state_dir / "client.key")
            self.ssl.load_cert_chain(str(cert), str(key))
        elif token := user.get("token"):
            self.headers["Authorization"] = f"Bearer {token}"

    def _request(
        self, method: str, path: str, body: Any, query: Mapping[str, str] | None, kind: str
    ) -> urllib.request.Request:
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = kind
        return urllib.request.Request(url, data=data, method=method, headers=headers)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        kind: str = "application/json",
    ) -> dict[str, Any]:
        request = self._request(method, path, body, query, kind)
        try:
            with urllib.request.urlopen(request, context=self.ssl, timeout=30) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                message = str(json.loads(raw).get("message", raw))
            except ValueError:
                message = raw.decode(errors="replace")
            raise ApiError(err.code, message) from None

    def patch(self, path: str, body: Any) -> dict[str, Any]:
        return self.call("PATCH", path, body, kind="application/merge-patch+json")

    def watch(self, path: str, query: Mapping[str, str], seconds: int) -> Iterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it."""
        q = {**query, "watch": "1", "timeoutSeconds": str(seconds)}
        request = self._request("GET", path, None, q, "")
        try:
            with urllib.request.urlopen(request, context=self.ssl, timeout=seconds + 30) as resp:
                for line in resp:
                    if line.strip():
                        event: dict[str, Any] = json.loads(line)
                        yield event
        except urllib.error.HTTPError as err:
            raise ApiError(err.code, err.reason) from None


# -- what a container is given ----------------------------------------------------------------


class ConfigError(Exception):
    """The container cannot be started as written (a kubelet's CreateContainerConfigError)."""


# (resource, namespace, name) -> the object or None; resource is "configmaps" or "secrets".
Lookup = Callable[[str, str, str], dict[str, Any] | None]


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ is a literal $."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i) and (end := text.find(")", i + 2)) != -1:
            name = text[i + 2 : end]
            out.append(env.get(name, text[i : end + 1]))
            i = end + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """A downward-API fieldRef, resolved like a kubelet does."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    for kind in ("labels", "annotations"):
        prefix = f"metadata.{kind}['"
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(kind) or {}).get(path[len(prefix) : -2], ""))
    raise ConfigError(f"fieldRef {path!r} is not supported")


def _source(
    lookup: Lookup, resource: str, namespace: str, ref: Mapping[str, Any]
) -> dict[str, str]:
    """The string data of a ConfigMap or Secret ({} when optional and missing)."""
    obj = lookup(resource, namespace, ref["name"])
    if obj is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f"{resource[:-1]} {ref['name']!r} not found")
    if resource == "secrets":
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
    return dict(obj.get("data") or {})


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str, host_ip: str, lookup: Lookup
) -> dict[str, str]:
    """envFrom, then env in order; a value sees the variables defined before it."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            data = _source(lookup, "configmaps", namespace, source["configMapRef"])
        else:
            data = _source(lookup, "secrets", namespace, source["secretRef"])
        env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name, value_from = var["name"], var.get("valueFrom")
        if value_from is None:
            env[name] = expand(var.get("value", ""), env)
        elif "fieldRef" in value_from:
            env[name] = field_value(pod, value_from["fieldRef"]["fieldPath"], pod_ip, host_ip)
        elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
            secret = "secretKeyRef" in value_from
            ref = value_from["secretKeyRef" if secret else "configMapKeyRef"]
            data = _source(lookup, "secrets" if secret else "configmaps", namespace, ref)
            if ref["key"] in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional") and data:
                raise ConfigError(f"key {ref['key']!r} not in {ref['name']!r}")
        else:
            raise ConfigError(f"env {name}: only fieldRef, configMapKeyRef and secretKeyRef")
    return env


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args, expanded; `python`/`python3` is the project's interpreter."""
    argv = [
        expand(a, env) for a in [*(container.get("command") or []), *(container.get("args") or [])]
    ]
    if not argv:
        raise ConfigError(
            f"container {container['name']!r} has no command: the local node agent cannot run "
            "an image's entrypoint, so give the container a command"
        )
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def resolve_executable(name: str, path: str) -> str | None:
    """Where a container's program is: relative paths are relative to the repository root."""
    if "/" in name:
        candidate = REPO_ROOT / name
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which(name, path=path)


def pod_hostname(pod: Mapping[str, Any]) -> str:
    return str(pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]


def hosts_file(pod: Mapping[str, Any], ip: str) -> str:
    """The /etc/hosts a kubelet writes: loopback names and the pod's own name(s)."""
    hostname, subdomain = pod_hostname(pod), pod["spec"].get("subdomain")
    names = hostname
    if subdomain:
        names = (
            f"{hostname}.{subdomain}.{pod['metadata']['namespace']}.svc.cluster.local {hostname}"
        )
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{names}\n"


def base_env(pod: Mapping[str, Any]) -> dict[str, str]:
    """What an image would provide: a PATH with the project's interpreter first, a HOME."""
    venv_bin = str(Path(sys.executable).parent)
    system = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return {
        "PATH": f"{venv_bin}:{system}",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "HOSTNAME": pod_hostname(pod),
    }


def pod_dir(state_dir: Path, namespace: str, name: str, uid: str) -> Path:
    """A pod's files: logs (<container>.log), token, kubeconfig."""
    return state_dir / "pods" / f"{namespace}_{name}_{uid[:8]}"


# -- process bookkeeping ----------------------------------------------------------------------


def _start_ticks(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def cleanup(state_dir: Path) -> list[str]:
    """Kills pod processes and removes namespaces a previous agent left (even if SIGKILLed)."""
    for record in sorted((state_dir / "pids").glob("*")):
        try:
            pid, ticks = record.read_text().split()
        except (OSError, ValueError):
            continue
        if _start_ticks(int(pid)) == ticks:
            _signal_group(int(pid), signal.SIGKILL)
        record.unlink(missing_ok=True)
    (state_dir / SOCKET_NAME).unlink(missing_ok=True)
    return netns.teardown(state_dir)


# -- the agent --------------------------------------------------------------------------------


@dataclass
class NodeState:
    spec: NodeSpec
    host_ip: str
    up: bool = True
    registered: bool = False
    uid: str = ""
    ready_since: str = ""
    status_due: float = 0.0


@dataclass
class PodRun:
    """What the agent knows of one pod it runs (a kubelet's pod worker)."""

    uid: str
    namespace: str
    name: str
    node: str
    dir: Path
    host_ip: str
    start_time: str
    grace: int
    net: netns.PodNetwork | None = None
    ip: str = ""
    proc: subprocess.Popen[bytes] | None = None
    container_id: str = ""
    started_at: str = ""
    started: float = 0.0
    phase: str = "Pending"
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    restart_pending: bool = False
    backoff_step: int = 0
    not_before: float = 0.0
    kill_at: float | None = None
    token_refresh_at: float = 0.0
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    reported: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Command:
    """A control request from the CLI, executed by the agent's main loop."""

    name: str
    node: str = ""
    kill_pods: bool = False
    reply: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


def _deletion_grace(pod: Mapping[str, Any]) -> int:
    meta = pod["metadata"]
    if meta.get("deletionGracePeriodSeconds") is not None:
        return int(meta["deletionGracePeriodSeconds"])
    return int(pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE))


class NodeAgent:
    """The kubelet stand-in for every node of one cluster description."""

    def __init__(
        self,
        api: KubeApi,
        spec: ClusterSpec,
        state_dir: Path,
        network: netns.Network,
        say: Callable[[str], None],
    ) -> None:
        self.api, self.state_dir, self.network, self.say = api, state_dir, network, say
        self.nodes = {n.name: NodeState(n, network.host_ip(n.index)) for n in spec.nodes()}
        self.runs: dict[str, PodRun] = {}
        self._pods: dict[str, dict[str, Any]] = {}
        self._pods_lock = threading.Lock()
        self._gone: set[str] = set()
        self._queue: queue.Queue[Command | None] = queue.Queue()
        self._stop = threading.Event()
        self._beat = threading.Event()
        server = urllib.parse.urlsplit(api.server)
        self.api_port = server.port or 443
        self.relay = netns.Relay(server.hostname or "127.0.0.1", self.api_port)
        self._tls_name = (
            server.hostname if server.hostname not in ("127.0.0.1", "localhost") else None
        )
        self.kubelet_api = KubeletApi(self._container_log, state_dir / "kubelet")

    # -- nodes ------------------------------------------------------------------------------

    def register(self, node: NodeState) -> None:
        """Creates (or updates) the Node, posts its capacity and Ready, renews its Lease."""
        obj = node_object(node.spec, node.host_ip, self.kubelet_api.port)
        try:
            created = self.api.call("POST", "/api/v1/nodes", obj)
        except ApiError as err:
            if err.status != 409:
                raise
            created = self.api.patch(
                f"/api/v1/nodes/{node.spec.name}", {"metadata": {"labels": node.spec.labels()}}
            )
        node.uid = created["metadata"]["uid"]
        node.registered = node.up = True
        node.ready_since = _now()
        self._post_status(node, obj["status"])
        self._renew_lease(node)

    def _post_status(self, node: NodeState, extra: Mapping[str, Any] | None = None) -> None:
        now = _now()
        pressure = {
            "MemoryPressure": "KubeletHasSufficientMemory",
            "DiskPressure": "KubeletHasNoDiskPressure",
            "PIDPressure": "KubeletHasSufficientPID",
        }
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": reason,
                "lastHeartbeatTime": now,
                "lastTransitionTime": node.ready_since,
            }
            for kind, reason in pressure.items()
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "ddl node agent is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": node.ready_since,
            }
        )
        self.api.patch(
            f"/api/v1/nodes/{node.spec.name}/status",
            {"status": {**(extra or {}), "conditions": conditions}},
        )
        node.status_due = time.monotonic() + STATUS_SECONDS

    def _renew_lease(self, node: NodeState) -> None:
        name = node.spec.name
        spec = {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _micro_now(),
        }
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        try:
            self.api.patch(f"{path}/{name}", {"spec": spec})
        except ApiError as err:
            if err.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.uid}
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "namespace": LEASE_NAMESPACE,
                    "ownerReferences": [owner],
                },
                "spec": spec,
            }
            self.api.call("POST", path, lease)

    def _heartbeats(self) -> None:
        while not self._stop.is_set():
            for node in list(self.nodes.values()):
                if not (node.up and node.registered):
                    continue
                try:
                    self._renew_lease(node)
                    if time.monotonic() >= node.status_due:
                        self._post_status(node)
                except (ApiError, OSError) as err:
                    self.say(f"heartbeat of {node.spec.name} failed: {err}")
            self._beat.wait(HEARTBEAT_SECONDS)
            self._beat.clear()

    # -- pods from the API ------------------------------------------------------------------

    def _watch_pods(self) -> None:
        """List, then watch, every bound pod; relist when the watch's version is gone."""
        query = {"fieldSelector": "spec.nodeName!="}
        while not self._stop.is_set():
            try:
                listing = self.api.call("GET", "/api/v1/pods", query=query)
                with self._pods_lock:
                    self._pods = {p["metadata"]["uid"]: p for p in listing["items"]}
                version = listing["metadata"]["resourceVersion"]
                self._queue.put(None)
                while not self._stop.is_set():
                    q = {**query, "resourceVersion": version, "allowWatchBookmarks": "true"}
                    for event in self.api.watch("/api/v1/pods", q, 240):
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiError(int(obj.get("code", 500)), obj.get("message", ""))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        with self._pods_lock:
                            if event["type"] == "DELETED":
                                self._pods.pop(obj["metadata"]["uid"], None)
                            else:
                                self._pods[obj["metadata"]["uid"]] = obj
                        self._queue.put(None)
            except (ApiError, OSError, ValueError) as err:
                if not (isinstance(err, ApiError) and err.status == 410):
                    self.say(f"pod watch: {err}; listing again")
                    self._stop.wait(1)

    def _lookup(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.call("GET", f"/api/v1/namespaces/{namespace}/{resource}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    # -- the sync loop ----------------------------------------------------------------------

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._heartbeats, name="heartbeats", daemon=True),
            threading.Thread(target=self._watch_pods, name="pod-watch", daemon=True),
            threading.Thread(target=self._serve_control, name="control", daemon=True),
        ]
        for thread in threads:
            thread.start()
        self.say(
            f"ready: {len(self.nodes)} nodes ({', '.join(self.nodes)}), network "
            f"{self.network.mode}, control socket {self.state_dir / SOCKET_NAME}"
        )
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=SYNC_SECONDS)
                while True:
                    if item is not None:
                        self._execute(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            self._reconcile()
        self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)

    def _reconcile(self) -> None:
        with self._pods_lock:
            pods = dict(self._pods)
        self._gone &= set(pods)
        for uid, pod in pods.items():
            node = self.nodes.get(pod["spec"].get("nodeName", ""))
            if node is None or not (node.registered and node.up) or uid in self._gone:
                continue
            try:
                self._sync(pod)
            except (ApiError, OSError, netns.NetworkError) as err:
                self.say(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}: {err}")
        for uid in [u for u in self.runs if u not in pods]:
            run = self.runs[uid]
            if self.nodes[run.node].up:
                self._orphan(run)

    def _sync(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        run = self.runs.get(meta["uid"])
        deleting = bool(meta.get("deletionTimestamp"))
        if run is None:
            if (pod.get("status") or {}).get("phase") in TERMINAL:
                return
            if deleting:
                self._delete_pod(pod)
                return
            run = self._admit(pod)
        self._poll(run, pod)
        if deleting:
            if run.proc is not None:
                self._terminate(run, _deletion_grace(pod))
                return
            self._report(run, pod)
            self._release(run)
            self._delete_pod(pod)
            del self.runs[run.uid]
            return
        if run.phase not in TERMINAL:
            if run.proc is None and time.monotonic() >= run.not_before:
                self._start(run, pod)
            elif run.proc is not None and time.monotonic() >= run.token_refresh_at:
                self._write_token(run, pod)
        self._report(run, pod)

    def _admit(self, pod: dict[str, Any]) -> PodRun:
        meta, spec = pod["metadata"], pod["spec"]
        status = pod.get("status") or {}
        node = self.nodes[spec["nodeName"]]
        run = PodRun(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            node=node.spec.name,
            dir=pod_dir(self.state_dir, meta["namespace"], meta["name"], meta["uid"]),
            host_ip=node.host_ip,
            start_time=status.get("startTime") or _now(),
            grace=int(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)),
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        # A pod this node already ran (the agent restarted) keeps its address where it can.
        run.net = self.network.add_pod(node.spec.index, status.get("podIP"))
        run.ip = run.net.ip
        if run.net.netns is not None:
            try:
                self.relay.add(run.uid, netns.listen_in(run.net, self.api_port))
            except OSError:
                self.network.remove_pod(run.net)
                raise
        self.runs[run.uid] = run
        if status.get("phase") == "Running":
            # A previous agent ran it: carry on from what it reported.
            previous = (status.get("containerStatuses") or [{}])[0]
            run.phase = "Running"
            run.restarts = int(previous.get("restartCount", 0))
            run.last_state = previous.get("lastState") or {}
            if "running" in previous.get("state", {}):
                # Its process died with that agent: report it like a container crash.
                run.started_at = previous["state"]["running"].get("startedAt", "")
                self._exited(run, pod, 137, "the node agent restarted and the container was lost")
            else:
                run.restart_pending = True
        return run

    def _start(self, run: PodRun, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        env = base_env(pod)
        try:
            kubeconfig = self._write_token(run, pod)
            if kubeconfig is not None:
                env["KUBECONFIG"] = str(kubeconfig)
            env.update(container_env(pod, container, run.ip, run.host_ip, self._lookup))
            argv = container_argv(container, env)
        except (ConfigError, ApiError) as err:
            reason = (
                "CreateContainerConfigError"
                if isinstance(err, ConfigError)
                else "ContainerCreating"
            )
            run.state = {"waiting": {"reason": reason, "message": str(err)}}
            run.not_before = time.monotonic() + CONFIG_RETRY_SECONDS
            return
        if run.restart_pending:
            run.restarts += 1
            run.restart_pending = False
        run.started_at, run.started = _now(), time.monotonic()
        program = resolve_executable(argv[0], env["PATH"])
        if program is None:
            self._exited(
                run, pod, 128, f'exec: "{argv[0]}": executable file not found', "StartError"
            )
            return
        assert run.net is not None
        hosts = run.dir / "hosts"
        hosts.write_text(hosts_file(pod, run.ip))
        sandbox = self.network.command_prefix(run.net, pod_hostname(pod), hosts)
        with (run.dir / f"{container['name']}.log").open("ab") as log:
            run.proc = subprocess.Popen(
                [*sandbox, program, *argv[1:]],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pids = self.state_dir / "pids"
        pids.mkdir(exist_ok=True)
        (pids / run.uid).write_text(f"{run.proc.pid} {_start_ticks(run.proc.pid)}")
        run.container_id = f"local://{run.proc.pid}"
        run.state = {"running": {"startedAt": run.started_at}}
        run.phase = "Running"
        run.kill_at = None

    def _write_token(self, run: PodRun, pod: Mapping[str, Any]) -> Path | None:
        """A pod-bound token of the pod's service account and a KUBECONFIG that uses it."""
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is False:
            run.token_refresh_at = float("inf")
            return None
        account = spec.get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": TOKEN_SECONDS,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": run.name,
                    "uid": run.uid,
                },
            },
        }
        answer = self.api.call(
            "POST", f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{account}/token", request
        )
        token_file, kubeconfig = run.dir / "token", run.dir / "kubeconfig"
        _write_private(token_file, answer["status"]["token"].encode())
        # Refreshed at 80% of its life, like the kubelet; clients that re-read tokenFile follow.
        run.token_refresh_at = time.monotonic() + 0.8 * TOKEN_SECONDS
        cluster: dict[str, Any] = {
            "server": self.api.server,
            "certificate-authority": str(self.api.ca_file.resolve()),
        }
        if self.network.mode == "netns":
            # The relay listens on the pod's own loopback; the name still matches the cert.
            cluster["server"] = f"https://127.0.0.1:{self.api_port}"
            if self._tls_name:
                cluster["tls-server-name"] = self._tls_name
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": account, "user": {"tokenFile": str(token_file)}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "local", "user": account, "namespace": run.namespace},
                }
            ],
            "current-context": "pod",
        }
        _write_private(kubeconfig, yaml.safe_dump(config, sort_keys=False).encode())
        return kubeconfig

    def _poll(self, run: PodRun, pod: dict[str, Any]) -> None:
        if run.proc is None or (code := run.proc.poll()) is None:
            return
        # A killed process reports -signal; a container runtime reports 128 + signal.
        self._exited(run, pod, code if code >= 0 else 128 - code)

    def _exited(
        self, run: PodRun, pod: Mapping[str, Any], code: int, message: str = "", reason: str = ""
    ) -> None:
        """Records a container's end and applies the restart policy."""
        if run.proc is not None:
            # Like a container runtime: the main process's end ends the whole container.
            _signal_group(run.proc.pid, signal.SIGKILL)
            run.proc = None
        (self.state_dir / "pids" / run.uid).unlink(missing_ok=True)
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": run.started_at or None,
            "finishedAt": _now(),
        }
        if run.container_id:
            terminated["containerID"] = run.container_id
        if message:
            terminated["message"] = message
        policy = pod["spec"].get("restartPolicy", "Always")
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if not deleting and (policy == "Always" or (policy == "OnFailure" and code != 0)):
            if time.monotonic() - run.started >= BACKOFF_RESET_SECONDS:
                run.backoff_step = 0
            delay = 0.0 if run.backoff_step == 0 else BACKOFF_FIRST * 2 ** (run.backoff_step - 1)
            delay = min(delay, BACKOFF_MAX)
            run.backoff_step += 1
            run.last_state = {"terminated": terminated}
            run.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:.0f}s restarting failed container",
                }
            }
            run.not_before = time.monotonic() + delay
            run.restart_pending = True
            return
        run.state = {"terminated": terminated}
        run.phase = "Succeeded" if code == 0 else "Failed"
        self._release(run)

    def _terminate(self, run: PodRun, grace: int) -> None:
        """SIGTERM to the process group now, SIGKILL once the grace period is over."""
        assert run.proc is not None
        if run.kill_at is None:
            _signal_group(run.proc.pid, signal.SIGTERM)
            run.kill_at = time.monotonic() + grace
        elif time.monotonic() >= run.kill_at:
            _signal_group(run.proc.pid, signal.SIGKILL)

    def _orphan(self, run: PodRun) -> None:
        """The pod object is gone (force-deleted): stop its process, then forget it."""
        if run.proc is not None and run.proc.poll() is None:
            self._terminate(run, run.grace)
            return
        run.proc = None
        (self.state_dir / "pids" / run.uid).unlink(missing_ok=True)
        self._release(run)
        del self.runs[run.uid]

    def _release(self, run: PodRun) -> None:
        """Gives back the pod's namespace and address (the status keeps showing its IP)."""
        if run.net is None:
            return
        if run.net.netns is not None:
            self.relay.remove(run.uid)
        self.network.remove_pod(run.net)
        run.net = None

    def _delete_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self.api.call(
                "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", options
            )
        except ApiError as err:
            if err.status not in (404, 409):
                raise
        self._gone.add(meta["uid"])

    # -- status -----------------------------------------------------------------------------

    def _condition(self, run: PodRun, kind: str, ok: bool, reason: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        previous = run.transitions.get(kind)
        if previous is None or previous[0] != status:
            run.transitions[kind] = (status, _now())
        cond = {"type": kind, "status": status, "lastTransitionTime": run.transitions[kind][1]}
        if reason and not ok:
            cond["reason"] = reason
        return cond

    def pod_status(self, run: PodRun, pod: Mapping[str, Any]) -> dict[str, Any]:
        container = pod["spec"]["containers"][0]
        running = "running" in run.state
        not_ready = "PodCompleted" if run.phase in TERMINAL else "ContainersNotReady"
        scheduled = next(
            (
                c
                for c in (pod.get("status") or {}).get("conditions") or []
                if c.get("type") == "PodScheduled"
            ),
            None,
        ) or self._condition(run, "PodScheduled", True)
        container_status: dict[str, Any] = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": running,
            "started": running,
            "restartCount": run.restarts,
            "state": run.state,
            "lastState": run.last_state,
        }
        if run.container_id:
            container_status["containerID"] = run.container_id
        ips = [{"ip": run.ip}] if run.ip else []
        return {
            "phase": run.phase,
            "hostIP": run.host_ip,
            "hostIPs": [{"ip": run.host_ip}],
            "podIP": run.ip or None,
            "podIPs": ips or None,
            "startTime": run.start_time,
            "conditions": [
                self._condition(run, "PodReadyToStartContainers", run.net is not None),
                self._condition(run, "Initialized", True),
                self._condition(run, "Ready", running, not_ready),
                self._condition(run, "ContainersReady", running, not_ready),
                scheduled,
            ],
            "containerStatuses": [container_status],
        }

    def _report(self, run: PodRun, pod: Mapping[str, Any]) -> None:
        """One status write when something changed since the last one."""
        status = self.pod_status(run, pod)
        text = json.dumps(status, sort_keys=True)
        if text == run.reported:
            return
        try:
            self.api.patch(
                f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status}
            )
        except ApiError as err:
            if err.status != 404:
                raise
        run.reported = text

    # -- control ----------------------------------------------------------------------------

    def _serve_control(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(self.state_dir / SOCKET_NAME))
            server.listen(8)
            server.settimeout(0.5)
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(60)
                    try:
                        request = json.loads(conn.makefile("r").readline())
                        command = Command(
                            request["command"],
                            request.get("node", ""),
                            request.get("kill_pods", False),
                        )
                    except (ValueError, KeyError, OSError) as err:
                        conn.sendall(
                            json.dumps({"ok": False, "message": str(err)}).encode() + b"\n"
                        )
                        continue
                    self._queue.put(command)
                    if not command.done.wait(60):
                        command.reply = {"ok": False, "message": "the agent did not answer"}
                    with contextlib.suppress(OSError):
                        conn.sendall(json.dumps(command.reply).encode() + b"\n")

    def _execute(self, command: Command) -> None:
        try:
            command.reply = {"ok": True, "message": self._command(command)}
        except (ApiError, OSError, ValueError, netns.NetworkError) as err:
            command.reply = {"ok": False, "message": str(err)}
        command.done.set()

    def _command(self, command: Command) -> Any:
        if command.name == "status":
            return {
                "network": self.network.mode,
                "nodes": {
                    n: ("deleted" if not s.registered else "up" if s.up else "down")
                    for n, s in self.nodes.items()
                },
                "pods": {
                    r.key: {"node": r.node, "phase": r.phase, "ip": r.ip, "restarts": r.restarts}
                    for r in self.runs.values()
                },
            }
        node = self.nodes.get(command.node)
        if node is None:
            raise ValueError(f"no node {command.node!r} here (nodes: {', '.join(self.nodes)})")
        if command.name == "node-down":
            node.up = False
            killed = self._kill_node_pods(node, forget=False) if command.kill_pods else 0
            return (
                f"{node.spec.name}: heartbeats stopped"
                + (f", {killed} pod processes killed" if command.kill_pods else "")
                + "; the controller-manager marks it NotReady after its grace period"
            )
        if command.name == "node-up":
            if not node.registered:
                self.register(node)
                return f"{node.spec.name}: registered again"
            node.up = True
            node.ready_since = _now()
            self._post_status(node)
            self._renew_lease(node)
            self._beat.set()
            return f"{node.spec.name}: heartbeats resumed, Ready posted"
        if command.name == "node-delete":
            killed = self._kill_node_pods(node, forget=True)
            node.registered = node.up = False
            for path in (
                f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{node.spec.name}",
                f"/api/v1/nodes/{node.spec.name}",
            ):
                with contextlib.suppress(ApiError):
                    self.api.call("DELETE", path)
            return f"{node.spec.name}: deleted ({killed} pod processes killed)"
        raise ValueError(f"unknown command {command.name!r}")

    def _kill_node_pods(self, node: NodeState, forget: bool) -> int:
        """SIGKILLs a node's pod processes, as if the machine died; `forget` drops them too."""
        killed = 0
        for run in [r for r in self.runs.values() if r.node == node.spec.name]:
            if run.proc is not None and run.proc.poll() is None:
                _signal_group(run.proc.pid, signal.SIGKILL)
                killed += 1
            if forget:
                if run.proc is not None:
                    run.proc.wait()
                    run.proc = None
                (self.state_dir / "pids" / run.uid).unlink(missing_ok=True)
                self._release(run)
                del self.runs[run.uid]
        return killed

    def _container_log(self, namespace: str, name: str, container: str) -> ContainerLog:
        """Answers `kubectl logs` (through the kubelet API, on its threads): the newest run."""
        key = f"{namespace}/{name}"
        run = next((r for r in reversed(list(self.runs.values())) if r.key == key), None)
        if run is None:
            raise LogError(404, f'pod "{name}" in namespace "{namespace}" is not on this agent')
        with self._pods_lock:
            pod = self._pods.get(run.uid) or {}
        names = [c["name"] for c in pod.get("spec", {}).get("containers", [])]
        if names and container not in names:
            raise LogError(400, f"container {container} is not valid for pod {name}")
        if names and container != names[0]:
            raise LogError(
                400, f"the local node agent runs only a pod's first container ({names[0]})"
            )
        path = run.dir / f"{container}.log"
        if not path.exists():
            reason = run.state.get("waiting", {}).get("reason", "ContainerCreating")
            raise LogError(
                400, f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        proc = run.proc
        return ContainerLog(path, lambda: proc is not None and proc.poll() is None)

    def _shutdown(self) -> None:
        """Stops every pod process (TERM, then KILL) and removes the emulated network."""
        live = [r for r in self.runs.values() if r.proc is not None and r.proc.poll() is None]
        for run in live:
            assert run.proc is not None
            _signal_group(run.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline and any(
            r.proc is not None and r.proc.poll() is None for r in live
        ):
            time.sleep(0.1)
        for run in live:
            assert run.proc is not None
            _signal_group(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        self.relay.close()
        self.kubelet_api.close()
        removed = cleanup(self.state_dir)
        self.say(f"stopped: {len(live)} pod processes ended, {len(removed)} namespaces removed")


# -- command line -----------------------------------------------------------------------------


def default_state_dir() -> Path:
    """Next to the default control plane's state (ddl-cluster's --dir)."""
    base = os.environ.get("DDL_CLUSTER_DIR") or str(cache_dir() / "cluster")
    return Path(base) / "nodeagent"


def send(state_dir: Path, request: Mapping[str, Any], timeout: float = 90) -> dict[str, Any]:
    """One request to a running agent over its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(state_dir / SOCKET_NAME))
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("r").readline())
        return answer


def _say(message: str) -> None:
    print(f"[nodeagent] {message}", flush=True)


def run_agent(kubeconfig: Path, cluster: Path, state_dir: Path, network_mode: str) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    if len(str(state_dir / SOCKET_NAME)) > 100:
        raise ValueError(
            f"state dir {state_dir} is too long for a unix socket path; use a shorter one"
        )
    spec = ClusterSpec.load(cluster)
    if left := cleanup(state_dir):
        _say(f"removed {len(left)} namespaces a previous agent left in {state_dir}")
    api = KubeApi(kubeconfig, state_dir)
    network = netns.setup(state_dir, spec, network_mode, _say)
    agent = NodeAgent(api, spec, state_dir, network, _say)
    try:
        for node in agent.nodes.values():
            agent.register(node)
    except BaseException:
        agent.relay.close()
        agent.kubelet_api.close()
        cleanup(state_dir)
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ddl_localcluster.nodeagent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[common])

    run = command("run", "register the nodes and run their pods until SIGTERM")
    run.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"))
    run.add_argument("--cluster", type=Path, default=DEFAULT_CLUSTER)
    run.add_argument(
        "--network",
        choices=("auto", "netns", "loopback"),
        default="auto",
        help="auto: namespaces where root allows, else loopback addresses",
    )
    down = command("node-down", "stop a node's heartbeats (it turns NotReady)")
    down.add_argument("node")
    down.add_argument("--kill-pods", action="store_true", help="also SIGKILL its pods' processes")
    for name, text in (
        ("node-up", "resume a node (or register a deleted one again)"),
        ("node-delete", "kill a node's pods and delete the Node"),
    ):
        command(name, text).add_argument("node")
    command("status", "nodes and pods of the running agent (JSON)")
    command("teardown", "kill leftover pods and remove namespaces (after a crash)")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir
    try:
        if args.command == "run":
            if args.kubeconfig is None:
                parser.error("--kubeconfig (or KUBECONFIG) is required")
            return run_agent(args.kubeconfig, args.cluster, state_dir, args.network)
        if args.command == "teardown":
            removed = cleanup(state_dir)
            print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
            return 0
        request = {
            "command": args.command,
            "node": getattr(args, "node", ""),
            "kill_pods": getattr(args, "kill_pods", False),
        }
        answer = send(state_dir, request)
    except (OSError, ValueError, TopologyError, ApiError, netns.NetworkError) as err:
        print(f"nodeagent: {err}", file=sys.stderr)
        return 1
    message = answer.get("message")
    print(message if isinstance(message, str) else json.dumps(message, indent=2))
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
