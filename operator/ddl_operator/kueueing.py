"""The operator's Kueue I/O: its Workloads, the ResourceFlavors they name, and a watch that
brings a job's pass when Kueue changes its Workload (controller-runtime's Owns(&Workload{})).

Kueue is optional: whether the API server serves kueue.x-k8s.io/v1beta2 Workloads is asked
(discovery) at most every INSTALLED_TTL_SECONDS, and the watch waits for it; without Kueue
a queued job is held with a condition that says so (core/kueue.py decides what to write).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from kubernetes import client
from kubernetes.client.rest import ApiException

from ddl_operator.api import constants as c
from ddl_operator.cache import watch_events
from ddl_operator.core import kueue as k

log = logging.getLogger(__name__)

VERSION: Final = k.API_VERSION.split("/", 1)[1]
WORKLOADS: Final = "workloads"
FLAVORS: Final = "resourceflavors"
INSTALLED_TTL_SECONDS: Final = 30.0
WATCH_SECONDS: Final = 300
CALL_TIMEOUT: Final = (5.0, 30.0)
BACKOFF_SECONDS: Final = (0.5, 30.0)

JobKey = tuple[str, str]


class KueueApi:
    """Thin typed wrapper over the Kueue calls a pass makes."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self._lock = threading.Lock()
        self._installed: bool | None = None
        self._asked = 0.0

    def installed(self) -> bool:
        """Whether the API server serves Kueue's Workloads (cached for a while: installing
        Kueue is noticed within INSTALLED_TTL_SECONDS)."""
        with self._lock:
            if (
                self._installed is not None
                and time.monotonic() - self._asked < INSTALLED_TTL_SECONDS
            ):
                return self._installed
            try:
                served = self.custom.get_api_resources(
                    k.GROUP, VERSION, _request_timeout=CALL_TIMEOUT
                )
                self._installed = any(r.name == WORKLOADS for r in served.resources or [])
            except ApiException as err:
                if err.status != 404:
                    raise
                self._installed = False
            self._asked = time.monotonic()
            return self._installed

    def get_workload(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                k.GROUP, VERSION, namespace, WORKLOADS, name, _request_timeout=CALL_TIMEOUT
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return obj

    def create_workload(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Creates the job's Workload; one already there (an earlier pass made it) is read."""
        meta = body["metadata"]
        try:
            obj: dict[str, Any] = self.custom.create_namespaced_custom_object(
                k.GROUP, VERSION, meta["namespace"], WORKLOADS, dict(body)
            )
            return obj
        except ApiException as err:
            if err.status != 409:
                raise
        found = self.get_workload(meta["namespace"], meta["name"])
        if found is None:  # deleted in between: the next pass creates it
            raise ApiException(status=409, reason="Workload deleted while adopted")
        return found

    def delete_workload(self, obj: Mapping[str, Any]) -> None:
        """Deletes exactly this Workload (uid precondition); a gone one is fine."""
        meta = obj["metadata"]
        try:
            self.custom.delete_namespaced_custom_object(
                k.GROUP,
                VERSION,
                meta["namespace"],
                WORKLOADS,
                meta["name"],
                body={"preconditions": {"uid": meta.get("uid")}},
            )
        except ApiException as err:
            if err.status != 404:
                raise

    def apply_status(self, write: k.StatusWrite) -> None:
        """Server-side apply on the Workload's status as `write.field_manager`."""
        meta = write.body["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            k.GROUP,
            VERSION,
            meta["namespace"],
            WORKLOADS,
            meta["name"],
            write.body,
            field_manager=write.field_manager,
            force=write.force or None,
            _content_type="application/apply-patch+yaml",
        )

    def adopt(self, obj: Mapping[str, Any], owner: Mapping[str, Any]) -> dict[str, Any]:
        """Adds the job's controller ownerReference to a Workload found by name without it."""
        meta = obj["metadata"]
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != owner["uid"]]
        patch = {
            "metadata": {
                "resourceVersion": meta.get("resourceVersion"),
                "ownerReferences": [*refs, dict(owner)],
            }
        }
        written: dict[str, Any] = self.custom.patch_namespaced_custom_object(
            k.GROUP,
            VERSION,
            meta["namespace"],
            WORKLOADS,
            meta["name"],
            patch,
            _content_type="application/merge-patch+json",
        )
        return written

    def flavors(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """The named ResourceFlavors (cluster-scoped); a missing one is left out (the core
        then says which, and the pass retries)."""
        out = []
        for name in names:
            try:
                out.append(
                    self.custom.get_cluster_custom_object(
                        k.GROUP, VERSION, FLAVORS, name, _request_timeout=CALL_TIMEOUT
                    )
                )
            except ApiException as err:
                if err.status != 404:
                    raise
        return out


class WorkloadWatch:
    """Watches the operator's Workloads (label ddl-operator.dev/job) and reports the job each
    event concerns; waits, without logging every minute, while Kueue is not installed."""

    def __init__(
        self,
        api: KueueApi,
        changed: Callable[[JobKey], None],
        namespaces: Sequence[str] = (),
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.api = api
        self.changed = changed
        self.namespaces = tuple(namespaces) or ("",)  # "" is every namespace
        self.watch_seconds = watch_seconds
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, Any] = {}

    def start(self) -> None:
        for ns in self.namespaces:
            thread = threading.Thread(
                target=self._run, args=(ns,), name=f"kueue-watch-{ns or 'all'}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        for response in list(self._responses.values()):
            with contextlib.suppress(OSError):
                response.shutdown()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, namespace: str) -> None:
        backoff = BACKOFF_SECONDS[0]
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if not self.api.installed():
                    version = None
                    self._stopping.wait(INSTALLED_TTL_SECONDS)
                    continue
                version = self._watch(namespace, version)
                backoff = BACKOFF_SECONDS[0]
            except Exception as err:  # a broken connection, 410, a 5xx: wait, list again
                if self._stopping.is_set():
                    break
                version = None
                log.warning("Workload watch failed (%s); retrying in %.1fs", err, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_SECONDS[1])

    def _call(self, namespace: str, **kw: Any) -> Any:
        custom = self.api.custom
        selector = {"label_selector": c.LABEL_JOB, "_preload_content": False}
        if namespace:
            return custom.list_namespaced_custom_object(
                k.GROUP, VERSION, namespace, WORKLOADS, **selector, **kw
            )
        return custom.list_cluster_custom_object(k.GROUP, VERSION, WORKLOADS, **selector, **kw)

    def _watch(self, namespace: str, version: str | None) -> str | None:
        """A list when there is no version to resume from (each Workload reported, since
        events may have been missed), then events until the server ends the watch."""
        if version is None:
            response = self._call(namespace, _request_timeout=CALL_TIMEOUT)
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            for obj in page.get("items") or []:
                self._report(obj)
            version = str((page.get("metadata") or {}).get("resourceVersion") or "")
        response = self._call(
            namespace,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_seconds,
            _request_timeout=(CALL_TIMEOUT[0], self.watch_seconds + 30),
        )
        self._responses[namespace] = response
        try:
            for kind, obj in watch_events(response, self._stopping):
                if kind == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                if kind != "BOOKMARK":
                    self._report(obj)
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        finally:
            self._responses.pop(namespace, None)
            response.close()
            response.release_conn()
        return version

    def _report(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        job = (meta.get("labels") or {}).get(c.LABEL_JOB)
        if isinstance(job, str) and isinstance(meta.get("namespace"), str):
            self.changed((meta["namespace"], job))
