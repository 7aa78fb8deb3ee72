"""Nodes and GPU usage in memory, kept current by list-then-watch (client-go's informer
pattern), so a reconcile pass reads free capacity without listing the cluster.

Three watches, each on its own thread: every node; every pod that has not finished
(`status.phase!=Succeeded,status.phase!=Failed`, server-side; a pod that finishes leaves the
watch as a DELETED event); and the operator's worker pods in every phase (by label,
server-side), so a pass reads its own pods here instead of listing them. GPU requests cannot
be selected server-side, so each pod event is parsed as plain JSON (never into client
models) and reduced at once to what accounting needs (core/ledger.py); pods without GPUs
are not kept at all, and of a worker only the state machine's view is. What a pass reads of
the nodes, free GPUs as its template's constraints allow, is patched per event as well
(core/nodeviews.py), not rebuilt per read. Lists are paged, and
a watch resumes from the last resourceVersion it saw; on 410 Gone it relists. Callbacks
tell the controller which jobs an event may concern; they run on the watch threads and must
only enqueue.

A pass reads its pods here only once the worker watch has caught up with the operator's own
last write to them (resourceVersions of one type are ordered: core/versions.py), the
read-your-writes that client-go's controllers get from expectations; until then it lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from ddl_operator import metrics
from ddl_operator.api import constants as c
from ddl_operator.core.ledger import (
    Change,
    JobKey,
    Ledger,
    NodeFacts,
    PodCharge,
    PodKey,
    node_facts,
    pod_charge,
    pod_key,
    worker_job,
)
from ddl_operator.core.nodeviews import Constraints, NodeViews
from ddl_operator.core.podview import worker_view
from ddl_operator.core.reconcile import WorkerPod
from ddl_operator.core.topology import NodeInfo
from ddl_operator.core.versions import at_least

log = logging.getLogger(__name__)

ACTIVE_PODS: Final = "status.phase!=Succeeded,status.phase!=Failed"
WORKER_PODS: Final = f"{c.LABEL_ROLE}=worker"
PAGE_SIZE: Final = 500
WATCH_SECONDS: Final = 300  # the server ends a watch after this; the cache resumes it
CALL_TIMEOUT: Final = (5.0, 30.0)
BACKOFF_SECONDS: Final = (0.5, 30.0)  # first and largest wait after a failed list or watch


class _Gone(Exception):
    """The resourceVersion is too old to resume from (410): relist."""


def _nothing(*_: Any) -> None:
    return None


@dataclass
class Callbacks:
    """What the controller wants to hear. All run on a watch thread."""

    node_changed: Callable[[str], None] = _nothing  # facts of a node changed (or it came/went)
    capacity_freed: Callable[[frozenset[str]], None] = _nothing  # GPUs on these nodes freed
    worker_event: Callable[[JobKey], None] = _nothing  # a pod labelled as a job's worker moved
    relisted: Callable[[str], None] = _nothing  # a relist after the first: events were missed


@dataclass(frozen=True)
class Worker:
    """A worker pod as a pass reads it: the state machine's view, its uid and its owners."""

    view: WorkerPod
    uid: str
    owners: frozenset[str]  # uids


def worker_record(pod: Mapping[str, Any]) -> Worker:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return Worker(
        worker_view(pod),
        str((pod.get("metadata") or {}).get("uid", "")),
        frozenset(str(r.get("uid")) for r in refs if isinstance(r, Mapping) and r.get("uid")),
    )


@dataclass
class _Stream:
    """One list+watch loop."""

    kind: str
    list_fn: Callable[..., Any]
    selectors: Mapping[str, str]
    synced: threading.Event = field(default_factory=threading.Event)
    relists: int = 0
    response: Any = None  # the open watch, so stop() can close it
    version: str | None = None  # the last resourceVersion seen; None: list first


class ClusterCache:
    """Informer-style cache of nodes and of GPUs held per node, with assumed reservations."""

    def __init__(
        self,
        core: client.CoreV1Api,
        callbacks: Callbacks | None = None,
        page_size: int = PAGE_SIZE,
        watch_seconds: int = WATCH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.callbacks = callbacks or Callbacks()
        self.page_size = page_size
        self.watch_seconds = watch_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeFacts] = {}
        self._ledger = Ledger()
        self._views = NodeViews()  # free capacity per constraint set, patched per change
        self._workers: dict[JobKey, dict[str, Worker]] = {}  # job -> pod name -> worker
        self._worker_jobs: dict[PodKey, JobKey] = {}
        self._workers_version: str | None = None  # what the worker watch has caught up with
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._streams = {
            "nodes": _Stream("nodes", core.list_node, {}),
            "pods": _Stream(
                "pods", core.list_pod_for_all_namespaces, {"field_selector": ACTIVE_PODS}
            ),
            "workers": _Stream(
                "workers", core.list_pod_for_all_namespaces, {"label_selector": WORKER_PODS}
            ),
        }

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for stream in self._streams.values():
            thread = threading.Thread(
                target=self._run, args=(stream,), name=f"cache-{stream.kind}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for stream in self._streams.values():
            _interrupt(stream.response)
        for thread in self._threads:
            thread.join(timeout)

    @property
    def synced(self) -> bool:
        return all(s.synced.is_set() for s in self._streams.values())

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(
            s.synced.wait(max(0.0, deadline - time.monotonic())) for s in self._streams.values()
        )

    def relists(self, kind: str) -> int:
        """Lists made by one stream so far (the first one included)."""
        return self._streams[kind].relists

    # -- reading ------------------------------------------------------------------------------

    def node_infos(
        self,
        tolerations: Sequence[Mapping[str, Any]] = (),
        node_selector: Mapping[str, str] | None = None,
        node_terms: Sequence[Mapping[str, Any]] = (),
    ) -> list[NodeInfo]:
        """Every node with the GPUs in use on it (assumed reservations included), as a job
        with these tolerations, nodeSelector and required node-affinity terms sees it."""
        constraints = Constraints(tuple(tolerations), node_selector, tuple(node_terms))
        with self._lock:
            if self.synced:
                self._moved(self._ledger.expire(self.clock()))
            return self._views.read(constraints, self._nodes, self._ledger.totals)

    def nodes(self) -> dict[str, NodeFacts]:
        with self._lock:
            return dict(self._nodes)

    def usage(self) -> dict[str, int]:
        with self._lock:
            return self._ledger.usage()

    def charges(self) -> dict[PodKey, PodCharge]:
        """What the pod watch observed (assumptions left out)."""
        with self._lock:
            return self._ledger.observed()

    def foreign_usage(self) -> dict[str, int]:
        """GPUs per node held by pods that are not the operator's workers."""
        with self._lock:
            return self._ledger.foreign()

    def workers_at(self, floor: str | None) -> bool:
        """Whether the worker watch has caught up with `floor` (a pod resourceVersion)."""
        with self._lock:
            return self._streams["workers"].synced.is_set() and at_least(
                self._workers_version, floor
            )

    def workers(self) -> dict[PodKey, Worker]:
        """Every worker pod the worker watch holds."""
        with self._lock:
            return {(job[0], n): w for job, pods in self._workers.items() for n, w in pods.items()}

    def worker_pods(self, job: JobKey, owner: str) -> list[Worker]:
        """The job's worker pods that the object with uid `owner` owns, by name."""
        with self._lock:
            pods = self._workers.get(job, {})
            return [pods[n] for n in sorted(pods) if owner in pods[n].owners]

    def jobs_on(self, node: str) -> set[JobKey]:
        with self._lock:
            return self._ledger.jobs_on(node)

    # -- reservations -------------------------------------------------------------------------

    def assume(self, key: PodKey, charge: PodCharge) -> None:
        """Count a placement now; the pod's event confirms it (see core/ledger.py)."""
        with self._lock:
            self._moved(self._ledger.assume(key, charge, self.clock()))

    def forget(self, key: PodKey) -> None:
        """Drop a reservation whose placement was not written."""
        with self._lock:
            change = self._moved(self._ledger.forget(key))
        self._announce(change)

    # -- list and watch -----------------------------------------------------------------------

    def _run(self, stream: _Stream) -> None:
        """List, then watch from the list's resourceVersion; resume after errors, relist
        after 410 Gone (client-go's reflector)."""
        backoff = BACKOFF_SECONDS[0]
        while not self._stopping.is_set():
            try:
                if stream.version is None:
                    stream.version = self._relist(stream)
                self._watch(stream, stream.version)
                backoff = BACKOFF_SECONDS[0]
            except _Gone:
                log.info("%s watch: version %s expired; relisting", stream.kind, stream.version)
                stream.version = None
            except Exception as err:  # a broken connection, a timeout, a 5xx: wait, resume
                if self._stopping.is_set():
                    break
                if isinstance(err, ApiException) and err.status == 410:
                    stream.version = None
                    continue
                log.warning("%s watch failed (%s); retrying in %.1fs", stream.kind, err, backoff)
                metrics.CACHE_WATCH_ERRORS.labels(stream.kind).inc()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_SECONDS[1])

    def _relist(self, stream: _Stream) -> str:
        items: list[Mapping[str, Any]] = []
        charges: dict[PodKey, PodCharge] = {}
        workers: dict[PodKey, tuple[JobKey, Worker]] = {}
        version = ""
        token: str | None = None
        while True:
            response = stream.list_fn(
                limit=self.page_size,
                _continue=token,
                _preload_content=False,
                _request_timeout=CALL_TIMEOUT,
                **stream.selectors,
            )
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            meta = page.get("metadata") or {}
            version = str(meta.get("resourceVersion", ""))
            token = meta.get("continue") or None
            if stream.kind == "pods":
                # Only the reduced form of a page's pods outlives the page.
                charges.update(
                    (key, charge)
                    for key, charge in _reduced(page.get("items") or [])
                    if charge is not None
                )
            elif stream.kind == "workers":
                workers.update(
                    (pod_key(pod), (job, worker_record(pod)))
                    for pod in page.get("items") or []
                    if (job := worker_job(pod)) is not None
                )
            else:
                items.extend(page.get("items") or [])
            if not token:
                break
        if stream.kind == "nodes":
            self._replace_nodes(items)
        elif stream.kind == "workers":
            self._replace_workers(workers, version)
        else:
            self._replace_pods(charges)
        stream.relists += 1
        metrics.CACHE_RELISTS.labels(stream.kind).inc()
        if stream.synced.is_set():
            self.callbacks.relisted(stream.kind)
        stream.synced.set()
        return version

    def _watch(self, stream: _Stream, version: str) -> None:
        """Apply events until the server ends the watch; `stream.version` follows them, so
        a broken watch resumes after the last event applied."""
        response = stream.list_fn(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            _preload_content=False,
            _request_timeout=(CALL_TIMEOUT[0], self.watch_seconds + 30),
            **stream.selectors,
        )
        stream.response = response
        try:
            for kind, obj in watch_events(response, self._stopping):
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                if stream.kind == "workers":
                    self._worker_event(kind, obj)  # a bookmark too: it is caught up to it
                elif kind == "BOOKMARK":
                    pass
                elif stream.kind == "nodes":
                    self._node_event(kind, obj)
                else:
                    self._pod_event(kind, obj)
                stream.version = str(
                    (obj.get("metadata") or {}).get("resourceVersion") or stream.version
                )
        finally:
            stream.response = None
            response.close()
            response.release_conn()

    # -- applying events ----------------------------------------------------------------------

    def _node_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        facts = node_facts(obj)
        with self._lock:
            if kind == "DELETED":
                changed = self._nodes.pop(facts.name, None) is not None
            else:
                changed = self._nodes.get(facts.name) != facts
                self._nodes[facts.name] = facts
            if changed:
                now = self._nodes.get(facts.name)
                self._views.node_changed(facts.name, now, self._ledger.used(facts.name))
        if changed:  # heartbeats change nothing placement reads
            self.callbacks.node_changed(facts.name)

    def _pod_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        key = pod_key(obj)
        with self._lock:
            if kind == "DELETED":
                uid = str((obj.get("metadata") or {}).get("uid", ""))
                change = self._moved(self._ledger.delete(key, uid))
            else:
                change = self._moved(self._ledger.observe(key, pod_charge(obj)))
        self._announce(change)

    def _worker_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        """A worker pod moved (or a bookmark: the watch has seen everything up to it)."""
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                with self._lock:
                    self._workers_version = str(version)
            return
        key, job = pod_key(obj), worker_job(obj)
        with self._lock:
            # A pod relabelled away from its job (or out of the selector) leaves that job.
            was = self._worker_jobs.pop(key, None)
            if was is not None:
                pods = self._workers.get(was, {})
                pods.pop(key[1], None)
                if not pods:
                    self._workers.pop(was, None)
            if job is not None and kind != "DELETED":
                self._workers.setdefault(job, {})[key[1]] = worker_record(obj)
                self._worker_jobs[key] = job
            if version:
                self._workers_version = str(version)
        for concerned in {j for j in (was, job) if j is not None}:
            self.callbacks.worker_event(concerned)

    def _replace_nodes(self, items: list[Mapping[str, Any]]) -> None:
        fresh = {f.name: f for f in map(node_facts, items)}
        with self._lock:
            old, self._nodes = self._nodes, fresh
            self._views.clear()
        for name in sorted(old.keys() | fresh.keys()):
            if old.get(name) != fresh.get(name) and old:
                self.callbacks.node_changed(name)

    def _replace_workers(
        self, workers: Mapping[PodKey, tuple[JobKey, Worker]], version: str
    ) -> None:
        fresh: dict[JobKey, dict[str, Worker]] = {}
        for (_ns, name), (job, record) in workers.items():
            fresh.setdefault(job, {})[name] = record
        with self._lock:
            self._workers = fresh
            self._worker_jobs = {key: job for key, (job, _) in workers.items()}
            self._workers_version = version or None

    def _replace_pods(self, charges: Mapping[PodKey, PodCharge]) -> None:
        with self._lock:
            change = self._moved(self._ledger.replace(charges))
        self._announce(change)

    def _moved(self, change: Change) -> Change:
        """Patch the node views where usage moved (under the lock); returns `change`."""
        self._views.usage_changed(change.freed | change.taken, self._nodes, self._ledger.totals)
        return change

    def _announce(self, change: Change) -> None:
        if change.freed:
            self.callbacks.capacity_freed(change.freed)


def _reduced(items: list[Mapping[str, Any]]) -> Iterator[tuple[PodKey, PodCharge | None]]:
    for pod in items:
        yield pod_key(pod), pod_charge(pod)


def _interrupt(response: Any) -> None:
    """Unblock a thread reading a watch: shut the socket down under it."""
    if response is not None:
        with contextlib.suppress(OSError):
            response.shutdown()


def watch_events(response: Any, stopping: threading.Event) -> Iterator[tuple[str, dict[str, Any]]]:
    """(type, object) of each event of a raw watch response, until `stopping` is set."""
    for line in iter_resp_lines(response):
        if stopping.is_set():
            return
        if line:
            event = json.loads(line)
            yield str(event.get("type")), event.get("object") or {}
