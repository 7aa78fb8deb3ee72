"""The training-script API: process group from the env, DDP with a timed comm hook, step loop."""

# No `from __future__ import annotations`: DDP checks the comm hook's annotations at runtime.
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import GradBucket
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from ddl_worker.checkpoint import Checkpointer, Loaded
from ddl_worker.env import EXIT_CODE_RETRYABLE, EXIT_CODE_STOPPED, ConfigError, TrainEnv
from ddl_worker.metrics import MetricLabels, TrainingMetrics
from ddl_worker.report import Progress

log = logging.getLogger("ddl_worker")

State = dict[str, Any]
Tiers = dict[str, tuple[int, float]]
BucketHook = Callable[[GradBucket], torch.futures.Future[torch.Tensor]]

FLAT_TIER = "flat"
# Steps the progress throughput and sync-wait ratio are averaged over.
PROGRESS_WINDOW = 20


class RendezvousError(Exception):
    """The process group did not form in time; a retry (new epoch) may help."""

    exit_code: int = EXIT_CODE_RETRYABLE


class CommRecorder:
    """What DDP's comm hook did during one step: per-bucket timings and exposed wait.

    Sync-wait is the time from the last bucket being ready (backward compute is done: every
    gradient is in some bucket) to the last allreduce completing, i.e. only the communication
    that compute did not hide. On CUDA the marks are events on the GPU timeline, since host
    times there say when work was queued, not when it ran.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._lock = threading.Lock()
        self._spans: list[list[Any]] = []
        self._ready: Any = None
        self._done: Any = None
        self._flat_bytes = 0

    def started(self, bucket: GradBucket, flat_bytes_per_byte: float) -> list[Any]:
        mark = self._mark()
        span = [mark, None]
        with self._lock:
            self._spans.append(span)
            if bucket.is_last():
                self._ready = mark
            if flat_bytes_per_byte:
                buffer = bucket.buffer()
                nbytes = buffer.numel() * buffer.element_size()
                self._flat_bytes += round(nbytes * flat_bytes_per_byte)
        return span

    def finished(self, span: list[Any]) -> None:
        mark = self._mark()
        with self._lock:
            span[1] = mark
            self._done = mark

    def take(self) -> tuple[float, Tiers]:
        """(sync-wait seconds, {"flat": (bytes, seconds)}) since the last take; resets."""
        with self._lock:
            spans, ready, done, nbytes = self._spans, self._ready, self._done, self._flat_bytes
            self._spans, self._ready, self._done, self._flat_bytes = [], None, None, 0
        busy = sum(self._elapsed(s, d) for s, d in spans if d is not None)
        wait = self._elapsed(ready, done) if ready is not None and done is not None else 0.0
        tiers = {FLAT_TIER: (nbytes, busy)} if nbytes else {}
        return max(0.0, wait), tiers

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end)) / 1000.0
        return float(end - start)


@dataclass
class HookState:
    """What timed_hook needs: the real reduction and where to record.

    flat_bytes_per_byte: bytes the flat allreduce sends per rank per bucket byte, counted as
    tier "flat"; 0 for the native hook, whose stats() count its own tiers.
    """

    reduce: BucketHook
    recorder: CommRecorder
    flat_bytes_per_byte: float


def timed_hook(state: HookState, bucket: GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: run the chosen reduction and time it."""
    span = state.recorder.started(bucket, state.flat_bytes_per_byte)
    future = state.reduce(bucket)

    def finish(done: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        state.recorder.finished(span)
        return done.value()

    return future.then(finish)


class StopControl:
    """Makes every rank stop at the same step boundary when any of them is asked to.

    A flag is MAX-allreduced on a CPU (Gloo) group, issued at one boundary and read at the
    next, so it never stalls a step; all ranks read the same value at the same boundary.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.requested: str | None = None
        self._flag = torch.zeros(1)
        self._work: Any = None

    def request(self, reason: str) -> None:
        self.requested = self.requested or reason

    def boundary(self) -> bool:
        """True when the ranks agreed to stop here."""
        stop = False
        if self._work is not None:
            self._work.wait()
            self._work = None
            stop = bool(self._flag.item() > 0)
        if not stop:
            self._flag.fill_(1.0 if self.requested else 0.0)
            self._work = dist.all_reduce(
                self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True
            )
        return stop

    def drain(self) -> None:
        """Finish the flag exchange in flight, so no rank leaves one behind."""
        if self._work is not None:
            self._work.wait()
            self._work = None


@dataclass
class Runtime:
    """This process's place in the job; what init() returns."""

    env: TrainEnv
    device: torch.device
    control: StopControl
    recorder: CommRecorder
    metrics: TrainingMetrics
    checkpointer: Checkpointer | None
    resumed_from: int | None = None
    native_stats: Callable[[], Tiers] | None = None
    _native_last: Tiers = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    def native_deltas(self) -> Tiers:
        """Per-tier bytes and seconds of the native allreduce since the last call."""
        if self.native_stats is None:
            return {}
        now = self.native_stats()
        deltas = {}
        for tier, (nbytes, seconds) in now.items():
            before = self._native_last.get(tier, (0, 0.0))
            deltas[tier] = (nbytes - before[0], seconds - before[1])
        self._native_last = dict(now)
        return deltas


_runtime: Runtime | None = None


def init() -> Runtime:
    """Join the job's process group from the env (NCCL on CUDA, Gloo on CPU).

    Exits with EXIT_CODE_PERMANENT on a configuration error and EXIT_CODE_RETRYABLE when the
    group does not form in time, after printing what is wrong.
    """
    global _runtime
    if _runtime is not None:
        return _runtime
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        env = TrainEnv.from_environ()
        device = _pick_device(env)
        _join_process_group(env, "nccl" if device.type == "cuda" else "gloo")
    except (ConfigError, RendezvousError) as error:
        _die(str(error), error.exit_code)
    timeout = timedelta(seconds=env.rendezvous_timeout)
    control = StopControl(dist.new_group(backend="gloo", timeout=timeout))
    checkpointer = None
    if env.comm.checkpoint_dir:
        checkpointer = Checkpointer(
            env.comm.checkpoint_dir,
            job=env.job,
            every=env.comm.checkpoint_every,
            keep=env.comm.checkpoint_keep,
            group=control.group,
        )
    labels = MetricLabels(env.job_name, env.namespace, env.rank, env.node_name)
    _runtime = Runtime(
        env=env,
        device=device,
        control=control,
        recorder=CommRecorder(cuda=device.type == "cuda"),
        metrics=TrainingMetrics(labels),
        checkpointer=checkpointer,
    )
    log.info(
        "rank %d/%d (local %d, worker %d) joined epoch %d on %s, grid %s, restart %d",
        env.rank,
        env.world_size,
        env.local_rank,
        env.group_rank,
        env.epoch,
        device,
        "x".join(map(str, env.grid)),
        env.restart_count,
    )
    return _runtime


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("call ddl_worker.init() first")
    return _runtime


def wrap(model: torch.nn.Module, **ddp_options: Any) -> DistributedDataParallel:
    """DDP around model with the allreduce the job asked for (DDL_ALLREDUCE_ALGORITHM).

    Ring, or a grid with one non-trivial tier, uses DDP's flat allreduce (with FP16/BF16
    compression when asked). Otherwise the native hierarchical hook; Auto falls back to the
    flat ring with a warning when the native extension is not built, Hierarchical raises.
    """
    rt = runtime()
    model.to(rt.device)
    options: dict[str, Any] = {"bucket_cap_mb": rt.env.comm.bucket_mb}
    if rt.device.type == "cuda":
        options["device_ids"] = [rt.device.index]
    options.update(ddp_options)
    ddp = DistributedDataParallel(model, **options)
    comm = rt.env.comm
    tiers = [d for d in rt.env.grid if d > 1]
    reduce: BucketHook | None = None
    if comm.algorithm != "Ring" and len(tiers) > 1:
        reduce = _native_hook(rt)
    if reduce is None:
        group: Any = dist.group.WORLD
        flat = {
            "None": default_hooks.allreduce_hook,
            "FP16": default_hooks.fp16_compress_hook,
            "BF16": default_hooks.bf16_compress_hook,
        }[comm.compression]
        reduce = partial(flat, group)
        # A bandwidth-optimal (ring) allreduce sends 2(p-1)/p of the buffer per rank, the
        # measure the native stats() use too; compression halves what goes on the wire.
        world = rt.world_size
        per_byte = 2 * (world - 1) / world * (1.0 if comm.compression == "None" else 0.5)
        ddp.register_comm_hook(HookState(reduce, rt.recorder, per_byte), timed_hook)
    else:
        ddp.register_comm_hook(HookState(reduce, rt.recorder, 0.0), timed_hook)
    return ddp


def _native_hook(rt: Runtime) -> BucketHook | None:
    comm = rt.env.comm
    try:
        from ddl_worker import allreduce
    except (ImportError, OSError) as error:
        if comm.algorithm == "Hierarchical":
            raise RuntimeError(
                "DDL_ALLREDUCE_ALGORITHM=Hierarchical but the native allreduce cannot be "
                f"loaded ({error}); build it with `pip install -e .` in the worker image"
            ) from error
        if rt.rank == 0:
            log.warning("native allreduce unavailable (%s); Auto uses the flat ring", error)
        return None
    state = allreduce.make_hook_state(list(rt.env.grid), comm.algorithm, comm.compression)
    rt.native_stats = allreduce.stats
    return partial(allreduce.hierarchical_hook, state)


def load_latest() -> Loaded | None:
    """The newest good checkpoint (the same one on every rank), or None: call on every start."""
    rt = runtime()
    if rt.checkpointer is None:
        return None
    loaded = rt.checkpointer.load_latest()
    rt.resumed_from = None if loaded is None else loaded.step
    return loaded


def save(step: int, state: State) -> Path | None:
    """Checkpoint state as of after step (written by rank 0)."""
    rt = runtime()
    return None if rt.checkpointer is None else rt.checkpointer.save(step, state)


def steps(total: int, *, start: int = 0, state: Callable[[], State] | None = None) -> "StepLoop":
    """The training loop's step numbers, with checkpoints, safe stops and metrics at boundaries."""
    return StepLoop(runtime(), total, start=start, state=state)


class StepLoop:
    """Iterates step numbers start..total-1; between steps it does the bookkeeping.

    At each boundary: record the finished step (metrics, progress), checkpoint every
    checkpoint.everySteps, and stop when any rank was signalled (SIGUSR1: new epoch, SIGTERM:
    pod ending): checkpoint, then exit with EXIT_CODE_STOPPED. After the last step it writes a
    final checkpoint. DDL_TOTAL_STEPS, when set, replaces total.
    """

    def __init__(
        self, rt: Runtime, total: int, *, start: int, state: Callable[[], State] | None
    ) -> None:
        self.rt = rt
        self.total = rt.env.total_steps or total
        self.start = start
        self.state = state
        self._started_at = 0.0
        self._samples = 0
        self._loss = math.nan
        # (seconds, global samples, sync-wait seconds, loss) of the last steps
        self._window: deque[tuple[float, int, float, float]] = deque(maxlen=PROGRESS_WINDOW)

    def record(self, samples: int, loss: float | None = None) -> None:
        """Report the step's samples on this rank (and its loss, for progress lines)."""
        self._samples += samples
        if loss is not None:
            self._loss = loss

    def __iter__(self) -> Iterator[int]:
        previous = _install_stop_handlers(self.rt.control)
        try:
            step = self.start
            while True:
                if step > self.start:
                    self._close_step(step)
                if step >= self.total:
                    self.rt.control.drain()
                    self._checkpoint(step)
                    return
                if step > self.start and self.rt.checkpointer and self.rt.checkpointer.due(step):
                    self._checkpoint(step)
                if self._agreed_to_stop(step):
                    self._checkpoint(step)
                    _exit_stopped(step, self.rt.control.requested)
                self._samples = 0
                self._loss = math.nan
                self._started_at = time.perf_counter()
                yield step
                step += 1
        finally:
            _restore_handlers(previous)

    def _agreed_to_stop(self, step: int) -> bool:
        try:
            return self.rt.control.boundary()
        except RuntimeError as error:
            if self.rt.control.requested is None:
                raise
            # Peers are gone, but this process was asked to stop anyway: keep its state.
            log.warning("stop exchange failed at step %d (%s); stopping alone", step, error)
            return True

    def _checkpoint(self, step: int) -> None:
        # At the start step the state is what was just loaded (or the initial one).
        if step == self.start or self.state is None or self.rt.checkpointer is None:
            return
        if self.rt.rank != 0:
            return
        self.rt.checkpointer.save(step, self.state())

    def _close_step(self, step: int) -> None:
        seconds = time.perf_counter() - self._started_at
        sync_wait, tiers = self.rt.recorder.take()
        tiers.update(self.rt.native_deltas())
        self.rt.metrics.record_step(
            seconds=seconds, samples=self._samples, sync_wait=sync_wait, tiers=tiers
        )
        self._window.append((seconds, self._samples * self.rt.world_size, sync_wait, self._loss))
        path = self.rt.env.progress_file
        if path:
            total_seconds = max(1e-9, sum(w[0] for w in self._window))
            losses = [w[3] for w in self._window if not math.isnan(w[3])]
            Progress(
                epoch=self.rt.env.epoch,
                step=step,
                loss=sum(losses) / len(losses) if losses else math.nan,
                throughput=sum(w[1] for w in self._window) / total_seconds,
                sync_wait_ratio=sum(w[2] for w in self._window) / total_seconds,
                step_seconds=seconds,
                resumed_from=self.rt.resumed_from,
                world_size=self.rt.world_size,
                time=time.time(),
            ).write(path)


def _install_stop_handlers(control: StopControl) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        control.request(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGUSR1, signal.SIGTERM)}


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _exit_stopped(step: int, reason: str | None) -> NoReturn:
    log.info("stopped at step %d (%s); checkpoint written, exiting for re-form", step, reason)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: tearing down a process group whose peers may be gone can block.
    os._exit(EXIT_CODE_STOPPED)


def _die(message: str, code: int) -> NoReturn:
    print(f"ddl_worker: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _pick_device(env: TrainEnv) -> torch.device:
    if torch.cuda.is_available():
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // env.local_world_size))
    return torch.device("cpu")


def _join_process_group(env: TrainEnv, backend: str) -> None:
    timeout = env.rendezvous_timeout
    if env.rank != 0:
        _wait_for_master(env.master_addr, env.master_port, timeout)
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout),
        )
    except (RuntimeError, ValueError) as error:
        raise RendezvousError(
            f"process group of {env.world_size} ranks did not form within {timeout:.0f}s "
            f"(this is rank {env.rank}, master {env.master_addr}:{env.master_port}, "
            f"epoch {env.epoch}): {error}"
        ) from error


def _wait_for_master(addr: str, port: int, timeout: float) -> None:
    """Fail with a clear message if the master's store never answers (bad address, no route)."""
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, timeout)):
                return
        except OSError as error:
            if time.monotonic() + delay >= deadline:
                raise RendezvousError(
                    f"cannot reach the master at {addr}:{port} (MASTER_ADDR/MASTER_PORT) "
                    f"within {timeout:.0f}s: {error}"
                ) from error
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
