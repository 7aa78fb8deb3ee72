"""Kueue admits DDLJobs' Workloads on the real control plane: the pinned Kueue manager (built by
`make kueue`) with its own CRDs, a 16-GPU ClusterQueue, and Workloads built by core/kueue.py for
real DDLJob objects. What Kueue writes back is read through core/kueue.py, as the operator will.

The DDLJobs name another controller in spec.managedBy, so an operator running in this session
leaves them (and their Workloads) alone, and here the test plays the owner's part (creating and
finishing a Workload, clearing an evicted one's admission) with the bodies core/kueue.py builds.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ddl_localcluster.controlplane import ControlPlane, ControlPlaneError
from ddl_localcluster.kueue import KueueManager, manager_binary
from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core import kueue as k

from builders import make_ddljob
from kubetools import Kubectl

GPU = c.GPU_RESOURCE
WAIT_S = 60
OWNER = "ddl-test/kueue-owner"  # spec.managedBy: this test, not the operator, owns the jobs


@pytest.fixture(scope="module")
def kueue_manager(control_plane: ControlPlane, crd_installed: None) -> Iterator[KueueManager]:
    """One Kueue manager for this module; fails (never skips) when it is not built."""
    manager = KueueManager(control_plane)
    manager.start()
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture
def test_id(kubectl: Kubectl) -> Iterator[str]:
    """A suffix for this test's cluster-scoped objects, deleted afterwards."""
    ident = uuid.uuid4().hex[:6]
    yield ident
    for kind in ("clusterqueues.kueue.x-k8s.io", "resourceflavors.kueue.x-k8s.io"):
        kubectl.run("delete", kind, "-l", f"ddl-test={ident}", "--wait=false", check=False)
    kubectl.run("delete", "priorityclass", "-l", f"ddl-test={ident}", check=False)


def _create(kubectl: Kubectl, obj: dict[str, Any]) -> dict[str, Any]:
    out = kubectl.run("create", "-o", "json", "-f", "-", input=json.dumps(obj))
    created: dict[str, Any] = json.loads(out.stdout)
    return created


def _queues(kubectl: Kubectl, ns: str, ident: str, gpus: int, **preemption: str) -> str:
    """A ResourceFlavor, a ClusterQueue with `gpus` nvidia.com/gpu, and a LocalQueue in `ns`;
    returns the LocalQueue's name."""
    labels = {"ddl-test": ident}
    flavor = f"gpu-{ident}"
    _create(
        kubectl,
        {
            "apiVersion": k.API_VERSION,
            "kind": "ResourceFlavor",
            "metadata": {"name": flavor, "labels": labels},
            "spec": {
                "nodeLabels": {"ddl-test/pool": ident},
                "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
    )
    cq: dict[str, Any] = {
        "apiVersion": k.API_VERSION,
        "kind": "ClusterQueue",
        "metadata": {"name": f"cq-{ident}", "labels": labels},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [
                {
                    "coveredResources": [GPU],
                    "flavors": [
                        {"name": flavor, "resources": [{"name": GPU, "nominalQuota": gpus}]}
                    ],
                }
            ],
        },
    }
    if preemption:
        cq["spec"]["preemption"] = preemption
    _create(kubectl, cq)
    _create(
        kubectl,
        {
            "apiVersion": k.API_VERSION,
            "kind": "LocalQueue",
            "metadata": {"name": "team", "namespace": ns},
            "spec": {"clusterQueue": f"cq-{ident}"},
        },
    )
    _wait(kubectl, "clusterqueue", f"cq-{ident}", "condition=Active")
    _wait(kubectl, "localqueue", "team", "condition=Active", ns)
    return "team"


def _ddljob(kubectl: Kubectl, ns: str, name: str, queue: str, **shape: Any) -> DDLJob:
    shape = {"replicas": 2, "gpus": 8, **shape}
    manifest = make_ddljob(name=name, namespace=ns, suspend=True, managedBy=OWNER, **shape)
    manifest["metadata"]["labels"] = {k.LABEL_QUEUE_NAME: queue}
    return DDLJob.model_validate(_create(kubectl, manifest))


def _submit(
    kubectl: Kubectl,
    ns: str,
    name: str,
    queue: str,
    priority: k.Priority | None = None,
    **shape: Any,
) -> tuple[DDLJob, str]:
    """A DDLJob and the Workload core/kueue.py builds for it (created); returns the job and
    the Workload's name."""
    job = _ddljob(kubectl, ns, name, queue, **shape)
    assert k.queue_name(job) == queue
    wl = _create(kubectl, k.workload(job, queue, priority))
    return job, wl["metadata"]["name"]


def _wait(kubectl: Kubectl, kind: str, name: str, what: str, ns: str | None = None) -> None:
    where = ["-n", ns] if ns else []
    proc = kubectl.run(
        "wait",
        *where,
        f"{kind}/{name}",
        f"--for={what}",
        f"--timeout={WAIT_S}s",
        check=False,
        timeout=WAIT_S + 10,
    )
    if proc.returncode != 0:
        obj = kubectl.get_json(kind, name, *where)
        raise AssertionError(f"{kind}/{name} never reached {what}: {obj.get('status')}")


def _status(kubectl: Kubectl, ns: str, name: str) -> tuple[dict[str, Any], k.WorkloadStatus]:
    obj = kubectl.get_json("workloads.kueue.x-k8s.io", name, "-n", ns)
    return obj, k.workload_status(obj)


def _apply_status(kubectl: Kubectl, body: dict[str, Any], manager: str) -> None:
    kubectl.run(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--subresource=status",
        f"--field-manager={manager}",
        "-f",
        "-",
        input=json.dumps(body),
    )


def test_a_16_gpu_queue_admits_one_2x8_job_and_the_second_after_the_first_finishes(
    kueue_manager: KueueManager, kubectl: Kubectl, namespace: str, test_id: str
) -> None:
    queue = _queues(kubectl, namespace, test_id, gpus=16)
    first, wl1 = _submit(kubectl, namespace, "first", queue)
    _wait(kubectl, "workload", wl1, "condition=Admitted", namespace)

    obj1, st1 = _status(kubectl, namespace, wl1)
    assert obj1["metadata"]["ownerReferences"][0]["uid"] == first.metadata.uid
    # The CRD kept what Kueue counts (no webhook defaulted or refused anything).
    [pod_set] = obj1["spec"]["podSets"]
    assert pod_set["count"] == 2
    assert pod_set["template"]["spec"]["containers"][0]["resources"]["requests"] == {GPU: "8"}
    assert st1.may_run and st1.admitted_count == 2
    assert st1.admission is not None
    assert st1.admission.cluster_queue == f"cq-{test_id}"
    assert st1.admission.flavor == f"gpu-{test_id}"
    flavors = kubectl.get_json("resourceflavors.kueue.x-k8s.io")["items"]
    placement = k.flavor_placement(st1, flavors)
    assert placement.node_labels == {"ddl-test/pool": test_id}
    assert placement.tolerations == ({"key": GPU, "operator": "Exists", "effect": "NoSchedule"},)

    # The second 2x8 job does not fit next to the first: Kueue says so and keeps it pending.
    _second, wl2 = _submit(kubectl, namespace, "second", queue)
    _wait(kubectl, "workload", wl2, "condition=QuotaReserved=false", namespace)
    _, st2 = _status(kubectl, namespace, wl2)
    assert not st2.quota_reserved and not st2.may_run and st2.admitted_count == 0
    waiting = st2.waiting_for()
    assert re.search(
        rf"insufficient (unused )?quota for {GPU} in flavor gpu-{test_id}, 16 more needed", waiting
    ), waiting

    # The owner marks the first Finished (its own field manager); Kueue frees its quota.
    _apply_status(kubectl, k.finished_apply(obj1, True, "training finished", _now()), "ddl-test")
    _wait(kubectl, "workload", wl2, "condition=Admitted", namespace)
    _, st2 = _status(kubectl, namespace, wl2)
    assert st2.may_run and st2.admitted_count == 2
    _, st1 = _status(kubectl, namespace, wl1)
    assert st1.finished and not st1.may_run


def _priority_classes(kubectl: Kubectl, test_id: str, **values: int) -> None:
    """PriorityClasses `ddl-<name>-<test_id>` of the given values, labelled for clean-up."""
    for name, value in values.items():
        _create(
            kubectl,
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": f"ddl-{name}-{test_id}", "labels": {"ddl-test": test_id}},
                "value": value,
            },
        )


def test_a_higher_priority_workload_evicts_a_lower_one_and_runs_once_its_admission_is_cleared(
    kueue_manager: KueueManager, kubectl: Kubectl, namespace: str, test_id: str
) -> None:
    _priority_classes(kubectl, test_id, low=100, high=1000)
    queue = _queues(kubectl, namespace, test_id, gpus=16, withinClusterQueue="LowerPriority")
    _low, wl_low = _submit(kubectl, namespace, "low", queue, k.Priority(100, f"ddl-low-{test_id}"))
    _wait(kubectl, "workload", wl_low, "condition=Admitted", namespace)

    _high, wl_high = _submit(
        kubectl, namespace, "high", queue, k.Priority(1000, f"ddl-high-{test_id}")
    )
    _wait(kubectl, "workload", wl_low, "condition=Evicted", namespace)
    obj_low, st_low = _status(kubectl, namespace, wl_low)
    # What the operator sees: evicted by preemption, not to run, though still holding quota
    # until the owner stops the job and clears the admission.
    assert st_low.evicted is not None and st_low.evicted.reason == "Preempted"
    assert st_low.preempted is not None and st_low.preempted.reason == "InClusterQueue"
    assert not st_low.may_run and st_low.admitted_count == 0
    assert st_low.waiting_for().startswith("evicted by Kueue (Preempted)")
    _, st_high = _status(kubectl, namespace, wl_high)
    assert not st_high.may_run

    # The owner has stopped the low job's workers; it clears the admission as Kueue's own
    # integrations do, and the high-priority Workload is admitted in its place.
    _apply_status(kubectl, k.clear_admission_apply(obj_low, _now()), k.ADMISSION_FIELD_MANAGER)
    _wait(kubectl, "workload", wl_high, "condition=Admitted", namespace)
    _, st_high = _status(kubectl, namespace, wl_high)
    assert st_high.may_run and st_high.admitted_count == 2
    _, st_low = _status(kubectl, namespace, wl_low)
    assert not st_low.quota_reserved and st_low.admission is None
    assert st_low.conditions[k.REQUEUED].true
    assert not st_low.may_run


def test_an_elastic_job_is_admitted_partially_and_its_workload_goes_with_it(
    kueue_manager: KueueManager, kubectl: Kubectl, namespace: str, test_id: str
) -> None:
    queue = _queues(kubectl, namespace, test_id, gpus=16)
    job, wl = _submit(
        kubectl, namespace, "elastic", queue, replicas=3, min_replicas=1, max_replicas=4
    )
    _wait(kubectl, "workload", wl, "condition=Admitted", namespace)
    obj, status = _status(kubectl, namespace, wl)
    assert obj["spec"]["podSets"][0]["minCount"] == 1
    # 3 x 8 GPUs asked, 16 in the queue: Kueue admits as many workers as fit.
    assert status.may_run and status.admitted_count == 2

    # The Workload is the job's child: deleting the job deletes it (garbage collector).
    kubectl.run("delete", "ddlj", job.metadata.name, "-n", namespace)
    _wait(kubectl, "workload", wl, "delete", namespace)


def test_a_missing_kueue_build_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DDL_KUEUE_DIR", str(tmp_path))
    with pytest.raises(ControlPlaneError, match="make kueue"):
        manager_binary()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
