"""Where an agent learns the current epoch's membership: the DDLJob's status, or a local file."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from ddl_operator.api.models import Member, Rendezvous
from ddl_worker.fileio import read_json

log = logging.getLogger(__name__)


class MembershipError(Exception):
    """The published membership cannot be used; the message says what is wrong with it."""


def parse_rendezvous(raw: Any, origin: str) -> Rendezvous:
    """Validate a published status.rendezvous and its internal consistency."""
    try:
        rendezvous = Rendezvous.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in error.errors()
        )
        raise MembershipError(f"{origin}: status.rendezvous is malformed: {problems}") from None
    check_rendezvous(rendezvous, origin)
    return rendezvous


def check_rendezvous(rendezvous: Rendezvous, origin: str) -> None:
    """Refuse a membership that would make ranks disagree about the process group."""
    problem = None
    ranks = [m.rank for m in rendezvous.members]
    pods = [m.pod for m in rendezvous.members]
    if len(rendezvous.members) != rendezvous.workers:
        problem = f"workers={rendezvous.workers} but {len(rendezvous.members)} members"
    elif ranks != list(range(rendezvous.workers)):
        problem = f"member ranks {ranks} are not 0..{rendezvous.workers - 1} in order"
    elif len(set(pods)) != len(pods):
        problem = f"a pod appears twice in members {pods}"
    elif rendezvous.grid and math.prod(rendezvous.grid) != rendezvous.world_size:
        problem = (
            f"grid {rendezvous.grid} has {math.prod(rendezvous.grid)} processes, world size is "
            f"{rendezvous.workers} workers x {rendezvous.processes_per_worker}"
        )
    elif rendezvous.workers > 0 and not rendezvous.master_addr:
        problem = "masterAddr is empty"
    if problem:
        raise MembershipError(f"{origin}: status.rendezvous (epoch {rendezvous.epoch}): {problem}")


def find_member(rendezvous: Rendezvous, pod: str) -> Member | None:
    return next((m for m in rendezvous.members if m.pod == pod), None)


class MembershipSource(Protocol):
    """The latest published membership, read without blocking."""

    def latest(self) -> Rendezvous | None:
        """The newest membership; None when none is published yet.

        Raises MembershipError when what is published is malformed.
        """
        ...

    def problem(self) -> str | None:
        """Why nothing (new) can be read right now, for messages; None when all is well."""
        ...

    def close(self) -> None: ...


class FileMembership:
    """Local mode: a JSON file (the rendezvous object) the local coordinator replaces atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None
        self._cached: Rendezvous | None = None

    def latest(self) -> Rendezvous | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (stat.st_mtime_ns, stat.st_ino)
        if key != self._seen:
            try:
                raw = read_json(self.path)
            except ValueError as error:
                raise MembershipError(f"{self.path}: not JSON: {error}") from None
            self._cached = None if raw is None else parse_rendezvous(raw, str(self.path))
            self._seen = key
        return self._cached

    def problem(self) -> str | None:
        return None if self.path.exists() else f"{self.path} does not exist yet"

    def close(self) -> None:
        return None


class JobReader(Protocol):
    """The two Kubernetes calls membership needs (kube.KubernetesApi is the real one)."""

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The DDLJob object, or None when it does not exist."""
        ...

    def watch_job(
        self, namespace: str, name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[dict[str, Any] | None]:
        """Versions of the DDLJob as they change (None: deleted) until the timeout."""
        ...


class KubernetesMembership:
    """Watches the DDLJob's status.rendezvous from a background thread.

    The API server is the rendezvous (no etcd of our own): the operator publishes, every
    agent watches. Lost watches are re-listed with backoff; the last good membership stays
    readable meanwhile, and problem() says what is going wrong.
    """

    WATCH_SECONDS = 60
    MAX_BACKOFF = 30.0

    def __init__(self, reader: JobReader, namespace: str, name: str) -> None:
        self.reader = reader
        self.namespace = namespace
        self.name = name
        self.origin = f"ddljob {namespace}/{name}"
        self._lock = threading.Lock()
        self._rendezvous: Rendezvous | None = None
        self._malformed: MembershipError | None = None
        self._problem: str | None = "no response from the API server yet"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="membership-watch", daemon=True)
        self._thread.start()

    def latest(self) -> Rendezvous | None:
        with self._lock:
            if self._malformed is not None:
                raise self._malformed
            return self._rendezvous

    def problem(self) -> str | None:
        with self._lock:
            return self._problem

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                job = self.reader.get_job(self.namespace, self.name)
                if job is None:
                    raise LookupError(f"{self.origin} not found")
                self._take(job)
                version = str(job.get("metadata", {}).get("resourceVersion", ""))
                backoff = 1.0
                for event in self.reader.watch_job(
                    self.namespace, self.name, version, self.WATCH_SECONDS
                ):
                    self._take(event)
                    if self._stop.is_set():
                        return
            except Exception as error:  # API down, 410 Gone, bad TLS: all retried
                with self._lock:
                    self._problem = f"watching {self.origin}: {error}"
                log.warning("%s; retrying in %.0fs", self._problem, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.MAX_BACKOFF)

    def _take(self, job: dict[str, Any] | None) -> None:
        if job is None:
            with self._lock:
                self._problem = f"{self.origin} not found"
            return
        raw = (job.get("status") or {}).get("rendezvous")
        try:
            rendezvous = None if raw is None else parse_rendezvous(raw, self.origin)
        except MembershipError as error:
            with self._lock:
                self._malformed, self._problem = error, str(error)
            return
        with self._lock:
            self._malformed = None
            self._problem = None if rendezvous else f"{self.origin} has no rendezvous yet"
            current = self._rendezvous
            if rendezvous is not None and (current is None or rendezvous.epoch >= current.epoch):
                self._rendezvous = rendezvous
