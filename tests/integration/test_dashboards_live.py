"""A real Prometheus scrapes a real running job and the operator; every dashboard panel's
query must return data (NVIDIA DCGM queries aside: no DCGM exporter runs here)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_localcluster.controlplane import free_port, wait_for

from builders import make_ddljob
from kubetools import Kubectl, OperatorProcess, make_fake_cluster
from workerutil import make_job_manifest, start_local_job

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "ddl-operator" / "dashboards"
PODS = ("live-w0", "live-w1")


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        pytest.fail("prometheus is not installed: `make system-deps` (Debian's prometheus)")
    return found


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A Prometheus server whose scrape targets the test writes into a file_sd file."""
    port = free_port()
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            # Our metrics carry job/namespace labels of their own: keep them.
            {
                "job_name": "ddl-workers",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            },
            {
                "job_name": "ddl-operator",
                "file_sd_configs": [
                    {"files": [str(tmp_path / "operator.json")], "refresh_interval": "1s"}
                ],
            },
        ],
    }
    (tmp_path / "operator.json").write_text("[]")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            "prometheus",
            lambda: _ready(port),
            60,
            lambda: (tmp_path / "prometheus.log").read_text()[-2000:],
        )
        yield port, tmp_path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def panel_queries(name: str, variables: dict[str, str]) -> list[tuple[str, str]]:
    board = json.loads((DASHBOARDS / name).read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if target["refId"].startswith("DCGM"):
                continue
            expr = target["expr"].replace("$__rate_interval", "20s").replace("$__range", "5m")
            for key, value in variables.items():
                expr = expr.replace(f"${key}", value)
            out.append((f"{panel['title']} / {target['refId']}", expr))
    return out


@pytest.mark.usefixtures("kwok")
def test_every_dashboard_panel_returns_data_from_a_live_scrape(
    prometheus: tuple[int, Path],
    tmp_path: Path,
    operator: OperatorProcess,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    port, prom_dir = prometheus
    (prom_dir / "operator.json").write_text(
        json.dumps([{"targets": [f"127.0.0.1:{operator.metrics_port}"]}])
    )
    # The operator has something to show: a running gang and one that cannot fit.
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    try:
        for name, replicas in (("fits", 1), ("too-big", 4)):
            job = make_ddljob(name=name, namespace=namespace, replicas=replicas, gpus=8)
            job["spec"]["template"]["spec"]["nodeSelector"] = fake.selector
            assert kubectl.apply(job).returncode == 0
        manifest = make_job_manifest(
            tmp_path / "job.yaml",
            name="live",
            replicas=2,
            processes=2,
            algorithm="Hierarchical",
            script_args=["--steps", "100000"],
        )
        work = tmp_path / "run"
        job_proc = start_local_job(manifest, work)
        try:
            ports = {}
            wait_for(
                "metrics ports",
                lambda: all((work / "pods" / p / "metrics_port").exists() for p in PODS),
                120,
                lambda: "",
            )
            for pod in PODS:
                ports[pod] = int((work / "pods" / pod / "metrics_port").read_text())
            (prom_dir / "targets.json").write_text(
                json.dumps([{"targets": [f"127.0.0.1:{p}" for p in ports.values()]}])
            )
            queries = panel_queries("ddl-job.json", {"namespace": "local", "job": "live"})
            queries += panel_queries("ddl-operator.json", {"namespace": ".*"})
            # Without a GPU there are no NVML gauges, and a healthy job has no straggler:
            # those queries must still evaluate, but may be empty.
            may_be_empty = [
                (w, e) for w, e in queries if "ddl_gpu_" in e or w.startswith("Straggler ranks")
            ]
            checks = [q for q in queries if q not in may_be_empty]
            assert len(checks) > 10
            empty: list[str] = []

            def all_have_data() -> bool:
                empty[:] = [where for where, expr in checks if not query(port, expr)]
                return not empty

            wait_for(
                "every panel to show data",
                all_have_data,
                150,
                lambda: f"panels without data: {empty}",
            )
        finally:
            job_proc.send_signal(signal.SIGTERM)
            job_proc.wait(timeout=60)
        print(
            f"\n{len(checks)} panel queries returned data from a live scrape; "
            f"{len(may_be_empty)} evaluated (GPU/straggler)"
        )
    finally:
        fake.delete()
