"""Scrape a running local job: every metric present, with sane values; SIGTERM checkpoints."""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ddl_worker.checkpoint import Checkpointer
from ddl_worker.env import EXIT_CODE_TERMINATED
from ddl_worker.metrics import GpuReader

from workerutil import (
    EXAMPLE_SCRIPT,
    job_log,
    make_job_manifest,
    progress,
    read_json,
    start_local_job,
    wait_for,
)

PODS = ("metrics-w0", "metrics-w1")
ALLOWED_LABELS = {"job", "namespace", "rank", "node", "tier", "le"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ddl_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def values(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """rank (or '' for pod-level metrics) -> value of the samples of name matching labels."""
    found = {}
    for (sample_name, sample_labels), value in samples.items():
        as_dict = dict(sample_labels)
        if sample_name == name and all(as_dict.get(k) == v for k, v in labels.items()):
            found[as_dict.get("rank", "")] = value
    return found


def example_parameter_bytes() -> int:
    sys.path.insert(0, str(EXAMPLE_SCRIPT.parent))
    from train_resnet import SmallResNet

    return sum(p.numel() * p.element_size() for p in SmallResNet().parameters())


def test_scraping_a_running_job_returns_every_metric_with_sane_values(tmp_path: Path) -> None:
    manifest = make_job_manifest(
        tmp_path / "job.yaml",
        name="metrics",
        replicas=2,
        processes=2,
        every_steps=100_000,  # no periodic checkpoint: the only one comes from SIGTERM
        script_args=["--steps", "100000"],
    )
    work = tmp_path / "run"
    job = start_local_job(manifest, work)
    try:
        wait_for("step 20", lambda: (p := progress(work, PODS[0])) and p.step >= 20, 120)
        ports = {pod: int((work / "pods" / pod / "metrics_port").read_text()) for pod in PODS}
        first = {pod: scrape(port) for pod, port in ports.items()}
        started = time.monotonic()
        time.sleep(2.0)
        second = {pod: scrape(port) for pod, port in ports.items()}
        elapsed = time.monotonic() - started
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()

    parameter_bytes = example_parameter_bytes()
    throughput = 0.0
    for index, pod in enumerate(PODS):
        before, after = first[pod], second[pod]
        ranks = {str(2 * index), str(2 * index + 1)}
        pod_labels = {"job": "metrics", "namespace": "local", "node": f"local-node-{index}"}
        for (_name, labels), _value in after.items():
            assert {k for k, _ in labels} <= ALLOWED_LABELS, labels
        samples_before = values(before, "ddl_samples_total", **pod_labels)
        samples_after = values(after, "ddl_samples_total", **pod_labels)
        assert set(samples_after) == ranks
        throughput += (sum(samples_after.values()) - sum(samples_before.values())) / elapsed

        step_count = values(after, "ddl_step_seconds_count", **pod_labels)
        step_sum = values(after, "ddl_step_seconds_sum", **pod_labels)
        sync_wait = values(after, "ddl_sync_wait_seconds_total", **pod_labels)
        flat = {**pod_labels, "tier": "flat"}
        reduced = values(after, "ddl_allreduce_bytes_total", **flat)
        busy = values(after, "ddl_allreduce_seconds_total", **flat)
        assert values(after, "ddl_step_seconds_bucket", **pod_labels, le="+Inf") == step_count
        for rank in ranks:
            assert step_count[rank] >= 20 and step_sum[rank] > 0
            assert 0 <= sync_wait[rank] <= step_sum[rank], (rank, sync_wait, step_sum)
            assert busy[rank] > 0
            # Each step a ring sends 2(p-1)/p = 1.5 of the gradients per rank (p = 4); one step
            # of slack as the files are read while training runs.
            per_step = 1.5 * parameter_bytes
            assert abs(reduced[rank] - step_count[rank] * per_step) <= per_step
        assert values(after, "ddl_epoch", **pod_labels) == {"": 0.0}
        assert values(after, "ddl_restarts_total", **pod_labels) == {"": 0.0}
        if GpuReader().count == 0:
            assert not values(after, "ddl_gpu_utilization_ratio")
            assert not values(after, "ddl_gpu_memory_used_bytes")
    print(f"scraped throughput {throughput:.0f} samples/s")
    assert throughput > 0

    # SIGTERM: every process stopped at one step boundary and rank 0 checkpointed it.
    assert code == EXIT_CODE_TERMINATED, job_log(work)
    last = progress(work, PODS[0])
    assert last is not None
    checkpoints = Checkpointer(work / "checkpoints")
    assert checkpoints.steps() == [last.step]
    assert checkpoints.read(last.step).state["sampler"]["consumed"] > 0
    reports = {pod: read_json(work / "reports" / f"{pod}.json") for pod in PODS}
    assert {r["message"] for r in reports.values()} == {"terminated by SIGTERM"}
