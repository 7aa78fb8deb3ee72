"""Worker pods as the operator renders them."""

from __future__ import annotations

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.affinity import required_terms
from ddl_operator.core.podview import worker_view
from ddl_operator.core.render import (
    ANNOTATION_NODE,
    SHM_VOLUME,
    merge_patch,
    pinned_creates,
    placement_patch,
    worker_pod,
)

from builders import make_ddljob, pinned_node, set_path


def _job(manifest: dict[str, object]) -> DDLJob:
    return DDLJob.model_validate(
        {**manifest, "metadata": {"name": "job", "namespace": "ml", "uid": "u-1"}}
    )


def test_workers_get_a_memory_backed_dev_shm() -> None:
    pod = worker_pod(_job(make_ddljob()), 0)
    spec = pod["spec"]
    assert {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    mounts = spec["containers"][0]["volumeMounts"]
    assert {"name": SHM_VOLUME, "mountPath": "/dev/shm"} in mounts


def test_a_template_that_mounts_its_own_dev_shm_keeps_it() -> None:
    own = {"name": "big-shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    manifest = set_path(make_ddljob(), "spec.template.spec.volumes", [own])
    manifest = set_path(
        manifest,
        "spec.template.spec.containers",
        [
            {
                "name": "worker",
                "image": "ddl-worker:dev",
                "volumeMounts": [{"name": "big-shm", "mountPath": "/dev/shm"}],
            }
        ],
    )
    spec = worker_pod(_job(manifest), 1)["spec"]
    assert spec["volumes"] == [own]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "big-shm", "mountPath": "/dev/shm"}]


def test_a_pod_placed_as_it_is_created_keeps_the_users_selector_and_other_gates() -> None:
    manifest = make_ddljob(gpus=8)
    spec = manifest["spec"]["template"]["spec"]
    spec["nodeSelector"] = {"pool": "a100"}
    spec["schedulingGates"] = [{"name": "example.com/quota"}]
    job = DDLJob.model_validate(manifest)
    pods = [worker_pod(job, 0), worker_pod(job, 1)]
    existing = "job-worker-7"
    place = [
        ("job-worker-1", placement_patch("n1", pods[1]["spec"]["schedulingGates"], "t", terms=())),
        (existing, placement_patch("n7", [{"name": c.SCHEDULING_GATE}], "t", terms=())),
    ]
    created, patches = pinned_creates(pods, place)
    assert [name for name, _ in patches] == [existing], "only a pod that exists is patched"
    assert created[0] == pods[0], "an unplaced new pod is created as rendered (gated)"
    pinned = created[1]
    assert pinned["spec"]["nodeSelector"] == {"pool": "a100"}
    assert pinned_node(pinned) == "n1"
    assert pinned["spec"]["schedulingGates"] == [{"name": "example.com/quota"}]
    assert pinned["metadata"]["annotations"][ANNOTATION_NODE] == "n1"
    assert pods[1]["spec"]["schedulingGates"][-1] == {"name": c.SCHEDULING_GATE}, "not mutated"


def test_merge_patch_merges_maps_removes_nulls_and_replaces_the_rest() -> None:
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2], "k": "v"}
    patch = {"a": {"c": None, "d": {"e": None, "f": 3}}, "l": [3], "k": None}
    assert merge_patch(target, patch) == {"a": {"b": 1, "d": {"f": 3}}, "l": [3]}
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2], "k": "v"}


def test_the_pin_is_on_the_node_name_and_anded_into_each_of_the_pods_own_terms() -> None:
    """kube-scheduler checks one node for a pin on metadata.name (not every node for a label),
    and a gated pod accepts requirements added to its existing terms, not new terms."""
    manifest = make_ddljob(gpus=8)
    spec = manifest["spec"]["template"]["spec"]
    gpu = {"key": "gpu", "operator": "In", "values": ["h100", "h200"]}
    spot = {"key": "spot", "operator": "DoesNotExist"}
    spec["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [gpu]}, {"matchExpressions": [spot]}]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [spot]}}
            ],
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    pod = worker_pod(DDLJob.model_validate(manifest), 0)
    view = worker_view(pod)
    patch = placement_patch("n3", view.gates, "t", terms=view.node_terms)
    pinned = merge_patch(pod, patch)
    pin = {"key": "metadata.name", "operator": "In", "values": ["n3"]}
    affinity = pinned["spec"]["affinity"]
    assert affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
        "nodeSelectorTerms": [
            {"matchExpressions": [gpu], "matchFields": [pin]},
            {"matchExpressions": [spot], "matchFields": [pin]},
        ]
    }
    kept = spec["affinity"]
    assert (
        affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        == kept["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    )
    assert affinity["podAntiAffinity"] == kept["podAntiAffinity"]
    assert "nodeSelector" not in pinned["spec"]
    assert pinned_node(pinned) == "n3"
    bare = placement_patch("n4", (), "t", terms=())
    assert required_terms(bare["spec"]) == ({"matchFields": [dict(pin, values=["n4"])]},)
    # An empty term matches no node and a gated pod's API refuses additions to it: kept as is.
    empty = placement_patch("n5", (), "t", terms=({}, {"matchExpressions": [gpu]}))
    assert required_terms(empty["spec"]) == (
        {},
        {"matchExpressions": [gpu], "matchFields": [dict(pin, values=["n5"])]},
    )
    for odd in (
        "x",
        {"nodeAffinity": []},
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": 1}},
    ):
        assert required_terms({"affinity": odd}) == (), odd
