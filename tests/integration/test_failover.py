"""High availability on the real control plane: Lease-based leader election, and two operator
replicas where the leader is killed -9 while it places a gang.

The Lease's holder is the only process that may act: with the leader dead and its Lease not
yet expired, the standby must create nothing. Once the standby holds the Lease it finishes
the dead leader's work from what the API server shows: no second pod for a slot, no GPU of a
node counted twice.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from test_operator import submit, worker_pods

from ddl_localcluster.controlplane import ControlPlane
from ddl_operator.api import constants as c
from ddl_operator.apiclient import load_client
from ddl_operator.core.render import ANNOTATION_NODE, LABEL_SLOT
from ddl_operator.leader import LeaderElector, LeaseConfig

from kubetools import FakeCluster, Kubectl, OperatorProcess, fake_node, make_fake_cluster

pytestmark = pytest.mark.usefixtures("kwok")

LEASE_SECONDS = 15.0  # the operator's default lease duration


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    api_client = load_client(str(control_plane.kubeconfig))
    yield api_client
    api_client.close()


def holder(api: client.ApiClient, ns: str, name: str) -> str | None:
    """The Lease's holderIdentity; None while there is no Lease."""
    try:
        lease = client.CoordinationV1Api(api).read_namespaced_lease(name, ns)
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise
    return str(lease.spec.holder_identity or "")


def until(
    what: str, check: Callable[[], bool], timeout: float, diagnose: Callable[[], str]
) -> float:
    """Polls `check` (fast: the window it looks for may be short); returns the seconds taken."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}"
            )
        time.sleep(0.05)
    return time.monotonic() - start


# -- the elector on its own -------------------------------------------------------------------


def test_one_elector_leads_release_hands_over_at_once_and_a_stolen_lease_is_lost(
    api: client.ApiClient, namespace: str
) -> None:
    name = f"lease-{uuid.uuid4().hex[:6]}"
    timing = {"duration_seconds": 3.0, "renew_seconds": 2.0, "retry_seconds": 0.5}
    lost: list[str] = []
    first = LeaderElector(api, LeaseConfig(namespace, "first", name, **timing), lambda: None)
    second = LeaderElector(
        api, LeaseConfig(namespace, "second", name, **timing), lambda: lost.append("second")
    )

    async def scenario() -> float:
        await asyncio.wait_for(first.acquire(), 10)
        waiting = asyncio.create_task(second.acquire())
        # Well past the duration: first renews, so second never gets it.
        await asyncio.sleep(2 * timing["duration_seconds"])
        assert not waiting.done(), "second acquired a lease that first renews"
        assert holder(api, namespace, name) == "first"
        started = time.monotonic()
        await asyncio.to_thread(first.stop)
        await asyncio.wait_for(waiting, 10)
        return time.monotonic() - started

    handover = asyncio.run(scenario())
    try:
        print(f"handover after release: {handover:.2f} s")
        # Released, not expired: the next try takes it, well before a duration passes.
        assert handover < timing["duration_seconds"]
        lease = client.CoordinationV1Api(api).read_namespaced_lease(name, namespace).spec
        assert lease.holder_identity == "second" and lease.lease_transitions == 1
        assert lease.acquire_time is not None and lease.renew_time >= lease.acquire_time

        # Someone else writes the Lease (a third replica with a skewed idea of expiry):
        # second notices at its next renewal and says it lost.
        client.CoordinationV1Api(api).patch_namespaced_lease(
            name, namespace, {"spec": {"holderIdentity": "intruder"}}
        )
        until("second to report the loss", lambda: bool(lost), 5, lambda: str(lost))
        assert holder(api, namespace, name) == "intruder", "a lost leader wrote the Lease again"
    finally:
        second.stop()


# -- two operator replicas --------------------------------------------------------------------


def _gpu_pods(api: client.ApiClient) -> list[dict[str, Any]]:
    resp = client.CoreV1Api(api).list_pod_for_all_namespaces(_preload_content=False)
    return [p for p in json.loads(resp.data)["items"] if _gpus(p)]


def _gpus(pod: dict[str, Any]) -> int:
    return sum(
        int((ctr.get("resources") or {}).get("requests", {}).get(c.GPU_RESOURCE, 0))
        for ctr in pod["spec"]["containers"]
    )


def _booked(api: client.ApiClient, nodes: list[str]) -> dict[str, int]:
    """GPUs requested per node by unfinished pods bound to it or placed on it (not yet bound)."""
    booked = dict.fromkeys(nodes, 0)
    for pod in _gpu_pods(api):
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        node = pod["spec"].get("nodeName") or pod["metadata"].get("annotations", {}).get(
            ANNOTATION_NODE
        )
        if node in booked:
            booked[node] += _gpus(pod)
    return booked


def _placed(pod: dict[str, Any]) -> bool:
    return ANNOTATION_NODE in (pod["metadata"].get("annotations") or {})


def _add_nodes(kubectl: Kubectl, fake: FakeCluster, count: int) -> None:
    """More nodes in the test's one rack: the capacity the gang's remaining workers wait for."""
    docs = []
    for i in range(count):
        name = f"n{fake.test_id}-late-{i}"
        fake.nodes.append(name)
        docs.append(
            fake_node(
                name,
                {
                    "ddl-test": fake.test_id,
                    "topology.kubernetes.io/zone": "zone-0",
                    "topology.kubernetes.io/rack": "z0-rack-0",
                    "ddl-operator.dev/nvlink-domain": f"{name}-nvl",
                },
                8,
            )
        )
    kubectl.run(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )


# When to kill the leader: at the first worker pod's creation, at the first placement (the
# rest of the gang's patches still under way), or with half the gang running and the other
# half gated, waiting for nodes that come only after the kill (the standby must place them on
# capacity the dead leader never saw). Requests the leader sent before it died still land, so
# the test prints the state it actually left behind.
KILL_POINTS = ("first-pod", "first-placed", "waiting-for-capacity")


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_leader_killed_mid_placement_standby_finishes_without_duplicates(
    kill_at: str,
    control_plane: ControlPlane,
    kubectl: Kubectl,
    namespace: str,
    operator: OperatorProcess,
    api: client.ApiClient,
    tmp_path: Path,
) -> None:
    lease = f"ddl-operator-{uuid.uuid4().hex[:6]}"

    def replica(identity: str) -> OperatorProcess:
        return OperatorProcess(
            control_plane.kubeconfig,
            tmp_path / f"{identity}.log",
            (
                "--leader-elect",
                f"--leader-elect-namespace={namespace}",
                f"--leader-elect-name={lease}",
            ),
            env={"POD_NAME": identity},
        )

    leader, standby = replica("replica-a"), replica("replica-b")
    capacity_later = kill_at == "waiting-for-capacity"
    # A gang of many small workers keeps the leader creating and patching long enough for
    # a kill to land in between; the capacity case needs whole nodes per worker.
    replicas, gpus = (4, 8) if capacity_later else (32, 1)
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2 if capacity_later else 4)
    operator.stop()  # the session's operator (no leader election) steps aside
    job = "gang"

    def diagnose() -> str:
        status = kubectl.get_json("ddlj", job, "-n", namespace).get("status")
        pods = {
            p["metadata"]["name"]: p["spec"].get("nodeName")
            for p in worker_pods(kubectl, namespace, job)
        }
        return (
            f"lease holder: {holder(api, namespace, lease)}\nstatus: {status}\npods: {pods}\n"
            f"--- replica-a\n{leader.log_tail(15)}\n--- replica-b\n{standby.log_tail(25)}"
        )

    def pods() -> list[dict[str, Any]]:
        return worker_pods(kubectl, namespace, job)

    try:
        leader.start()
        until(
            "replica-a to take the Lease",
            lambda: holder(api, namespace, lease) == "replica-a",
            30,
            diagnose,
        )
        standby.start()  # a standby is live (its probe answers) while it waits for the Lease
        time.sleep(2 * 2.0)  # a few of the standby's retries
        assert holder(api, namespace, lease) == "replica-a"

        hit: list[float] = []  # when the watch below killed the leader
        if capacity_later:
            submit(
                kubectl,
                namespace,
                fake,
                job,
                replicas=replicas,
                min_replicas=2,
                max_replicas=replicas,
                gpus=gpus,
            )
            until(
                "half the gang running, half waiting",
                lambda: (
                    sum(1 for p in pods() if p["spec"].get("nodeName")) == 2
                    and len(pods()) == replicas
                ),
                60,
                diagnose,
            )
        else:
            # A watch opened before the job exists, and the kill on the watching thread: the
            # kill follows the first event in the window at once.
            stream = watch.Watch()

            def kill_in_window() -> None:
                for event in stream.stream(
                    client.CoreV1Api(api).list_namespaced_pod,
                    namespace,
                    label_selector=f"{c.LABEL_JOB}={job}",
                    timeout_seconds=90,
                ):
                    pod = event["object"]
                    if kill_at == "first-pod" or ANNOTATION_NODE in (
                        pod.metadata.annotations or {}
                    ):
                        leader.kill()
                        hit.append(time.monotonic())
                        return

            watcher = threading.Thread(target=kill_in_window, daemon=True)
            watcher.start()
            time.sleep(1.0)  # the watch is established (no event is missed either way)
            submit(kubectl, namespace, fake, job, replicas=replicas, gpus=gpus)
            watcher.join(timeout=90)
            assert hit, f"no {kill_at} within 90 s\n{diagnose()}"
        leader.kill()
        killed = hit[0] if hit else time.monotonic()
        before = {p["metadata"]["name"]: p for p in pods()}
        placed_before = sum(1 for p in before.values() if _placed(p))
        print(
            f"{kill_at}: killed the leader at {len(before)}/{replicas} pods, {placed_before} placed"
        )
        if capacity_later:
            _add_nodes(kubectl, fake, replicas - 2)

        # The dead leader's Lease has not expired: the live standby must not act meanwhile.
        probe = "probe"
        submit(kubectl, namespace, fake, probe, replicas=1, gpus=0)
        while True:
            probe_pods = worker_pods(kubectl, namespace, probe)
            # Read after the pods: a listing counts only if the dead leader still held the
            # Lease once it was taken.
            if holder(api, namespace, lease) != "replica-a":
                break
            assert not probe_pods, "the standby created a pod without holding the Lease"
            assert time.monotonic() - killed < 3 * LEASE_SECONDS, diagnose()
            time.sleep(0.2)
        took_over = time.monotonic() - killed
        assert holder(api, namespace, lease) == "replica-b", diagnose()
        print(f"{kill_at}: failover after {took_over:.1f} s (lease duration {LEASE_SECONDS:g} s)")
        assert took_over <= LEASE_SECONDS + 2 * 2.0 + 2.0, "standby slower than duration + retries"

        kubectl.wait_job(namespace, job, "{.status.phase}", "Running", timeout=60)
        kubectl.wait_job(namespace, job, "{.status.rendezvous.workers}", str(replicas), timeout=60)
        converged = time.monotonic() - killed
        print(f"{kill_at}: job Running with {replicas} workers {converged:.1f} s after the kill")
        kubectl.wait_job(namespace, probe, "{.status.phase}", "Running", timeout=60)

        final = pods()
        slots = sorted(int(p["metadata"]["labels"][LABEL_SLOT]) for p in final)
        assert slots == list(range(replicas)), f"one pod per slot, got slots {slots}"
        # The pods the dead leader created were kept, not replaced by new ones.
        uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in final}
        for name, pod in before.items():
            assert uids.get(name) == pod["metadata"]["uid"], f"{name} was deleted or recreated"
        assert all(p["spec"].get("nodeName") for p in final)
        booked = _booked(api, fake.nodes)
        assert all(v <= 8 for v in booked.values()), f"double-booked GPUs: {booked}"
        assert sum(booked.values()) == replicas * gpus, booked
    finally:
        leader.kill()
        standby.stop()
        fake.delete()
        operator.start()
