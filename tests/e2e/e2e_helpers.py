"""Helpers for end-to-end tests on the local cluster."""

from __future__ import annotations

import subprocess
import sys

from ddl_localcluster.controlplane import ControlPlane


def node_agent(cp: ControlPlane, *args: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ddl_localcluster.nodeagent",
            *args,
            "--state-dir",
            str(cp.dir / "nodeagent"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
