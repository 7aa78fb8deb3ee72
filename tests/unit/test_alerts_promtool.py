"""The alert rules and dashboard queries, evaluated by the real `promtool` on synthetic series.

Each alert fires in a provoked case and stays quiet in a healthy one; every dashboard query
parses and returns a number on the series a running job and operator export. promtool comes
from Debian's `prometheus` package.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_operator.observability import OPERATOR_SCRAPE_JOB
from ddl_operator.observability.alerts import JOB_ALERTS, OPERATOR_ALERTS, RULES_PATH, Alert
from ddl_operator.observability.dashboards import DASHBOARD_DIR

ALERTS = {a.name: a for a in (*JOB_ALERTS, *OPERATOR_ALERTS)}
NS = "team-a"
JOB = "resnet"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (Debian) provides it")
    return path


def run_promtool(*args: str) -> None:
    proc = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {args[0]} {args[1]} failed:\n{proc.stdout}{proc.stderr}"


@dataclass
class Series:
    """One input series in promtool's notation, e.g. values '0+15x60'."""

    name: str
    labels: dict[str, str]
    values: str

    def input(self) -> dict[str, str]:
        labels = ", ".join(f'{k}="{v}"' for k, v in self.labels.items())
        return {"series": f"{self.name}{{{labels}}}", "values": self.values}


@dataclass
class Expect:
    """An alert expected at `at` (labels and annotations), or none when `alerts` is empty."""

    at: str
    alerts: list[dict[str, dict[str, str]]] = field(default_factory=list)


def rank_series(
    rank: int,
    node: str,
    *,
    sync_per_step: float,
    step_seconds: float = 1.0,
    minutes: int = 60,
    job: str = JOB,
) -> list[Series]:
    """A rank stepping once a second for `minutes`, scraped every minute."""
    labels = {"job": job, "namespace": NS, "rank": str(rank), "node": node}
    n = minutes
    return [
        Series("ddl_samples_total", labels, f"0+{32 * 60}x{n}"),
        Series("ddl_step_seconds_count", labels, f"0+60x{n}"),
        Series("ddl_step_seconds_sum", labels, f"0+{60 * step_seconds:g}x{n}"),
        Series("ddl_step_seconds_bucket", {**labels, "le": "0.5"}, f"0x{n}"),
        Series("ddl_step_seconds_bucket", {**labels, "le": "2.5"}, f"0+60x{n}"),
        Series("ddl_step_seconds_bucket", {**labels, "le": "+Inf"}, f"0+60x{n}"),
        Series("ddl_sync_wait_seconds_total", labels, f"0+{60 * sync_per_step:g}x{n}"),
        Series("ddl_allreduce_bytes_total", {**labels, "tier": "intra"}, f"0+{60 * 10**8}x{n}"),
        Series("ddl_allreduce_bytes_total", {**labels, "tier": "inter"}, f"0+{60 * 10**7}x{n}"),
        Series("ddl_allreduce_seconds_total", {**labels, "tier": "intra"}, f"0+6x{n}"),
        Series("ddl_allreduce_seconds_total", {**labels, "tier": "inter"}, f"0+18x{n}"),
        Series("ddl_gpu_utilization_ratio", labels, f"0.9+0x{n}"),
        Series("ddl_gpu_memory_used_bytes", labels, f"{20 * 2**30}+0x{n}"),
    ]


def write_tests(tmp_path: Path, groups: list[dict[str, Any]]) -> Path:
    path = tmp_path / "tests.yaml"
    path.write_text(
        yaml.safe_dump(
            {"rule_files": [str(RULES_PATH)], "evaluation_interval": "1m", "tests": groups},
            sort_keys=False,
        )
    )
    return path


def alert_case(alert: str, series: list[Series], *expects: Expect) -> dict[str, Any]:
    return {
        "interval": "1m",
        "input_series": [s.input() for s in series],
        "alert_rule_test": [
            {
                "eval_time": e.at,
                "alertname": alert,
                "exp_alerts": [
                    {"exp_labels": a["labels"], "exp_annotations": a["annotations"]}
                    for a in e.alerts
                ],
            }
            for e in expects
        ],
    }


def fired(alert: Alert, labels: dict[str, str], value: str = "") -> dict[str, dict[str, str]]:
    """The alert as Prometheus renders it for these labels (and humanized value)."""

    def fill(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
        return re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)

    return {
        "labels": {**labels, "alertname": alert.name, "severity": alert.severity},
        "annotations": {"summary": fill(alert.summary), "description": fill(alert.description)},
    }


def test_rule_file_passes_promtool_check() -> None:
    run_promtool("check", "rules", str(RULES_PATH))


def test_unschedulable(tmp_path: Path) -> None:
    alert = ALERTS["DDLJobUnschedulable"]
    labels = {"namespace": NS, "job": "big", "reason": "zone: 16 GPUs wanted, 8 free"}
    stuck = Series("ddl_operator_job_unschedulable", labels, "1+0x30")
    placed = Series("ddl_operator_job_unschedulable", {**labels, "job": "small"}, "1+0x9 0+0x20")
    cases = [
        alert_case(alert.name, [stuck], Expect("10m"), Expect("20m", [fired(alert, labels)])),
        alert_case(alert.name, [placed], Expect("20m")),
    ]
    run_promtool("test", "rules", str(write_tests(tmp_path, cases)))


def test_high_sync_wait(tmp_path: Path) -> None:
    alert = ALERTS["DDLJobHighSyncWait"]
    slow = [*rank_series(0, "n1", sync_per_step=0.5), *rank_series(1, "n2", sync_per_step=0.5)]
    fine = [*rank_series(0, "n1", sync_per_step=0.1), *rank_series(1, "n2", sync_per_step=0.1)]
    job = {"namespace": NS, "job": JOB}
    cases = [
        alert_case(alert.name, slow, Expect("12m"), Expect("40m", [fired(alert, job, "50%")])),
        alert_case(alert.name, fine, Expect("40m")),
    ]
    run_promtool("test", "rules", str(write_tests(tmp_path, cases)))


def test_straggler_rank(tmp_path: Path) -> None:
    """Rank 3 needs 0.95 s of compute per step, the others 0.6 s (they wait for it)."""
    alert = ALERTS["DDLJobStragglerRank"]
    fast = [s for r in range(3) for s in rank_series(r, "n1", sync_per_step=0.4)]
    straggling = [*fast, *rank_series(3, "n2", sync_per_step=0.05)]
    steady = [*fast, *rank_series(3, "n2", sync_per_step=0.35)]
    rank3 = {"namespace": NS, "job": JOB, "rank": "3", "node": "n2"}
    cases = [
        alert_case(
            alert.name, straggling, Expect("12m"), Expect("40m", [fired(alert, rank3, "1.583")])
        ),
        alert_case(alert.name, steady, Expect("40m")),
    ]
    run_promtool("test", "rules", str(write_tests(tmp_path, cases)))


def test_restart_loop(tmp_path: Path) -> None:
    alert = ALERTS["DDLJobRestartLoop"]
    pod = {"job": JOB, "namespace": NS, "node": "n1"}
    job = {"namespace": NS, "job": JOB}
    agent_looping = Series("ddl_restarts_total", pod, "0 0 0 1 2 3 4 5 6 7 8 9 10")
    agent_once = Series("ddl_restarts_total", pod, "0 0 0 1 1 1 1 1 1 1 1 1 1")
    operator_looping = Series("ddl_operator_job_restarts", job, "0+1x12")
    operator_once = Series("ddl_operator_job_restarts", job, "0 1 1 1 1 1 1 1 1 1 1 1 1")
    cases = [
        alert_case(alert.name, [agent_looping], Expect("10m", [fired(alert, job)])),
        alert_case(alert.name, [operator_looping], Expect("10m", [fired(alert, job)])),
        alert_case(alert.name, [agent_once, operator_once], Expect("12m")),
    ]
    run_promtool("test", "rules", str(write_tests(tmp_path, cases)))


def test_operator_down(tmp_path: Path) -> None:
    alert = ALERTS["DDLOperatorDown"]
    target = {"job": OPERATOR_SCRAPE_JOB, "instance": "10.0.0.7:9090"}
    cases = [
        alert_case(
            alert.name,
            [Series("up", target, "1 1 0 0 0 0 0 0 0 0 0")],
            Expect("5m"),
            Expect("9m", [fired(alert, target)]),
        ),
        # No target at all (never deployed, or its Service lost its endpoints).
        alert_case(
            alert.name,
            [Series("up", {"job": "other", "instance": "x"}, "1+0x10")],
            Expect("9m", [fired(alert, {"job": OPERATOR_SCRAPE_JOB})]),
        ),
        alert_case(alert.name, [Series("up", target, "1+0x10")], Expect("9m")),
    ]
    run_promtool("test", "rules", str(write_tests(tmp_path, cases)))


# ---- dashboards ----------------------------------------------------------------------------

# What Grafana substitutes for the dashboard variables.
VARIABLES = {
    "ddl-job.json": {"namespace": NS, "job": JOB},
    "ddl-operator.json": {"namespace": ".*"},
}
GRAFANA_INTERVALS = {"$__rate_interval": "2m", "$__range": "1h"}


def cluster_series() -> list[Series]:
    """A running job (rank 3 straggling, one rescale, one restart), a waiting job, DCGM, the
    operator: everything each dashboard query needs to return data."""
    ranks = [(0, "node-a"), (1, "node-a"), (2, "node-b"), (3, "node-b")]
    series = [
        s for r, node in ranks for s in rank_series(r, node, sync_per_step=0.05 if r == 3 else 0.4)
    ]
    for slot, node in enumerate(("node-a", "node-b")):
        pod = {"job": JOB, "namespace": NS, "node": node}
        series += [
            Series("ddl_epoch", pod, "1+0x29 2+0x30"),
            Series("ddl_restarts_total", pod, "0+0x29 1+0x30"),
        ]
        dcgm = {
            "gpu": "0",
            "UUID": f"GPU-{slot}",
            "Hostname": node,
            "namespace": NS,
            "pod": f"{JOB}-worker-{slot}",
            "container": "worker",
        }
        series += [
            Series("DCGM_FI_DEV_GPU_UTIL", dcgm, "90+0x59"),
            Series("DCGM_FI_PROF_GR_ENGINE_ACTIVE", dcgm, "0.85+0x59"),
            Series("DCGM_FI_DEV_FB_USED", dcgm, "20480+0x59"),
        ]
    waiting = {"namespace": NS, "job": "big"}
    series += [
        Series("up", {"job": OPERATOR_SCRAPE_JOB, "instance": "10.0.0.7:9090"}, "1+0x59"),
        Series("ddl_operator_jobs", {"phase": "Running"}, "1+0x59"),
        Series("ddl_operator_jobs", {"phase": "Pending"}, "1+0x59"),
        Series("ddl_operator_pending_gpus", waiting, "16+0x59"),
        Series("ddl_operator_job_unschedulable", {**waiting, "reason": "zone full"}, "1+0x59"),
        Series("ddl_operator_job_epoch", {"namespace": NS, "job": JOB}, "1+0x29 2+0x30"),
        Series("ddl_operator_job_restarts", {"namespace": NS, "job": JOB}, "0+0x29 1+0x30"),
    ]
    for histogram in ("ddl_operator_reconcile_seconds", "ddl_operator_placement_seconds"):
        for le, per_minute in (("0.01", 30), ("0.1", 55), ("+Inf", 60)):
            series.append(Series(f"{histogram}_bucket", {"le": le}, f"0+{per_minute}x59"))
        series += [
            Series(f"{histogram}_count", {}, "0+60x59"),
            Series(f"{histogram}_sum", {}, "0+1.5x59"),
        ]
    return series


# Panels are read well after the rescale and restart at 30m; annotations just after them.
PANEL_TIME = "50m"
ANNOTATION_TIME = "31m"


def dashboard_queries(name: str) -> list[tuple[str, str, str]]:
    """(where, PromQL, when) for every panel query and annotation, variables substituted."""
    board = json.loads((DASHBOARD_DIR / name).read_text())
    found = [
        (f"annotation {a['name']}", a["expr"], ANNOTATION_TIME)
        for a in board.get("annotations", {}).get("list", [])
    ]
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found.append((f"{panel['title']} / {target['refId']}", target["expr"], PANEL_TIME))
    substituted = []
    for where, expr, when in found:
        for key, value in GRAFANA_INTERVALS.items():
            expr = expr.replace(key, value)
        for key, value in VARIABLES[name].items():
            expr = expr.replace(f"${key}", value)
        assert "$" not in expr, f"{where}: unsubstituted variable in {expr}"
        substituted.append((where, expr, when))
    return substituted


def returns_numbers(expr: str) -> str:
    """1 when `expr` parses, returns series, and none of them is NaN; nothing otherwise."""
    return f"count(({expr}) == ({expr})) > bool 0"


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_every_dashboard_query_returns_numbers(name: str, tmp_path: Path) -> None:
    queries = dashboard_queries(name)
    assert queries
    case = {
        "interval": "1m",
        "input_series": [s.input() for s in cluster_series()],
        "promql_expr_test": [
            {
                "expr": returns_numbers(expr),
                "eval_time": when,
                "exp_samples": [{"labels": "{}", "value": 1}],
            }
            for _, expr, when in queries
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [], "tests": [case]}, sort_keys=False))
    proc = subprocess.run(
        [promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        # promtool quotes each failing expression like a JSON string.
        quoted = re.findall(r'^\s*expr: (".*"), time:', proc.stdout + proc.stderr, re.M)
        failed = {json.loads(q) for q in quoted}
        where = [w for w, expr, _ in queries if returns_numbers(expr) in failed]
        pytest.fail(f"queries without data: {where}\n{proc.stdout}{proc.stderr}")
