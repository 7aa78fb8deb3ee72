"""Leader election for running several operator replicas: only the Lease's holder reconciles.

The I/O edge of core/lease.py. One thread per elector reads the Lease, writes what `decide`
says with the resourceVersion it read (a 409 means another candidate won that round), and
keeps renewing once it leads. A thread rather than an asyncio task, so that a busy or stalled
event loop cannot starve the renewals and cost the leadership. Every call has a timeout
that ends before the renew deadline can pass unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kubernetes
import urllib3
from kubernetes import client

from ddl_operator.core.lease import (
    LeaseRecord,
    Seen,
    Step,
    Timing,
    decide,
    from_spec,
    released,
    renew_overdue,
    to_spec,
)

log = logging.getLogger("ddl_operator.leader")

_API_ERRORS = (client.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)


@dataclass(frozen=True)
class LeaseConfig:
    """Which Lease, who we are, and client-go's three timings (same defaults)."""

    namespace: str
    identity: str
    name: str = "ddl-operator"
    duration_seconds: float = 15.0
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0

    @property
    def timing(self) -> Timing:
        return Timing(self.duration_seconds, self.renew_seconds, self.retry_seconds)


def _clock_origin() -> Callable[[], dt.datetime]:
    """UTC wall time that moves with the monotonic clock, so an NTP step cannot make a lease
    look expired or a renewal overdue; the timestamps written stay wall time."""
    wall, mono = dt.datetime.now(dt.UTC), time.monotonic()
    return lambda: wall + dt.timedelta(seconds=time.monotonic() - mono)


class LeaderElector:
    """Acquires the Lease, renews it in a background thread, releases it on `stop`.

    `on_lost` runs (on the renew thread) once, when a leader fails to renew within the
    renew deadline or finds the Lease held by another; the caller must stop reconciling.
    """

    def __init__(
        self, api: kubernetes.client.ApiClient, config: LeaseConfig, on_lost: Callable[[], None]
    ) -> None:
        self.config = config
        self.timing = config.timing  # checks the timings now, not in the thread
        self._leases = client.CoordinationV1Api(api)
        self._on_lost = on_lost
        self._now = _clock_origin()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._leading = False
        self._lease = f"{config.namespace}/{config.name}"

    @property
    def leading(self) -> bool:
        return self._leading

    async def acquire(self) -> None:
        """Returns once this process holds the Lease; renewals go on in the background."""
        if self._thread is not None:
            raise RuntimeError("acquire() called twice")
        loop = asyncio.get_running_loop()
        acquired = asyncio.Event()

        def signal_acquired() -> None:
            # The loop may be gone if acquire() was cancelled at shutdown; the thread then
            # sees the stop and releases what it just took.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(acquired.set)

        self._thread = threading.Thread(
            target=self._run,
            args=(signal_acquired,),
            name="leader-election",
            daemon=True,
        )
        self._thread.start()
        try:
            await acquired.wait()
        except asyncio.CancelledError:
            self._stopping.set()  # shutting down while standby: the thread ends at its next wait
            raise

    def stop(self) -> None:
        """Stop renewing and hand the Lease back (a standby takes over at its next try)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # The thread releases on its way out; its calls time out within renew_seconds.
            thread.join(timeout=2 * self.timing.renew_seconds)
            if thread.is_alive():
                log.warning("leader election: %s not released in time", self._lease)

    # -- the renew thread ---------------------------------------------------------------------

    def _run(self, signal_acquired: Callable[[], None]) -> None:
        log.info("leader election: acquiring Lease %s as %s", self._lease, self.config.identity)
        try:
            self._loop(signal_acquired)
        except Exception:
            # Whatever broke, a leader that no longer renews must not go on leading.
            log.exception("leader election: renew loop failed")
            if self._leading:
                self._lose("renew loop failed")

    def _loop(self, signal_acquired: Callable[[], None]) -> None:
        seen: Seen | None = None
        last_renewed = self._now()
        holder = ""
        while not self._stopping.is_set():
            now = self._now()
            step: Step | None = None
            wrote = False
            try:
                step, wrote = self._try(seen, now, last_renewed)
                seen = step.seen
            except _API_ERRORS as err:
                log.warning("leader election: %s: %s", self._lease, _reason(err))
            if self._leading:
                if wrote:
                    last_renewed = now
                elif step is not None and step.write is None:
                    current = step.seen.record
                    self._lose(f"now held by {current.holder if current else '?'}")
                    return
                if renew_overdue(last_renewed, self._now(), self.timing):
                    self._lose(f"not renewed for {self.timing.renew_seconds:g} s")
                    return
            elif wrote:
                self._leading, last_renewed = True, now
                record = step.write if step else None
                log.info(
                    "leader election: acquired Lease %s as %s (transitions: %d)",
                    self._lease,
                    self.config.identity,
                    record.transitions if record else 0,
                )
                signal_acquired()
            elif step is not None and step.seen.record and step.seen.record.holder != holder:
                holder = step.seen.record.holder
                log.info("leader election: %s is held by %s", self._lease, holder or "nobody")
            wait = step.wait_seconds if step is not None else self.timing.retry_seconds
            self._stopping.wait(wait)
        if self._leading:
            self._release()

    def _try(
        self, seen: Seen | None, now: dt.datetime, last_renewed: dt.datetime
    ) -> tuple[Step, bool]:
        """Read, decide, write. Returns the step and whether a write of ours landed."""
        timeout = self._timeout(now, last_renewed)
        current, version = self._read(timeout)
        step = decide(current, seen, self.config.identity, now, self.timing)
        if step.write is None:
            return step, False
        try:
            self._write(step.write, version, timeout)
        except client.ApiException as err:
            if err.status == 409:  # another candidate wrote first: it won this round
                log.debug("leader election: %s: lost a write race", self._lease)
                return step, False
            raise
        return step, True

    def _timeout(self, now: dt.datetime, last_renewed: dt.datetime) -> tuple[float, float]:
        """A leader's call must end before its renew deadline; a candidate's within one."""
        left = self.timing.renew_seconds
        if self._leading:
            left -= (now - last_renewed).total_seconds()
        # Two calls per try (read, write), each with at most half of what is left.
        per_call = max(0.5, left / 2)
        return (min(per_call, 5.0), per_call)

    def _read(self, timeout: tuple[float, float]) -> tuple[LeaseRecord | None, str | None]:
        try:
            resp = self._leases.read_namespaced_lease(
                self.config.name,
                self.config.namespace,
                _preload_content=False,
                _request_timeout=timeout,
            )
        except client.ApiException as err:
            if err.status == 404:
                return None, None
            raise
        lease: dict[str, Any] = json.loads(resp.data)
        return from_spec(lease.get("spec")), lease["metadata"]["resourceVersion"]

    def _write(
        self, record: LeaseRecord, version: str | None, timeout: tuple[float, float]
    ) -> None:
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.config.name, "namespace": self.config.namespace},
            "spec": to_spec(record),
        }
        if version is None:  # absent: a create, refused with 409 if someone created it first
            self._leases.create_namespaced_lease(
                self.config.namespace, body, _preload_content=False, _request_timeout=timeout
            )
        else:  # the resourceVersion makes a stale replace fail with 409
            body["metadata"]["resourceVersion"] = version
            self._leases.replace_namespaced_lease(
                self.config.name,
                self.config.namespace,
                body,
                _preload_content=False,
                _request_timeout=timeout,
            )

    def _lose(self, why: str) -> None:
        self._leading = False
        log.error("leader election: lost Lease %s (%s)", self._lease, why)
        self._on_lost()

    def _release(self) -> None:
        self._leading = False
        timeout = (2.0, self.timing.renew_seconds / 2)
        try:
            current, version = self._read(timeout)
            record = released(current, self.config.identity, self._now())
            if record is not None:
                self._write(record, version, timeout)
                log.info("leader election: released Lease %s", self._lease)
        except _API_ERRORS as err:
            # The standby then takes over once the duration runs out.
            log.warning("leader election: could not release %s: %s", self._lease, _reason(err))


def _reason(err: Exception) -> str:
    if isinstance(err, client.ApiException):
        return f"{err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"
