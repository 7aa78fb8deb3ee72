"""Run a function on N real processes joined in one Gloo process group over loopback.

    results = run_workers(check_fn, 4, "arg")        # one-shot: check_fn(rank, world, "arg")

    with GlooWorld(8) as world:                      # a pool that several tests share
        world.run(case_a)
        world.run(case_b, 1024)

Processes fork from a forkserver that has torch imported once, so a pool of 8 starts in
seconds even on 2 cores. The rendezvous store is a TCPStore the parent serves on a free port
(port 0: the kernel picks, no race). Functions and their arguments must be picklable
(module-level functions of an importable module, e.g. the test module itself).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, Final

import torch.distributed as dist
import torch.multiprocessing as mp

# The store class itself, typed (torch.distributed re-exports it without declaring so).
from torch._C._distributed_c10d import TCPStore

DEFAULT_TIMEOUT: Final = 120.0
# After one rank fails, how long the others get to finish before the world is torn down
# (they are usually stuck in a collective the failed rank never joined).
FAILURE_GRACE: Final = 10.0
PRELOAD: Final = ("torch", "torch.distributed")


class WorkerError(RuntimeError):
    """One or more ranks raised; the message holds each failing rank's traceback."""


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = DEFAULT_TIMEOUT
) -> list[Any]:
    """Call fn(rank, world_size, *args) on world_size fresh processes; results by rank."""
    with GlooWorld(world_size, timeout=timeout) as world:
        return world.run(fn, *args, timeout=timeout)


class GlooWorld:
    """world_size processes that stay joined in one Gloo group between run() calls.

    A run that fails or times out tears the processes down; the next run starts new ones.
    """

    def __init__(
        self,
        world_size: int,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        env: Mapping[str, str] | None = None,
        preload: Iterable[str] = PRELOAD,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.env = dict(env or {})
        self.preload = list(preload)
        self._store: TCPStore | None = None
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    def __enter__(self) -> GlooWorld:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        if self.alive:
            return
        self.close()
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(self.preload)
        self._store = TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=self.timeout),
        )
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, self.world_size, self._store.port, child, self.env, self.timeout),
                daemon=True,
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """Call fn(rank, world_size, *args) on every rank; results by rank.

        Raises WorkerError with every failing rank's traceback, TimeoutError when ranks do not
        answer within timeout (default: the world's).
        """
        self.start()
        for conn in self._conns:
            conn.send((fn, args))
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        results: list[Any] = [None] * self.world_size
        failures: dict[int, str] = {}
        pending = set(range(self.world_size))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for ready in wait([self._conns[r] for r in pending], timeout=min(remaining, 1.0)):
                rank = next(r for r in pending if self._conns[r] is ready)
                pending.discard(rank)
                try:
                    ok, value = self._conns[rank].recv()
                except EOFError:
                    ok, value = False, f"exited with code {self._procs[rank].exitcode}"
                if ok:
                    results[rank] = value
                else:
                    failures[rank] = value
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE)
            dead = [
                r for r in pending if not self._procs[r].is_alive() and not self._conns[r].poll()
            ]
            for rank in dead:
                pending.discard(rank)
                failures[rank] = f"exited with code {self._procs[rank].exitcode}"
        if failures or pending:
            for rank in pending:
                # faulthandler (registered in the worker) prints where the rank is stuck.
                if self._procs[rank].pid is not None and self._procs[rank].is_alive():
                    os.kill(self._procs[rank].pid, signal.SIGUSR1)
            time.sleep(0.5 if pending else 0.0)
            self.close()
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            if failures:
                stuck = f"\n(ranks {sorted(pending)} did not finish)" if pending else ""
                raise WorkerError(f"{fn.__name__} failed:\n{details}{stuck}")
            raise TimeoutError(f"{fn.__name__}: ranks {sorted(pending)} gave no result")
        return results

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self._store = None


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    conn: Connection,
    env: Mapping[str, str],
    timeout: float,
) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    os.environ.update(env)
    # Keep Gloo on loopback and leave the cores to the other ranks.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch

    torch.set_num_threads(1)
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout))
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            fn, args = message
            try:
                conn.send((True, fn(rank, world_size, *args)))
            except Exception:
                conn.send((False, traceback.format_exc()))
    except EOFError:
        pass
    finally:
        dist.destroy_process_group()
