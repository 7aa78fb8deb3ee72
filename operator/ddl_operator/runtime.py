"""The running operator's state in one object: settings, the work queue, the API edge, the cache.

Built at kopf startup and closed at cleanup (kopf's `memo` carries it to the handlers), so no
module global is shared between the event loop and the reconcile threads. The work queue is
controller-runtime's: deduplicating, delayed, with client-go's per-item exponential back-off
for keys whose passes fail.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Final

from ddl_operator.cache import ClusterCache
from ddl_operator.core.preemption import Running
from ddl_operator.core.queueing import Demand, Slot, queue_key, walk
from ddl_operator.core.topology import NodeInfo
from ddl_operator.kube import Kube
from ddl_operator.kueueing import KueueApi, WorkloadWatch
from ddl_operator.leader import LeaderElector, LeaseConfig

JobKey = tuple[str, str]  # (namespace, name)
WORKERS: Final = 4
# How long GPUs of workers a preemption evicts count as free for the next preemption
# decision: time for the victim's pass to re-form without them and their pods to go.
LEAVING_SECONDS: Final = 120.0


@dataclass(frozen=True)
class Settings:
    """Operator options from the command line."""

    worker_service_account: str | None = None
    # ClusterRole bound to the workers' account in each job namespace (the chart's worker role).
    worker_cluster_role: str | None = None
    workers: int = WORKERS
    # Watched namespaces; empty means every namespace (and cluster-wide reads of DDLJobs).
    namespaces: tuple[str, ...] = ()
    # Reconcile only while holding this Lease; None runs unconditionally (one replica).
    lease: LeaseConfig | None = None
    # The GPU queue's order and head-of-line reservation (--no-queue-order turns it off:
    # whichever job's pass claims first takes the free GPUs).
    queue_order: bool = True
    # Preemption of lower-priority jobs for a waiting one (--no-preemption turns it off).
    preemption: bool = True


@dataclass(frozen=True)
class Backoff:
    """client-go's ItemExponentialFailureRateLimiter: `base * 2**(n-1)` after the n-th
    failure in a row, never more than `cap`."""

    base: float
    cap: float

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        # The exponent is bounded so a long-broken job cannot overflow the float.
        return min(self.cap, self.base * 2.0 ** min(failures - 1, 64))


# A failing pass: 1 s, 2 s, 4 s ... 5 min (client-go's controllers use 5 ms to 1000 s; a pass
# here costs API calls, so the first retry waits longer and the last does not wait for ever).
ERROR_BACKOFF: Final = Backoff(1.0, 300.0)
# A pass that wrote on a stale read (409): the next read is fresh, so retry soon, yet not spin
# if something keeps writing the job.
CONFLICT_BACKOFF: Final = Backoff(0.1, 5.0)


# Lanes of the work queue: a job's own events first; wake-ups of jobs waiting for GPUs
# (capacity freed somewhere, the resync) after them.
URGENT: Final = 0
BACKGROUND: Final = 1


@dataclass
class WorkQueue:
    """Deduplicating delayed queue of job keys with per-key back-off (controller-runtime's
    rate-limited queue, in asyncio; every method runs on the event loop).

    `add` is for events: it queues the key now, back-off or not, since the change it reports
    may be the fix. Failed passes come back through `add_rate_limited`; `forget` after a
    success resets the key's back-off.

    Two lanes, FIFO within each: freed capacity wakes every job waiting for GPUs, and on a
    busy cluster those passes (each takes the claim lock) kept a running job's own event
    (its pods bound, a worker lost) waiting behind them for seconds. A key added to the
    urgent lane while queued in the background one moves up.
    """

    lanes: tuple[deque[JobKey], deque[JobKey]] = field(default_factory=lambda: (deque(), deque()))
    queued: dict[JobKey, int] = field(default_factory=dict)  # key -> its lane
    items: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))  # queued
    active: set[JobKey] = field(default_factory=set)
    dirty: dict[JobKey, int] = field(default_factory=dict)  # key -> lane, once it is done
    timers: dict[JobKey, asyncio.TimerHandle] = field(default_factory=dict)
    failures: dict[JobKey, int] = field(default_factory=dict)
    conflicts: dict[JobKey, int] = field(default_factory=dict)
    errors: Backoff = ERROR_BACKOFF
    conflict_backoff: Backoff = CONFLICT_BACKOFF

    def add(self, key: JobKey, lane: int = URGENT) -> None:
        if key in self.active:  # reconcile again once the running pass ends
            self.dirty[key] = min(lane, self.dirty.get(key, lane))
        elif key not in self.queued:
            self.queued[key] = lane
            self.lanes[lane].append(key)
            self.items.release()
        elif lane < self.queued[key]:  # moves up
            self.lanes[self.queued[key]].remove(key)
            self.queued[key] = lane
            self.lanes[lane].append(key)

    def add_after(self, key: JobKey, delay: float) -> None:
        """Queue `key` after `delay`, unless a timer already fires it sooner."""
        loop = asyncio.get_running_loop()
        old = self.timers.get(key)
        due = loop.time() + delay
        if old is not None and old.when() <= due:
            return
        self._set_timer(key, due)

    def add_rate_limited(self, key: JobKey) -> float:
        """Retry after a failed pass, later for each failure in a row; returns the delay."""
        self.failures[key] = self.failures.get(key, 0) + 1
        return self._retry(key, self.errors.delay(self.failures[key]))

    def add_conflicted(self, key: JobKey) -> float:
        """Retry after a pass refused for a stale read (409): soon, on a back-off of its own."""
        self.conflicts[key] = self.conflicts.get(key, 0) + 1
        return self._retry(key, self.conflict_backoff.delay(self.conflicts[key]))

    def forget(self, key: JobKey) -> None:
        """The key's pass succeeded (or the job is gone): its back-off starts over."""
        self.failures.pop(key, None)
        self.conflicts.pop(key, None)

    def backing_off(self, key: JobKey) -> bool:
        """Whether the key's last pass failed (its retry is already scheduled)."""
        return key in self.failures

    def _retry(self, key: JobKey, delay: float) -> float:
        # Replaces a sooner timer a pass set before it failed: the back-off wins over a
        # requeue the failure made moot.
        self._set_timer(key, asyncio.get_running_loop().time() + delay)
        return delay

    def _set_timer(self, key: JobKey, due: float) -> None:
        old = self.timers.pop(key, None)
        if old is not None:
            old.cancel()
        self.timers[key] = asyncio.get_running_loop().call_at(due, self._fire, key)

    def _fire(self, key: JobKey) -> None:
        self.timers.pop(key, None)
        self.add(key)

    async def get(self) -> JobKey:
        await self.items.acquire()
        key = (self.lanes[URGENT] or self.lanes[BACKGROUND]).popleft()
        del self.queued[key]
        self.active.add(key)
        return key

    def done(self, key: JobKey) -> None:
        self.active.discard(key)
        lane = self.dirty.pop(key, None)
        if lane is not None:
            self.add(key, lane)

    def close(self) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()


@dataclass
class Arrangement:
    """A walk of the GPU queue (core/queueing.py `walk`), its inputs, and the slots it has
    given so far."""

    demands: tuple[Demand, ...]
    nodes: tuple[NodeInfo, ...]
    lasting: Mapping[str, int]
    walk: Iterator[Slot]
    slots: dict[JobKey, Slot]


@dataclass
class Runtime:
    """Everything one running operator holds. The sets are touched on the event loop only;
    the reconcile threads report back through their pass's outcome."""

    settings: Settings
    queue: WorkQueue
    kube: Kube
    cache: ClusterCache
    executor: ThreadPoolExecutor
    # Held only while a pass decides on free capacity and reserves it in the cache.
    claim_lock: threading.Lock = field(default_factory=threading.Lock)
    # Jobs waiting for GPUs, in the GPU queue's terms (core/queueing.py): each job's pass
    # files or withdraws its own, under the claim lock, where the queue is read.
    demands: dict[JobKey, Demand] = field(default_factory=dict)
    # The last walk of the whole queue and what it was computed from (see `arranged`).
    arrangement: Arrangement | None = None
    # What running jobs hold, for preemption; and the workers preemption already took from
    # them (job -> pod -> (node, GPUs, until when)). Both under the claim lock, too.
    holders: dict[JobKey, Running] = field(default_factory=dict)
    leaving: dict[JobKey, dict[str, tuple[str, int, float]]] = field(default_factory=dict)
    known_jobs: set[JobKey] = field(default_factory=set)
    # Jobs that want GPUs they do not hold: freed capacity or a changed node may let them grow.
    pending_jobs: set[JobKey] = field(default_factory=set)
    # The Unschedulable reason a job's gauge carries (touched by the job's own pass only).
    unschedulable: dict[JobKey, str] = field(default_factory=dict)
    # resourceVersions of our own status writes whose watch events need no pass (written by
    # the job's own pass thread, read on the loop).
    echoes: dict[JobKey, str] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    elector: LeaderElector | None = None
    # Kueue's API (jobs labelled kueue.x-k8s.io/queue-name) and the watch on our Workloads;
    # None where nothing was set up (then such jobs are held, saying Kueue is missing).
    kueue: KueueApi | None = None
    workload_watch: WorkloadWatch | None = None

    def slot(
        self, job: JobKey, nodes: tuple[NodeInfo, ...], lasting: Mapping[str, int]
    ) -> Slot | None:
        """`job`'s slot in the GPU queue over `nodes` (under the claim lock); `lasting` are
        the GPUs other tenants' pods hold (core/queueing.py `reserve`).

        One walk serves every waiting job's pass until the capacity or a demand changes:
        each pass re-walking the jobs ahead of it cost a placement per job ahead, under the
        lock, and one freed GPU wakes every waiting job. The walk goes only as far as the
        jobs asked for so far, and further when a later one asks (a job's slot depends only
        on the jobs ahead of it)."""
        demands = tuple(sorted(self.demands.values(), key=queue_key))
        last = self.arrangement
        if last is None or (last.demands, last.nodes, last.lasting) != (demands, nodes, lasting):
            steps = walk(demands, nodes, lasting)
            last = self.arrangement = Arrangement(demands, nodes, lasting, steps, {})
        if job not in last.slots and any(d.key == job for d in demands):
            for slot in last.walk:
                last.slots[slot.key] = slot
                if slot.key == job:
                    break
        return last.slots.get(job)

    def forget_claims(self, job: JobKey) -> None:
        """The job is gone (or no longer ours): out of the queue and of preemption's view."""
        self.demands.pop(job, None)
        self.holders.pop(job, None)
        self.leaving.pop(job, None)

    def sweep_claims(self, known: frozenset[JobKey]) -> None:
        """Forgets queue and holder entries of jobs no longer known (deleted while no pass
        of theirs ran); under the claim lock."""
        for job in {*self.demands, *self.holders, *self.leaving} - known:
            self.forget_claims(job)

    def clock(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def mark_leaving(self, job: JobKey, pods: Mapping[str, str], units: int) -> None:
        until = time.monotonic() + LEAVING_SECONDS
        self.leaving.setdefault(job, {}).update({p: (n, units, until) for p, n in pods.items()})

    def leaving_pods(self, job: JobKey, present: frozenset[str] | None = None) -> frozenset[str]:
        """The job's workers preemption took, still leaving; forgets expired ones and, given
        the job's `present` pods, those already gone (the cache no longer counts them)."""
        now = time.monotonic()
        pods = {
            pod: entry
            for pod, entry in self.leaving.get(job, {}).items()
            if entry[2] > now and (present is None or pod in present)
        }
        if pods:
            self.leaving[job] = pods
        else:
            self.leaving.pop(job, None)
        return frozenset(pods)

    def without_leaving(self, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
        """`nodes` with the GPUs of leaving workers counted as free."""
        freed: dict[str, int] = {}
        now = time.monotonic()
        for pods in self.leaving.values():
            for node, units, until in pods.values():
                if until > now:
                    freed[node] = freed.get(node, 0) + units
        return [
            replace(n, used=max(0, n.used - freed[n.name])) if n.name in freed else n for n in nodes
        ]

    async def close(self) -> None:
        """Stop everything this runtime started, on the loop it started on.

        Passes in flight end first (their API calls have timeouts), so a standby that takes
        the Lease next never decides beside a pass of ours that is still writing.
        """
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.queue.close()
        await asyncio.to_thread(self._stop_threads)

    def _stop_threads(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.elector is not None:
            self.elector.stop()  # hands the Lease back: a standby takes over at once
        if self.workload_watch is not None:
            self.workload_watch.stop()
        self.cache.stop()
