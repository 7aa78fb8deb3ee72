"""The node/GPU cache against the real API server: it converges after its watches break."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Final

import pytest
from kubernetes import client

from ddl_localcluster.controlplane import ControlPlane
from ddl_operator.api import constants as c
from ddl_operator.apiclient import load_client
from ddl_operator.cache import (
    ACTIVE_PODS,
    WORKER_PODS,
    Callbacks,
    ClusterCache,
    Worker,
    worker_record,
)
from ddl_operator.core.ledger import NodeFacts, PodCharge, PodKey, node_facts, pod_charge, pod_key

from kubetools import Kubectl, fake_node

pytestmark = pytest.mark.integration


class Proxy:
    """A TCP relay in front of the API server that can cut every connection through it and
    refuse new ones until restored (TLS passes through untouched)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.pairs.append((conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def sever(self) -> None:
        self.open.clear()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            _shut(*pair)

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.sever()
        self.listener.close()


def _shut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Gone:
    """A watch response whose only event is the API server's 410 for a resourceVersion it
    no longer holds (what a watch resuming after a long outage gets)."""

    LINE: Final = json.dumps(
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": "too old resource version",
                "reason": "Expired",
                "code": 410,
            },
        }
    ).encode()

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        yield self.LINE + b"\n"

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class ExpiringApi(client.CoreV1Api):  # type: ignore[misc]
    """The API, except that when armed, the next watch of each kind is answered 410 Gone."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(api)
        self.armed: set[str] = set()

    def _call(self, kind: str, call: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("watch") and kind in self.armed:
            self.armed.discard(kind)
            return Gone()
        return call(**kwargs)

    def list_node(self, **kwargs: Any) -> Any:
        return self._call("nodes", super().list_node, kwargs)

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        kind = "workers" if kwargs.get("label_selector") == WORKER_PODS else "pods"
        return self._call(kind, super().list_pod_for_all_namespaces, kwargs)


@pytest.fixture
def direct(control_plane: ControlPlane) -> client.CoreV1Api:
    return client.CoreV1Api(load_client(str(control_plane.kubeconfig)))


@pytest.fixture
def proxy(control_plane: ControlPlane) -> Iterator[Proxy]:
    relay = Proxy(int(control_plane.state()["ports"]["apiserver"]))
    yield relay
    relay.close()


@pytest.fixture
def cache_api(control_plane: ControlPlane, proxy: Proxy) -> ExpiringApi:
    api = load_client(str(control_plane.kubeconfig))
    api.configuration.host = f"https://127.0.0.1:{proxy.port}"
    return ExpiringApi(api)


@pytest.fixture
def heard() -> dict[str, list[Any]]:
    return {"nodes": [], "freed": [], "workers": [], "relisted": []}


@pytest.fixture
def cache(cache_api: ExpiringApi, heard: dict[str, list[Any]]) -> Iterator[ClusterCache]:
    callbacks = Callbacks(
        node_changed=heard["nodes"].append,
        capacity_freed=heard["freed"].append,
        worker_event=heard["workers"].append,
        relisted=heard["relisted"].append,
    )
    # Small pages, so the relists page too.
    cached = ClusterCache(cache_api, callbacks, page_size=3)
    cached.start()
    assert cached.wait_synced(30), "the cache never synced"
    yield cached
    cached.stop()


def truth(
    api: client.CoreV1Api,
) -> tuple[dict[str, NodeFacts], dict[PodKey, PodCharge], dict[PodKey, Worker]]:
    """What fresh lists say, through the same pure translations."""
    nodes = json.loads(api.list_node(_preload_content=False).data)["items"]
    pods = json.loads(
        api.list_pod_for_all_namespaces(field_selector=ACTIVE_PODS, _preload_content=False).data
    )["items"]
    charges = {pod_key(p): ch for p in pods if (ch := pod_charge(p)) is not None}
    workers = json.loads(
        api.list_pod_for_all_namespaces(label_selector=WORKER_PODS, _preload_content=False).data
    )["items"]
    return (
        {n["metadata"]["name"]: node_facts(n) for n in nodes},
        charges,
        {pod_key(p): worker_record(p) for p in workers},
    )


def converged(cache: ClusterCache, api: client.CoreV1Api) -> Callable[[], str | None]:
    """None once the cache equals a fresh list, else what differs."""

    def check() -> str | None:
        nodes, charges, workers = truth(api)
        usage: dict[str, int] = {}
        for charge in charges.values():
            usage[charge.node] = usage.get(charge.node, 0) + charge.gpus
        if cache.nodes() != nodes:
            return f"nodes differ: {sorted(cache.nodes().keys() ^ nodes.keys())}"
        if cache.charges() != charges:
            return f"pods differ: {sorted(cache.charges().items() ^ charges.items())}"
        if cache.usage() != usage:
            return f"usage differs: {cache.usage()} != {usage}"
        if cache.workers() != workers:
            return f"workers differ: {sorted(cache.workers().items() ^ workers.items())}"
        return None

    return check


def wait_converged(cache: ClusterCache, api: client.CoreV1Api, timeout: float = 60) -> None:
    check = converged(cache, api)
    deadline = time.monotonic() + timeout
    while (diff := check()) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"cache did not converge in {timeout}s: {diff}")
        time.sleep(0.2)


def gpu_pod(name: str, node: str | None, gpus: int, worker_of: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if worker_of:
        meta["labels"] = {c.LABEL_JOB: worker_of, c.LABEL_ROLE: "worker"}
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": "trainer",
                "resources": {"limits": {c.GPU_RESOURCE: str(gpus)}} if gpus else {},
            }
        ],
        "restartPolicy": "Never",
    }
    if node:
        spec["nodeName"] = node
    else:
        spec["schedulerName"] = "nobody"  # stays unbound
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def apply_all(kubectl: Kubectl, ns: str, docs: list[dict[str, Any]]) -> None:
    kubectl.run(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
    )


def finish(kubectl: Kubectl, ns: str, pod: str) -> None:
    """Mark a pod Succeeded, as a kubelet would (it leaves the cache's watch)."""
    kubectl.run(
        "patch",
        "pod",
        pod,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"phase": "Succeeded"}}),
    )


def test_cache_converges_after_its_watches_break(
    kubectl: Kubectl,
    namespace: str,
    direct: client.CoreV1Api,
    proxy: Proxy,
    cache_api: ExpiringApi,
    cache: ClusterCache,
    heard: dict[str, list[Any]],
) -> None:
    tag = uuid.uuid4().hex[:6]
    names = [f"c{tag}-{i}" for i in range(4)]
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "List",
                "items": [fake_node(n, {"ddl-test": tag}, gpus=8) for n in names],
            }
        ),
    )
    apply_all(
        kubectl,
        namespace,
        [
            gpu_pod("a", names[0], 4),
            gpu_pod("b", names[0], 2),
            gpu_pod("w0", names[1], 8, worker_of="train"),
            gpu_pod("w1", names[2], 0, worker_of="train"),
            gpu_pod("cpu", names[2], 0),
            gpu_pod("pending", None, 8),
        ],
    )
    wait_converged(cache, direct)
    assert cache.usage()[names[0]] == 6
    assert {(namespace, "cpu"), (namespace, "pending")}.isdisjoint(cache.charges())
    assert set(names) <= set(heard["nodes"])
    assert (namespace, "train") in heard["workers"]

    # 1. Every connection through the relay is cut and refused; the cluster moves on.
    proxy.sever()
    kubectl.run("delete", "node", names[3])
    kubectl.run(
        "apply",
        "-f",
        "-",
        input=json.dumps(fake_node(f"c{tag}-new", {"ddl-test": tag}, gpus=4)),
    )
    kubectl.run("delete", "pod", "b", "-n", namespace, "--grace-period=0", "--force")
    finish(kubectl, namespace, "a")
    finish(kubectl, namespace, "w1")  # leaves the active pods, stays with its job's workers
    apply_all(kubectl, namespace, [gpu_pod("c", f"c{tag}-new", 3)])
    time.sleep(2)  # the cache's retries meet a closed door meanwhile
    proxy.restore()
    wait_converged(cache, direct)
    assert names[0] not in cache.usage()
    assert cache.usage()[f"c{tag}-new"] == 3
    assert cache.workers()[(namespace, "w1")].view.phase == "Succeeded"

    # 2. Cut again, and the watches that resume are told 410 Gone: the events missed
    #    meanwhile are never replayed, so only a relist can bring in what changed.
    lists_before = cache.relists("nodes"), cache.relists("pods"), cache.relists("workers")
    cache_api.armed.update({"nodes", "pods", "workers"})
    proxy.sever()
    kubectl.run("delete", "node", names[2])
    kubectl.run("delete", "pod", "w0", "-n", namespace, "--grace-period=0", "--force")
    apply_all(kubectl, namespace, [gpu_pod("d", names[1], 1)])
    proxy.restore()
    wait_converged(cache, direct)
    assert cache.relists("nodes") > lists_before[0]
    assert cache.relists("pods") > lists_before[1]
    assert cache.relists("workers") > lists_before[2]
    assert not cache_api.armed, "every watch resumed after the break"
    assert set(heard["relisted"]) >= {"nodes", "pods", "workers"}
    assert (namespace, "w0") not in cache.workers()
    assert cache.usage()[names[1]] == 1
    assert names[1] in {n for freed in heard["freed"] for n in freed}

    kubectl.run("delete", "nodes", "-l", f"ddl-test={tag}", "--wait=false")
