"""Pod processes on the host: pid records, signals to whole process groups, crash cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Final

from ddl_localcluster import netns
from ddl_localcluster.nodeagent.control import SOCKET_NAME
from ddl_localcluster.nodeagent.throttle import cleanup_cgroups

PIDS_DIR: Final = "pids"


def start_ticks(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Signals the process group a pod's process leads; one already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def record_pid(state_dir: Path, uid: str, pid: int) -> None:
    """Notes a pod's process (pid and start time) so a later agent can kill it after a crash."""
    pids = state_dir / PIDS_DIR
    pids.mkdir(exist_ok=True)
    (pids / uid).write_text(f"{pid} {start_ticks(pid)}")


def forget_pid(state_dir: Path, uid: str) -> None:
    (state_dir / PIDS_DIR / uid).unlink(missing_ok=True)


def cleanup(state_dir: Path) -> list[str]:
    """Kills pod processes, removes node cgroups and namespaces a previous agent left.

    Works after a SIGKILLed agent too: a node frozen at that moment is thawed and emptied.
    """
    for record in sorted((state_dir / PIDS_DIR).glob("*")):
        try:
            pid, ticks = record.read_text().split()
        except (OSError, ValueError):
            continue
        if start_ticks(int(pid)) == ticks:
            signal_group(int(pid), signal.SIGKILL)
        record.unlink(missing_ok=True)
    (state_dir / SOCKET_NAME).unlink(missing_ok=True)
    cleanup_cgroups(state_dir)
    return netns.teardown(state_dir)
