"""A pass reads its job and pods from the watches only once they have caught up with what the
operator last wrote or read (read-your-writes), and from the API otherwise."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from ddl_operator import metrics
from ddl_operator.cache import ClusterCache
from ddl_operator.core.versions import UNSEEN, at_least, comparable, newest
from ddl_operator.kube import Kube

from builders import make_ddljob
from fakeapi import FakeCoreApi, make_node, make_pod

NS, NAME, UID = "ml", "train", "job-uid"


def test_versions_order_by_length_then_digits_and_unknown_never_catches_up() -> None:
    assert at_least("10", "9") and at_least("9", "9") and not at_least("9", "10")
    assert at_least(None, None) and at_least("5", "")
    assert not at_least("12", UNSEEN) and not at_least("x1", "1") and not at_least(None, "1")
    assert not comparable("012") and not comparable("") and comparable("7")
    assert newest("9", "10") == "10" and newest(None, "3") == "3"
    assert newest("3", UNSEEN) == UNSEEN, "a floor nobody meets wins: reads go to the API"


class _Raw:
    def __init__(self, body: dict[str, Any]) -> None:
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass

    def drain_conn(self) -> None:
        pass


class FakeApiServer:
    """The few calls a snapshot and a plan make, answering from FakeCoreApi's objects."""

    def __init__(self, api: FakeCoreApi, job: dict[str, Any]) -> None:
        self.api = api
        self.job = job
        self.reads: list[str] = []

    def get_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
        self.reads.append("job")
        return json.loads(json.dumps(self.job))

    def replace_namespaced_custom_object_status(self, *args: Any) -> dict[str, Any]:
        body = args[-1]
        self.api.version += 1
        meta = {**body["metadata"], "resourceVersion": str(self.api.version)}
        self.job = {**body, "metadata": meta}
        return json.loads(json.dumps(self.job))

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> _Raw:
        self.reads.append("pods")
        page = self.api.list_pod_for_all_namespaces(label_selector=kwargs["label_selector"])
        return _Raw(json.loads(page.data))

    def create_namespaced_pod(self, namespace: str, manifest: dict[str, Any], **_: Any) -> _Raw:
        pod = make_pod(manifest["metadata"]["name"], namespace=namespace, worker_of=NAME)
        # Written, but the watch has not delivered it yet.
        self.api.version += 1
        pod["metadata"]["resourceVersion"] = str(self.api.version)
        self.api.objects["pods"].append(pod)
        self.pending = pod
        return _Raw(pod)


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def setup() -> Iterator[tuple[Kube, FakeApiServer, FakeCoreApi]]:
    api = FakeCoreApi(nodes=[make_node("n0")], pods=[make_pod("w0", worker_of=NAME, uid="u0")])
    job = make_ddljob(NAME, namespace=NS)
    job["metadata"].update(uid=UID, resourceVersion="100")
    server = FakeApiServer(api, job)
    cache = ClusterCache(api, clock=lambda: 0.0)  # type: ignore[arg-type]
    cache.start()
    assert cache.wait_synced(5)
    kube = Kube(client.ApiClient(), cache)
    kube.core = kube.custom = server  # type: ignore[assignment]
    yield kube, server, api
    cache.stop()


def reads(kube: Kube) -> list[str]:
    """A snapshot's reads from the API."""
    server: FakeApiServer = kube.custom  # type: ignore[assignment]
    before = len(server.reads)
    snap = kube.snapshot(NS, NAME)
    assert snap is not None and snap.job.metadata.uid == UID
    return server.reads[before:]


def test_the_job_comes_from_its_watch_unless_older_than_our_own_write(
    setup: tuple[Kube, FakeApiServer, FakeCoreApi],
) -> None:
    kube, server, _api = setup
    assert reads(kube) == ["job"], "nothing delivered yet: read from the API"
    kube.observe_job(server.job)
    assert reads(kube) == []
    written = kube.replace_status(server.job, {"phase": "Placing"})
    assert reads(kube) == ["job"], "the watch has not shown our status write yet"
    kube.observe_job(server.job)
    assert server.job["metadata"]["resourceVersion"] == written
    assert reads(kube) == []
    kube.forget_job((NS, NAME))
    assert reads(kube) == ["job"]


def test_pods_come_from_the_worker_watch_once_it_has_our_creates(
    setup: tuple[Kube, FakeApiServer, FakeCoreApi],
) -> None:
    kube, server, api = setup
    kube.observe_job(server.job)
    assert reads(kube) == []
    snap = kube.snapshot(NS, NAME)
    assert snap is not None and [p.name for p in snap.pods] == ["w0"]
    api_reads = metrics.SNAPSHOT_READS.labels("pods", "api")._value.get()
    server.create_namespaced_pod(NS, {"metadata": {"name": "w1"}})
    created = server.pending["metadata"]["resourceVersion"]
    kube._saw(kube._pod_floor, (NS, NAME), created)  # what apply records of its creates
    snap = kube.snapshot(NS, NAME)
    assert snap is not None and [p.name for p in snap.pods] == ["w0", "w1"], "listed: fresh"
    assert metrics.SNAPSHOT_READS.labels("pods", "api")._value.get() == api_reads + 1
    # The watch delivers the create: from then on the cache serves, and it has w1 too.
    api.push("pods", "ADDED", server.pending)
    eventually(lambda: kube.cache.workers_at(created))
    assert reads(kube) == []
    snap = kube.snapshot(NS, NAME)
    assert snap is not None and [p.name for p in snap.pods] == ["w0", "w1"]


def test_a_failed_write_sends_reads_to_the_api_until_one_has_shown_it(
    setup: tuple[Kube, FakeApiServer, FakeCoreApi],
) -> None:
    kube, server, api = setup
    kube.observe_job(server.job)
    with pytest.raises(RuntimeError), kube._unseen_on_error(kube._pod_floor, (NS, NAME)):
        raise RuntimeError("the connection broke after the request went out")
    assert reads(kube) == ["pods"]
    # That consistent list showed whatever the write did; the next worker event catches up.
    api.push("pods", "MODIFIED", make_pod("w0", worker_of=NAME, uid="u0"))
    eventually(lambda: kube.cache.workers_at(str(api.version)))
    assert reads(kube) == []


def test_worker_watch_keeps_finished_and_relabelled_pods_straight(
    setup: tuple[Kube, FakeApiServer, FakeCoreApi],
) -> None:
    kube, _server, api = setup
    failed = make_pod("w0", worker_of=NAME, uid="u0")
    failed["status"] = {"phase": "Failed"}
    api.push("pods", "MODIFIED", failed)
    eventually(lambda: kube.cache.workers_at(str(api.version)))
    [w0] = kube.cache.worker_pods((NS, NAME), UID)
    assert w0.view.phase == "Failed", "a finished worker stays visible to its job"
    other = make_pod("w0", worker_of="other", uid="u0")
    api.push("pods", "MODIFIED", other)
    eventually(lambda: kube.cache.workers_at(str(api.version)))
    assert kube.cache.worker_pods((NS, NAME), UID) == []
    assert [w.view.name for w in kube.cache.worker_pods((NS, "other"), UID)] == ["w0"]
    api.push("pods", "DELETED", other)
    eventually(lambda: kube.cache.workers_at(str(api.version)))
    assert kube.cache.worker_pods((NS, "other"), UID) == []
    assert kube.cache.worker_pods((NS, NAME), "someone-else") == [], "owners are checked"
    api.push_raw("pods", {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "999"}}})
    eventually(lambda: kube.cache.workers_at("999"))
