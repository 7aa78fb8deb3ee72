"""Each job checkpoints to a directory of its own unless told otherwise, under its identity."""

from __future__ import annotations

from typing import Any

import pytest

from ddl_operator.api.models import DDLJob
from ddl_operator.core.render import worker_env
from ddl_worker.env import ConfigError, JobIdentity, TrainEnv

from builders import make_ddljob

TRAIN_ENV = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "1",
    "LOCAL_WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
}


def rendered(manifest: dict[str, Any]) -> dict[str, str]:
    """The plain env of the job's workers."""
    return {
        e["name"]: e["value"] for e in worker_env(DDLJob.model_validate(manifest)) if "value" in e
    }


def test_jobs_with_the_default_path_get_directories_of_their_own() -> None:
    dirs = {
        rendered(make_ddljob(name="a", namespace="ml"))["DDL_CHECKPOINT_DIR"],
        rendered(make_ddljob(name="b", namespace="ml"))["DDL_CHECKPOINT_DIR"],
        rendered(make_ddljob(name="a", namespace="team"))["DDL_CHECKPOINT_DIR"],
    }
    assert dirs == {"/ckpt/ml/a", "/ckpt/ml/b", "/ckpt/team/a"}


def test_a_path_that_is_set_is_used_as_is() -> None:
    manifest = make_ddljob(name="a", checkpoint={"path": "/data/shared", "keep": 2})
    env = rendered(manifest)
    assert (env["DDL_CHECKPOINT_DIR"], env["DDL_CHECKPOINT_KEEP"]) == ("/data/shared", "2")
    assert env["DDL_JOB_NAME"] == "a"


def test_the_training_env_names_the_job() -> None:
    env = TrainEnv.from_environ({**TRAIN_ENV, "POD_NAMESPACE": "ml", "DDL_JOB_NAME": "train"})
    assert env.job == JobIdentity("ml", "train")
    assert str(env.job) == "ml/train"
    assert TrainEnv.from_environ(TRAIN_ENV).job == JobIdentity("default", "local")


@pytest.mark.parametrize(
    ("namespace", "name", "message"),
    [
        ("m.l", "train", "namespace 'm.l' is not a DNS label"),
        ("ml", "../x", "job name '../x' is not a DNS subdomain"),
        ("ml", "Train", "job name 'Train' is not a DNS subdomain"),
        ("ml", "x" * 151, "at most 150"),
    ],
)
def test_an_identity_that_cannot_name_a_file_is_a_config_error(
    namespace: str, name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        JobIdentity(namespace, name)
    with pytest.raises(ConfigError, match=r"POD_NAMESPACE=.*DDL_JOB_NAME="):
        TrainEnv.from_environ({**TRAIN_ENV, "POD_NAMESPACE": namespace, "DDL_JOB_NAME": name})
