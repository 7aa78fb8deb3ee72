"""kopf wiring: watch events feed a work queue; workers reconcile jobs in parallel.

kopf supplies the DDLJob watch, the liveness endpoint and the process lifecycle; the cache
(cache.py) watches nodes and unfinished pods itself, with server-side selectors, because
kopf applies a handler's `labels=` filter client-side and would stream every pod in the
cluster. Events only enqueue the job keys they may concern. A small pool of workers takes
keys off the queue, reads the job and its own pods, takes free capacity from the cache,
runs the pure core and applies the plan. A key is never reconciled twice at once; the one
serialised step is claiming GPUs (decide on the cache's capacity, reserve in the cache), so
two gangs never claim the same free GPUs while API calls of different jobs overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import kopf
from kubernetes import client

from ddl_operator import metrics
from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob, DDLJobStatus
from ddl_operator.apiclient import load_client
from ddl_operator.cache import Callbacks, ClusterCache
from ddl_operator.core.ledger import PodCharge
from ddl_operator.core.reconcile import Event, Plan, reconcile
from ddl_operator.core.render import ANNOTATION_NODE
from ddl_operator.core.validate import (
    CHILD_REFUSED,
    UNUSABLE_TEMPLATE,
    FieldError,
    child_errors,
    invalid_status,
    spec_errors,
)
from ddl_operator.kube import Kube, Snapshot

log = logging.getLogger("ddl_operator")

JobKey = tuple[str, str]  # (namespace, name)
WORKERS = 4
RESYNC_SECONDS = 60.0


@dataclass
class Settings:
    """Operator options from the command line."""

    worker_service_account: str | None = None
    # ClusterRole bound to the workers' account in each job namespace (the chart's worker role).
    worker_cluster_role: str | None = None
    workers: int = WORKERS


SETTINGS = Settings()


@dataclass
class WorkQueue:
    """Deduplicating delayed queue of job keys (controller-runtime's model, in asyncio)."""

    ready: asyncio.Queue[JobKey] = field(default_factory=asyncio.Queue)
    queued: set[JobKey] = field(default_factory=set)
    active: set[JobKey] = field(default_factory=set)
    dirty: set[JobKey] = field(default_factory=set)
    timers: dict[JobKey, asyncio.TimerHandle] = field(default_factory=dict)

    def add(self, key: JobKey) -> None:
        if key in self.active:
            self.dirty.add(key)  # reconcile again once the running pass ends
        elif key not in self.queued:
            self.queued.add(key)
            self.ready.put_nowait(key)

    def add_after(self, key: JobKey, delay: float) -> None:
        loop = asyncio.get_running_loop()
        old = self.timers.get(key)
        due = loop.time() + delay
        if old is not None and old.when() <= due:
            return
        if old is not None:
            old.cancel()
        self.timers[key] = loop.call_at(due, self._fire, key)

    def _fire(self, key: JobKey) -> None:
        self.timers.pop(key, None)
        self.add(key)

    async def get(self) -> JobKey:
        key = await self.ready.get()
        self.queued.discard(key)
        self.active.add(key)
        return key

    def done(self, key: JobKey) -> None:
        self.active.discard(key)
        if key in self.dirty:
            self.dirty.discard(key)
            self.add(key)


QUEUE: WorkQueue | None = None
KUBE: Kube | None = None
CACHE: ClusterCache | None = None
EXECUTOR: ThreadPoolExecutor | None = None
# Held only while a pass decides on free capacity and reserves it in the cache.
CLAIM_LOCK = threading.Lock()
KNOWN_JOBS: set[JobKey] = set()
# Jobs that want GPUs they do not hold: freed capacity or a changed node may let them grow.
PENDING_JOBS: set[JobKey] = set()
TASKS: list[asyncio.Task[None]] = []


def _queue() -> WorkQueue:
    assert QUEUE is not None, "operator not started"
    return QUEUE


def reconcile_job(key: JobKey) -> float | None:
    """One pass for one job (runs in a thread). Returns when to look again, or None."""
    started = time.perf_counter()
    try:
        return _pass(key)
    finally:
        elapsed = time.perf_counter() - started
        metrics.RECONCILE_SECONDS.observe(elapsed)
        log.debug("%s/%s: pass took %.0f ms", *key, elapsed * 1000)


def _pass(key: JobKey) -> float | None:
    assert KUBE is not None and CACHE is not None
    namespace, name = key
    if not CACHE.synced:
        return 1.0  # free capacity is unknown until the first lists are in
    snap = KUBE.snapshot(namespace, name)
    if snap is None:
        KNOWN_JOBS.discard(key)
        PENDING_JOBS.discard(key)
        _forget_metrics(namespace, name)
        return None
    now = dt.datetime.now(dt.UTC)
    errors = spec_errors(snap.job)
    if errors:
        # Nothing can be rendered: say which field, and wait for the job to change.
        _refuse(snap, snap.job.status, errors, now, UNUSABLE_TEMPLATE, [])
        return None
    # Reservations of ours that an earlier pass made but could not write: these pods are
    # still unplaced (this snapshot was read after that pass ended), so they hold nothing.
    for pod in snap.pods:
        if not pod.placed_on:
            CACHE.forget((namespace, pod.name))
    t0 = time.perf_counter()

    def decide(view: Snapshot) -> Plan:
        return reconcile(
            view.job, view.pods, view.nodes, now, service_account=SETTINGS.worker_service_account
        )

    # A job with unplaced workers goes straight to the serialised step; others decide
    # without the lock, and take it only if their plan places someone after all.
    plan = None if any(not p.placed_on for p in snap.pods) else decide(snap)
    if plan is None or plan.place:
        # Decide on capacity read under the lock, and reserve what was chosen before the
        # next job reads it; the API writes happen after the lock is released.
        with CLAIM_LOCK:
            snap = replace(snap, nodes=KUBE.node_infos(snap.job))
            plan = decide(snap)
            _reserve(CACHE, snap, plan)
    metrics.PLACEMENT_SECONDS.observe(time.perf_counter() - t0)
    identity = (
        (SETTINGS.worker_service_account, SETTINGS.worker_cluster_role)
        if SETTINGS.worker_service_account and SETTINGS.worker_cluster_role
        else None
    )
    try:
        KUBE.apply(snap, plan, identity)
    except client.ApiException as err:
        errors = _refused_children(err, snap.job)
        if not errors:
            raise
        # The rest of the plan still applies (losses, placement of existing workers).
        plan = replace(plan, create=[])
        _refuse(snap, plan.status, errors, now, CHILD_REFUSED, plan.events, plan, identity)
        return None
    status = plan.status
    pending = max(0, snap.job.spec.replicas - status.replicas) * snap.job.spec.gpus_per_worker
    if pending or status.phase in ("Pending", "Placing", "Rescaling"):
        PENDING_JOBS.add(key)
    else:
        PENDING_JOBS.discard(key)
    metrics.PENDING_GPUS.labels(namespace, name).set(pending)
    metrics.JOB_EPOCH.labels(namespace, name).set(status.epoch)
    metrics.JOB_RESTARTS.labels(namespace, name).set(status.restarts)
    unsched = next((x for x in status.conditions if x.type == "Unschedulable"), None)
    _set_unschedulable(
        namespace, name, unsched.reason if unsched and unsched.status == "True" else None
    )
    for event in plan.events:
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
    return plan.requeue_after or None


def _reserve(cache: ClusterCache, snap: Snapshot, plan: Plan) -> None:
    """Count the workers this plan places on their nodes now (kube-scheduler's assume); the
    pods' watch events confirm it, an expiry undoes what is never written."""
    job = snap.job
    namespace, name = job.metadata.namespace, job.metadata.name
    gpus = job.spec.gpus_per_worker
    if gpus <= 0:
        return
    for pod, patch in plan.place:
        node = patch["metadata"]["annotations"][ANNOTATION_NODE]
        charge = PodCharge(node, gpus, snap.uids.get(pod, ""), (namespace, name))
        cache.assume((namespace, pod), charge)


def _refused_children(err: client.ApiException, job: DDLJob) -> list[FieldError]:
    """The job fields behind a 422 on creating a worker pod or the Service; empty otherwise."""
    if err.status != 422 or not err.body:
        return []
    try:
        refusal = json.loads(err.body)
    except ValueError:
        return []
    return child_errors(refusal, job) if isinstance(refusal, dict) else []


def _refuse(
    snap: Snapshot,
    status: DDLJobStatus,
    errors: list[FieldError],
    now: dt.datetime,
    reason: str,
    events: list[Event],
    plan: Plan | None = None,
    identity: tuple[str, str] | None = None,
) -> None:
    """Writes the InvalidSpec condition (with `plan`'s other changes); one event per new
    reason. The status stays the same while the errors do, so no write loop follows."""
    invalid, event = invalid_status(snap.job, status, errors, now, reason)
    if event is not None:
        log.warning("%s/%s: %s", snap.job.metadata.namespace, snap.job.metadata.name, event.message)
    base = plan or Plan(status=invalid)
    assert KUBE is not None
    KUBE.apply(
        snap,
        replace(base, status=invalid, events=[*events, *([event] if event else [])]),
        identity,
    )


_UNSCHED_REASONS: dict[JobKey, str] = {}


def _set_unschedulable(namespace: str, name: str, reason: str | None) -> None:
    old = _UNSCHED_REASONS.pop((namespace, name), None)
    if old is not None:
        metrics.UNSCHEDULABLE.remove(namespace, name, old)
    if reason is not None:
        metrics.UNSCHEDULABLE.labels(namespace, name, reason).set(1)
        _UNSCHED_REASONS[(namespace, name)] = reason


def _forget_metrics(namespace: str, name: str) -> None:
    for gauge in (metrics.PENDING_GPUS, metrics.JOB_EPOCH, metrics.JOB_RESTARTS):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    _set_unschedulable(namespace, name, None)


async def _worker(queue: WorkQueue) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key = await queue.get()
        try:
            delay = await loop.run_in_executor(EXECUTOR, reconcile_job, key)
        except Exception:
            log.exception("reconcile of %s/%s failed; retrying", *key)
            delay = 5.0
        finally:
            queue.done(key)
        if delay is not None:
            queue.add_after(key, delay)


async def _resync(queue: WorkQueue) -> None:
    """Level-triggered safety net: look at every known job now and then."""
    while True:
        await asyncio.to_thread(_count_phases)
        await asyncio.sleep(RESYNC_SECONDS)
        for key in list(KNOWN_JOBS):
            queue.add(key)


def _count_phases() -> None:
    assert KUBE is not None
    try:
        jobs = KUBE.custom.list_cluster_custom_object(c.GROUP, c.VERSION, c.PLURAL)["items"]
    except client.ApiException as err:
        log.warning("could not list jobs for metrics: %s", err.reason)
        return
    counts: dict[str, int] = {}
    job: dict[str, Any]
    for job in jobs:
        phase = (job.get("status") or {}).get("phase", "Pending")
        counts[phase] = counts.get(phase, 0) + 1
    for phase in ("Pending", "Placing", "Running", "Rescaling", "Succeeded", "Failed"):
        metrics.JOBS.labels(phase).set(counts.get(phase, 0))


# -- kopf handlers ----------------------------------------------------------------------------


def _callbacks(loop: asyncio.AbstractEventLoop, queue: WorkQueue) -> Callbacks:
    """Cache events (on its watch threads) enqueue the jobs they may concern, on the loop."""

    def enqueue(keys: set[JobKey]) -> None:
        for key in keys:
            queue.add(key)

    def node_changed(node: str) -> None:
        # Capacity or readiness changed: jobs waiting for GPUs, and jobs with a worker there.
        assert CACHE is not None
        loop.call_soon_threadsafe(enqueue, PENDING_JOBS | CACHE.jobs_on(node))

    def capacity_freed(_nodes: frozenset[str]) -> None:
        loop.call_soon_threadsafe(enqueue, set(PENDING_JOBS))

    def worker_event(job: JobKey) -> None:
        loop.call_soon_threadsafe(queue.add, job)

    def relisted(_kind: str) -> None:
        loop.call_soon_threadsafe(enqueue, set(KNOWN_JOBS))  # events were missed

    return Callbacks(node_changed, capacity_freed, worker_event, relisted)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global QUEUE, KUBE, CACHE, EXECUTOR
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{c.GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # kopf's own calls time out too: a hung API server fails a request, not the operator.
    settings.watching.client_timeout = 330
    settings.networking.connect_timeout = 5
    settings.networking.request_timeout = 30
    QUEUE = WorkQueue()
    loop = asyncio.get_running_loop()
    # The cache has a client (and connection pool) of its own, so its watches never wait
    # for a connection that reconcile passes hold.
    CACHE = ClusterCache(client.CoreV1Api(load_client()), _callbacks(loop, QUEUE))
    CACHE.start()
    KUBE = Kube(load_client(), CACHE)
    EXECUTOR = ThreadPoolExecutor(SETTINGS.workers, thread_name_prefix="reconcile")
    TASKS.extend(loop.create_task(_worker(QUEUE)) for _ in range(SETTINGS.workers))
    TASKS.append(loop.create_task(_resync(QUEUE)))


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    for task in TASKS:
        task.cancel()
    if CACHE is not None:
        await asyncio.to_thread(CACHE.stop)
    if EXECUTOR is not None:
        EXECUTOR.shutdown(wait=False, cancel_futures=True)


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
def job_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
    key = (namespace or "", name)
    if type == "DELETED":
        KNOWN_JOBS.discard(key)
    else:
        KNOWN_JOBS.add(key)
    _queue().add(key)
