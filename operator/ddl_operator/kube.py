"""Kubernetes I/O for the operator: read one job's snapshot, apply one plan.

The only module that talks to the API server on the reconcile path; everything it returns
is plain data for the pure core.

A snapshot reads the job as the DDLJob watch last delivered it and the pods as the cache's
worker watch has them, each only once that watch has caught up with what this operator last
wrote to it or read of it (its resourceVersion: core/versions.py), so a pass never decides
on less than it already knows; otherwise it reads from the API. Under a burst of jobs this
takes two reads off most passes, and the API server's reads off its busiest moments.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException

from ddl_operator import metrics
from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.cache import ClusterCache
from ddl_operator.core.affinity import required_terms
from ddl_operator.core.ledger import pod_key as object_key  # (namespace, name) of any object
from ddl_operator.core.podview import owned_by, worker_view
from ddl_operator.core.reconcile import Event, Plan, WorkerPod
from ddl_operator.core.render import headless_service, pinned_creates
from ddl_operator.core.topology import NodeInfo
from ddl_operator.core.versions import UNSEEN, at_least, comparable, newest

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
JobKey = tuple[str, str]  # (namespace, name)
FANOUT: Final = 16  # concurrent API calls of the passes together (see apiclient's pool)

_TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Snapshot:
    job: DDLJob
    body: Mapping[str, Any]
    pods: list[WorkerPod]
    nodes: list[NodeInfo]
    uids: Mapping[str, str] = field(default_factory=dict)  # pod name -> uid


PRIORITY_TTL_SECONDS: Final = 30.0


@dataclass(frozen=True)
class PriorityClasses:
    """What the queue needs of the cluster's PriorityClasses."""

    values: Mapping[str, int] = field(default_factory=dict)
    global_default: int | None = None
    never_preempt: frozenset[str] = frozenset()  # classes with preemptionPolicy Never

    @classmethod
    def from_items(cls, items: Iterable[Mapping[str, Any]]) -> PriorityClasses:
        values: dict[str, int] = {}
        default, never = None, set()
        for item in items:
            name, value = item.get("metadata", {}).get("name"), item.get("value")
            if not isinstance(name, str) or not isinstance(value, int):
                continue
            values[name] = value
            if item.get("globalDefault") is True:
                default = value
            if item.get("preemptionPolicy") == "Never":
                never.add(name)
        return cls(values, default, frozenset(never))


class Kube:
    """Thin typed wrapper over the API calls the operator makes."""

    def __init__(self, api: client.ApiClient, cache: ClusterCache) -> None:
        self.api = api
        self.cache = cache
        # A pass's independent calls (its pods' creates, patches, deletes) go out together.
        self._fanout = ThreadPoolExecutor(FANOUT, thread_name_prefix="api")
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._priority_lock = threading.Lock()
        self._priorities: PriorityClasses | None = None
        self._priority_read = 0.0
        # The DDLJob watch's latest body per job, and per job the newest resourceVersion of
        # it (and of its pods) this operator wrote or read: a cache older than that is
        # not read.
        self._known = threading.Lock()
        self._bodies: dict[JobKey, dict[str, Any]] = {}
        self._job_floor: dict[JobKey, str] = {}
        self._pod_floor: dict[JobKey, str] = {}

    # -- what the watches delivered, and what this operator wrote ---------------------------

    def observe_job(self, body: Mapping[str, Any]) -> None:
        """The DDLJob watch's latest body of a job (called for each event)."""
        with self._known:
            self._bodies[object_key(body)] = copy.deepcopy(dict(body))

    def forget_job(self, key: JobKey) -> None:
        with self._known:
            self._bodies.pop(key, None)
            self._job_floor.pop(key, None)
            self._pod_floor.pop(key, None)

    def _saw(
        self, floors: dict[JobKey, str], key: JobKey, version: str | None, read: bool = False
    ) -> None:
        """Raise a floor to `version`. A consistent `read` from the API also replaces the
        UNSEEN mark a failed write left: it shows whatever that write did."""
        if not version:
            return
        with self._known:
            old = floors.get(key)
            raised = version if read and not comparable(old) else newest(old, version)
            if raised:
                floors[key] = raised

    def _job_at(self, body: Mapping[str, Any], read: bool = False) -> None:
        version = (body.get("metadata") or {}).get("resourceVersion")
        self._saw(self._job_floor, object_key(body), version, read)

    def _write_job(
        self, body: Mapping[str, Any], write: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """One write to the job `body` was read as; its result raises the job's floor."""
        with self._unseen_on_error(self._job_floor, object_key(body)):
            written = write()
        self._job_at(written)
        return written

    @contextlib.contextmanager
    def _unseen_on_error(self, floors: dict[JobKey, str], key: JobKey) -> Iterator[None]:
        """A write that fails may still have landed, unseen: read from the API until a
        read has shown it."""
        try:
            yield
        except BaseException:
            self._saw(floors, key, UNSEEN)
            raise

    def _cached_job(self, key: JobKey) -> dict[str, Any] | None:
        with self._known:
            body = self._bodies.get(key)
            floor = self._job_floor.get(key)
        version = (body or {}).get("metadata", {}).get("resourceVersion")
        return body if body is not None and at_least(version, floor) else None

    # -- reading --------------------------------------------------------------------------------

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            body: dict[str, Any] = self.custom.get_namespaced_custom_object(
                c.GROUP, c.VERSION, namespace, c.PLURAL, name
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        self._job_at(body, read=True)
        return body

    def snapshot(self, namespace: str, name: str) -> Snapshot | None:
        key = (namespace, name)
        with self._known:
            pod_floor = self._pod_floor.get(key)
        listing = None
        if not self.cache.workers_at(pod_floor):
            listing = self._fanout.submit(
                self.core.list_namespaced_pod,
                namespace,
                label_selector=f"{c.LABEL_JOB}={name},{c.LABEL_ROLE}=worker",
                _preload_content=False,  # plain JSON: client models cost ms per pod
            )
        body = self._cached_job(key)
        metrics.SNAPSHOT_READS.labels("job", "api" if body is None else "cache").inc()
        if body is None:
            body = self.get_job(namespace, name)  # raises the job's floor
        metrics.SNAPSHOT_READS.labels("pods", "api" if listing else "cache").inc()
        raw = _json(listing.result()) if listing is not None else None
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        job = DDLJob.model_validate(body)
        uid = job.metadata.uid
        if raw is None:
            workers = self.cache.worker_pods(key, uid)
            pods, uids = [w.view for w in workers], {w.view.name: w.uid for w in workers}
        else:
            version = raw.get("metadata", {}).get("resourceVersion")
            self._saw(self._pod_floor, key, version, read=True)
            owned = [p for p in raw["items"] if owned_by(p, uid)]
            pods = [worker_view(p) for p in owned]
            uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in owned}
        return Snapshot(job=job, body=body, pods=pods, nodes=self.node_infos(job), uids=uids)

    def node_infos(self, job: DDLJob) -> list[NodeInfo]:
        """Every node with its free GPUs, from the cache (no listing): bound pods, and pods
        we placed but the scheduler has not bound yet (so two jobs never take the same GPUs)."""
        pod_spec = job.spec.template.get("spec") or {}
        return self.cache.node_infos(
            pod_spec.get("tolerations") or [],
            pod_spec.get("nodeSelector") or {},
            required_terms(pod_spec),
        )

    def list_jobs(self, namespaces: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Every DDLJob, or those of `namespaces` (namespaced RBAC refuses the cluster list)."""
        if not namespaces:
            items: list[dict[str, Any]] = self.custom.list_cluster_custom_object(
                c.GROUP, c.VERSION, c.PLURAL
            )["items"]
            return items
        return [
            job
            for ns in namespaces
            for job in self.custom.list_namespaced_custom_object(c.GROUP, c.VERSION, ns, c.PLURAL)[
                "items"
            ]
        ]

    def priority_classes(self, refresh: bool = False) -> PriorityClasses:
        """The cluster's PriorityClasses, read at most every PRIORITY_TTL_SECONDS (a handful
        of objects that rarely change; a pass never waits on more than one read). Without the
        RBAC to read them every job ranks 0 (logged once): the queue is then first come,
        first served. `refresh` reads them now (a Workload's priority is fixed when it is
        created, so a class made just before its job must not be missed)."""
        with self._priority_lock:
            fresh = time.monotonic() - self._priority_read < PRIORITY_TTL_SECONDS
            if self._priorities is not None and fresh and not refresh:
                return self._priorities
            try:
                items = client.SchedulingV1Api(self.api).list_priority_class(_preload_content=False)
                self._priorities = PriorityClasses.from_items(_json(items)["items"])
            except ApiException as err:
                if self._priorities is None:
                    log.warning("cannot read PriorityClasses (%s): every job ranks 0", err.reason)
                self._priorities = self._priorities or PriorityClasses()
            self._priority_read = time.monotonic()
            return self._priorities

    # -- writing ----------------------------------------------------------------------------

    def replace_status(self, body: Mapping[str, Any], status: Mapping[str, Any]) -> str:
        """Write `status` over the job `body` was read as; returns the new resourceVersion.

        Replace, not patch: cleared fields must go, and the resourceVersion in `body` makes a
        write based on a stale read fail with 409 (and retry) instead of clobbering.
        """
        meta = body["metadata"]
        written = self._write_job(
            body,
            lambda: self.custom.replace_namespaced_custom_object_status(
                c.GROUP,
                c.VERSION,
                meta["namespace"],
                c.PLURAL,
                meta["name"],
                {**body, "status": status},
            ),
        )
        version: str = written["metadata"]["resourceVersion"]
        return version

    def patch_annotations(
        self, body: Mapping[str, Any], annotations: Mapping[str, str | None]
    ) -> dict[str, Any]:
        """Merge `annotations` into the job's own (None removes one); returns the job as
        written. The resourceVersion `body` was read at goes with the patch, so a pass based
        on a stale read fails with 409 here as its status write would."""
        return self.patch_job(body, {"metadata": {"annotations": dict(annotations)}})

    def patch_job(self, body: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the job's spec and metadata (Kueue's admission and eviction), at the
        resourceVersion `body` was read at: a job changed meanwhile answers 409."""
        meta = body["metadata"]
        changes = {**(patch.get("metadata") or {})}
        if meta.get("resourceVersion"):
            changes["resourceVersion"] = meta["resourceVersion"]
        return self._write_job(
            body,
            lambda: self.custom.patch_namespaced_custom_object(
                c.GROUP,
                c.VERSION,
                meta["namespace"],
                c.PLURAL,
                meta["name"],
                {**patch, "metadata": changes},
                _content_type="application/merge-patch+json",
            ),
        )

    def apply(
        self, snap: Snapshot, plan: Plan, worker_identity: tuple[str, str] | None = None
    ) -> str | None:
        """Children first, then the job's own annotations, then the status once; events
        only after the status write.

        `worker_identity` is (service account, cluster role): workers need to read their
        job and report on their pod, so each namespace gets that account bound to the role.
        Returns the resourceVersion of the status written, None when it was unchanged.
        """
        job = snap.job
        ns = job.metadata.namespace
        service = self._fanout.submit(self._ensure_service, job) if plan.create else None
        if plan.create and worker_identity:
            # Before the pods: a pod naming a missing service account is refused.
            self.ensure_worker_identity(ns, *worker_identity)

        def create(manifest: dict[str, Any]) -> str | None:
            try:
                created = self.core.create_namespaced_pod(ns, manifest, _preload_content=False)
                return _version(created)
            except ApiException as err:
                if err.status != 409:  # already there: an earlier pass made it
                    raise
                return None

        def place(step: tuple[str, Mapping[str, Any]]) -> str | None:
            # A merge patch replaces the gate list as a whole (the gate is lifted).
            patched = self.core.patch_namespaced_pod(
                step[0],
                ns,
                step[1],
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
            return _version(patched)

        def delete(name: str) -> str | None:
            try:
                deleted = self.core.delete_namespaced_pod(
                    name, ns, grace_period_seconds=_grace(snap, name), _preload_content=False
                )
                return _version(deleted)
            except ApiException as err:
                if err.status != 404:
                    raise
                return None

        creates, patches = pinned_creates(plan.create, plan.place)
        key = (ns, job.metadata.name)
        with self._unseen_on_error(self._pod_floor, key):
            for version in self._each(create, creates):
                self._saw(self._pod_floor, key, version)
            if service is not None:
                service.result()  # the workers' Service, made alongside them
            for version in [*self._each(place, patches), *self._each(delete, plan.delete)]:
                self._saw(self._pod_floor, key, version)
        body = snap.body
        if plan.annotations:  # the job's own metadata; the status is written over the result
            body = self.patch_annotations(body, plan.annotations)
        new_status = plan.status.model_dump(by_alias=True, exclude_none=True, mode="json")
        written = None
        if new_status != body.get("status"):
            written = self.replace_status(body, new_status)
        if plan.events:  # best effort, after the status write; the pass need not wait
            self._fanout.submit(self.post_events, snap.body, plan.events)
        return written

    def _each(self, call: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """`call` on every item at once; once all are done, their results, or the first
        error raised."""
        if len(items) <= 1:
            return [call(item) for item in items]
        futures = [self._fanout.submit(call, item) for item in items]
        errors = [err for f in futures if (err := f.exception()) is not None]
        if errors:
            raise errors[0]
        return [f.result() for f in futures]

    def ensure_worker_identity(self, namespace: str, account: str, cluster_role: str) -> None:
        """The workers' ServiceAccount and its RoleBinding to the chart's worker role."""
        rbac = client.RbacAuthorizationV1Api(self.api)
        sa = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {
                "name": account,
                "labels": {"app.kubernetes.io/managed-by": "ddl-operator"},
            },
        }
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": account,
                "labels": {"app.kubernetes.io/managed-by": "ddl-operator"},
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": cluster_role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        }
        for create, body in (
            (self.core.create_namespaced_service_account, sa),
            (rbac.create_namespaced_role_binding, binding),
        ):
            try:
                create(namespace, body)
            except ApiException as err:
                if err.status != 409:
                    raise

    def _ensure_service(self, job: DDLJob) -> None:
        try:
            self.core.create_namespaced_service(job.metadata.namespace, headless_service(job))
        except ApiException as err:
            if err.status != 409:
                raise

    def post_events(self, body: Mapping[str, Any], events: Iterable[Event]) -> None:
        meta = body["metadata"]
        now = dt.datetime.now(dt.UTC)
        for event in events:
            try:
                self.core.create_namespaced_event(
                    meta["namespace"],
                    client.CoreV1Event(
                        metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}."),
                        involved_object=client.V1ObjectReference(
                            api_version=c.API_VERSION,
                            kind=c.KIND,
                            name=meta["name"],
                            namespace=meta["namespace"],
                            uid=meta.get("uid"),
                        ),
                        type=event.type,
                        reason=event.reason,
                        message=event.message[:1024],
                        first_timestamp=now,
                        last_timestamp=now,
                        count=1,
                        source=client.V1EventSource(component="ddl-operator"),
                        reporting_component="ddl-operator",
                        reporting_instance="ddl-operator",
                    ),
                )
            except ApiException as err:  # events are best effort; the status holds the truth
                log.warning("could not post event %s: %s", event.reason, err.reason)


def _grace(snap: Snapshot, name: str) -> int | None:
    """Pods on a node that is gone or not ready cannot shut down; don't wait for them."""
    pod = next((p for p in snap.pods if p.name == name), None)
    if pod and pod.placed_on:
        node = next((n for n in snap.nodes if n.name == pod.placed_on), None)
        if node is None or not node.ready:
            return 0
    return None


def _json(response: Any) -> Any:
    """The body of a raw (not preloaded) response, and the connection back to the pool."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _version(response: Any) -> str | None:
    """The resourceVersion of the object a raw write response carries."""
    body = _json(response)
    meta = (body.get("metadata") if isinstance(body, dict) else None) or {}
    version = meta.get("resourceVersion")
    return str(version) if version else None


def worker_pod_view(pod: Any) -> WorkerPod:
    """The state machine's view of a worker pod given as a client model."""
    return worker_view(_SERIALIZER.sanitize_for_serialization(pod))


_SERIALIZER: Final = client.ApiClient()
