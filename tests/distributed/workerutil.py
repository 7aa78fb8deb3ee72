"""Helpers for worker-runtime tests: manifest builder, local-mode job runner, deadline waits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ddl_worker.report import Progress

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_SCRIPT = REPO / "examples" / "train_resnet.py"
EXAMPLE_MANIFEST = REPO / "examples" / "resnet-job.yaml"

T = TypeVar("T")


def make_job_manifest(
    path: Path,
    *,
    name: str = "test-job",
    replicas: int = 2,
    processes: int = 1,
    min_replicas: int = 1,
    max_replicas: int = 4,
    every_steps: int = 10,
    algorithm: str = "Ring",
    script_args: list[str] | None = None,
    max_restarts: int = 3,
    rendezvous_timeout: int = 60,
) -> Path:
    """Write a CPU DDLJob manifest that runs the example script through the agent."""
    manifest: dict[str, Any] = {
        "apiVersion": "ddl-operator.dev/v1alpha1",
        "kind": "DDLJob",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "elastic": {
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "rendezvousTimeoutSeconds": rendezvous_timeout,
            },
            "gpusPerWorker": 0,
            "processesPerWorker": processes,
            "allreduce": {"algorithm": algorithm, "bucketMB": 1},
            "checkpoint": {"path": "/ckpt", "everySteps": every_steps, "keep": 3},
            "failurePolicy": {"maxRestarts": max_restarts, "backoffSeconds": 0},
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "worker",
                            "image": "ddl-operator/worker:test",
                            "command": ["ddl-worker", "agent", "--"],
                            "args": ["python", str(EXAMPLE_SCRIPT), *(script_args or [])],
                        }
                    ]
                }
            },
        },
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def start_local_job(manifest: Path, work_dir: Path, *options: str) -> subprocess.Popen[str]:
    """`python -m ddl_worker run MANIFEST --local --workdir DIR`, output to DIR/../run.log."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = (work_dir.parent / f"{work_dir.name}.log").open("w")
    command = [sys.executable, "-m", "ddl_worker", "run", str(manifest), "--local"]
    return subprocess.Popen(
        [*command, "--workdir", str(work_dir), *options],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def job_log(work_dir: Path) -> str:
    path = work_dir.parent / f"{work_dir.name}.log"
    return path.read_text() if path.exists() else ""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, log: str = "") -> T:
    """probe() until it returns something, or fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{log}")
        time.sleep(0.1)


def progress(work_dir: Path, pod: str) -> Progress | None:
    return Progress.read(work_dir / "pods" / pod / "progress.json")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None
