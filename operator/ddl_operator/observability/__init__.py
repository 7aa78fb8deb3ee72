"""PromQL shared by the Grafana dashboards and the Prometheus alerts, so both say the same thing.

Worker series carry {job, namespace, rank, node}; every expression first sums by exactly those
labels, so the scrape's own target labels (pod, instance, container) never break a division.
Scrapes must keep the exposed `job` and `namespace` labels (honor_labels: true, which the
chart's PodMonitor and ServiceMonitor set): they name the DDLJob, not the scrape job.
"""

from __future__ import annotations

from typing import Final

JOB_LABELS: Final = "namespace, job"
RANK_LABELS: Final = "namespace, job, rank, node"
# A rank whose compute time per step exceeds the job's median by more than this is a straggler.
STRAGGLER_FACTOR: Final = 1.2
# Share of step time blocked on communication above which a job is said to scale badly.
HIGH_SYNC_WAIT_RATIO: Final = 0.3
# The `job` label the chart's ServiceMonitor gives the operator's own scrape target.
OPERATOR_SCRAPE_JOB: Final = "ddl-operator"
# Worker pods are named `<job>-worker-<slot>` (ddl_operator.core.render.pod_name); DCGM's
# `pod` label is matched against this to find a job's GPUs.
WORKER_POD_REGEX: Final = "{job}-worker-[0-9]+"


def series(metric: str, selector: str = "") -> str:
    """`metric{selector}`, or the bare name when there is nothing to select."""
    return f"{metric}{{{selector}}}" if selector else metric


def rate_by(metric: str, selector: str, window: str, labels: str) -> str:
    """Per-second rate summed down to `labels`."""
    return f"sum by ({labels}) (rate({series(metric, selector)}[{window}]))"


def increase_by(metric: str, selector: str, window: str, labels: str) -> str:
    """Increase over the window summed down to `labels`."""
    return f"sum by ({labels}) (increase({series(metric, selector)}[{window}]))"


def throughput(selector: str, window: str, labels: str = RANK_LABELS) -> str:
    """Training samples per second."""
    return rate_by("ddl_samples_total", selector, window, labels)


def mean_step_seconds(selector: str, window: str, labels: str = RANK_LABELS) -> str:
    """Mean wall time of one step."""
    return (
        f"{rate_by('ddl_step_seconds_sum', selector, window, labels)}\n"
        f"/\n{rate_by('ddl_step_seconds_count', selector, window, labels)}"
    )


def sync_wait_ratio(selector: str, window: str, labels: str = RANK_LABELS) -> str:
    """Share of step time blocked on communication that backward compute did not hide."""
    return (
        f"{rate_by('ddl_sync_wait_seconds_total', selector, window, labels)}\n"
        f"/\n{rate_by('ddl_step_seconds_sum', selector, window, labels)}"
    )


def compute_seconds_per_step(selector: str, window: str) -> str:
    """Step time minus sync-wait, per rank: the time this rank itself needs for a step.

    Synchronous data parallelism makes every rank's step wall time the same (the fast ranks
    wait in the allreduce for the slow one), so a straggler shows in compute time, and the
    others show it as sync-wait.
    """
    steps = rate_by("ddl_step_seconds_sum", selector, window, RANK_LABELS)
    waits = rate_by("ddl_sync_wait_seconds_total", selector, window, RANK_LABELS)
    count = rate_by("ddl_step_seconds_count", selector, window, RANK_LABELS)
    return f"(\n{steps}\n-\n{waits}\n)\n/\n{count}"


def straggler_ratio(selector: str, window: str) -> str:
    """Each rank's compute time per step divided by its job's median rank."""
    compute = compute_seconds_per_step(selector, window)
    return (
        f"(\n{compute}\n)\n/ on ({JOB_LABELS}) group_left\n"
        f"quantile by ({JOB_LABELS}) (0.5,\n{compute}\n)"
    )


def allreduce_time_share(selector: str, window: str, labels: str) -> str:
    """Time allreduces of a tier were in flight, per second of step time."""
    return (
        f"{rate_by('ddl_allreduce_seconds_total', selector, window, f'{labels}, tier')}\n"
        f"/ ignoring (tier) group_left\n"
        f"{rate_by('ddl_step_seconds_sum', selector, window, labels)}"
    )


def allreduce_bandwidth(selector: str, window: str, labels: str) -> str:
    """Bytes reduced per second of allreduce time, per tier (the algorithm's bandwidth)."""
    tier_labels = f"{labels}, tier"
    return (
        f"{rate_by('ddl_allreduce_bytes_total', selector, window, tier_labels)}\n"
        f"/\n{rate_by('ddl_allreduce_seconds_total', selector, window, tier_labels)}"
    )
