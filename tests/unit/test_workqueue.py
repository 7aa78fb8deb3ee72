"""The work queue's per-job back-off, and what a failing pass does to its job, in pure asyncio
(no cluster): failures wait longer each time and a success resets them, a 409 retries soon
without showing, the job gets one ReconcileError event per new reason, and a broken job never
starves a healthy one of the worker pool."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import functools
import json
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fakeruntime import JobWatchSink, fake_runtime
from kubernetes import client

from ddl_operator import controller
from ddl_operator.api.constants import LABEL_HOSTNAME
from ddl_operator.api.models import DDLJob
from ddl_operator.core.placement import GangRequest
from ddl_operator.core.queueing import Demand
from ddl_operator.core.reconcile import Event, Plan
from ddl_operator.core.topology import NodeInfo
from ddl_operator.kube import PriorityClasses, Snapshot
from ddl_operator.runtime import BACKGROUND, URGENT, Backoff, JobKey, Runtime, Settings, WorkQueue

from builders import make_ddljob

KEY: JobKey = ("ml", "job")


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Runs an async test on a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(1.0, 300.0)
    assert [backoff.delay(n) for n in range(11)] == [
        0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0,
    ]  # fmt: skip
    assert backoff.delay(10_000) == 300.0  # a job broken for days does not overflow


def _due(queue: WorkQueue, key: JobKey) -> float:
    """Seconds until the key's timer fires."""
    return queue.timers[key].when() - asyncio.get_running_loop().time()


@on_loop
async def test_failures_wait_longer_each_time_and_a_success_resets() -> None:
    queue = WorkQueue(errors=Backoff(10.0, 60.0))
    delays = [queue.add_rate_limited(KEY) for _ in range(5)]
    assert delays == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert 59.0 < _due(queue, KEY) <= 60.0 and not queue.queued
    assert queue.backing_off(KEY) and queue.failures[KEY] == 5
    queue.forget(KEY)
    assert not queue.backing_off(KEY)
    assert queue.add_rate_limited(KEY) == 10.0  # starts over
    queue.close()


@on_loop
async def test_a_retry_fires_after_its_delay_not_before() -> None:
    queue = WorkQueue(errors=Backoff(0.05, 1.0))
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue.add_rate_limited(KEY)
    await asyncio.sleep(0.02)
    assert not queue.queued
    assert await asyncio.wait_for(queue.get(), 2.0) == KEY
    assert loop.time() - start >= 0.05


@on_loop
async def test_the_back_off_replaces_a_sooner_requeue_of_the_failed_pass() -> None:
    queue = WorkQueue(errors=Backoff(30.0, 60.0))
    queue.add_after(KEY, 5.0)  # what the job's last good pass asked for
    queue.add_rate_limited(KEY)
    assert _due(queue, KEY) > 29.0
    queue.add_after(KEY, 100.0)  # a later requeue never postpones a sooner timer
    assert _due(queue, KEY) < 31.0
    queue.close()


@on_loop
async def test_an_event_is_not_held_back_by_the_back_off() -> None:
    """The change an event reports (a fixed spec, freed quota) may be the cure."""
    queue = WorkQueue(errors=Backoff(60.0, 60.0))
    queue.add_rate_limited(KEY)
    queue.add(KEY)
    assert await asyncio.wait_for(queue.get(), 1.0) == KEY
    queue.close()


@on_loop
async def test_conflicts_retry_soon_on_their_own_back_off() -> None:
    queue = WorkQueue(errors=Backoff(60.0, 600.0), conflict_backoff=Backoff(0.1, 0.4))
    assert [queue.add_conflicted(KEY) for _ in range(4)] == [0.1, 0.2, 0.4, 0.4]
    assert not queue.backing_off(KEY)  # a stale read is no failure of the job
    assert queue.add_rate_limited(KEY) == 60.0
    queue.close()


@on_loop
async def test_a_key_is_never_handed_out_twice_at_once() -> None:
    queue = WorkQueue()
    queue.add(KEY)
    queue.add(KEY)
    assert await queue.get() == KEY and not queue.queued
    queue.add(KEY)  # while its pass runs: once more after it
    assert not queue.queued
    queue.done(KEY)
    assert await asyncio.wait_for(queue.get(), 1.0) == KEY


@on_loop
async def test_a_jobs_own_events_go_before_wake_ups_of_waiting_jobs() -> None:
    queue = WorkQueue()
    waiting = [("ml", f"waiting-{i}") for i in range(3)]
    for key in waiting:
        queue.add(key, BACKGROUND)
    queue.add(KEY)  # its pods were bound: it has a rendezvous to publish
    queue.add(waiting[2])  # an event of its own moves a waiting job up, once
    got = [await asyncio.wait_for(queue.get(), 1.0) for _ in range(4)]
    assert got == [KEY, waiting[2], waiting[0], waiting[1]]
    assert not queue.queued and not any(queue.lanes)


@on_loop
async def test_a_key_busy_when_woken_comes_back_in_the_most_urgent_lane_asked() -> None:
    queue = WorkQueue()
    queue.add(KEY, BACKGROUND)
    assert await queue.get() == KEY
    queue.add(KEY, BACKGROUND)
    queue.add(("ml", "other"), BACKGROUND)
    queue.done(KEY)
    assert await asyncio.wait_for(queue.get(), 1.0) == ("ml", "other")  # FIFO in a lane
    assert await asyncio.wait_for(queue.get(), 1.0) == KEY
    queue.done(KEY)
    queue.add(KEY, BACKGROUND)
    queue.add(KEY, URGENT)  # while queued in the background: moves up
    queue.add(("ml", "late"), BACKGROUND)
    assert await asyncio.wait_for(queue.get(), 1.0) == KEY
    assert await asyncio.wait_for(queue.get(), 1.0) == ("ml", "late")
    assert not queue.queued and not any(queue.lanes)  # handed out once each


def test_waiting_jobs_wake_in_the_gpu_queues_order() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    request = GangRequest(1, 1, 8, (LABEL_HOSTNAME,), None, 1)

    def demand(name: str, priority: int, age: int) -> Demand:
        return Demand(("ml", name), priority, t0 - dt.timedelta(seconds=age), request)

    demands = {
        d.key: d for d in (demand("low-old", 1, 50), demand("high", 10, 1), demand("low-new", 1, 5))
    }
    pending = [("ml", "low-new"), ("ml", "unfiled"), ("ml", "low-old"), ("ml", "high")]
    assert controller.waiting_in_order(pending, demands) == [
        ("ml", "high"), ("ml", "low-old"), ("ml", "low-new"), ("ml", "unfiled"),
    ]  # fmt: skip


# -- what a failing pass does to its job ---------------------------------------------------


def _api_error(status: int, reason: str, message: str) -> client.ApiException:
    err = client.ApiException(status=status, reason=reason)
    err.body = json.dumps({"kind": "Status", "code": status, "reason": reason, "message": message})
    return err


QUOTA = 'pods "job-worker-0" is forbidden: exceeded quota: none, limited: pods=0'


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (_api_error(403, "Forbidden", QUOTA), controller.PassError("Forbidden", QUOTA)),
        (
            _api_error(409, "Conflict", "the object has been modified"),
            controller.PassError("Conflict", "the object has been modified", conflict=True),
        ),
        (
            client.ApiException(status=503, reason="Service Unavailable"),
            controller.PassError("ServiceUnavailable", "503 Service Unavailable"),
        ),
        (TimeoutError("read timed out"), controller.PassError("TimeoutError", "read timed out")),
    ],
)
def test_a_failure_is_named_by_the_apis_reason_or_the_exception(
    err: Exception, expected: controller.PassError
) -> None:
    assert controller.pass_error(err) == expected


def test_the_condition_is_written_once_per_message_and_news_once_per_reason() -> None:
    quota = controller.PassError("Forbidden", QUOTA)
    placed = {"type": "Placed", "status": "False", "reason": "Placing", "message": "0/2"}
    first = controller.error_status({"phase": "Pending", "conditions": [placed]}, quota, "T1")
    assert first is not None
    status, news = first
    assert news and status["phase"] == "Pending"
    assert status["conditions"] == [
        placed,
        {
            "type": "ReconcileError",
            "status": "True",
            "reason": "Forbidden",
            "message": QUOTA,
            "lastTransitionTime": "T1",
        },
    ]
    assert controller.error_status(status, quota, "T2") is None  # same error: no write
    other = controller.PassError("Forbidden", QUOTA.replace("pods=0", "pods=1"))
    second = controller.error_status(status, other, "T3")
    assert second is not None and not second[1]  # new message, same reason: no event
    assert second[0]["conditions"][-1]["lastTransitionTime"] == "T1"
    third = controller.error_status(second[0], controller.PassError("Timeout", "slow"), "T4")
    assert third is not None and third[1]


class FakeKube(JobWatchSink):
    """The API edge: jobs by name; `failing` names make every read raise `error`."""

    def __init__(self, names: list[str], error: Exception) -> None:
        self.bodies = {
            name: {**make_ddljob(name=name, replicas=1), "metadata": _meta(name)} for name in names
        }
        self.failing: set[str] = set()
        self.error = error
        self.passes: Counter[str] = Counter()
        self.applied: Counter[str] = Counter()
        self.events: list[tuple[str, Event]] = []
        self.node = NodeInfo(
            name="n0", labels={"kubernetes.io/hostname": "n0"}, allocatable=8, used=0
        )

    def snapshot(self, namespace: str, name: str) -> Snapshot:
        self.passes[name] += 1
        if name in self.failing:
            raise self.error
        body = copy.deepcopy(self.bodies[name])
        return Snapshot(DDLJob.model_validate(body), body, pods=[], nodes=[self.node])

    def node_infos(self, job: DDLJob) -> list[NodeInfo]:
        return [self.node]

    def priority_classes(self) -> PriorityClasses:
        return PriorityClasses()

    def apply(self, snap: Snapshot, plan: Plan, identity: Any = None) -> str | None:
        name = snap.job.metadata.name
        self.applied[name] += 1
        status = plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")
        return self.replace_status(snap.body, status)

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.bodies[name])

    def replace_status(self, body: dict[str, Any], status: dict[str, Any]) -> str:
        name = body["metadata"]["name"]
        version = str(int(self.bodies[name]["metadata"]["resourceVersion"]) + 1)
        self.bodies[name] = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": version},
            "status": status,
        }
        return version

    def post_events(self, body: dict[str, Any], events: list[Event]) -> None:
        self.events.extend((body["metadata"]["name"], e) for e in events)

    def conditions(self, name: str) -> dict[str, dict[str, Any]]:
        status = self.bodies[name].get("status") or {}
        return {x["type"]: x for x in status.get("conditions", [])}


def _meta(name: str) -> dict[str, Any]:
    return {"name": name, "namespace": "ml", "uid": f"u-{name}", "resourceVersion": "1"}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown()


def _runtime(kube: FakeKube, executor: ThreadPoolExecutor, queue: WorkQueue) -> Runtime:
    return fake_runtime(kube, executor, Settings(workers=1), queue)


@on_loop
async def test_a_broken_job_backs_off_shows_its_error_once_and_never_starves_another(
    executor: ThreadPoolExecutor,
) -> None:
    kube = FakeKube(["broken", "healthy"], _api_error(403, "Forbidden", QUOTA))
    kube.failing.add("broken")
    rt = _runtime(kube, executor, WorkQueue(errors=Backoff(0.05, 0.2)))
    broken, healthy = ("ml", "broken"), ("ml", "healthy")
    worker = asyncio.create_task(controller._worker(rt))  # one worker for both jobs
    try:
        rt.queue.add(broken)
        for _ in range(20):  # the healthy job keeps getting events
            rt.queue.add(healthy)
            await asyncio.sleep(0.05)
        # 1 s at 0.05, 0.1, 0.2, 0.2 ... s apart: a handful of passes, not a spin.
        assert 3 <= kube.passes["broken"] <= 8, kube.passes
        assert kube.passes["healthy"] >= 15, kube.passes
        assert kube.applied["broken"] == 0 and rt.queue.failures[broken] >= 3
        error = kube.conditions("broken")["ReconcileError"]
        assert (error["status"], error["reason"], error["message"]) == ("True", "Forbidden", QUOTA)
        assert "ReconcileError" not in kube.conditions("healthy")
        # Each of its passes creates its pod (the fake never shows it): not at rest, so the
        # echo of its status write is looked at like any event.
        assert healthy not in rt.echoes
        warnings = [e for name, e in kube.events if name == "broken"]
        assert [(e.type, e.reason) for e in warnings] == [("Warning", "ReconcileError")]
        assert warnings[0].message == f"Forbidden: {QUOTA}"
        # Its own condition write echoes back: the event brings no pass of its own.
        version = kube.bodies["broken"]["metadata"]["resourceVersion"]
        assert rt.echoes[broken] == version
        probe = dataclasses.replace(rt, queue=WorkQueue())
        echo = kube.bodies["broken"]
        controller.job_event("MODIFIED", "broken", "ml", echo, {"runtime": probe})
        assert not probe.queue.queued
        edited = {**echo, "metadata": {**echo["metadata"], "resourceVersion": "edited"}}
        controller.job_event("MODIFIED", "broken", "ml", edited, {"runtime": probe})
        assert len(probe.queue.queued) == 1  # a change by anyone else is looked at now

        # The quota is raised: the next retry succeeds, clears the condition, resets.
        kube.failing.clear()
        await asyncio.sleep(0.5)
        assert kube.applied["broken"] >= 1
        assert "ReconcileError" not in kube.conditions("broken")
        assert not rt.queue.backing_off(broken)
        assert len([e for name, e in kube.events if name == "broken"]) == 1
    finally:
        worker.cancel()
        rt.queue.close()


@on_loop
async def test_a_conflict_retries_without_showing_on_the_job(executor: ThreadPoolExecutor) -> None:
    kube = FakeKube(["job"], _api_error(409, "Conflict", "the object has been modified"))
    kube.failing.add("job")
    queue = WorkQueue(errors=Backoff(60.0, 60.0), conflict_backoff=Backoff(0.02, 0.05))
    rt = _runtime(kube, executor, queue)
    worker = asyncio.create_task(controller._worker(rt))
    try:
        rt.queue.add(KEY)
        await asyncio.sleep(0.3)
        assert kube.passes["job"] >= 3  # soon, not after the error back-off's minute
        assert kube.conditions("job") == {} and kube.events == []
        assert not rt.queue.backing_off(KEY)
    finally:
        worker.cancel()
        rt.queue.close()
