"""The pod agent: follows the job's membership, runs one training process per slot, reports back."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Final, Literal

from ddl_operator.api.models import Member, Rendezvous
from ddl_operator.core.reports import AgentState
from ddl_worker.env import (
    EXIT_CODE_PERMANENT,
    EXIT_CODE_RETRYABLE,
    EXIT_CODE_STOPPED,
    EXIT_CODE_TERMINATED,
    AgentConfig,
    ConfigError,
    format_grid,
)
from ddl_worker.fileio import write_json
from ddl_worker.membership import (
    FileMembership,
    KubernetesMembership,
    MembershipError,
    MembershipSource,
    find_member,
)
from ddl_worker.metrics import (
    AgentCollector,
    AgentView,
    GpuReader,
    MetricsServer,
    reset_multiproc_dir,
)
from ddl_worker.report import (
    FileReporter,
    KubernetesReporter,
    Progress,
    Report,
    Reporter,
)

log = logging.getLogger("ddl_worker.agent")

TICK_SECONDS: Final = 0.2
REPORT_INTERVAL: Final = 1.0
TAIL_LINES: Final = 20
# Signals a training process dies of when it was asked to stop and had no handler.
_STOP_SIGNALS: Final = frozenset({-signal.SIGUSR1, -signal.SIGTERM})


@dataclass
class Child:
    """One training process and the tail of its output (for failure messages)."""

    rank: int
    local_rank: int
    process: subprocess.Popen[bytes]
    tail: deque[str]
    reader: threading.Thread


Outcome = Literal["running", "succeeded", "permanent", "failed", "stopped"]


class Gang:
    """This pod's training processes of one epoch."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children
        self.first_success: float | None = None

    @classmethod
    def start(
        cls, command: list[str], env_by_local_rank: list[dict[str, str]], out: IO[str]
    ) -> Gang:
        children = []
        for local_rank, env in enumerate(env_by_local_rank):
            rank = int(env["RANK"])
            wrapped = [sys.executable, "-m", "ddl_worker.childexec", str(os.getpid()), "--"]
            process = subprocess.Popen(
                [*wrapped, *command],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C reaches the agent, which stops us in order.
                start_new_session=True,
            )
            tail: deque[str] = deque(maxlen=TAIL_LINES)
            reader = threading.Thread(
                target=_pump, args=(process, f"[rank {rank}] ", tail, out), daemon=True
            )
            reader.start()
            children.append(Child(rank, local_rank, process, tail, reader))
        return cls(children)

    @property
    def pids(self) -> list[int]:
        return [c.process.pid for c in self.children]

    def poll(self, finish_timeout: float) -> tuple[Outcome, str]:
        """What the gang is doing, with a message naming the process that decided it."""
        codes = [(c, c.process.poll()) for c in self.children]
        exited = [(c, code) for c, code in codes if code is not None]
        for child, code in exited:
            if code == EXIT_CODE_PERMANENT:
                return "permanent", self._describe(child, code, "a retry cannot help")
        for child, code in exited:
            if code == EXIT_CODE_STOPPED or code in _STOP_SIGNALS:
                return "stopped", f"rank {child.rank} stopped at a step boundary"
            if code != 0:
                return "failed", self._describe(child, code, "")
        if len(exited) == len(codes):
            return "succeeded", "training finished"
        if exited:
            now = time.monotonic()
            self.first_success = self.first_success or now
            if now - self.first_success > finish_timeout:
                late = [c.rank for c, code in codes if code is None]
                return "failed", f"ranks {late} did not finish {finish_timeout:.0f}s after others"
        return "running", ""

    def stop(self, sig: signal.Signals, timeout: float) -> None:
        """Ask every process to stop (sig), wait up to timeout, then SIGKILL what is left."""
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(sig)
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "rank %d ignored %s for %.0fs; killing it", child.rank, sig.name, timeout
                )
                child.process.kill()
                child.process.wait()
        for child in self.children:
            child.reader.join(timeout=2)

    @staticmethod
    def _describe(child: Child, code: int, why: str) -> str:
        """'rank 3 exited 1: <last output line>' (the error, usually); signals need no line."""
        if code < 0:
            return f"rank {child.rank} was killed by {signal.Signals(-code).name}"
        last = next((line for line in reversed(child.tail) if line.strip()), "")
        text = f"rank {child.rank} exited {code}" + (f" ({why})" if why else "")
        return f"{text}: {last.strip()}"[:400] if last else text


def _pump(process: subprocess.Popen[bytes], prefix: str, tail: deque[str], out: IO[str]) -> None:
    """Forward a child's output line by line with its rank, keeping the last lines."""
    assert process.stdout is not None
    for raw in iter(process.stdout.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        out.write(prefix + line + "\n")
        out.flush()


def training_env(
    base: dict[str, str],
    rendezvous: Rendezvous,
    member: Member,
    *,
    restart_count: int,
    node_name: str,
    metrics_dir: Path,
    progress_file: Path,
) -> list[dict[str, str]]:
    """torchrun-compatible variables plus the DDL ones, one env per local process."""
    per_worker = rendezvous.processes_per_worker
    grid = rendezvous.grid or [rendezvous.world_size]
    envs = []
    for local_rank in range(per_worker):
        env = dict(base)
        env.update(
            RANK=str(member.rank * per_worker + local_rank),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(rendezvous.world_size),
            LOCAL_WORLD_SIZE=str(per_worker),
            GROUP_RANK=str(member.rank),
            GROUP_WORLD_SIZE=str(rendezvous.workers),
            MASTER_ADDR=rendezvous.master_addr,
            MASTER_PORT=str(rendezvous.master_port),
            TORCHELASTIC_RESTART_COUNT=str(restart_count),
            DDL_GRID=format_grid(grid),
            DDL_EPOCH=str(rendezvous.epoch),
            DDL_NODE_NAME=node_name,
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // per_worker)))
        if local_rank == 0:
            env["DDL_PROGRESS_FILE"] = str(progress_file)
        else:
            env.pop("DDL_PROGRESS_FILE", None)
        envs.append(env)
    return envs


class Agent:
    """Runs until training succeeds, fails for good, times out waiting, or is terminated.

    Every wait has a deadline: a membership that never includes this pod, a published
    membership that stays malformed, processes that ignore a stop request.
    """

    def __init__(
        self,
        config: AgentConfig,
        source: MembershipSource,
        reporter: Reporter,
        command: list[str],
        *,
        out: IO[str] | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.reporter = reporter
        self.command = command
        self.out = out or sys.stdout
        self.work_dir = Path(
            config.work_dir or tempfile.mkdtemp(prefix=f"ddl-agent-{config.pod_name}-")
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_dir = self.work_dir / "metrics"
        self.progress_file = self.work_dir / "progress.json"
        self.gang: Gang | None = None
        self.epoch: int | None = None
        self.member: Member | None = None
        self.state: AgentState = "Waiting"
        self.message = "waiting for the first membership"
        self.starts = 0
        self.waiting_since = time.monotonic()
        self.malformed_since: float | None = None
        self.terminate: str | None = None
        self._last_report: tuple[object, ...] | None = None
        self._last_report_time = 0.0
        self._progress: Progress | None = None
        self.epoch_message = ""
        self.gpus = GpuReader()
        self.metrics: MetricsServer | None = None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_terminate)
        self._start_metrics()
        try:
            while True:
                if self.terminate:
                    return self._shut_down()
                code = self._tick()
                if code is not None:
                    return code
                time.sleep(TICK_SECONDS)
        finally:
            if self.gang is not None:  # leaving with training running: let it checkpoint
                self.gang.stop(signal.SIGTERM, self.config.stop_timeout)
            self.source.close()
            if self.metrics is not None:
                self.metrics.close()

    def _on_terminate(self, signum: int, _frame: FrameType | None) -> None:
        self.terminate = signal.Signals(signum).name

    def _tick(self) -> int | None:
        now = time.monotonic()
        rendezvous = self._read_membership(now)
        if self.malformed_since is not None and (
            now - self.malformed_since > self.config.rendezvous_timeout
        ):
            return self._finish("Failed", EXIT_CODE_PERMANENT)
        if rendezvous is not None and (self.epoch is None or rendezvous.epoch > self.epoch):
            self._enter_epoch(rendezvous)
        if self.gang is not None:
            outcome, message = self.gang.poll(self.config.rendezvous_timeout)
            if outcome == "succeeded":
                self.message = message
                return self._finish("Succeeded", 0)
            if outcome == "permanent":
                self.message = message
                self.gang.stop(signal.SIGTERM, self.config.stop_timeout)
                self.gang = None
                return self._finish("Failed", EXIT_CODE_PERMANENT)
            if outcome in ("failed", "stopped"):
                self._gang_ended(outcome, message)
        self._follow_progress()
        if self.gang is None and now - self.waiting_since > self.config.rendezvous_timeout:
            why = self.source.problem() or f"the latest epoch is {self.epoch}"
            self.message = (
                f"no new membership including pod {self.config.pod_name} within "
                f"{self.config.rendezvous_timeout:.0f}s ({why}); {self.message}"
            )
            return self._finish("Failed", EXIT_CODE_RETRYABLE)
        self._report()
        return None

    def _read_membership(self, now: float) -> Rendezvous | None:
        try:
            rendezvous = self.source.latest()
            expected = self.config.procs_per_worker
            if rendezvous is not None and expected and rendezvous.processes_per_worker != expected:
                raise MembershipError(
                    f"epoch {rendezvous.epoch} has processesPerWorker="
                    f"{rendezvous.processes_per_worker} but this pod was made for "
                    f"DDL_PROCS_PER_WORKER={expected}"
                )
        except MembershipError as error:
            if self.malformed_since is None:
                timeout = self.config.rendezvous_timeout
                log.error("%s (waiting up to %.0fs for a valid one)", error, timeout)
                self.malformed_since = now
            self.message = str(error)
            return None
        if self.malformed_since is not None:
            log.info("the published membership is valid again")
            self.malformed_since = None
            if self.gang is not None:
                self.message = self.epoch_message
        return rendezvous

    def _enter_epoch(self, rendezvous: Rendezvous) -> None:
        if self.gang is not None:
            log.info(
                "epoch %d published; stopping epoch %s at a step boundary",
                rendezvous.epoch,
                self.epoch,
            )
            self.gang.stop(signal.SIGUSR1, self.config.stop_timeout)
            self.gang = None
            self._follow_progress()  # the step the old epoch stopped at
        self.epoch = rendezvous.epoch
        if self.terminate:  # asked to leave while stopping: start nothing new
            return
        self.member = find_member(rendezvous, self.config.pod_name)
        if self.member is None:
            self.state = "Waiting"
            self.message = f"standby: pod is not a member of epoch {rendezvous.epoch}"
            self.waiting_since = time.monotonic()
            log.info("%s", self.message)
            return
        node = self.member.node or self.config.node_name
        envs = training_env(
            dict(os.environ),
            rendezvous,
            self.member,
            restart_count=self.starts,
            node_name=node,
            metrics_dir=self.metrics_dir,
            progress_file=self.progress_file,
        )
        log.info(
            "epoch %d: worker %d of %d, ranks %s..%s of %d, master %s:%d",
            rendezvous.epoch,
            self.member.rank,
            rendezvous.workers,
            envs[0]["RANK"],
            envs[-1]["RANK"],
            rendezvous.world_size,
            rendezvous.master_addr,
            rendezvous.master_port,
        )
        self.gang = Gang.start(self.command, envs, self.out)
        self.starts += 1
        self.state = "Running"
        self.epoch_message = f"starting epoch {rendezvous.epoch}"
        self.message = self.epoch_message
        write_json(self.work_dir / "gang.json", {"epoch": rendezvous.epoch, "pids": self.gang.pids})

    def _gang_ended(self, outcome: str, message: str) -> None:
        """A process failed or stopped on its own: end the rest, wait for the next epoch."""
        assert self.gang is not None
        log.warning("epoch %s ended on this pod: %s; waiting for a new epoch", self.epoch, message)
        self.gang.stop(signal.SIGTERM, self.config.stop_timeout)
        self.gang = None
        self.state = "Failed" if outcome == "failed" else "Waiting"
        self.message = message
        self.waiting_since = time.monotonic()

    def _shut_down(self) -> int:
        """SIGTERM: checkpoint at the next step boundary, stop, exit within the grace period."""
        log.info("%s received; stopping training at a step boundary", self.terminate)
        if self.gang is not None:
            self.gang.stop(signal.SIGTERM, self.config.stop_timeout)
            self.gang = None
        self.message = f"terminated by {self.terminate}"
        return self._finish("Waiting", EXIT_CODE_TERMINATED)

    def _finish(self, state: AgentState, code: int) -> int:
        self.state = state
        (log.info if code == 0 else log.error)("%s: %s (exit %d)", state, self.message, code)
        self._report(force=True)
        return code

    def _follow_progress(self) -> None:
        """Say (log and report, at once) when training runs in this epoch, from which step,
        and how many steps the re-form cost.

        The trainer's progress gives the steps done and the checkpoint it resumed from; steps
        the previous epoch did past that checkpoint were trained twice.
        """
        progress = Progress.read(self.progress_file)
        last = self._progress
        if progress is None:
            return
        if last is not None and progress.epoch == last.epoch:
            self._progress = progress  # further steps of a known epoch, up to its last
            return
        if progress.epoch != self.epoch or self.gang is None:
            return
        self._progress = progress
        resumed = progress.resumed_from or 0
        where = f"checkpoint step {resumed}" if progress.resumed_from else "step 0"
        message = f"training in epoch {progress.epoch} from {where}"
        if last is not None:
            message += (
                f"; epoch {last.epoch} had reached step {last.step}: "
                f"{max(0, last.step - resumed)} steps redone"
            )
        log.info("%s", message)
        self.epoch_message = message
        if self.malformed_since is None:
            self.message = message  # a new message is reported at once

    def _report(self, *, force: bool = False) -> None:
        """Publish on every change, and progress every REPORT_INTERVAL while training: rank 0's
        is the job's summary, every worker's step and sync-wait lets the operator name
        stragglers."""
        key = (self.epoch, self.state, self.message, self.starts)
        now = time.monotonic()
        progress_due = now - self._last_report_time >= REPORT_INTERVAL
        training = self.member is not None and self.gang is not None
        if not force and key == self._last_report and not (progress_due and training):
            return
        progress = Progress.read(self.progress_file)
        current = progress is not None and progress.epoch == self.epoch
        self.reporter.publish(
            Report(
                epoch=self.epoch or 0,
                state=self.state,
                step=progress.step if progress else 0,
                throughput=progress.throughput if current and progress else 0.0,
                sync_wait_ratio=progress.sync_wait_ratio if current and progress else 0.0,
                step_seconds=progress.step_seconds if current and progress else 0.0,
                restarts=self.restarts,
                message=self.message,
            )
        )
        self._last_report, self._last_report_time = key, now

    def _start_metrics(self) -> None:
        reset_multiproc_dir(self.metrics_dir)
        collector = AgentCollector(self._metrics_view, self.gpus)
        try:
            self.metrics = MetricsServer(self.config.metrics_port, self.metrics_dir, collector)
        except OSError as error:
            port = self.config.metrics_port
            log.error("metrics endpoint on port %d unavailable: %s", port, error)
            return
        (self.work_dir / "metrics_port").write_text(str(self.metrics.port))
        log.info("serving /metrics on port %d", self.metrics.port)

    def _metrics_view(self) -> AgentView:
        member, gang = self.member, self.gang
        ranks: tuple[int, ...] = ()
        if member is not None and gang is not None and self.gpus.count:
            ranks = tuple(c.rank for c in gang.children[: self.gpus.count])
        return AgentView(
            job=self.config.job_name,
            namespace=self.config.namespace,
            node=(member.node if member else "") or self.config.node_name,
            epoch=self.epoch or 0,
            restarts=self.restarts,
            gpu_ranks=ranks,
        )


def main(argv: list[str]) -> int:
    """`ddl-worker agent [--] COMMAND...`: the worker container's entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent %(levelname)s %(message)s")
    command = argv[1:] if argv[:1] == ["--"] else argv
    try:
        config = AgentConfig.from_environ()
        if not command:
            raise ConfigError("no training command: use `ddl-worker agent -- python train.py`")
    except ConfigError as error:
        print(f"ddl_worker agent: configuration error: {error}", file=sys.stderr, flush=True)
        return EXIT_CODE_PERMANENT
    source: MembershipSource
    reporter: Reporter
    if config.membership_file:
        source = FileMembership(config.membership_file)
        report_dir = config.report_dir or Path(config.membership_file).parent
        reporter = FileReporter(report_dir, config.pod_name)
    else:
        from ddl_worker.kube import KubernetesApi  # only here: local mode needs no client

        try:
            api = KubernetesApi()
        except Exception as error:  # no in-cluster config and no kubeconfig
            print(f"ddl_worker agent: cannot reach Kubernetes: {error}", file=sys.stderr)
            return EXIT_CODE_PERMANENT
        source = KubernetesMembership(api, config.namespace, config.job_name)
        reporter = KubernetesReporter(api, config.namespace, config.pod_name)
    return Agent(config, source, reporter, command).run()
