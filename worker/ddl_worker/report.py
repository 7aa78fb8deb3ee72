"""What workers tell: the agent's report (to the operator) and the trainer's progress."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from ddl_operator.api import constants
from ddl_operator.core.reports import AgentState
from ddl_worker.fileio import read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """The agent's summary; the operator folds it into the DDLJob status."""

    epoch: int
    state: AgentState
    step: int = 0
    throughput: float = 0.0
    sync_wait_ratio: float = 0.0
    step_seconds: float = 0.0
    restarts: int = 0
    message: str = ""

    def to_json(self) -> str:
        """Compact JSON with the wire (camelCase) names, as the annotation holds it."""
        return json.dumps(
            {
                "epoch": self.epoch,
                "state": self.state,
                "step": self.step,
                "throughput": round(self.throughput, 3),
                "syncWaitRatio": round(self.sync_wait_ratio, 4),
                "stepSeconds": round(self.step_seconds, 4),
                "restarts": self.restarts,
                "message": self.message,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        raw = json.loads(text)
        return cls(
            epoch=int(raw["epoch"]),
            state=raw["state"],
            step=int(raw.get("step", 0)),
            throughput=float(raw.get("throughput", 0.0)),
            sync_wait_ratio=float(raw.get("syncWaitRatio", 0.0)),
            step_seconds=float(raw.get("stepSeconds", 0.0)),
            restarts=int(raw.get("restarts", 0)),
            message=str(raw.get("message", "")),
        )


@dataclass(frozen=True)
class Progress:
    """A training process's latest step, written by local rank 0 for its agent to read."""

    epoch: int
    step: int
    loss: float
    throughput: float
    sync_wait_ratio: float
    step_seconds: float
    resumed_from: int | None
    world_size: int
    time: float

    def write(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> Progress | None:
        """The progress in path; None when the trainer has not written one yet."""
        try:
            raw = read_json(path)
        except (OSError, ValueError):
            return None
        return None if raw is None else cls(**raw)


class Reporter(Protocol):
    """Where the agent's report goes."""

    def publish(self, report: Report) -> None: ...


class FileReporter:
    """Local mode: one JSON file per pod in a directory the local coordinator reads."""

    def __init__(self, directory: str | Path, pod_name: str) -> None:
        self.path = Path(directory) / f"{pod_name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, report: Report) -> None:
        write_json(self.path, json.loads(report.to_json()))

    @staticmethod
    def read(directory: str | Path, pod_name: str) -> Report | None:
        try:
            text = (Path(directory) / f"{pod_name}.json").read_text()
        except FileNotFoundError:
            return None
        return Report.from_json(text)


class PodAnnotator(Protocol):
    """The one Kubernetes call a reporter needs (a thin edge, so tests need no cluster)."""

    def annotate_pod(self, namespace: str, pod: str, key: str, value: str) -> None: ...


class KubernetesReporter:
    """Patches the report onto the agent's own pod; rate-limited while nothing but progress changes.

    A failed patch is logged and retried on the next report: losing a report is better than
    stopping training because the API server hiccuped.
    """

    def __init__(
        self, annotator: PodAnnotator, namespace: str, pod: str, *, min_interval: float = 10.0
    ) -> None:
        self.annotator = annotator
        self.namespace = namespace
        self.pod = pod
        self.min_interval = min_interval
        self._last: Report | None = None
        self._last_time = 0.0

    def publish(self, report: Report) -> None:
        now = time.monotonic()
        last = self._last
        changed = last is None or (last.epoch, last.state, last.message, last.restarts) != (
            report.epoch,
            report.state,
            report.message,
            report.restarts,
        )
        if not changed and now - self._last_time < self.min_interval:
            return
        try:
            self.annotator.annotate_pod(
                self.namespace, self.pod, constants.ANNOTATION_REPORT, report.to_json()
            )
        except Exception as error:  # any API or network failure: log, retry next time
            log.warning("cannot patch report onto pod %s/%s: %s", self.namespace, self.pod, error)
            return
        self._last = report
        self._last_time = now
