"""A job whose worker pods the API server refuses (a ResourceQuota of no pods, 403): the job
says why in a ReconcileError condition and one Warning event, its passes back off instead of
retrying at a fixed pace, a healthy job in another namespace runs meanwhile, and once the
quota is gone a change to the job is reconciled at once and clears the condition."""

from __future__ import annotations

import datetime as dt
import itertools
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from test_operator import submit, wait_for, worker_pods

from kubetools import FakeCluster, Kubectl, OperatorProcess, make_fake_cluster

pytestmark = pytest.mark.usefixtures("operator", "kwok")

ERROR_STATUS = '{.status.conditions[?(@.type=="ReconcileError")].status}'
# The operator's log line for a failed pass (kopf's format: "[date time,ms] logger [LEVEL] ...").
FAILED = re.compile(
    r"^\[(?P<at>[\d-]+ [\d:]+,\d+)\].*?(?P<key>\S+): pass failed \((?P<reason>\w+): .*\); "
    r"retry (?P<n>\d+) in (?P<delay>[\d.e+]+) s$"
)
WINDOW_SECONDS = 25.0


@pytest.fixture
def cluster(kubectl: Kubectl) -> Iterator[FakeCluster]:
    fake = make_fake_cluster(kubectl, zones=1, racks=1, nodes=2, gpus=8)
    yield fake
    fake.delete()


@pytest.fixture
def healthy_namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl.run("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def _no_pods_quota(kubectl: Kubectl, ns: str) -> None:
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods", "namespace": ns},
        "spec": {"hard": {"pods": "0"}},
    }
    assert kubectl.apply(quota).returncode == 0
    # The controller-manager fills in what is used; admission counts from that.
    kubectl.run(
        "wait", "-n", ns, "resourcequota/no-pods", "--for=jsonpath={.status.hard.pods}=0",
        "--timeout=60s",
    )  # fmt: skip


def _failures(operator: OperatorProcess, key: str) -> list[tuple[float, int, float]]:
    """(time, failure in a row, delay) of each failed pass of `key` in the operator's log."""
    out = []
    for line in operator.log_path.read_text(errors="replace").splitlines():
        match = FAILED.match(line)
        if match and match["key"] == key:
            at = dt.datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((at, int(match["n"]), float(match["delay"])))
    return out


def _metric(operator: OperatorProcess, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics") as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_refused_pods_back_off_and_show_while_another_job_runs(
    kubectl: Kubectl,
    namespace: str,
    healthy_namespace: str,
    cluster: FakeCluster,
    operator: OperatorProcess,
) -> None:
    _no_pods_quota(kubectl, namespace)
    submit(kubectl, namespace, cluster, "refused", replicas=1, gpus=8)
    submit(kubectl, healthy_namespace, cluster, "healthy", replicas=1, gpus=8)

    wait_for(kubectl, namespace, "refused", ERROR_STATUS, "True")
    shown = time.monotonic()
    job = kubectl.get_json("ddlj", "refused", "-n", namespace)
    (error,) = [x for x in job["status"]["conditions"] if x["type"] == "ReconcileError"]
    assert error["reason"] == "Forbidden", error
    assert "exceeded quota" in error["message"] and "no-pods" in error["message"], error
    assert worker_pods(kubectl, namespace, "refused") == []

    wait_for(kubectl, healthy_namespace, "healthy", "{.status.phase}", "Running")
    healthy = kubectl.get_json("ddlj", "healthy", "-n", healthy_namespace)["status"]
    assert "ReconcileError" not in {x["type"] for x in healthy["conditions"]}

    time.sleep(max(0.0, WINDOW_SECONDS - (time.monotonic() - shown)))
    failures = _failures(operator, f"{namespace}/refused")
    # 1, 2, 4, 8, 16 s apart: about six passes in the window, where a fixed 5 s retry makes
    # as many but never waits longer, and a spin makes hundreds.
    assert 4 <= len(failures) <= 8, failures
    assert [n for _, n, _ in failures] == list(range(1, len(failures) + 1)), failures
    assert [d for _, _, d in failures[:4]] == [1.0, 2.0, 4.0, 8.0], failures
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(failures)]
    assert max(gaps) >= 7.0, gaps  # an echo may come early, the back-off's waits do not
    assert _metric(
        operator, "ddl_operator_job_pass_failures", namespace=namespace, job="refused"
    ) == float(len(failures))

    events = kubectl.get_json("events", "-n", namespace, "--field-selector=reason=ReconcileError")[
        "items"
    ]
    assert len(events) == 1, [e["message"] for e in events]  # one per reason, not per retry
    assert events[0]["type"] == "Warning" and "exceeded quota" in events[0]["message"]

    # The quota goes; a change to the job is reconciled now, not after the back-off.
    kubectl.run("delete", "resourcequota", "no-pods", "-n", namespace)
    deadline = time.monotonic() + 30
    for poke in range(100):
        kubectl.run("annotate", "ddlj", "refused", "-n", namespace, f"poke={poke}", "--overwrite")
        phase = kubectl.get_json("ddlj", "refused", "-n", namespace).get("status", {}).get("phase")
        if phase in ("Placing", "Running") or time.monotonic() > deadline:
            break
        time.sleep(1)  # the quota's deletion reaches the admission cache within moments
    wait_for(kubectl, namespace, "refused", "{.status.phase}", "Running", timeout=30)
    status = kubectl.get_json("ddlj", "refused", "-n", namespace)["status"]
    assert "ReconcileError" not in {x["type"] for x in status["conditions"]}
    assert len(worker_pods(kubectl, namespace, "refused")) == 1
    assert (
        _metric(operator, "ddl_operator_job_pass_failures", namespace=namespace, job="refused")
        == 0.0
    )
