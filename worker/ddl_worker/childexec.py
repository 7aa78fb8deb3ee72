"""Exec a training command so that it dies with its agent (Linux parent-death signal).

Without this, a SIGKILLed agent (OOM, node agent crash) would leave training processes that
hold the old epoch's process group open while the rest of the job re-forms.
Usage: python -m ddl_worker.childexec AGENT_PID -- COMMAND...
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m ddl_worker.childexec AGENT_PID -- COMMAND...", file=sys.stderr)
        return 2
    agent_pid = int(argv[0])
    command = argv[2:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(f"childexec: prctl failed: errno {ctypes.get_errno()}", file=sys.stderr)
            return 1
    # The agent may have died between fork and prctl; then nobody would kill us later.
    if os.getppid() != agent_pid:
        return 1
    try:
        os.execvp(command[0], command)
    except OSError as error:
        print(f"childexec: cannot run {command[0]!r}: {error}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
