"""kopf wiring: watch events feed a work queue; workers reconcile jobs in parallel.

kopf supplies the DDLJob watch, the liveness endpoint and the process lifecycle; the cache
(cache.py) watches nodes and unfinished pods itself, with server-side selectors, because
kopf applies a handler's `labels=` filter client-side and would stream every pod in the
cluster. Events only enqueue the job keys they may concern. A small pool of workers takes
keys off the queue, reads the job and its own pods, takes free capacity from the cache,
runs the pure core and applies the plan. A key is never reconciled twice at once; the one
serialised step is claiming GPUs (decide on the cache's capacity, reserve in the cache), so
two gangs never claim the same free GPUs while API calls of different jobs overlap.

A pass that fails goes back to the queue with a per-job exponential back-off (a 409 from a
stale read retries soon, silently), and the job says why in a ReconcileError condition and
one Warning event per new reason; its next successful pass clears the condition. With
leader election, the cache warms on a standby but the workers start only once it leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Final

import kopf
import urllib3
from kubernetes import client

from ddl_operator import metrics
from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob, DDLJobStatus, Phase, managed_here
from ddl_operator.apiclient import load_client
from ddl_operator.cache import Callbacks, ClusterCache
from ddl_operator.core import kueue
from ddl_operator.core.ledger import PodCharge
from ddl_operator.core.preemption import (
    PREEMPTED_BY,
    Eviction,
    NoPreemption,
    PreemptedRecord,
    PreemptionPolicy,
    encode_record,
    holding,
    parse_record,
    preempt,
    record_for,
)
from ddl_operator.core.queueing import (
    Demand,
    Slot,
    arrange,
    priority_class_name,
    priority_of,
    queue_key,
)
from ddl_operator.core.reconcile import Event, Plan, pending_request, reconcile
from ddl_operator.core.render import ANNOTATION_NODE, owner_reference
from ddl_operator.core.validate import (
    CHILD_REFUSED,
    UNUSABLE_TEMPLATE,
    FieldError,
    child_errors,
    invalid_status,
    spec_errors,
)
from ddl_operator.kube import Kube, PriorityClasses, Snapshot
from ddl_operator.kueueing import KueueApi, WorkloadWatch
from ddl_operator.leader import LeaderElector
from ddl_operator.runtime import BACKGROUND, URGENT, JobKey, Runtime, Settings, WorkQueue

log = logging.getLogger("ddl_operator")

RESYNC_SECONDS: Final = 60.0
# How often a job Kueue holds is looked at besides its Workload's events (and to notice
# Kueue being installed).
KUEUE_RECHECK_SECONDS: Final = 30.0
ERROR_CONDITION: Final = "ReconcileError"
# A gang's pods are created, bound and started together, and each step is an event per pod:
# a job's pass waits this long after the first of them, so that one pass sees them all
# (Kubernetes' Job controller batches its pods' events the same way, for a second). Jobs
# waiting for GPUs are woken at most this often by freed capacity and node changes.
EVENT_BATCH_SECONDS: Final = 0.2
# Exit status when the Lease is lost (client-go's controllers exit too): the process must not
# reconcile beside the new leader, and its restart comes back as a standby.
LOST_LEASE_EXIT: Final = 3
_API_ERRORS: Final = (client.ApiException, urllib3.exceptions.HTTPError, OSError)


@dataclass(frozen=True)
class Outcome:
    """What a pass tells the event loop: when to look again, and what the job waits for."""

    requeue_after: float | None = None
    wants_gpus: bool = False  # freed capacity or a changed node may let it grow
    gone: bool = False  # deleted: forget it


@dataclass(frozen=True)
class PassError:
    """Why a pass failed, as the job's condition says it."""

    reason: str  # the API's status reason (Forbidden, ...) or the exception's class
    message: str
    conflict: bool = False  # 409: written on a stale read; retried, not shown


def pass_error(err: Exception) -> PassError:
    """The reason and message of a failed pass: the API's Status when it sent one."""
    if isinstance(err, client.ApiException):
        try:
            status: Any = json.loads(err.body) if err.body else {}
        except ValueError:
            status = {}
        if not isinstance(status, dict):
            status = {}
        phrase = "".join(str(err.reason or "").title().split())
        reason = str(status.get("reason") or "") or phrase or f"Status{err.status}"
        message = str(status.get("message") or "") or f"{err.status} {err.reason}"
        return PassError(reason, message, conflict=err.status == 409)
    return PassError(type(err).__name__, str(err) or type(err).__name__)


def error_status(
    status: Mapping[str, Any], error: PassError, stamp: str
) -> tuple[dict[str, Any], bool] | None:
    """`status` (as stored) with a ReconcileError condition saying `error`, and whether the
    reason is news (worth an event); None when the status says so already, so a job that
    keeps failing the same way costs no writes."""
    conditions = [x for x in status.get("conditions") or [] if isinstance(x, Mapping)]
    previous = next((x for x in conditions if x.get("type") == ERROR_CONDITION), None)
    held = previous is not None and previous.get("status") == "True"
    message = error.message[:1024]
    said = (previous or {}).get("reason"), (previous or {}).get("message")
    if held and said == (error.reason, message):
        return None
    condition = {
        "type": ERROR_CONDITION,
        "status": "True",
        "reason": error.reason,
        "message": message,
        "lastTransitionTime": (previous or {}).get("lastTransitionTime") if held else stamp,
    }
    kept = [dict(x) for x in conditions if x.get("type") != ERROR_CONDITION]
    news = not held or said[0] != error.reason
    return {**status, "conditions": [*kept, condition]}, news


# -- one pass (runs in a reconcile thread) ------------------------------------------------------


def reconcile_job(rt: Runtime, key: JobKey) -> Outcome:
    """One pass for one job. Raises what the API raised; the worker backs off."""
    started = time.perf_counter()
    try:
        return _pass(rt, key)
    finally:
        elapsed = time.perf_counter() - started
        metrics.RECONCILE_SECONDS.observe(elapsed)
        log.debug("%s/%s: pass took %.0f ms", *key, elapsed * 1000)


def _pass(rt: Runtime, key: JobKey) -> Outcome:
    kube, cache, settings = rt.kube, rt.cache, rt.settings
    namespace, name = key
    if not cache.synced:
        return Outcome(1.0)  # free capacity is unknown until the first lists are in
    snap = kube.snapshot(namespace, name)
    if snap is None:
        _forget_metrics(rt, namespace, name)
        with rt.claim_lock:
            rt.forget_claims(key)  # a deleted job neither waits ahead of others nor holds GPUs
        return Outcome(gone=True)
    if not managed_here(snap.job.spec.managed_by):
        # spec.managedBy names another controller (immutable): nothing here is ours to write.
        with rt.claim_lock:
            rt.forget_claims(key)
        return Outcome(gone=True)
    now = dt.datetime.now(dt.UTC)
    errors = spec_errors(snap.job)
    if errors:
        # Nothing can be rendered: say which field, and wait for the job to change.
        with rt.claim_lock:
            rt.forget_claims(key)
        _refuse(rt, snap, snap.job.status, errors, now, UNUSABLE_TEMPLATE, [])
        return Outcome()
    # Reservations of ours that an earlier pass made but could not write: these pods are
    # still unplaced (this snapshot was read after that pass ended), so they hold nothing.
    for pod in snap.pods:
        if not pod.placed_on:
            cache.forget((namespace, pod.name))
    priorities = kube.priority_classes()
    queued = _kueue(rt, snap, priorities, now)
    if queued is not None and queued.job_patch is not None:
        # Kueue's verdict changed the job (suspend, admitted size or placement): this
        # snapshot is stale now, and the patch's own event brings the next pass.
        return Outcome(1.0)
    t0 = time.perf_counter()

    def decide(view: Snapshot, slot: Slot | None = None) -> Plan:
        decided = reconcile(
            view.job,
            view.pods,
            view.nodes,
            now,
            service_account=settings.worker_service_account,
            queue=slot,
        )
        if queued is not None:
            decided.status = kueue.with_condition(decided.status, queued.condition, now)
        return decided

    # A job with unplaced workers, or with no workers at all yet, goes straight to the
    # serialised step (so does a victim of preemption: only the queue says when it may grow
    # back); others decide without the lock, and take it only if their plan creates or
    # places someone after all (a placement on a big cluster is the costly part of a pass).
    record = _record(snap.job)
    finished = snap.job.status.phase in ("Succeeded", "Failed")
    claims = (not snap.pods and not finished) or any(not p.placed_on for p in snap.pods)
    plan = None if claims or record is not None else decide(snap)
    evictions: list[tuple[Eviction, JobKey]] = []
    waited = time.perf_counter()
    with rt.claim_lock:
        waited = time.perf_counter() - waited
        if plan is None or plan.place or plan.create:
            # Decide on capacity read under the lock, and reserve what was chosen before the
            # next job reads it; the API writes happen after the lock is released.
            snap = replace(snap, nodes=kube.node_infos(snap.job))
            demand, slot = _queue_slot(rt, snap, priorities, now, record is not None)
            plan = decide(snap, slot)
            _reserve(cache, snap, plan)
            if plan.place:
                rt.demands.pop(key, None)  # what it placed is in the cache's count now
            elif demand is not None and slot is None:
                evictions = _preempt(rt, snap, demand, priorities, now)
            _file_holder(rt, snap, plan, priorities)
        else:
            rt.demands.pop(key, None)
            _file_holder(rt, snap, plan, priorities)
    t1 = time.perf_counter()
    metrics.PLACEMENT_SECONDS.observe(t1 - t0)
    for eviction, victim in evictions:
        _mark_victim(rt, key, eviction, victim, now)
    if evictions:
        names = ", ".join(f"{ns}/{n}" for _, (ns, n) in evictions)
        plan.events.append(Event("Normal", "Preempting", f"taking GPUs from {names}"))
    if queued is not None and kueue.condition_news(snap.job.status, queued.condition):
        ok, _reason, message = queued.condition
        plan.events.append(Event("Normal" if ok else "Warning", kueue.JOB_CONDITION, message))
    if queued is not None and queued.holds:
        plan.requeue_after = min(plan.requeue_after or KUEUE_RECHECK_SECONDS, KUEUE_RECHECK_SECONDS)
    identity = (
        (settings.worker_service_account, settings.worker_cluster_role)
        if settings.worker_service_account and settings.worker_cluster_role
        else None
    )
    try:
        written = kube.apply(snap, plan, identity)
    except client.ApiException as err:
        errors = _refused_children(err, snap.job)
        if not errors:
            raise
        # The rest of the plan still applies (losses, placement of existing workers); what
        # it reserved for the refused new workers is given back.
        refused = {m["metadata"]["name"] for m in plan.create}
        for pod in refused:
            rt.cache.forget((namespace, pod))
        plan = replace(plan, create=[], place=[p for p in plan.place if p[0] not in refused])
        _refuse(rt, snap, plan.status, errors, now, CHILD_REFUSED, plan.events, plan, identity)
        return Outcome()
    log.debug(
        "%s/%s: decided in %.0f ms (%.0f waiting for the claim lock), wrote in %.0f ms",
        namespace,
        name,
        (t1 - t0) * 1000,
        waited * 1000,
        (time.perf_counter() - t1) * 1000,
    )
    if written is not None and _at_rest(decide, snap, plan):
        rt.echoes[key] = written
    status = plan.status
    # Suspended by its spec it wants nothing; suspended by preemption it waits to resume.
    wanted = 0 if snap.job.spec.suspend else snap.job.spec.replicas
    pending = max(0, wanted - status.replicas) * snap.job.spec.gpus_per_worker
    metrics.PENDING_GPUS.labels(namespace, name).set(pending)
    metrics.JOB_EPOCH.labels(namespace, name).set(status.epoch)
    metrics.JOB_RESTARTS.labels(namespace, name).set(status.restarts)
    unsched = next((x for x in status.conditions if x.type == "Unschedulable"), None)
    _set_unschedulable(
        rt, namespace, name, unsched.reason if unsched and unsched.status == "True" else None
    )
    for event in plan.events:
        log.info("%s/%s %s: %s", namespace, name, event.reason, event.message)
    return Outcome(
        plan.requeue_after or None,
        wants_gpus=bool(pending) or status.phase in ("Pending", "Placing", "Rescaling"),
    )


def _kueue(
    rt: Runtime, snap: Snapshot, priorities: PriorityClasses, now: dt.datetime
) -> kueue.OwnerStep | None:
    """The owner's part for a job labelled kueue.x-k8s.io/queue-name (None for others): its
    Workload read, created or adopted, the writes core/kueue.py decides, applied."""
    job = snap.job
    try:
        queue = kueue.queue_name(job)
    except kueue.WorkloadShapeError as err:
        step = kueue.hold(job, "InvalidQueueName", str(err))
    else:
        if queue is None:
            return None
        if rt.kueue is None or not rt.kueue.installed():
            step = kueue.hold(
                job,
                "KueueNotInstalled",
                f"labelled {kueue.LABEL_QUEUE_NAME}={queue}, but the API server serves no "
                f"{kueue.API_VERSION} Workloads: install Kueue (integrations."
                'externalFrameworks: ["DDLJob.v1alpha1.ddl-operator.dev"]) or remove the label',
            )
        else:
            return _owner_step(rt, rt.kueue, snap, queue, priorities, now)
    if step.job_patch is not None:
        rt.kube.patch_job(snap.body, step.job_patch)
    return step


def _owner_step(
    rt: Runtime,
    api: KueueApi,
    snap: Snapshot,
    queue: str,
    priorities: PriorityClasses,
    now: dt.datetime,
) -> kueue.OwnerStep:
    job = snap.job
    namespace, uid = job.metadata.namespace, job.metadata.uid
    obj = api.get_workload(namespace, kueue.workload_name(job))
    if obj is not None and not kueue.owned(obj, uid):
        obj = api.adopt(obj, owner_reference(job))
    flavors: list[dict[str, Any]] = []
    if obj is not None:
        status = kueue.workload_status(obj)
        if status.may_run and status.admission is not None:
            flavors = api.flavors(status.admission.flavor_names)
    class_name = priority_class_name(job.spec.template)
    if obj is None and class_name is not None and class_name not in priorities.values:
        priorities = rt.kube.priority_classes(refresh=True)
    priority = kueue.owner_priority(class_name, priorities.values, priorities.global_default)
    phases = [p.phase for p in snap.pods]
    step = kueue.owner_step(job, queue, obj, flavors, phases, priority, now)
    # The job first: it is suspended before its Workload can be admitted, and restored
    # before its admission is cleared (a failed write is redone by the next pass).
    if step.job_patch is not None:
        rt.kube.patch_job(snap.body, step.job_patch)
    if step.create is not None:
        api.create_workload(step.create)
    if step.delete_stale and obj is not None:
        api.delete_workload(obj)
    for write in step.writes:
        api.apply_status(write)
    return step


def _queue_slot(
    rt: Runtime, snap: Snapshot, priorities: PriorityClasses, now: dt.datetime, held: bool
) -> tuple[Demand | None, Slot | None]:
    """Files the job's demand in the GPU queue and returns it with the capacity the job
    may claim (under the claim lock). No slot when nothing waits ahead of it: all free GPUs
    are its to take; but a job `held` by a preemption record always gets one, since only a
    slot that fits lets it grow back.

    Only jobs that could not place yet stay filed, so the walk costs a placement per job
    that is waiting, not per job in the cluster.

    With `--no-queue-order` nothing is filed and nothing waits ahead of any job: a held job's
    slot is the free capacity alone, and every other job may take all free GPUs.
    """
    job, key = snap.job, (snap.job.metadata.namespace, snap.job.metadata.name)
    request = pending_request(job, snap.pods, snap.nodes, now)
    if request is None or request.units_per_worker <= 0:
        rt.demands.pop(key, None)
        return None, None
    demand = Demand(
        key=key,
        priority=_priority(job, priorities),
        created=_created(snap.body, now),
        request=request,
        eligible=frozenset(n.name for n in snap.nodes if n.schedulable),
    )
    if not rt.settings.queue_order:
        rt.demands.pop(key, None)
        lasting = rt.cache.foreign_usage() if held else {}
        alone = arrange([demand], snap.nodes, key, lasting).slots.get(key) if held else None
        return demand, alone
    rt.demands[key] = demand
    mine = queue_key(demand)
    if not held and not any(queue_key(d) < mine for d in rt.demands.values()):
        return demand, None
    return demand, rt.slot(key, tuple(snap.nodes), rt.cache.foreign_usage())


def _priority(job: DDLJob, priorities: PriorityClasses) -> int:
    name = priority_class_name(job.spec.template)
    return priority_of(name, priorities.values, priorities.global_default)


def _record(job: DDLJob) -> PreemptedRecord | None:
    """The job's valid preemption record, if any (reconcile reports an invalid one)."""
    record = parse_record((job.metadata.annotations or {}).get(PREEMPTED_BY))
    return record if isinstance(record, PreemptedRecord) else None


def _file_holder(rt: Runtime, snap: Snapshot, plan: Plan, priorities: PriorityClasses) -> None:
    """Files what the job holds as preemption sees it (under the claim lock): its placed
    workers that stay, in rank order; nothing once it holds no GPUs."""
    job = snap.job
    key = (job.metadata.namespace, job.metadata.name)
    holder = holding(
        key,
        _priority(job, priorities),
        _created(snap.body, rt.clock()),
        job,
        [p for p in snap.pods if p.name not in plan.delete],
        leaving=rt.leaving_pods(key),
    )
    if holder is None:
        rt.holders.pop(key, None)
    else:
        rt.holders[key] = holder


def _preempt(
    rt: Runtime, snap: Snapshot, demand: Demand, priorities: PriorityClasses, now: dt.datetime
) -> list[tuple[Eviction, JobKey]]:
    """For the first job in the queue that does not fit: the evictions that make it fit
    (under the claim lock). The GPUs of workers already leaving count as free, so a pass
    during the hand-over evicts nobody more. None with `--no-preemption`."""
    if not rt.settings.preemption:
        return []
    name = priority_class_name(snap.job.spec.template)
    policy: PreemptionPolicy = (
        "Never" if name in priorities.never_preempt else ("PreemptLowerPriority")
    )
    nodes = rt.without_leaving(snap.nodes)
    running = [h for k, h in rt.holders.items() if k != demand.key]
    decision = preempt(demand, nodes, running, policy)
    if isinstance(decision, NoPreemption):
        log.debug("%s/%s: no preemption: %s", *demand.key, decision.reason)
        return []
    victims = []
    for eviction in decision.victims:
        holder = rt.holders[eviction.job]
        gone = {pod: node for pod, node in holder.workers if pod in eviction.pods}
        rt.mark_leaving(eviction.job, gone, holder.units_per_worker)
        victims.append((eviction, eviction.job))
    log.info(
        "%s/%s: preempting in %s: %s",
        *demand.key,
        decision.domain,
        "; ".join(e.message for e in decision.victims),
    )
    return victims


def _mark_victim(
    rt: Runtime, preemptor: JobKey, eviction: Eviction, victim: JobKey, now: dt.datetime
) -> None:
    """Writes the victim's record; its own pass carries the eviction out and says so."""
    body = {"metadata": {"namespace": victim[0], "name": victim[1]}}
    value = encode_record(record_for(eviction, preemptor, now))
    try:
        rt.kube.patch_annotations(body, {PREEMPTED_BY: value})
    except client.ApiException as err:
        if err.status != 404:
            raise
        log.info("%s/%s: preemption victim %s/%s is gone", *preemptor, *victim)


def _created(body: Mapping[str, Any], now: dt.datetime) -> dt.datetime:
    """The job's creationTimestamp (set by the API server); `now` if unreadable."""
    stamp = body.get("metadata", {}).get("creationTimestamp")
    try:
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return now


def _at_rest(decide: Callable[[Snapshot], Plan], snap: Snapshot, plan: Plan) -> bool:
    """Whether a pass on the job as this one left it would do nothing, so the watch event of
    this pass's own status write needs no pass (level-triggered still: only that exact
    resourceVersion is skipped; anyone else's change has another).

    The plan touched no child (a touched pod's own events bring a pass anyway), and deciding
    again on the status just written, same pods and nodes, changes nothing more. A decision
    that waits on time is not lost: the pass's requeue timer still fires.
    """
    if plan.create or plan.place or plan.delete:
        return False
    again = decide(replace(snap, job=snap.job.model_copy(update={"status": plan.status})))
    touches = again.create or again.place or again.delete or again.events
    return not touches and again.status == plan.status


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
    rt: Runtime,
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
    # This pass got through: an earlier pass's ReconcileError no longer holds.
    status = status.model_copy(
        update={"conditions": [x for x in status.conditions if x.type != ERROR_CONDITION]}
    )
    invalid, event = invalid_status(snap.job, status, errors, now, reason)
    if event is not None:
        log.warning("%s/%s: %s", snap.job.metadata.namespace, snap.job.metadata.name, event.message)
    base = plan or Plan(status=invalid)
    rt.kube.apply(
        snap,
        replace(base, status=invalid, events=[*events, *([event] if event else [])]),
        identity,
    )


def _set_unschedulable(rt: Runtime, namespace: str, name: str, reason: str | None) -> None:
    old = rt.unschedulable.pop((namespace, name), None)
    if old is not None:
        metrics.UNSCHEDULABLE.remove(namespace, name, old)
    if reason is not None:
        metrics.UNSCHEDULABLE.labels(namespace, name, reason).set(1)
        rt.unschedulable[(namespace, name)] = reason


def _forget_metrics(rt: Runtime, namespace: str, name: str) -> None:
    for gauge in (
        metrics.PENDING_GPUS,
        metrics.JOB_EPOCH,
        metrics.JOB_RESTARTS,
        metrics.JOB_PASS_FAILURES,
    ):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    _set_unschedulable(rt, namespace, name, None)


def _attempt(rt: Runtime, key: JobKey) -> Outcome | PassError:
    """A pass, and what its failure is; a failure that is not a conflict goes on the job."""
    try:
        return reconcile_job(rt, key)
    except _API_ERRORS as err:
        error = pass_error(err)
    except Exception as err:  # a bug: keep the traceback, and still back off
        log.exception("%s/%s: pass failed", *key)
        error = pass_error(err)
    if not error.conflict:
        report_error(rt, key, error)
    return error


def report_error(rt: Runtime, key: JobKey, error: PassError) -> None:
    """Best effort: the ReconcileError condition on a fresh read of the job (its
    resourceVersion guards the write), and a Warning event when the reason is new."""
    namespace, name = key
    try:
        body = rt.kube.get_job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        update = error_status(body.get("status") or {}, error, stamp)
        if update is None:
            return
        status, news = update
        # Its watch event brings nothing a pass needs: the retry waits for its back-off.
        rt.echoes[key] = rt.kube.replace_status(body, status)
    except _API_ERRORS as err:
        log.warning("%s/%s: could not write %s: %s", namespace, name, ERROR_CONDITION, err)
        return
    if news:
        event = Event("Warning", ERROR_CONDITION, f"{error.reason}: {error.message}")
        try:
            rt.kube.post_events(body, [event])
        except _API_ERRORS as err:  # the condition holds the truth
            log.warning("%s/%s: could not post event: %s", namespace, name, err)


# -- the event loop's side ----------------------------------------------------------------------


def _settle(rt: Runtime, key: JobKey, result: Outcome | PassError) -> None:
    """Back on the loop: back off after a failure, requeue and file the job after a pass."""
    queue, namespace, name = rt.queue, *key
    if isinstance(result, PassError):
        # Capacity events must not bypass a broken job's back-off; its retries still come.
        rt.pending_jobs.discard(key)
        if result.conflict:
            delay = queue.add_conflicted(key)
            metrics.RECONCILE_ERRORS.labels("Conflict").inc()
            log.info("%s/%s: stale read (409); retrying in %.2g s", namespace, name, delay)
            return
        delay = queue.add_rate_limited(key)
        failures = queue.failures[key]
        metrics.RECONCILE_ERRORS.labels(result.reason).inc()
        metrics.JOB_PASS_FAILURES.labels(namespace, name).set(failures)
        log.warning(
            "%s/%s: pass failed (%s: %s); retry %d in %.3g s",
            namespace, name, result.reason, result.message, failures, delay,
        )  # fmt: skip
        return
    if result.gone:
        queue.forget(key)
        rt.known_jobs.discard(key)
        rt.pending_jobs.discard(key)
        rt.echoes.pop(key, None)
        return
    if queue.backing_off(key):
        metrics.JOB_PASS_FAILURES.labels(namespace, name).set(0)
    queue.forget(key)
    if result.wants_gpus:
        rt.pending_jobs.add(key)
    else:
        rt.pending_jobs.discard(key)
    if result.requeue_after is not None:
        queue.add_after(key, result.requeue_after)


async def _worker(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key = await rt.queue.get()
        try:
            result = await loop.run_in_executor(rt.executor, _attempt, rt, key)
        finally:
            rt.queue.done(key)
        _settle(rt, key, result)


async def _resync(rt: Runtime) -> None:
    """Level-triggered safety net: look at every known job now and then (a job backing off
    is looked at when its retry is due)."""
    while True:
        await asyncio.to_thread(_count_phases, rt)
        await asyncio.sleep(RESYNC_SECONDS)
        await asyncio.to_thread(_sweep, rt, frozenset(rt.known_jobs))
        for key in list(rt.known_jobs):
            if not rt.queue.backing_off(key):
                rt.queue.add(key, BACKGROUND)


def _sweep(rt: Runtime, known: frozenset[JobKey]) -> None:
    with rt.claim_lock:
        rt.sweep_claims(known)


def _count_phases(rt: Runtime) -> None:
    try:
        jobs = rt.kube.list_jobs(rt.settings.namespaces)
    except _API_ERRORS as err:
        log.warning("could not list jobs for metrics: %s", err)
        return
    counts: dict[str, int] = {}
    for job in jobs:
        phase = (job.get("status") or {}).get("phase", "Pending")
        counts[phase] = counts.get(phase, 0) + 1
    for phase in typing.get_args(Phase):
        metrics.JOBS.labels(phase).set(counts.get(phase, 0))


def waiting_in_order(pending: Iterable[JobKey], demands: Mapping[JobKey, Demand]) -> list[JobKey]:
    """Jobs to wake for freed capacity, in the GPU queue's order (the head first: it is the
    one a freed GPU is held for), then those not filed in the queue, by name. `demands` is a
    copy: passes on other threads file and withdraw theirs."""
    waiting = set(pending)
    filed = sorted((d for k, d in demands.items() if k in waiting), key=queue_key)
    return [d.key for d in filed] + sorted(waiting - demands.keys())


def _build(settings: Settings, loop: asyncio.AbstractEventLoop) -> Runtime:
    """The runtime with its cache started: cache events (on the watch threads) enqueue the
    jobs they may concern, on the loop, where the job sets live."""

    served = frozenset(settings.namespaces)

    def serves(key: JobKey) -> bool:
        # The cache sees worker pods of every namespace; a namespaced operator serves its own.
        return not served or key[0] in served

    def enqueue(keys: Iterable[JobKey], lane: int = URGENT) -> None:
        for key in keys:
            if serves(key):
                rt.queue.add(key, lane)

    wake_due: list[asyncio.TimerHandle] = []

    def wake_now() -> None:
        wake_due.clear()
        enqueue(waiting_in_order(rt.pending_jobs, rt.demands.copy()), BACKGROUND)

    def wake_waiting() -> None:
        # Batched too: node events come in streams (a controller untainting nodes at ten a
        # second after a restart), and each would wake every waiting job.
        if not wake_due:
            wake_due.append(loop.call_later(EVENT_BATCH_SECONDS, wake_now))

    def node_changed(node: str) -> None:
        # Capacity or readiness changed: jobs with a worker there, and jobs waiting for GPUs.
        jobs = rt.cache.jobs_on(node)

        def wake() -> None:
            enqueue(jobs)
            wake_waiting()

        loop.call_soon_threadsafe(wake)

    def capacity_freed(_nodes: frozenset[str]) -> None:
        loop.call_soon_threadsafe(wake_waiting)

    def batched(key: JobKey) -> None:
        if serves(key):
            rt.queue.add_after(key, EVENT_BATCH_SECONDS)

    def worker_event(job: JobKey) -> None:
        loop.call_soon_threadsafe(batched, job)

    def relisted(_kind: str) -> None:
        # Events were missed: every job, each behind any event of its own.
        loop.call_soon_threadsafe(lambda: enqueue(sorted(rt.known_jobs), BACKGROUND))

    # The cache has a client (and connection pool) of its own, so its watches never wait
    # for a connection that reconcile passes hold.
    cache = ClusterCache(
        client.CoreV1Api(load_client()),
        Callbacks(node_changed, capacity_freed, worker_event, relisted),
    )
    queued_api = KueueApi(load_client())
    rt = Runtime(
        settings=settings,
        queue=WorkQueue(),
        kube=Kube(load_client(), cache),
        cache=cache,
        executor=ThreadPoolExecutor(settings.workers, thread_name_prefix="reconcile"),
        kueue=queued_api,
        workload_watch=WorkloadWatch(queued_api, worker_event, settings.namespaces),
    )
    cache.start()
    if rt.workload_watch is not None:
        rt.workload_watch.start()
    return rt


def _start_reconciling(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    rt.tasks.extend(loop.create_task(_worker(rt)) for _ in range(rt.settings.workers))
    rt.tasks.append(loop.create_task(_resync(rt)))


async def _lead(rt: Runtime, elector: LeaderElector) -> None:
    """Reconcile once the Lease is ours; until then the cache warms and events queue up."""
    await elector.acquire()
    log.info("leader election: leading, reconciling %d known jobs", len(rt.known_jobs))
    _start_reconciling(rt)


def _lost_lease() -> None:
    """On the renew thread: another replica leads now, so this one stops at once."""
    log.critical("leader election: Lease lost; exiting so that only the new leader reconciles")
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(LOST_LEASE_EXIT)


def _runtime(memo: Any) -> Runtime:
    rt = memo.get("runtime") if isinstance(memo, Mapping) else None
    assert isinstance(rt, Runtime), "operator not started"
    return rt


# -- kopf handlers ----------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
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
    options = memo.get("settings")
    if isinstance(options, Settings) and options.namespaces:
        # Serving named namespaces: kopf would otherwise list every namespace to find them,
        # which namespaced RBAC refuses (and retries for a minute).
        settings.scanning.disabled = True
    rt = _build(
        options if isinstance(options, Settings) else Settings(), asyncio.get_running_loop()
    )
    memo["runtime"] = rt
    lease = rt.settings.lease
    if lease is None:
        _start_reconciling(rt)
        return
    # Return now: kopf's liveness must answer on a standby, which may wait for ever.
    rt.elector = LeaderElector(load_client(), lease, _lost_lease)
    rt.tasks.append(asyncio.get_running_loop().create_task(_lead(rt, rt.elector)))


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    if not isinstance(rt, Runtime):
        return
    await rt.close()


@kopf.on.event(c.GROUP, c.VERSION, c.PLURAL)
def job_event(
    type: str, name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    rt = _runtime(memo)
    key = (namespace or "", name)
    if type != "DELETED" and not managed_here((body.get("spec") or {}).get("managedBy")):
        rt.known_jobs.discard(key)
        return  # another controller's job (spec.managedBy)
    if type == "DELETED":
        rt.known_jobs.discard(key)
        rt.kube.forget_job(key)
    else:
        rt.known_jobs.add(key)
        rt.kube.observe_job(body)
        if rt.echoes.get(key) == body.get("metadata", {}).get("resourceVersion"):
            return  # the echo of our own status write: nothing changed that a pass reads
    rt.queue.add(key)
