"""Keys under the operator's prefix on a worker are the operator's alone to set."""

from __future__ import annotations

import pytest

from ddl_operator.api import constants as c
from ddl_operator.api.models import DDLJob
from ddl_operator.core.render import ANNOTATION_NODE, LABEL_SLOT, operator_key, worker_pod

from builders import make_ddljob


def _job(metadata: dict[str, object]) -> DDLJob:
    manifest = make_ddljob(name="train")
    manifest["spec"]["template"]["metadata"] = metadata
    return DDLJob.model_validate({**manifest, "metadata": {"name": "train", "uid": "u-1"}})


@pytest.mark.parametrize(
    ("key", "ours"),
    [
        (c.LABEL_JOB, True),
        (ANNOTATION_NODE, True),
        (c.ANNOTATION_REPORT, True),
        ("team.ddl-operator.dev/anything", True),
        ("ddl-operator.dev", False),
        ("notddl-operator.dev/x", False),
        ("ddl-operator.dev.example.com/x", False),
        ("app", False),
        ("example.com/ddl-operator.dev", False),
    ],
)
def test_operator_keys(key: str, ours: bool) -> None:
    assert operator_key(key) is ours


def test_the_users_keys_under_our_prefix_are_dropped_the_rest_kept() -> None:
    pod = worker_pod(
        _job(
            {
                "labels": {
                    "app": "trainer",
                    c.LABEL_JOB: "someone-else",
                    c.LABEL_RANK: "0",
                    "team.ddl-operator.dev/x": "1",
                },
                "annotations": {
                    "owner": "ml-team",
                    ANNOTATION_NODE: "gpu-node-7",
                    c.ANNOTATION_REPORT: '{"epoch": 0, "state": "Failed"}',
                },
            }
        ),
        3,
    )
    meta = pod["metadata"]
    assert meta["labels"] == {
        "app": "trainer",
        c.LABEL_JOB: "train",
        c.LABEL_ROLE: "worker",
        LABEL_SLOT: "3",
    }
    assert meta["annotations"] == {"owner": "ml-team"}


def test_template_metadata_without_labels_or_annotations() -> None:
    meta = worker_pod(_job({}), 0)["metadata"]
    assert meta["annotations"] == {} and meta["labels"][c.LABEL_JOB] == "train"
