"""Prometheus metrics: recorded by every training process, served for the pod by its agent.

Training processes write to PROMETHEUS_MULTIPROC_DIR (set by the agent before they start, as
prometheus_client requires); the agent serves the sum on DDL_METRICS_PORT together with what
only it knows: the epoch, its restarts and the GPUs (NVML).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

TRAINING_LABELS: Final = ("job", "namespace", "rank", "node")
# Step times from a few milliseconds (small CPU models) to minutes (huge models).
STEP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class MetricLabels:
    """The bounded label set of one training process."""

    job: str
    namespace: str
    rank: int
    node: str

    def values(self) -> tuple[str, str, str, str]:
        return (self.job, self.namespace, str(self.rank), self.node)


class TrainingMetrics:
    """The per-process metrics; create one per process (prometheus_client names are global)."""

    def __init__(self, labels: MetricLabels) -> None:
        values = labels.values()
        self.samples = Counter(
            "ddl_samples_total", "Training samples processed by this rank.", TRAINING_LABELS
        ).labels(*values)
        self.step_seconds = Histogram(
            "ddl_step_seconds",
            "Wall time of one training step (checkpoint writes excluded).",
            TRAINING_LABELS,
            buckets=STEP_BUCKETS,
        ).labels(*values)
        self.sync_wait = Counter(
            "ddl_sync_wait_seconds_total",
            "Time a step was blocked on gradient communication that backward compute did not "
            "hide: from the last gradient bucket being ready to the last allreduce completing.",
            TRAINING_LABELS,
        ).labels(*values)
        self._bytes = Counter(
            "ddl_allreduce_bytes_total",
            "Gradient bytes this rank sent, per network tier; flat (one ring over all ranks) "
            "counts a ring allreduce's 2(p-1)/p of each bucket.",
            (*TRAINING_LABELS, "tier"),
        )
        self._seconds = Counter(
            "ddl_allreduce_seconds_total",
            "Time allreduce operations were in flight, per network tier.",
            (*TRAINING_LABELS, "tier"),
        )
        self._values = values

    def record_step(
        self,
        *,
        seconds: float,
        samples: int,
        sync_wait: float,
        tiers: dict[str, tuple[int, float]],
    ) -> None:
        self.step_seconds.observe(seconds)
        self.samples.inc(samples)
        self.sync_wait.inc(max(0.0, sync_wait))
        for tier, (nbytes, tier_seconds) in tiers.items():
            self._bytes.labels(*self._values, tier).inc(nbytes)
            self._seconds.labels(*self._values, tier).inc(tier_seconds)


@dataclass
class AgentView:
    """What the agent knows that training processes do not; read at every scrape."""

    job: str
    namespace: str
    node: str
    epoch: int = 0
    restarts: int = 0
    # Global rank of the process on each local GPU (index = GPU index); empty when idle.
    gpu_ranks: tuple[int, ...] = ()


class GpuReader:
    """NVML utilisation and memory per GPU; absent (no devices) where pynvml or a GPU is not."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml  # type: ignore[import-not-found, unused-ignore]

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.count = int(pynvml.nvmlDeviceGetCount())
        except Exception as error:  # no module, no driver, no GPU: all mean "no GPU metrics"
            log.info("GPU metrics off: %s", error)
            self.count = 0

    def read(self, index: int) -> tuple[float, int] | None:
        """(utilisation ratio, memory used bytes) of GPU index, None when NVML fails."""
        if self._nvml is None or index >= self.count:
            return None
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            utilisation = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception as error:  # a GPU that fell off the bus must not break /metrics
            log.warning("NVML read of GPU %d failed: %s", index, error)
            return None
        return utilisation, used


class AgentCollector:
    """Yields the agent's own metrics at scrape time."""

    def __init__(self, view: Callable[[], AgentView], gpus: GpuReader) -> None:
        self.view = view
        self.gpus = gpus

    def collect(self) -> Iterator[Any]:
        view = self.view()
        pod_labels = ["job", "namespace", "node"]
        pod_values = [view.job, view.namespace, view.node]
        epoch = GaugeMetricFamily(
            "ddl_epoch", "Rendezvous epoch the pod trains in.", labels=pod_labels
        )
        epoch.add_metric(pod_values, view.epoch)
        yield epoch
        restarts = CounterMetricFamily(
            "ddl_restarts", "Times the agent restarted its training processes.", labels=pod_labels
        )
        restarts.add_metric(pod_values, view.restarts)
        yield restarts
        if not view.gpu_ranks or self.gpus.count == 0:
            return
        gpu_labels = [*pod_labels, "rank"]
        utilisation = GaugeMetricFamily(
            "ddl_gpu_utilization_ratio", "GPU busy share (NVML), 0..1.", labels=gpu_labels
        )
        memory = GaugeMetricFamily(
            "ddl_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=gpu_labels
        )
        for index, rank in enumerate(view.gpu_ranks):
            reading = self.gpus.read(index)
            if reading is not None:
                utilisation.add_metric([*pod_values, str(rank)], reading[0])
                memory.add_metric([*pod_values, str(rank)], reading[1])
        yield utilisation
        yield memory


class MetricsServer:
    """The pod's /metrics: training processes' multiprocess files plus the agent collector."""

    def __init__(self, port: int, multiproc_dir: Path, collector: AgentCollector) -> None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
        registry.register(collector)
        self._server, self._thread = start_http_server(port, registry=registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def reset_multiproc_dir(directory: Path) -> None:
    """An empty directory for this agent's training processes' metric files."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
