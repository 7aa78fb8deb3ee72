"""The `ddl` / `ddl-worker` command: `agent` (a worker pod's entry point) and `run --local`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE = """usage:
  ddl-worker agent -- COMMAND...            run the pod agent (worker container entry point)
  ddl run MANIFEST --local [--nodes N] [--steps N] [--workdir DIR]
                                            run a DDLJob manifest on this machine
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["agent"]:
        from ddl_worker.agent import main as agent_main

        return agent_main(args[1:])
    if args[:1] == ["run"]:
        return run(args[1:])
    sys.stderr.write(USAGE)
    return 2


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ddl run", description="Run a DDLJob manifest.")
    parser.add_argument("manifest", type=Path)
    parser.add_argument(
        "--local", action="store_true", help="run here, one agent process per simulated node"
    )
    parser.add_argument("--nodes", type=int, help="simulated nodes (default: spec.replicas)")
    parser.add_argument("--steps", type=int, help="train this many steps (DDL_TOTAL_STEPS)")
    parser.add_argument(
        "--workdir", type=Path, help="checkpoints, logs and reports (default: a temp dir)"
    )
    options = parser.parse_args(argv)
    if not options.local:
        parser.error("only --local is supported here; for a cluster: kubectl apply -f MANIFEST")
    for name in ("nodes", "steps"):
        value = getattr(options, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    from ddl_worker.local import run_local

    return run_local(
        options.manifest, nodes=options.nodes, steps=options.steps, work_dir=options.workdir
    )


if __name__ == "__main__":
    sys.exit(main())
