"""An in-memory stand-in for the two CoreV1Api calls the cache makes (paged lists and
watches answered as raw JSON), for unit tests that need no API server."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client

from ddl_operator.api import constants as c
from ddl_operator.core.render import ANNOTATION_NODE

_END = b""  # pushed to end a watch, as the server does when timeoutSeconds passes


def as_manifest(obj: Any) -> dict[str, Any]:
    """A client model as the API serves it (camelCase JSON)."""
    out: dict[str, Any] = client.ApiClient().sanitize_for_serialization(obj)
    return out


def make_pod(
    name: str = "p",
    namespace: str = "ml",
    node: str | None = None,
    gpus: int | None = 8,
    uid: str = "u1",
    worker_of: str | None = None,
    reserved_on: str | None = None,
    init_gpus: int | None = None,
) -> dict[str, Any]:
    """A pod manifest as the API serves it; `worker_of` makes it one of our workers."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid}
    if worker_of:
        meta["labels"] = {c.LABEL_JOB: worker_of, c.LABEL_ROLE: "worker"}
        meta["ownerReferences"] = [
            {
                "apiVersion": c.API_VERSION,
                "kind": c.KIND,
                "name": worker_of,
                "uid": "job-uid",
                "controller": True,
            }
        ]
    if reserved_on:
        meta["annotations"] = {ANNOTATION_NODE: reserved_on}
    spec: dict[str, Any] = {
        "containers": [
            {"name": "main", "resources": {"limits": {c.GPU_RESOURCE: str(gpus)}} if gpus else {}}
        ]
    }
    if init_gpus is not None:
        spec["initContainers"] = [
            {"name": "init", "resources": {"requests": {c.GPU_RESOURCE: str(init_gpus)}}}
        ]
    if node:
        spec["nodeName"] = node
    return {"metadata": meta, "spec": spec, "status": {"phase": "Pending"}}


def make_node(
    name: str = "n1",
    gpus: str = "8",
    ready: str = "True",
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
    **labels: str,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {c.LABEL_HOSTNAME: name, **labels}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": {c.GPU_RESOURCE: gpus, "cpu": "64"},
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready},
            ],
        },
    }


class _Page:
    def __init__(self, body: dict[str, Any]) -> None:
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass


class _Watch:
    def __init__(self, matches: Callable[[dict[str, Any]], bool]) -> None:
        self.matches = matches
        self.events: queue.Queue[bytes] = queue.Queue()
        self.closed = threading.Event()

    def stream(self, amt: int | None = None, decode_content: bool = False) -> Iterator[bytes]:
        while not self.closed.is_set():
            try:
                line = self.events.get(timeout=0.02)
            except queue.Empty:
                continue
            if line == _END:
                return
            yield line + b"\n"

    def shutdown(self) -> None:
        self.closed.set()

    def close(self) -> None:
        self.closed.set()

    def release_conn(self) -> None:
        pass


def label_matcher(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    """The API server's equality-based label selector (`k=v`, `k!=v`, comma-separated)."""
    terms = [t for t in (selector or "").split(",") if t]

    def matches(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for term in terms:
            if "!=" in term:
                key, value = term.split("!=", 1)
                if labels.get(key) == value:
                    return False
            else:
                key, value = term.split("=", 1)
                if labels.get(key) != value:
                    return False
        return True

    return matches


class FakeCoreApi:
    """Holds nodes and pods; lists them in pages; streams what a test pushes to every watch
    whose label selector it matches, replaying what a watch started after missed (from the
    resourceVersion it asks for), as the API server does."""

    def __init__(
        self, nodes: list[dict[str, Any]] | None = None, pods: list[dict[str, Any]] | None = None
    ) -> None:
        self.objects = {"nodes": list(nodes or []), "pods": list(pods or [])}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.version = 100
        self._lock = threading.Lock()
        self._log: dict[str, list[tuple[int, dict[str, Any], bytes]]] = {"nodes": [], "pods": []}
        self._watches: dict[str, list[_Watch]] = {"nodes": [], "pods": []}
        self._raw: dict[str, list[bytes]] = {"nodes": [], "pods": []}  # for the next watch

    def list_node(self, **kwargs: Any) -> Any:
        return self._serve("nodes", kwargs)

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        return self._serve("pods", kwargs)

    def push(self, kind: str, type_: str, obj: dict[str, Any]) -> None:
        """Deliver one watch event (and keep the stored objects in step for later lists)."""
        with self._lock:
            self.version += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
            name = obj["metadata"]["name"]
            kept = [o for o in self.objects[kind] if o["metadata"]["name"] != name]
            self.objects[kind] = kept if type_ == "DELETED" else [*kept, obj]
            line = json.dumps({"type": type_, "object": obj}).encode()
            self._log[kind].append((self.version, obj, line))
            for watch in self._watches[kind]:
                if watch.matches(obj):
                    watch.events.put(line)

    def push_raw(self, kind: str, event: dict[str, Any]) -> None:
        """An event as is (an ERROR, a BOOKMARK) to every open watch of `kind`, or to the
        next one when none is open."""
        line = json.dumps(event).encode()
        with self._lock:
            open_now = [w for w in self._watches[kind] if not w.closed.is_set()]
            for watch in open_now:
                watch.events.put(line)
            if not open_now:
                self._raw[kind].append(line)

    def end_watch(self, kind: str) -> None:
        """The server's timeout: every open watch of `kind` ends."""
        with self._lock:
            for watch in self._watches[kind]:
                watch.events.put(_END)
            self._watches[kind] = []

    def _serve(self, kind: str, kwargs: dict[str, Any]) -> Any:
        matches = label_matcher(kwargs.get("label_selector"))
        with self._lock:
            self.calls.append((kind, kwargs))
            if kwargs.get("watch"):
                watch = _Watch(matches)
                since = int(kwargs.get("resource_version") or 0)
                for version, obj, line in self._log[kind]:
                    if version > since and matches(obj):
                        watch.events.put(line)
                for line in self._raw[kind]:
                    watch.events.put(line)
                self._raw[kind] = []
                self._watches[kind].append(watch)
                return watch
            objects = [o for o in self.objects[kind] if matches(o)]
            start = int(kwargs.get("_continue") or 0)
            limit = kwargs.get("limit") or len(objects) or 1
            items = objects[start : start + limit]
            more = start + limit < len(objects)
            meta = {
                "resourceVersion": str(self.version),
                **({"continue": str(start + limit)} if more else {}),
            }
            return _Page({"items": items, "metadata": meta})
