"""kopf wiring: watch events feed a work queue; workers reconcile one job at a time.

kopf supplies the watches (with reconnects), the liveness endpoint and the process
lifecycle. Every DDLJob, worker-pod and node event only enqueues the affected job keys;
a small pool of workers takes keys off the queue, reads a fresh snapshot, runs the pure
core and applies the plan. A key is never reconciled twice at once, and placement is
serialised across jobs so two gangs never claim the same free GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import kopf
from kubernetes import client, config

from ddl_operator import metrics
from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob, DDLJobStatus
from ddl_operator.core.reconcile import Event, Plan, reconcile
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
PLACEMENT_LOCK = threading.Lock()
KNOWN_JOBS: set[JobKey] = set()
NODE_DIGESTS: dict[str, str] = {}
TASKS: list[asyncio.Task[None]] = []


def _queue() -> WorkQueue:
    assert QUEUE is not None, "operator not started"
    return QUEUE


def reconcile_job(key: JobKey) -> float | None:
    """One pass for one job (runs in a thread). Returns when to look again, or None."""
    assert KUBE is not None
    namespace, name = key
    started = time.perf_counter()
    with PLACEMENT_LOCK:
        snap = KUBE.snapshot(namespace, name)
        if snap is None:
            KNOWN_JOBS.discard(key)
            _forget_metrics(namespace, name)
            return None
        now = dt.datetime.now(dt.UTC)
        errors = spec_errors(snap.job)
        if errors:
            # Nothing can be rendered: say which field, and wait for the job to change.
            _refuse(snap, snap.job.status, errors, now, UNUSABLE_TEMPLATE, [])
            return None
        t0 = time.perf_counter()
        plan = reconcile(
            snap.job, snap.pods, snap.nodes, now, service_account=SETTINGS.worker_service_account
        )
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
    metrics.PENDING_GPUS.labels(namespace, name).set(pending)
    metrics.JOB_EPOCH.labels(namespace, name).set(status.epoch)
    metrics.JOB_RESTARTS.labels(namespace, name).set(status.restarts)
    unsched = next((x for x in status.conditions if x.type == "Unschedulable"), None)
    _set_unschedulable(
        namespace, name, unsched.reason if unsched and unsched.status == "True" else None
    )
    metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
    for event in plan.events:
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
    return plan.requeue_after or None


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
    while True:
        key = await queue.get()
        try:
            delay = await asyncio.to_thread(reconcile_job, key)
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


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global QUEUE, KUBE
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{c.GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    KUBE = Kube(client.ApiClient())
    QUEUE = WorkQueue()
    loop = asyncio.get_running_loop()
    TASKS.extend(loop.create_task(_worker(QUEUE)) for _ in range(SETTINGS.workers))
    TASKS.append(loop.create_task(_resync(QUEUE)))


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
def job_event(type: str, name: str, namespace: str | None, **_: Any) -> None:
    key = (namespace or "", name)
    if type == "DELETED":
        KNOWN_JOBS.discard(key)
    else:
        KNOWN_JOBS.add(key)
    _queue().add(key)


@kopf.on.event("v1", "pods", labels={c.LABEL_ROLE: "worker", c.LABEL_JOB: kopf.PRESENT})
def worker_pod_event(labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    _queue().add((namespace or "", labels[c.LABEL_JOB]))


@kopf.on.event("v1", "nodes")
def node_event(type: str, name: str, body: kopf.Body, **_: Any) -> None:
    """Capacity or readiness changed: every job may now fit, or have lost a worker."""
    spec, status = body.get("spec", {}), body.get("status", {})
    ready = [x.get("status") for x in status.get("conditions", []) if x.get("type") == "Ready"]
    digest = hashlib.sha1(
        repr(
            (
                type,
                spec.get("unschedulable"),
                spec.get("taints"),
                ready,
                status.get("allocatable"),
                body.get("metadata", {}).get("labels"),
            )
        ).encode()
    ).hexdigest()
    if NODE_DIGESTS.get(name) == digest:
        return  # a heartbeat, nothing that placement looks at
    NODE_DIGESTS[name] = digest
    if type == "DELETED":
        NODE_DIGESTS.pop(name, None)
    for key in list(KNOWN_JOBS):
        _queue().add(key)
