"""The Kueue Workload a queued DDLJob owns, and how the operator reads Kueue's answer."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob, DDLJobStatus
from ddl_operator.core import kueue as k
from ddl_operator.core.render import LABEL_SLOT

from builders import make_ddljob, set_path

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def _job(manifest: dict[str, Any], labels: dict[str, str] | None = None) -> DDLJob:
    meta: dict[str, Any] = {"name": "train", "namespace": "ml", "uid": "uid-1"}
    if labels is not None:
        meta["labels"] = labels
    return DDLJob.model_validate({**manifest, "metadata": meta})


def _cond(kind: str, status: str = "True", reason: str = "R", message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-03-01T11:00:00Z",
    }


def _admitted(
    count: int | None = 2, flavors: dict[str, str] | None = None, spec_count: int = 2
) -> dict[str, Any]:
    psa: dict[str, Any] = {
        "name": "workers",
        "flavors": flavors if flavors is not None else {c.GPU_RESOURCE: "h100"},
    }
    if count is not None:
        psa["count"] = count
    return {
        "metadata": {
            "name": "ddljob-train-abcde",
            "namespace": "ml",
            "uid": "w-1",
            "resourceVersion": "7",
        },
        "spec": {"podSets": [{"name": "workers", "count": spec_count, "template": {}}]},
        "status": {
            "conditions": [
                _cond("QuotaReserved", reason="QuotaReserved"),
                _cond("Admitted", reason="Admitted"),
            ],
            "admission": {"clusterQueue": "gpus", "podSetAssignments": [psa]},
        },
    }


def _flavor(name: str, labels: dict[str, str] | None = None, tolerations: Any = None) -> Any:
    spec: dict[str, Any] = {}
    if labels is not None:
        spec["nodeLabels"] = labels
    if tolerations is not None:
        spec["tolerations"] = tolerations
    return {"metadata": {"name": name}, "spec": spec}


# -- the Workload -------------------------------------------------------------------------------


def test_the_queue_comes_from_the_label_and_jobs_without_it_are_not_queued() -> None:
    assert k.queue_name(_job(make_ddljob(), {k.LABEL_QUEUE_NAME: "team-a"})) == "team-a"
    assert k.queue_name(_job(make_ddljob(), {"app": "x"})) is None
    assert k.queue_name(_job(make_ddljob())) is None


@pytest.mark.parametrize("bad", ["Team_A", "", "-a", "a" * 254])
def test_a_queue_label_that_names_no_local_queue_is_refused(bad: str) -> None:
    with pytest.raises(k.WorkloadShapeError, match="queue-name"):
        k.queue_name(_job(make_ddljob(), {k.LABEL_QUEUE_NAME: bad}))


def test_one_worker_pod_set_counts_replicas_and_asks_for_gpus_per_worker() -> None:
    wl = k.workload(_job(make_ddljob(replicas=2, gpus=8)), "team-a")
    assert wl["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    assert wl["kind"] == "Workload"
    assert wl["spec"]["queueName"] == "team-a"
    [ps] = wl["spec"]["podSets"]
    assert ps["name"] == "workers"
    assert ps["count"] == 2
    assert "minCount" not in ps  # a fixed-size job is admitted whole or not at all
    main = ps["template"]["spec"]["containers"][0]
    assert main["resources"]["requests"][c.GPU_RESOURCE] == "8"
    assert main["resources"]["limits"][c.GPU_RESOURCE] == "8"


def test_an_elastic_job_may_be_admitted_partially_down_to_its_minimum() -> None:
    wl = k.workload(_job(make_ddljob(replicas=4, min_replicas=2, max_replicas=6, gpus=8)), "q")
    [ps] = wl["spec"]["podSets"]
    assert (ps["count"], ps["minCount"]) == (4, 2)


def test_an_elastic_job_already_at_its_minimum_has_no_min_count() -> None:
    wl = k.workload(_job(make_ddljob(replicas=2, min_replicas=2, max_replicas=6, gpus=8)), "q")
    assert "minCount" not in wl["spec"]["podSets"][0]


def test_the_template_is_a_worker_without_what_belongs_to_one_slot_or_to_placement() -> None:
    job = _job(make_ddljob(gpus=8))
    template = k.pod_set_template(job)
    spec = template["spec"]
    assert "hostname" not in spec
    assert "schedulingGates" not in spec
    assert spec["subdomain"] == "train"
    assert spec["restartPolicy"] == "Never"
    assert LABEL_SLOT not in template["metadata"]["labels"]
    assert template["metadata"]["labels"][c.LABEL_JOB] == "train"
    assert template["metadata"]["labels"]["app"] == "trainer"
    env = {e["name"] for e in spec["containers"][0]["env"]}
    assert {"DDL_JOB_NAME", "POD_NAME"} <= env


def test_the_users_own_scheduling_gates_stay() -> None:
    manifest = set_path(make_ddljob(), "spec.template.spec.schedulingGates", [{"name": "x/y"}])
    assert k.pod_set_template(_job(manifest))["spec"]["schedulingGates"] == [{"name": "x/y"}]


def test_limits_stand_in_for_missing_requests_as_the_api_server_defaults_pods() -> None:
    container = {
        "name": "worker",
        "image": "i",
        "resources": {"limits": {"cpu": "4", "memory": "16Gi"}, "requests": {"cpu": "2"}},
    }
    sidecar = {"name": "init", "image": "i", "resources": {"limits": {"memory": "1Gi"}}}
    manifest = set_path(make_ddljob(gpus=8), "spec.template.spec.containers", [container])
    manifest = set_path(manifest, "spec.template.spec.initContainers", [sidecar])
    spec = k.pod_set_template(_job(manifest))["spec"]
    assert spec["containers"][0]["resources"]["requests"] == {
        "cpu": "2",
        "memory": "16Gi",
        c.GPU_RESOURCE: "8",
    }
    assert spec["initContainers"][0]["resources"]["requests"] == {"memory": "1Gi"}


def test_the_workload_is_owned_by_the_job_and_named_after_it() -> None:
    job = _job(make_ddljob())
    wl = k.workload(job, "q")
    [owner] = wl["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": "train",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert wl["metadata"]["namespace"] == "ml"
    assert wl["metadata"]["name"].startswith("ddljob-train-")
    assert wl["metadata"]["labels"][k.LABEL_JOB_UID] == "uid-1"
    assert k.workload_name(job) == wl["metadata"]["name"]


def test_a_recreated_job_gets_a_new_workload_name_and_long_names_fit() -> None:
    first = _job(make_ddljob())
    again = DDLJob.model_validate(
        {**make_ddljob(), "metadata": {"name": "train", "namespace": "ml", "uid": "uid-2"}}
    )
    assert k.workload_name(first) != k.workload_name(again)
    long = DDLJob.model_validate(
        {**make_ddljob(), "metadata": {"name": "a" * 250, "namespace": "ml", "uid": "u"}}
    )
    name = k.workload_name(long)
    assert len(name) <= 253
    assert name == k.workload_name(long)


def test_priority_with_its_class_or_alone() -> None:
    job = _job(make_ddljob())
    spec = k.workload(job, "q", k.Priority(1000, "high"))["spec"]
    assert spec["priority"] == 1000
    assert spec["priorityClassRef"] == {
        "group": "scheduling.k8s.io",
        "kind": "PriorityClass",
        "name": "high",
    }
    spec = k.workload(job, "q", k.Priority(5, "batch", workload_priority_class=True))["spec"]
    assert spec["priorityClassRef"]["kind"] == "WorkloadPriorityClass"
    spec = k.workload(job, "q", k.Priority(-3))["spec"]
    assert spec["priority"] == -3
    assert "priorityClassRef" not in spec
    assert "priority" not in k.workload(job, "q")["spec"]
    with pytest.raises(k.WorkloadShapeError, match="int32"):
        k.Priority(2**31)


# -- reading the status -------------------------------------------------------------------------


def test_an_admitted_workload_runs_its_admitted_count_on_its_flavor() -> None:
    status = k.workload_status(_admitted(count=2))
    assert status.quota_reserved and status.admitted and status.may_run
    assert status.admitted_count == 2
    assert status.admission is not None
    assert status.admission.cluster_queue == "gpus"
    assert status.admission.flavor == "h100"
    assert status.waiting_for() == ""


def test_partial_admission_and_an_assignment_without_count_means_the_whole_pod_set() -> None:
    assert k.workload_status(_admitted(count=3, spec_count=4)).admitted_count == 3
    assert k.workload_status(_admitted(count=None, spec_count=4)).admitted_count == 4


def test_a_pending_workload_says_what_kueue_said() -> None:
    obj = _admitted()
    obj["status"] = {
        "conditions": [
            _cond(
                "QuotaReserved",
                "False",
                "Pending",
                "couldn't assign flavors to pod set workers: insufficient unused quota for "
                "nvidia.com/gpu in flavor h100, 16 more needed",
            )
        ]
    }
    status = k.workload_status(obj)
    assert not status.quota_reserved and not status.may_run
    assert status.admitted_count == 0
    assert "insufficient unused quota" in status.waiting_for()
    assert status.waiting_for().startswith("waiting for Kueue quota (Pending)")


def test_a_fresh_workload_without_status_waits() -> None:
    obj = _admitted()
    del obj["status"]
    status = k.workload_status(obj)
    assert not status.may_run
    assert "waiting for Kueue" in status.waiting_for()


def test_quota_reserved_but_not_admitted_waits_for_admission_checks() -> None:
    obj = _admitted()
    obj["status"]["conditions"][1] = _cond("Admitted", "False", "UnsatisfiedChecks", "checks")
    status = k.workload_status(obj)
    assert status.quota_reserved and not status.admitted and status.admitted_count == 0
    assert "admission checks" in status.waiting_for()


def test_an_evicted_workload_must_stop_even_while_still_admitted() -> None:
    obj = _admitted()
    obj["status"]["conditions"] += [
        _cond("Evicted", reason="Preempted", message="Preempted to accommodate a workload"),
        _cond("Preempted", reason="InClusterQueue", message="..."),
    ]
    status = k.workload_status(obj)
    assert status.admitted and not status.may_run and status.admitted_count == 0
    assert status.evicted is not None and status.evicted.reason == "Preempted"
    assert status.preempted is not None and status.preempted.reason == "InClusterQueue"
    assert status.waiting_for().startswith("evicted by Kueue (Preempted)")


def test_a_finished_workload_does_not_run() -> None:
    obj = _admitted()
    obj["status"]["conditions"].append(_cond("Finished", reason="Succeeded"))
    status = k.workload_status(obj)
    assert status.finished and not status.may_run


BAD_SHAPES: list[tuple[str, Any, str]] = [
    ("spec", "x", "spec: must be an object"),
    ("spec.podSets", {}, "spec.podSets: must be a list"),
    ("spec.podSets", [{"name": "main", "count": 1}], "no pod set named 'workers'"),
    ("spec.podSets.0.count", "2", r"spec.podSets\[0\].count: must be an integer"),
    ("status.conditions", {"type": "Admitted"}, "status.conditions: must be a list"),
    ("status.conditions.0.status", "yes", "is not True, False or Unknown"),
    ("status.conditions.1.type", "QuotaReserved", "appears twice"),
    ("status.admission.clusterQueue", 3, "clusterQueue: must be a non-empty string"),
    ("status.admission.podSetAssignments", [], "has no assignment for 'workers'"),
    ("status.admission.podSetAssignments.0.count", 3, "more than the pod set's count 2"),
    ("status.admission.podSetAssignments.0.count", -1, "below 0"),
    ("status.admission.podSetAssignments.0.count", True, "must be an integer"),
    ("status.admission.podSetAssignments.0.flavors", {"nvidia.com/gpu": 1}, "strings"),
    ("metadata.name", None, "metadata.name"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_SHAPES)
def test_a_workload_of_the_wrong_shape_is_refused_naming_the_field(
    path: str, value: Any, message: str
) -> None:
    with pytest.raises(k.WorkloadShapeError, match=message):
        k.workload_status(set_path(_admitted(), path, value))


def test_not_an_object_at_all() -> None:
    with pytest.raises(k.WorkloadShapeError, match="must be an object"):
        k.workload_status([])  # type: ignore[arg-type]


# -- placement inside the flavor ----------------------------------------------------------------


def test_the_flavor_gives_node_labels_and_tolerations() -> None:
    tol = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    flavors = [
        _flavor("h100", {"gpu": "h100", "pool": "a"}, [tol]),
        _flavor("spot", {"pool": "spot"}),
    ]
    placement = k.flavor_placement(k.workload_status(_admitted()), flavors)
    assert placement.flavors == ("h100",)
    assert placement.node_labels == {"gpu": "h100", "pool": "a"}
    assert placement.tolerations == (tol,)
    assert placement.node_selector({"zone": "z1"}) == {"zone": "z1", "gpu": "h100", "pool": "a"}
    mine = {"key": "team", "operator": "Equal", "value": "a"}
    assert placement.all_tolerations([mine, tol]) == [mine, tol]


def test_flavors_of_several_resources_are_combined() -> None:
    status = k.workload_status(_admitted(flavors={c.GPU_RESOURCE: "h100", "cpu": "big-cpu"}))
    assert status.admission is not None
    assert status.admission.flavor == "h100"
    placement = k.flavor_placement(
        status, [_flavor("h100", {"gpu": "h100"}), _flavor("big-cpu", {"cpu": "big"})]
    )
    assert placement.node_labels == {"gpu": "h100", "cpu": "big"}
    conflict = [_flavor("h100", {"pool": "a"}), _flavor("big-cpu", {"pool": "b"})]
    with pytest.raises(k.WorkloadShapeError, match="no node can have both"):
        k.flavor_placement(status, conflict)


def test_a_flavor_without_node_labels_places_anywhere() -> None:
    placement = k.flavor_placement(k.workload_status(_admitted()), [_flavor("h100")])
    assert placement.node_labels == {}
    assert placement.tolerations == ()


def test_a_template_selector_that_contradicts_the_flavor_is_an_error() -> None:
    placement = k.flavor_placement(k.workload_status(_admitted()), [_flavor("h100", {"g": "a"})])
    with pytest.raises(k.WorkloadShapeError, match="no node can have both"):
        placement.node_selector({"g": "b"})


def test_an_unknown_flavor_or_no_admission_cannot_be_placed() -> None:
    with pytest.raises(k.WorkloadShapeError, match="'h100', which is not among"):
        k.flavor_placement(k.workload_status(_admitted()), [_flavor("other")])
    pending = _admitted()
    del pending["status"]
    with pytest.raises(k.WorkloadShapeError, match="no admission"):
        k.flavor_placement(k.workload_status(pending), [])


def test_admission_check_updates_add_to_the_placement() -> None:
    obj = _admitted()
    obj["status"]["admissionChecks"] = [
        {
            "name": "prov",
            "state": "Ready",
            "message": "",
            "podSetUpdates": [
                {
                    "name": "workers",
                    "nodeSelector": {"reservation": "r1"},
                    "tolerations": [{"key": "res", "operator": "Exists"}],
                },
                {"name": "other", "nodeSelector": {"ignored": "x"}},
            ],
        }
    ]
    placement = k.flavor_placement(k.workload_status(obj), [_flavor("h100", {"gpu": "h100"})])
    assert placement.node_labels == {"gpu": "h100", "reservation": "r1"}
    assert placement.tolerations == ({"key": "res", "operator": "Exists"},)


BAD_FLAVORS: list[tuple[Any, str]] = [
    ({"metadata": {}}, "metadata.name"),
    (_flavor("h100", {"a": 1}), "nodeLabels: must map strings"),
    (_flavor("h100", tolerations={"key": "a"}), "tolerations: must be a list"),
    (_flavor("h100", tolerations=["a"]), r"tolerations\[0\]: must be an object"),
    (_flavor("h100", tolerations=[{"operator": "In"}]), "is not Exists or Equal"),
    (_flavor("h100", tolerations=[{"effect": "Sometimes"}]), "is not a taint effect"),
    (_flavor("h100", tolerations=[{"key": "a", "operator": "Exists", "value": "b"}]), "empty"),
    (_flavor("h100", tolerations=[{"key": "a", "colour": "b"}]), "unknown fields"),
    (_flavor("h100", tolerations=[{"key": "a", "tolerationSeconds": "5"}]), "integer"),
]


@pytest.mark.parametrize(("flavor", "message"), BAD_FLAVORS)
def test_a_flavor_of_the_wrong_shape_is_refused(flavor: Any, message: str) -> None:
    with pytest.raises(k.WorkloadShapeError, match=message):
        k.flavor_placement(k.workload_status(_admitted()), [flavor])


# -- what the owner writes ----------------------------------------------------------------------


def test_finished_and_pods_ready_are_one_condition_each_for_server_side_apply() -> None:
    body = k.finished_apply(_admitted(), True, "training finished", NOW)
    assert body["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    assert body["metadata"] == {"name": "ddljob-train-abcde", "namespace": "ml", "uid": "w-1"}
    assert body["status"] == {
        "conditions": [
            {
                "type": "Finished",
                "status": "True",
                "reason": "Succeeded",
                "message": "training finished",
                "lastTransitionTime": "2026-03-01T12:00:00Z",
            }
        ]
    }
    assert k.finished_apply(_admitted(), False, "x", NOW)["status"]["conditions"][0]["reason"] == (
        "Failed"
    )
    [ready] = k.pods_ready_apply(_admitted(), True, "2 workers run", NOW)["status"]["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("PodsReady", "True", "PodsReady")


def test_pods_ready_keeps_its_transition_time_while_unchanged() -> None:
    obj = _admitted()
    obj["status"]["conditions"].append(_cond("PodsReady", "True", "PodsReady"))
    [ready] = k.pods_ready_apply(obj, True, "still", NOW)["status"]["conditions"]
    assert ready["lastTransitionTime"] == "2026-03-01T11:00:00Z"
    [lost] = k.pods_ready_apply(obj, False, "a worker was lost", NOW)["status"]["conditions"]
    assert lost["lastTransitionTime"] == "2026-03-01T12:00:00Z"


def _evicted(reason: str = "Preempted") -> dict[str, Any]:
    obj = _admitted()
    obj["status"]["conditions"] += [
        _cond("Evicted", reason=reason, message="Preempted to accommodate a workload (UID: x)"),
        _cond("Preempted", reason="InClusterQueue", message="m"),
        _cond("PodsReady", reason="PodsReady"),
    ]
    obj["status"]["schedulingStats"] = {
        "evictions": [{"reason": reason, "underlyingCause": "", "count": 1}]
    }
    obj["status"]["accumulatedPastExecutionTimeSeconds"] = 10
    return obj


def test_clearing_an_evicted_admission_is_what_kueues_integrations_write() -> None:
    original = _evicted()
    before = copy.deepcopy(original)
    body = k.clear_admission_apply(original, NOW)
    assert original == before
    assert body["metadata"]["resourceVersion"] == "7"
    status = body["status"]
    assert "admission" not in status
    conds = {c["type"]: c for c in status["conditions"]}
    assert set(conds) == {"QuotaReserved", "Admitted", "Evicted", "Preempted", "Requeued"}
    assert (conds["QuotaReserved"]["status"], conds["QuotaReserved"]["reason"]) == (
        "False",
        "Pending",
    )
    assert conds["QuotaReserved"]["message"].startswith("Preempted to accommodate")
    assert (conds["Admitted"]["status"], conds["Admitted"]["reason"]) == ("False", "NoReservation")
    assert (conds["Requeued"]["status"], conds["Requeued"]["reason"]) == ("True", "Preempted")
    assert conds["Evicted"] == original["status"]["conditions"][2]
    # What else the admission manager owns travels along, so the apply removes only admission.
    assert status["schedulingStats"] == original["status"]["schedulingStats"]
    assert status["accumulatedPastExecutionTimeSeconds"] == 10 + 3600
    # The result reads as a workload that waits again.
    cleared = {**original, "status": status}
    assert not k.workload_status(cleared).quota_reserved


def test_an_eviction_kueue_does_not_requeue_by_itself_says_so() -> None:
    body = k.clear_admission_apply(_evicted(reason="ClusterQueueStopped"), NOW)
    [requeued] = [c for c in body["status"]["conditions"] if c["type"] == "Requeued"]
    assert requeued["status"] == "False"


def test_an_admission_that_was_not_evicted_is_not_cleared() -> None:
    with pytest.raises(k.WorkloadShapeError, match="not evicted"):
        k.clear_admission_apply(_admitted(), NOW)


# -- the owner's part for one job ---------------------------------------------------------------

TAINT = {"key": "pool", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}
MINE = {"key": "team", "operator": "Exists"}


def _queued(suspend: bool = True, replicas: int = 3, **status: Any) -> DDLJob:
    manifest = make_ddljob(replicas=replicas, min_replicas=1, max_replicas=4, gpus=8)
    manifest = set_path(manifest, "spec.suspend", suspend)
    manifest = set_path(manifest, "spec.template.spec.nodeSelector", {"disk": "ssd"})
    manifest = set_path(manifest, "spec.template.spec.tolerations", [MINE])
    manifest["status"] = status
    return _job(manifest, {k.LABEL_QUEUE_NAME: "team"})


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the API server applies the operator's patches."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _patched(job: DDLJob, patch: dict[str, Any] | None) -> DDLJob:
    assert patch is not None
    return DDLJob.model_validate(_merge(job.model_dump(by_alias=True, exclude_none=True), patch))


def _step(job: DDLJob, obj: Any, pods: tuple[str, ...] = (), flavors: Any = ()) -> k.OwnerStep:
    return k.owner_step(job, "team", obj, flavors, pods, k.Priority(100, "low"), NOW)


def _h100() -> list[Any]:
    return [_flavor("h100", {"pool": "h100"}, [TAINT])]


def test_a_queued_job_without_a_workload_gets_one_and_is_held_suspended() -> None:
    step = _step(_queued(suspend=False), None)
    assert step.create is not None
    assert step.create["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert step.create["spec"]["podSets"][0]["count"] == 3
    assert step.create["spec"]["priority"] == 100
    assert step.job_patch == {"spec": {"suspend": True}}
    assert step.holds and step.condition[1] == "Pending"
    # Created suspended (as it should be): nothing to patch.
    assert _step(_queued(), None).job_patch is None


def test_a_pending_workload_keeps_the_job_suspended_and_says_why() -> None:
    obj = _admitted()
    obj["status"] = {
        "conditions": [
            _cond("QuotaReserved", "False", "Pending", "insufficient quota for nvidia.com/gpu")
        ]
    }
    obj["spec"]["podSets"][0]["count"] = 3
    obj["spec"]["podSets"][0]["minCount"] = 1
    step = _step(_queued(), obj)
    assert step.job_patch is None and not step.writes and not step.delete_stale
    assert step.condition == (
        False,
        "Pending",
        "waiting for Kueue quota (Pending): insufficient quota for nvidia.com/gpu",
    )
    # A job that was scaled while it waited no longer matches its Workload: recreate it.
    assert _step(_queued(replicas=4), obj).delete_stale


def test_admission_runs_the_admitted_count_in_the_flavor_and_remembers_what_it_changed() -> None:
    job = _queued()
    step = _step(job, _admitted(count=2), flavors=_h100())
    assert step.condition[0] and "2 of 3 workers on h100" in step.condition[2]
    running = _patched(job, step.job_patch)
    assert not running.spec.suspend and running.spec.replicas == 2
    pod_spec = running.spec.template["spec"]
    assert pod_spec["nodeSelector"] == {"disk": "ssd", "pool": "h100"}
    assert pod_spec["tolerations"] == [MINE, TAINT]
    record = k.injected(running)
    assert record == k.Injected(3, {"disk": "ssd"}, (MINE,))
    # The Workload stays what the user asked for, not the admitted size.
    assert k.workload(k.as_written(running), "team")["spec"]["podSets"][0]["count"] == 3
    # Applied: nothing more to change, and no PodsReady before the gang trains.
    again = _step(running, _admitted(count=2), flavors=_h100())
    assert again.job_patch is None and not again.writes


def test_pods_ready_once_the_gang_trains_and_only_once() -> None:
    job = _queued()
    running = _patched(job, _step(job, _admitted(count=2), flavors=_h100()).job_patch)
    rendezvous = {"epoch": 1, "workers": 2, "processesPerWorker": 8}
    status = {"phase": "Running", "epoch": 1, "rendezvous": rendezvous}
    training = running.model_copy(update={"status": DDLJobStatus.model_validate(status)})
    [write] = _step(training, _admitted(count=2), flavors=_h100()).writes
    assert write.field_manager == k.PODS_READY_MANAGER
    assert write.body["status"]["conditions"][0]["type"] == "PodsReady"
    obj = _admitted(count=2)
    obj["status"]["conditions"].append(_cond("PodsReady", reason="PodsReady"))
    assert not _step(training, obj, flavors=_h100()).writes


def test_eviction_suspends_then_restores_and_clears_the_admission_once_no_pod_is_left() -> None:
    job = _queued()
    running = _patched(job, _step(job, _admitted(count=2), flavors=_h100()).job_patch)
    evicted = _evicted()
    first = _step(running, evicted, pods=("Running", "Running"))
    assert first.condition[:2] == (False, "Evicted")
    assert first.job_patch == {"spec": {"suspend": True}} and not first.writes
    stopping = _patched(running, first.job_patch)
    # Workers still stopping: wait for them.
    waiting = _step(stopping, evicted, pods=("Running", "Succeeded"))
    assert waiting.job_patch is None and not waiting.writes
    done = _step(stopping, evicted, pods=("Succeeded",))
    restored = _patched(stopping, done.job_patch)
    assert restored.spec.suspend and restored.spec.replicas == 3
    assert restored.spec.template["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert restored.spec.template["spec"]["tolerations"] == [MINE]
    assert k.ANNOTATION_ADMISSION not in restored.metadata.annotations
    [clear] = done.writes
    assert (clear.field_manager, clear.force) == (k.ADMISSION_FIELD_MANAGER, True)
    assert "admission" not in clear.body["status"]


def test_a_readmission_on_another_flavor_starts_from_what_the_user_wrote() -> None:
    job = _queued()
    on_h100 = _patched(job, _step(job, _admitted(count=2), flavors=_h100()).job_patch)
    a100 = [_flavor("a100", {"pool": "a100"})]
    readmitted = _admitted(count=3, flavors={c.GPU_RESOURCE: "a100"}, spec_count=3)
    moved = _step(on_h100, readmitted, flavors=a100)
    now = _patched(on_h100, moved.job_patch)
    assert now.spec.replicas == 3
    assert now.spec.template["spec"]["nodeSelector"] == {"disk": "ssd", "pool": "a100"}
    assert now.spec.template["spec"]["tolerations"] == [MINE]
    assert k.injected(now) == k.Injected(3, {"disk": "ssd"}, (MINE,))


def test_a_job_that_ended_marks_its_workload_finished_once() -> None:
    done = _queued(phase="Succeeded", message="4 of 4 workers succeeded")
    [write] = _step(done, _admitted()).writes
    assert write.field_manager == k.FINISHED_MANAGER
    [cond] = write.body["status"]["conditions"]
    assert (cond["type"], cond["reason"]) == ("Finished", "Succeeded")
    finished = _admitted()
    finished["status"]["conditions"].append(_cond("Finished", reason="Succeeded"))
    assert not _step(done, finished).writes


def test_without_kueue_the_job_is_held_and_says_so() -> None:
    step = k.hold(_queued(suspend=False), "KueueNotInstalled", "install Kueue")
    assert step.job_patch == {"spec": {"suspend": True}} and step.holds
    assert k.hold(_queued(), "KueueNotInstalled", "install Kueue").job_patch is None


def test_the_condition_keeps_its_transition_time_and_a_held_job_says_why() -> None:
    status = _queued(phase="Suspended").status
    first = k.with_condition(status, (False, "Pending", "waiting for quota"), NOW)
    [cond] = [x for x in first.conditions if x.type == k.JOB_CONDITION]
    assert (cond.status, cond.reason) == ("False", "Pending")
    assert first.message == "Kueue: waiting for quota"
    later = NOW + dt.timedelta(minutes=5)
    same = k.with_condition(first, (False, "Pending", "still waiting"), later)
    kept = next(x for x in same.conditions if x.type == k.JOB_CONDITION)
    assert kept.last_transition_time == cond.last_transition_time
    assert not k.condition_news(first, (False, "Pending", "still waiting"))
    assert k.condition_news(first, (True, "Admitted", "admitted"))
    admitted = k.with_condition(first, (True, "Admitted", "admitted"), later)
    assert next(x for x in admitted.conditions if x.type == k.JOB_CONDITION).status == "True"


def test_a_tampered_admission_record_is_refused_naming_it() -> None:
    manifest = make_ddljob(gpus=8)
    manifest["metadata"] = {
        "name": "train",
        "namespace": "ml",
        "annotations": {k.ANNOTATION_ADMISSION: "{not json"},
    }
    with pytest.raises(k.WorkloadShapeError, match="kueue-admission"):
        k.injected(DDLJob.model_validate(manifest))
