"""Worker pods as the operator renders them."""

from __future__ import annotations

from ddl_operator.api.models import DDLJob
from ddl_operator.core.render import SHM_VOLUME, worker_pod

from builders import make_ddljob, set_path


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
