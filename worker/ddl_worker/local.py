"""Local mode: run a DDLJob manifest on this machine, one agent process per simulated node.

The agents are the same code as in a cluster; only the membership source differs. This module
plays the operator's part: it publishes memberships (a JSON file it replaces atomically), folds
the agents' reports, re-forms at a new epoch when a worker is lost or the gang fails, and prints
a progress line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import yaml
from pydantic import ValidationError

from ddl_operator.api import constants
from ddl_operator.api.models import DDLJob, Member, Rendezvous
from ddl_worker.env import EXIT_CODE_PERMANENT, EXIT_CODE_RETRYABLE, format_grid
from ddl_worker.fileio import write_json
from ddl_worker.report import FileReporter, Progress

TICK_SECONDS: Final = 0.2
PRINT_INTERVAL: Final = 1.0
LOCAL_STOP_TIMEOUT: Final = 10.0
AGENT_PROGRAMS: Final = ("ddl-worker", "ddl_worker")


class ManifestError(Exception):
    """The manifest cannot run locally; the message names the field."""


@dataclass
class Reform:
    """One re-formation: why, when, and how it went (for the summary and the tests)."""

    epoch: int
    workers: int
    reason: str
    detected_at: float
    last_step: int
    resumed_from: int | None = None
    first_step: int | None = None
    seconds: float | None = None


@dataclass
class LocalJob:
    """What the coordinator needs from the manifest."""

    job: DDLJob
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


def load_manifest(path: Path) -> LocalJob:
    """Validate a DDLJob manifest and find the training command its agent runs."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ManifestError(f"cannot read {path}: {error}") from error
    if not isinstance(raw, dict) or raw.get("apiVersion") != constants.API_VERSION:
        raise ManifestError(f"{path}: apiVersion must be {constants.API_VERSION}")
    if raw.get("kind") != constants.KIND:
        raise ManifestError(f"{path}: kind must be {constants.KIND}")
    try:
        job = DDLJob.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ManifestError(f"{path} is not a valid DDLJob: {problems}") from None
    spec = job.spec
    # The CRD's CEL rules, which the API server would apply.
    if not spec.min_replicas <= spec.replicas <= spec.max_replicas:
        raise ManifestError(
            f"{path}: spec.replicas={spec.replicas} must be within [elastic.minReplicas, "
            f"elastic.maxReplicas] = [{spec.min_replicas}, {spec.max_replicas}]"
        )
    if spec.gpus_per_worker and spec.procs_per_worker != spec.gpus_per_worker:
        raise ManifestError(f"{path}: spec.processesPerWorker must equal gpusPerWorker on GPU jobs")
    containers = spec.template.get("spec", {}).get("containers") or []
    if not containers:
        raise ManifestError(f"{path}: spec.template.spec.containers is empty")
    container = containers[0]
    argv = [str(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
    env = {
        str(e["name"]): str(e["value"])
        for e in container.get("env") or []
        if isinstance(e, dict) and "value" in e
    }
    return LocalJob(job, training_command(argv, path), env)


def training_command(argv: list[str], path: Path) -> list[str]:
    """The command after `ddl-worker agent --` (or `python -m ddl_worker agent --`)."""
    where = f"{path}: spec.template.spec.containers[0] command+args"
    rest: list[str] | None = None
    if len(argv) >= 2 and Path(argv[0]).name in AGENT_PROGRAMS and argv[1] == "agent":
        rest = argv[2:]
    elif len(argv) >= 4 and argv[1] == "-m" and argv[2] == "ddl_worker" and argv[3] == "agent":
        rest = argv[4:]
    if rest is None:
        raise ManifestError(f"{where} must run the agent: ddl-worker agent -- python train.py")
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise ManifestError(f"{where} has no training command after the agent")
    if Path(rest[0]).name.startswith("python"):
        rest = [sys.executable, *rest[1:]]
    return rest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Coordinator:
    """Plays the operator for agents on this machine."""

    def __init__(
        self,
        local_job: LocalJob,
        *,
        nodes: int,
        steps: int | None,
        work_dir: Path,
        out: IO[str],
    ) -> None:
        self.local_job = local_job
        self.spec = local_job.job.spec
        self.name = local_job.job.metadata.name
        self.nodes = nodes
        self.steps = steps
        self.work_dir = work_dir
        self.out = out
        self.membership_file = work_dir / "rendezvous.json"
        self.report_dir = work_dir / "reports"
        self.checkpoint_dir = work_dir / "checkpoints"
        self.pods = [f"{self.name}-w{i}" for i in range(nodes)]
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.rendezvous: Rendezvous | None = None
        self.restarts = 0
        self.reforms: list[Reform] = []
        self.started = time.monotonic()
        self.last_print = 0.0
        self.printed_step = -1
        self.last_progress: Progress | None = None
        self.interrupted: str | None = None
        self.metrics_ports: dict[str, int] = {}

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for directory in (self.report_dir, self.checkpoint_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._say(
            f"{self.name}: {self.nodes} local nodes x {self.spec.procs_per_worker} processes, "
            f"work dir {self.work_dir}"
        )
        for pod in self.pods:
            self._start_agent(pod)
        self._publish(self._eligible(), reason="start")
        try:
            code = self._loop()
        finally:
            self._stop_agents()
        self._write_summary(code)
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.interrupted = signal.Signals(signum).name

    def _loop(self) -> int:
        while True:
            time.sleep(TICK_SECONDS)
            if self.interrupted:
                self._say(f"{self.interrupted}: stopping the agents (they checkpoint first)")
                return 128 + int(signal.Signals[self.interrupted])
            assert self.rendezvous is not None
            members = [m.pod for m in self.rendezvous.members]
            codes = {pod: self.agents[pod].poll() for pod in self.pods}
            permanent = [p for p, c in codes.items() if c == EXIT_CODE_PERMANENT]
            if permanent:
                message = self._report_message(permanent[0])
                self._say(f"{permanent[0]} failed permanently: {message}")
                self._show_log_tail(permanent[0])
                return EXIT_CODE_PERMANENT
            if members and all(codes[p] == 0 for p in members):
                self._print_progress(force=True)
                done = self.last_progress
                result = f"step {done.step}, loss {done.loss:.4f}; " if done else ""
                self._say(
                    f"{self.name} succeeded in {time.monotonic() - self.started:.1f}s: {result}"
                    f"checkpoints in {self.checkpoint_dir}"
                )
                return 0
            lost = [p for p in members if codes[p] not in (None, 0)]
            failed = [p for p in members if self._reported_failed(p)]
            if lost:
                reason = ", ".join(f"{p} lost (exit {codes[p]})" for p in lost)
                if not self._reform(reason):
                    return EXIT_CODE_RETRYABLE
            elif failed:
                self.restarts += 1
                if self.restarts > self.spec.failure_policy.max_restarts:
                    self._say(f"gang failed {self.restarts} times (maxRestarts reached)")
                    self._show_log_tail(failed[0])
                    return EXIT_CODE_RETRYABLE
                reason = f"{failed[0]} reported: {self._report_message(failed[0])}"
                time.sleep(self.spec.failure_policy.backoff_seconds)
                if not self._reform(reason):
                    return EXIT_CODE_RETRYABLE
            self._print_progress()

    def _eligible(self) -> list[str]:
        """Pods whose agents are alive, in node order, at most maxReplicas."""
        alive = [p for p in self.pods if self.agents[p].poll() is None]
        return alive[: self.spec.max_replicas]

    def _reform(self, reason: str) -> bool:
        pods = self._eligible()
        if len(pods) < self.spec.min_replicas:
            self._say(f"{reason}; {len(pods)} workers left, below minReplicas: job failed")
            return False
        self._publish(pods, reason=reason)
        return True

    def _publish(self, pods: list[str], *, reason: str) -> None:
        epoch = 0 if self.rendezvous is None else self.rendezvous.epoch + 1
        per_worker = self.spec.procs_per_worker
        grid = [d for d in (per_worker, len(pods)) if d > 1] or [1]
        self.rendezvous = Rendezvous(
            epoch=epoch,
            workers=len(pods),
            processes_per_worker=per_worker,
            master_addr="127.0.0.1",
            master_port=free_port(),
            grid=grid,
            members=[
                Member(
                    rank=rank,
                    pod=pod,
                    node=_node_of(pod),
                    domains={constants.LABEL_HOSTNAME: _node_of(pod)},
                )
                for rank, pod in enumerate(pods)
            ],
        )
        if epoch > 0:
            self.reforms.append(
                Reform(
                    epoch=epoch,
                    workers=len(pods),
                    reason=reason,
                    detected_at=time.monotonic(),
                    last_step=self._last_step(),
                )
            )
        write_json(self.membership_file, self.rendezvous.model_dump(mode="json", by_alias=True))
        self._say(
            f"epoch {epoch}: {len(pods)} workers ({', '.join(pods)}), grid {format_grid(grid)}"
            + ("" if epoch == 0 else f" - {reason}")
        )

    def _last_step(self) -> int:
        """Highest step any pod reached in the current epoch (before a re-form)."""
        steps = [
            p.step
            for pod in self.pods
            if (p := Progress.read(self._pod_dir(pod) / "progress.json")) is not None
        ]
        return max(steps, default=0)

    def _reported_failed(self, pod: str) -> bool:
        report = FileReporter.read(self.report_dir, pod)
        assert self.rendezvous is not None
        current = report is not None and report.epoch == self.rendezvous.epoch
        return current and report is not None and report.state == "Failed"

    def _report_message(self, pod: str) -> str:
        report = FileReporter.read(self.report_dir, pod)
        return report.message if report else "(no report)"

    def _print_progress(self, *, force: bool = False) -> None:
        assert self.rendezvous is not None
        if not self.rendezvous.members:
            return
        rank0 = self.rendezvous.members[0].pod
        progress = Progress.read(self._pod_dir(rank0) / "progress.json")
        if progress is None or progress.epoch != self.rendezvous.epoch:
            return
        self.last_progress = progress
        reform = self.reforms[-1] if self.reforms else None
        if reform is not None and reform.epoch == progress.epoch and reform.seconds is None:
            reform.seconds = time.monotonic() - reform.detected_at
            reform.resumed_from = progress.resumed_from
            reform.first_step = progress.step
            lost = reform.last_step - (progress.resumed_from or 0)
            self._say(
                f"re-formed at epoch {reform.epoch} with {reform.workers} workers in "
                f"{reform.seconds:.1f}s; resumed from step {progress.resumed_from} "
                f"({lost} steps redone)"
            )
        self._note_metrics_ports()
        now = time.monotonic()
        recent = now - self.last_print < PRINT_INTERVAL
        if progress.step == self.printed_step or (recent and not force):
            return
        self.printed_step, self.last_print = progress.step, now
        self._say(
            f"epoch {progress.epoch} | step {progress.step} | loss {progress.loss:.4f} | "
            f"{progress.throughput:.1f} samples/s | "
            f"sync-wait {100 * progress.sync_wait_ratio:.1f}% | {progress.world_size} processes"
        )

    def _note_metrics_ports(self) -> None:
        for pod in self.pods:
            if pod in self.metrics_ports:
                continue
            try:
                port = int((self._pod_dir(pod) / "metrics_port").read_text())
            except (OSError, ValueError):
                continue
            self.metrics_ports[pod] = port
            self._say(f"{pod}: metrics at http://127.0.0.1:{port}/metrics")

    def _start_agent(self, pod: str) -> None:
        pod_dir = self._pod_dir(pod)
        pod_dir.mkdir(parents=True, exist_ok=True)
        log = (pod_dir / "agent.log").open("wb")
        self.agents[pod] = subprocess.Popen(
            [sys.executable, "-m", "ddl_worker", "agent", "--", *self.local_job.command],
            env=self._agent_env(pod),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        write_json(self.work_dir / "agents.json", {p: a.pid for p, a in self.agents.items()})

    def _agent_env(self, pod: str) -> dict[str, str]:
        spec = self.spec
        processes = self.nodes * spec.procs_per_worker
        env = dict(os.environ)
        env.update(self.local_job.env)
        env.update(
            POD_NAME=pod,
            POD_NAMESPACE="local",
            POD_IP="127.0.0.1",
            DDL_JOB_NAME=self.name,
            DDL_CHECKPOINT_DIR=str(self.checkpoint_dir),
            DDL_CHECKPOINT_EVERY=str(spec.checkpoint.every_steps),
            DDL_CHECKPOINT_KEEP=str(spec.checkpoint.keep),
            DDL_ALLREDUCE_ALGORITHM=spec.allreduce.algorithm,
            DDL_COMPRESSION=spec.allreduce.compression,
            DDL_BUCKET_MB=str(spec.allreduce.bucket_mb),
            DDL_PROCS_PER_WORKER=str(spec.procs_per_worker),
            DDL_METRICS_PORT="0",
            DDL_RENDEZVOUS_TIMEOUT=str(
                spec.elastic.rendezvous_timeout_seconds if spec.elastic else 300
            ),
            DDL_STOP_TIMEOUT=str(LOCAL_STOP_TIMEOUT),
            DDL_MEMBERSHIP_FILE=str(self.membership_file),
            DDL_REPORT_DIR=str(self.report_dir),
            DDL_WORK_DIR=str(self._pod_dir(pod)),
            DDL_NODE_NAME=_node_of(pod),
            OMP_NUM_THREADS=str(max(1, len(os.sched_getaffinity(0)) // processes)),
            PYTHONUNBUFFERED="1",
        )
        if spec.gpus_per_worker == 0:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if self.steps is not None:
            env["DDL_TOTAL_STEPS"] = str(self.steps)
        return env

    def _stop_agents(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + LOCAL_STOP_TIMEOUT + 5
        for agent in self.agents.values():
            try:
                agent.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()

    def _show_log_tail(self, pod: str, lines: int = 15) -> None:
        try:
            text = (self._pod_dir(pod) / "agent.log").read_text(errors="replace")
        except OSError:
            return
        self._say(f"last lines of {pod}'s log:")
        for line in text.splitlines()[-lines:]:
            self._say(f"  {line}")

    def _write_summary(self, code: int) -> None:
        progress = self.last_progress
        summary = {
            "job": self.name,
            "exitCode": code,
            "wallSeconds": round(time.monotonic() - self.started, 2),
            "finalStep": progress.step if progress else None,
            "finalLoss": progress.loss if progress else None,
            "checkpointDir": str(self.checkpoint_dir),
            "restarts": self.restarts,
            "reforms": [asdict(r) for r in self.reforms],
            "metricsPorts": self.metrics_ports,
        }
        (self.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def _pod_dir(self, pod: str) -> Path:
        return self.work_dir / "pods" / pod

    def _say(self, text: str) -> None:
        self.out.write(f"[ddl local {time.monotonic() - self.started:6.1f}s] {text}\n")
        self.out.flush()


def _node_of(pod: str) -> str:
    return "local-node-" + pod.rsplit("-w", 1)[-1]


def run_local(
    manifest: Path,
    *,
    nodes: int | None = None,
    steps: int | None = None,
    work_dir: Path | None = None,
    out: IO[str] | None = None,
) -> int:
    """`ddl run MANIFEST --local`: returns the exit code (0, 42 permanent, 1 failed)."""
    stream = out or sys.stdout
    try:
        local_job = load_manifest(manifest)
    except ManifestError as error:
        stream.write(f"ddl: {error}\n")
        return EXIT_CODE_PERMANENT
    name = local_job.job.metadata.name
    directory = work_dir or Path(tempfile.mkdtemp(prefix=f"ddl-local-{name}-"))
    directory.mkdir(parents=True, exist_ok=True)
    coordinator = Coordinator(
        local_job,
        nodes=nodes or local_job.job.spec.replicas,
        steps=steps,
        work_dir=directory,
        out=stream,
    )
    return coordinator.run()
