"""GPU usage per node: what the scheduler charges, plus only our own workers' reservations."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.cache import ClusterCache
from ddl_operator.core.capacity import (
    Container,
    OwnerRef,
    PodClaim,
    effective_gpus,
    gpu_quantity,
    gpus_in_use,
)
from ddl_operator.core.ledger import pod_claim
from ddl_operator.core.render import ANNOTATION_NODE, LABEL_SLOT
from ddl_operator.kube import Kube, worker_pod_view

from builders import make_ddljob
from fakeapi import FakeCoreApi, as_manifest

OWNER = OwnerRef(c.API_VERSION, c.KIND, "train", controller=True)
WORKER_LABELS = {c.LABEL_JOB: "train", c.LABEL_ROLE: "worker"}


def reserved(**changes: Any) -> PodClaim:
    """A gated worker of job `train` that our placement put on node-a (not bound yet)."""
    fields: dict[str, Any] = {
        "containers": (Container(8),),
        "labels": WORKER_LABELS,
        "annotations": {ANNOTATION_NODE: "node-a"},
        "owners": (OWNER,),
    }
    return PodClaim(**{**fields, **changes})


@pytest.mark.parametrize(
    ("claim", "expected"),
    [
        (reserved(), {"node-a": 8}),
        (reserved(node_name="node-b"), {"node-b": 8}),
        # Anyone can write our annotation; only our workers' reservations count.
        (reserved(owners=()), {}),
        (reserved(labels={}), {}),
        (reserved(labels={**WORKER_LABELS, c.LABEL_JOB: "other"}), {}),
        (reserved(labels={c.LABEL_JOB: "train"}), {}),
        (reserved(owners=(OwnerRef(c.API_VERSION, c.KIND, "train", controller=False),)), {}),
        (reserved(owners=(OwnerRef("example.com/v1", c.KIND, "train", controller=True),)), {}),
        (reserved(owners=(OwnerRef("apps/v1", "ReplicaSet", "train", controller=True),)), {}),
        # An ordinary pod counts where it is bound, whatever it carries.
        (reserved(owners=(), node_name="node-c"), {"node-c": 8}),
        (PodClaim(node_name="node-c", containers=(Container(0),)), {}),
        (PodClaim(containers=(Container(4),)), {}),
    ],
)
def test_who_counts_where(claim: PodClaim, expected: dict[str, int]) -> None:
    assert gpus_in_use([claim]) == expected


def test_usage_adds_up_per_node() -> None:
    claims = [
        reserved(),
        reserved(node_name="node-a"),
        PodClaim(node_name="node-a", containers=(Container(1), Container(2))),
        reserved(owners=()),
    ]
    assert gpus_in_use(claims) == {"node-a": 19}


@pytest.mark.parametrize(
    ("containers", "init", "expected"),
    [
        ((Container(2), Container(3)), (), 5),
        ((Container(2),), (Container(4),), 4),
        ((Container(2),), (Container(1),), 2),
        # A sidecar runs next to later init containers and the main ones.
        ((Container(2),), (Container(1, sidecar=True), Container(4)), 5),
        ((Container(2),), (Container(4), Container(1, sidecar=True)), 4),
        ((Container(2),), (Container(1, sidecar=True),), 3),
    ],
)
def test_effective_request_follows_the_scheduler(
    containers: tuple[Container, ...], init: tuple[Container, ...], expected: int
) -> None:
    assert effective_gpus(PodClaim(containers=containers, init_containers=init)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("8", 8), (8, 8), ("1k", 1000), ("2Ki", 2048), ("0", 0), ("-1", 0), ("1.5", 0), ("", 0)],
)
def test_quantities(value: object, expected: int) -> None:
    assert gpu_quantity(value) == expected


def _pod(
    name: str,
    namespace: str = "ml",
    node: str | None = None,
    gpus: str | None = "8",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    owners: list[client.V1OwnerReference] | None = None,
    limits_only: bool = False,
) -> client.V1Pod:
    resources = {c.GPU_RESOURCE: gpus} if gpus else {}
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name,
            namespace=namespace,
            labels=labels,
            annotations=annotations,
            owner_references=owners,
        ),
        spec=client.V1PodSpec(
            node_name=node,
            containers=[
                client.V1Container(
                    name="main",
                    resources=client.V1ResourceRequirements(
                        limits=resources, requests=None if limits_only else resources
                    ),
                )
            ],
        ),
        status=client.V1PodStatus(phase="Pending"),
    )


def _owner(name: str) -> client.V1OwnerReference:
    return client.V1OwnerReference(
        api_version=c.API_VERSION, kind=c.KIND, name=name, uid="u-1", controller=True
    )


def _node(name: str) -> client.V1Node:
    return client.V1Node(
        metadata=client.V1ObjectMeta(name=name, labels={c.LABEL_HOSTNAME: name}),
        spec=client.V1NodeSpec(),
        status=client.V1NodeStatus(
            allocatable={c.GPU_RESOURCE: "8"},
            conditions=[client.V1NodeCondition(type="Ready", status="True")],
        ),
    )


def test_a_strangers_reservation_annotation_does_not_fill_a_node() -> None:
    stranger = _pod(
        "squatter",
        namespace="elsewhere",
        annotations={ANNOTATION_NODE: "node-a"},
        limits_only=True,
    )
    ours = _pod(
        "train-worker-0",
        labels={**WORKER_LABELS, LABEL_SLOT: "0"},
        annotations={ANNOTATION_NODE: "node-b"},
        owners=[_owner("train")],
    )
    bound = _pod("web", namespace="elsewhere", node="node-c", gpus="2", limits_only=True)
    api = FakeCoreApi(
        nodes=[as_manifest(_node(n)) for n in ("node-a", "node-b", "node-c")],
        pods=[as_manifest(p) for p in (stranger, ours, bound)],
    )
    cache = ClusterCache(api)
    cache.start()
    try:
        assert cache.wait_synced(5)
        kube = Kube(client.ApiClient(), cache)
        job = DDLJob.model_validate({**make_ddljob(gpus=8), "metadata": {"name": "train"}})
        free = {n.name: n.free for n in kube.node_infos(job)}
    finally:
        cache.stop()
    assert free == {"node-a": 8, "node-b": 0, "node-c": 6}


def test_pod_claim_reads_init_containers_and_sidecars() -> None:
    pod = _pod("p", node="n")
    pod.spec.init_containers = [
        client.V1Container(
            name="side",
            restart_policy="Always",
            resources=client.V1ResourceRequirements(limits={c.GPU_RESOURCE: "1"}),
        )
    ]
    claim = pod_claim(client.ApiClient().sanitize_for_serialization(pod))
    assert claim.init_containers == (Container(1, sidecar=True),)
    assert effective_gpus(claim) == 9


def test_worker_view_passes_the_report_through_and_survives_a_bad_slot_label() -> None:
    raw = '{"epoch": 1, "throughput": NaN}'
    pod = _pod(
        "train-worker-7",
        labels={**WORKER_LABELS, LABEL_SLOT: "seven"},
        annotations={c.ANNOTATION_REPORT: raw},
        owners=[_owner("train")],
    )
    view = worker_pod_view(pod)
    assert view.report == raw, "parsing is the core's job"
    assert view.slot == 7, "from the name when the label is unreadable"
    pod.metadata.name = "oddly-named"
    assert worker_pod_view(pod).slot == -1
