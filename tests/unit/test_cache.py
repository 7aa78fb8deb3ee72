"""The cache's list/watch loop on an in-memory API: paging, events, 410, reservations."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from ddl_operator.cache import ACTIVE_PODS, WORKER_PODS, Callbacks, ClusterCache
from ddl_operator.core.ledger import PodCharge, free_nodes

from fakeapi import FakeCoreApi, make_node, make_pod


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


class Heard:
    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.freed: list[frozenset[str]] = []
        self.workers: list[tuple[str, str]] = []
        self.relisted: list[str] = []

    def callbacks(self) -> Callbacks:
        return Callbacks(
            self.nodes.append, self.freed.append, self.workers.append, self.relisted.append
        )


@pytest.fixture
def api() -> FakeCoreApi:
    return FakeCoreApi(
        nodes=[make_node(f"n{i}", zone="z1" if i < 2 else "z2") for i in range(4)],
        pods=[
            make_pod("a", node="n0", gpus=4, uid="ua"),
            make_pod("b", node="n0", gpus=2, uid="ub"),
            make_pod("cpu", node="n1", gpus=None, uid="uc"),
            make_pod("w0", worker_of="train", reserved_on="n2", uid="uw"),
        ],
    )


@pytest.fixture
def heard() -> Heard:
    return Heard()


@pytest.fixture
def cache(api: FakeCoreApi, heard: Heard) -> Iterator[ClusterCache]:
    cached = ClusterCache(api, heard.callbacks(), page_size=2, clock=lambda: 0.0)
    cached.start()
    assert cached.wait_synced(5)
    yield cached
    cached.stop()


def active_pod_calls(api: FakeCoreApi, watch: bool) -> list[dict[str, object]]:
    """The calls of the active-pods stream (the worker stream lists pods too)."""
    return [
        kw
        for kind, kw in api.calls
        if kind == "pods"
        and kw.get("field_selector") == ACTIVE_PODS
        and bool(kw.get("watch")) == watch
    ]


def test_first_sync_pages_through_the_lists(api: FakeCoreApi, cache: ClusterCache) -> None:
    assert cache.usage() == {"n0": 6, "n2": 8}
    assert cache.jobs_on("n2") == {("ml", "train")}
    assert set(cache.nodes()) == {"n0", "n1", "n2", "n3"}
    assert len(active_pod_calls(api, watch=False)) == 2
    worker_lists = [
        kw for kind, kw in api.calls if kind == "pods" and kw.get("label_selector") == WORKER_PODS
    ]
    assert len(worker_lists) == 2, "one page, then the watch"
    assert [w.view.name for w in cache.worker_pods(("ml", "train"), "job-uid")] == ["w0"]
    assert "cpu" not in {name for _, name in cache.charges()}, "pods without GPUs are not kept"
    free = {n.name: n.free for n in cache.node_infos(node_selector={"zone": "z1"})}
    assert free == {"n0": 2, "n1": 8, "n2": 0, "n3": 0}


def test_watch_events_update_the_totals_and_say_whom_they_concern(
    api: FakeCoreApi, cache: ClusterCache, heard: Heard
) -> None:
    api.push("pods", "ADDED", make_pod("c", node="n3", gpus=3, uid="uc2"))
    eventually(lambda: cache.usage().get("n3") == 3)
    api.push("pods", "DELETED", make_pod("a", node="n0", gpus=4, uid="ua"))
    eventually(lambda: cache.usage()["n0"] == 2)
    assert frozenset({"n0"}) in heard.freed
    api.push("pods", "MODIFIED", make_pod("w0", worker_of="train", node="n2", uid="uw"))
    eventually(lambda: ("ml", "train") in heard.workers)
    # A heartbeat changes nothing placement reads; a taint does.
    beat = make_node("n1", zone="z1")
    beat["status"]["conditions"][1]["lastHeartbeatTime"] = "2026-12-01T00:00:00Z"
    api.push("nodes", "MODIFIED", beat)
    api.push("nodes", "MODIFIED", make_node("n3", taints=[{"key": "k", "effect": "NoSchedule"}]))
    eventually(lambda: "n3" in heard.nodes)
    assert "n1" not in heard.nodes
    api.push("nodes", "DELETED", make_node("n3"))
    eventually(lambda: "n3" not in cache.nodes())


def test_410_gone_relists_and_an_ended_watch_resumes(
    api: FakeCoreApi, cache: ClusterCache, heard: Heard
) -> None:
    api.push("pods", "ADDED", make_pod("c", node="n3", gpus=3, uid="uc2"))
    eventually(lambda: cache.usage().get("n3") == 3)
    api.end_watch("pods")  # the server's timeout: resume from the last version seen
    eventually(lambda: len(active_pod_calls(api, watch=True)) == 2)
    resumed = active_pod_calls(api, watch=True)[-1]
    assert resumed["resource_version"] == str(api.version)
    assert cache.relists("pods") == 1
    # Meanwhile a pod went away unseen, then the watch is told its version expired.
    api.objects["pods"] = [p for p in api.objects["pods"] if p["metadata"]["name"] != "b"]
    api.push_raw("pods", {"type": "ERROR", "object": {"kind": "Status", "code": 410}})
    eventually(lambda: cache.relists("pods") == 2)
    eventually(lambda: cache.usage()["n0"] == 4)
    # The worker watch got the 410 too (every open pod watch did): it relists as well.
    eventually(lambda: sorted(heard.relisted) == ["pods", "workers"])


def test_a_reservation_counts_until_its_event_or_its_expiry(api: FakeCoreApi) -> None:
    now = [0.0]
    cache = ClusterCache(api, clock=lambda: now[0])
    cache.start()
    try:
        assert cache.wait_synced(5)
        cache.assume(("ml", "w1"), PodCharge("n3", 8, "uw1", ("ml", "train")))
        assert {n.name: n.used for n in cache.node_infos()}["n3"] == 8
        # The gated pod's creation event says nothing about a node: still reserved.
        api.push("pods", "ADDED", make_pod("w1", worker_of="train", uid="uw1"))
        api.push("pods", "ADDED", make_pod("marker", node="n1", gpus=1, uid="um"))
        eventually(lambda: cache.usage().get("n1") == 1)
        assert cache.usage()["n3"] == 8
        now[0] = 1e6  # never confirmed: it expires
        assert {n.name: n.used for n in cache.node_infos()}["n3"] == 0
        # Confirmed by the event of the placement's patch: counted from the pod from then on.
        cache.assume(("ml", "w1"), PodCharge("n3", 8, "uw1", ("ml", "train")))
        api.push("pods", "MODIFIED", make_pod("w1", worker_of="train", reserved_on="n3", uid="uw1"))
        eventually(lambda: ("ml", "w1") in cache.charges())
        now[0] = 2e6
        assert {n.name: n.used for n in cache.node_infos()}["n3"] == 8
    finally:
        cache.stop()


def test_node_views_follow_every_kind_of_change(api: FakeCoreApi, cache: ClusterCache) -> None:
    """What a pass reads is patched per event (core/nodeviews.py); after each kind of change
    it must equal a view rebuilt from the cache's nodes and totals."""
    wants = [
        {},
        {"node_selector": {"zone": "z1"}},
        {"tolerations": [{"key": "k", "operator": "Exists"}]},
    ]

    def matches() -> bool:
        return all(
            cache.node_infos(**want) == free_nodes(cache.nodes().values(), cache.usage(), **want)
            for want in wants
        )

    assert matches()  # each view is built here and patched from now on
    api.push("pods", "ADDED", make_pod("c", node="n3", gpus=3, uid="uc2"))
    eventually(lambda: cache.usage().get("n3") == 3)
    assert matches()
    api.push(
        "nodes",
        "MODIFIED",
        make_node("n1", zone="z1", taints=[{"key": "k", "effect": "NoSchedule"}]),
    )
    api.push("nodes", "ADDED", make_node("n9", zone="z1"))
    eventually(lambda: "n9" in cache.nodes())
    assert matches()
    api.push("pods", "MODIFIED", make_pod("c", node="n9", gpus=3, uid="uc2"))  # moved: both change
    eventually(lambda: cache.usage().get("n9") == 3)
    assert matches()
    api.push("nodes", "DELETED", make_node("n0"))
    api.push("pods", "DELETED", make_pod("w0", worker_of="train", reserved_on="n2", uid="uw"))
    eventually(lambda: "n0" not in cache.nodes() and "n2" not in cache.usage())
    assert matches()
    cache.assume(("ml", "w5"), PodCharge("n3", 5, "uw5", ("ml", "train")))
    assert {n.name: n.used for n in cache.node_infos()}["n3"] == 5
    assert matches()
    cache.forget(("ml", "w5"))
    assert matches()
    api.objects["nodes"] = [make_node("n7", zone="z1")]  # a relist replaces every node
    api.push_raw("nodes", {"type": "ERROR", "object": {"kind": "Status", "code": 410}})
    eventually(lambda: set(cache.nodes()) == {"n7"})
    assert matches()


def test_stop_ends_a_blocked_watch(api: FakeCoreApi) -> None:
    cache = ClusterCache(api)
    cache.start()
    assert cache.wait_synced(5)
    started = time.monotonic()
    cache.stop()
    assert time.monotonic() - started < 2
    assert not any(t.is_alive() for t in cache._threads)
