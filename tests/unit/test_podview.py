"""A worker pod's manifest as the state machine sees it."""

from __future__ import annotations

from typing import Any

import pytest

from ddl_operator.api import constants as c
from ddl_operator.core.podview import owned_by, slot, worker_view
from ddl_operator.core.reconcile import WorkerPod
from ddl_operator.core.render import ANNOTATION_NODE, ANNOTATION_PLACED_AT, LABEL_SLOT


def manifest(**parts: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {"metadata": {"name": "train-worker-3", "uid": "u3"}, "spec": {}}
    for key, value in parts.items():
        section, field = key.split("__")
        pod.setdefault(section, {})[field] = value
    return pod


def test_a_fresh_gated_worker() -> None:
    pod = manifest(
        metadata__labels={LABEL_SLOT: "3"},
        spec__schedulingGates=[{"name": c.SCHEDULING_GATE}],
    )
    view = worker_view(pod)
    assert view == WorkerPod(name="train-worker-3", slot=3, gates=({"name": c.SCHEDULING_GATE},))
    assert view.gated and view.placed_on is None


def test_a_running_placed_worker_with_a_report() -> None:
    pod = manifest(
        metadata__annotations={ANNOTATION_NODE: "n1", c.ANNOTATION_REPORT: '{"epoch": 1}'},
        spec__nodeName="n1",
        status__phase="Running",
        status__podIP="10.0.0.3",
    )
    view = worker_view(pod)
    assert (view.phase, view.node, view.assigned, view.ip) == ("Running", "n1", "n1", "10.0.0.3")
    assert view.report == '{"epoch": 1}' and view.exit_code is None


def test_a_failed_worker_being_deleted() -> None:
    pod = manifest(
        metadata__deletionTimestamp="2026-12-01T00:00:00Z",
        status__phase="Failed",
        status__containerStatuses=[
            {"name": "w", "state": {"running": {}}},
            {"name": "x", "state": {"terminated": {"exitCode": 42}}},
        ],
    )
    view = worker_view(pod)
    assert view.deleting and view.phase == "Failed" and view.exit_code == 42


@pytest.mark.parametrize(
    ("name", "label", "expected"),
    [
        ("train-worker-7", "7", 7),
        ("train-worker-7", None, 7),
        ("train-worker-7", "seven", 7),
        ("oddly-named", "x", -1),
        ("w-1234567890", None, -1),
        ("w-٣", None, -1),
    ],
)
def test_slot(name: str, label: str | None, expected: int) -> None:
    assert slot(name, label) == expected


def test_owned_by() -> None:
    pod = manifest(metadata__ownerReferences=[{"uid": "job-uid"}, "junk"])
    assert owned_by(pod, "job-uid") and not owned_by(pod, "other")
    assert not owned_by(manifest(), "job-uid")


def test_a_placed_worker_the_scheduler_cannot_bind() -> None:
    pod = manifest(
        metadata__annotations={ANNOTATION_NODE: "n1", ANNOTATION_PLACED_AT: "2026-12-01T10:00:00Z"},
        status__conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/4 nodes are available: 4 Insufficient memory.",
            }
        ],
    )
    view = worker_view(pod)
    assert view.assigned == "n1" and view.node is None
    assert view.placed_at == "2026-12-01T10:00:00Z"
    assert view.unscheduled == "0/4 nodes are available: 4 Insufficient memory."
    bound = manifest(status__conditions=[{"type": "PodScheduled", "status": "True"}])
    assert worker_view(bound).unscheduled == ""
