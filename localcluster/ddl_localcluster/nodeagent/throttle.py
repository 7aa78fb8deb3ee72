"""Slowed nodes: one cgroup per node that its pods run in, frozen and thawed on a duty cycle.

Where a cgroup v2 hierarchy is writable (the host's /sys/fs/cgroup, or the `unified` one of a
hybrid host, where the v1 cpu controller leaves v2 without cpu.max), every pod process starts
inside `ddl<tag>/<node>` and `cgroup.freeze` stops and resumes the whole node at once, child
processes included, unseen by them. Elsewhere (no root) the agent falls back to SIGSTOP and
SIGCONT on each pod's process group, which misses only processes that left their group.
The timing is slowdown.py's; this module does the writes, on a thread of its own.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Protocol

from ddl_localcluster import netns
from ddl_localcluster.nodeagent import slowdown

CGROUP_MOUNTS: Final = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
EMPTY_SECONDS: Final = 5.0
EMPTY_POLL_SECONDS: Final = 0.02


def cgroup2_root(candidates: Iterable[Path] = CGROUP_MOUNTS) -> Path | None:
    """The first candidate that is a cgroup v2 hierarchy this process may write, if any."""
    for path in candidates:
        # `tasks` exists only in v1 hierarchies (and cgroup.freeze only below a v2 root).
        v2 = (path / "cgroup.procs").exists() and not (path / "tasks").exists()
        if v2 and os.access(path, os.W_OK):
            return path
    return None


def join_command(procs: Path) -> list[str]:
    """A prefix that moves the command into a cgroup, then execs it (same pid, no race).

    Moving the pid after Popen returns would leave out any child it forked in between.
    """
    script = f'echo $$ > {shlex.quote(str(procs))} && exec "$@"'
    return ["sh", "-c", script, "sh"]


class Freezer(Protocol):
    """How a node's pods are stopped and resumed."""

    description: str

    def command_prefix(self, node: str) -> list[str]: ...

    def set_frozen(self, node: str, frozen: bool) -> None: ...

    def close(self) -> None: ...


class CgroupFreezer:
    """Each node a cgroup under `<root>/ddl<tag>`; freezing writes its cgroup.freeze."""

    def __init__(self, root: Path, state_dir: Path, nodes: Iterable[str]) -> None:
        self.base = root / f"ddl{netns.tag(state_dir)}"
        self.description = f"cgroup v2 freeze under {self.base}"
        for node in nodes:
            (self.base / node).mkdir(parents=True, exist_ok=True)

    def command_prefix(self, node: str) -> list[str]:
        return join_command(self.base / node / "cgroup.procs")

    def set_frozen(self, node: str, frozen: bool) -> None:
        (self.base / node / "cgroup.freeze").write_text("1" if frozen else "0")

    def close(self) -> None:
        remove_cgroups(self.base)


class SignalFreezer:
    """SIGSTOP and SIGCONT to the process group of each of a node's pods."""

    description = "SIGSTOP/SIGCONT of pod process groups (no writable cgroup v2)"

    def __init__(self, groups: Callable[[str], list[int]]) -> None:
        self.groups = groups

    def command_prefix(self, node: str) -> list[str]:
        return []

    def set_frozen(self, node: str, frozen: bool) -> None:
        for pgid in self.groups(node):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def close(self) -> None:
        pass


def remove_cgroups(base: Path) -> list[str]:
    """Thaws, kills and removes every node cgroup under base, then base; the names removed.

    Kills what is left inside: the agent only ever put pod processes there.
    """
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for group in sorted(p for p in base.iterdir() if p.is_dir()):
        with contextlib.suppress(OSError):
            (group / "cgroup.freeze").write_text("0")
        with contextlib.suppress(OSError):
            (group / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + EMPTY_SECONDS
        while _members(group) and time.monotonic() < deadline:
            time.sleep(EMPTY_POLL_SECONDS)
        with contextlib.suppress(OSError):
            group.rmdir()
            removed.append(group.name)
    with contextlib.suppress(OSError):
        base.rmdir()
    return removed


def _members(group: Path) -> bool:
    try:
        return bool((group / "cgroup.procs").read_text().strip())
    except OSError:
        return False


class Throttle:
    """Runs each node at its set speed: a thread that freezes and thaws on the duty cycle."""

    def __init__(self, freezer: Freezer, say: Callable[[str], None]) -> None:
        self.freezer, self.say = freezer, say
        self._fractions: dict[str, float] = {}
        self._frozen: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()

    @property
    def description(self) -> str:
        return self.freezer.description

    def fractions(self) -> dict[str, float]:
        """The slowed nodes and their speeds (a node at full speed is not listed)."""
        with self._lock:
            return dict(self._fractions)

    def set(self, node: str, fraction: float) -> None:
        """Runs node at `fraction` from the next period on; 1 restores full speed at once."""
        with self._lock:
            if fraction >= slowdown.FULL_SPEED:
                self._fractions.pop(node, None)
            else:
                self._fractions[node] = fraction
        self._wake.set()

    def command_prefix(self, node: str) -> list[str]:
        """What a pod's command runs under so that its node's slowdown reaches it."""
        return self.freezer.command_prefix(node)

    def run(self, stop: threading.Event) -> None:
        """Cycles until stop is set, then leaves every node running."""
        while not stop.is_set():
            fractions = self.fractions()
            if not fractions:
                self._apply(frozenset())
                self._wake.wait()
                self._wake.clear()
                continue
            phase = time.monotonic() % slowdown.PERIOD_SECONDS
            self._apply(slowdown.frozen_nodes(fractions, phase))
            self._wake.wait(slowdown.until_change(fractions, phase))
            self._wake.clear()
        self._apply(frozenset())

    def stop(self) -> None:
        """Wakes the thread so that it sees its stop event at once."""
        self._wake.set()

    def _apply(self, frozen: frozenset[str]) -> None:
        for node in frozen ^ self._frozen:
            try:
                self.freezer.set_frozen(node, node in frozen)
            except OSError as err:
                self.say(f"slowdown of {node}: {err}")
        self._frozen = set(frozen)

    def close(self) -> None:
        """Thaws every node and removes what the freezer made (run() must have ended)."""
        self._apply(frozenset())
        self.freezer.close()


def make_throttle(
    state_dir: Path,
    nodes: Iterable[str],
    groups: Callable[[str], list[int]],
    say: Callable[[str], None],
    roots: Iterable[Path] = CGROUP_MOUNTS,
) -> Throttle:
    """A throttle on cgroup v2 where one is writable, else on signals."""
    root = cgroup2_root(roots)
    freezer: Freezer = SignalFreezer(groups)
    if root is not None:
        try:
            freezer = CgroupFreezer(root, state_dir, nodes)
        except OSError as err:  # e.g. a read-only or undelegated hierarchy
            say(f"no node cgroups under {root} ({err}); slowdowns use signals")
    return Throttle(freezer, say)


def cleanup_cgroups(state_dir: Path, roots: Iterable[Path] = CGROUP_MOUNTS) -> list[str]:
    """Removes the node cgroups a previous agent of this state dir left (after a crash)."""
    root = cgroup2_root(roots)
    if root is None:
        return []
    return remove_cgroups(root / f"ddl{netns.tag(state_dir)}")


__all__ = [
    "CgroupFreezer",
    "Freezer",
    "SignalFreezer",
    "Throttle",
    "cgroup2_root",
    "cleanup_cgroups",
    "join_command",
    "make_throttle",
    "remove_cgroups",
]
