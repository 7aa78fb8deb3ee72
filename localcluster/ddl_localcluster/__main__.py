"""`ddl-cluster`: start, inspect and stop the local control plane."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ddl_localcluster.controlplane import ControlPlane, ControlPlaneError, bin_dir, cache_dir


def default_dir() -> Path:
    if env := os.environ.get("DDL_CLUSTER_DIR"):
        return Path(env)
    return cache_dir() / "cluster"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddl-cluster", description=__doc__)
    parser.add_argument(
        "--dir", type=Path, default=None, help="state directory (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the control plane and print its kubeconfig")
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("status", help="show which components run")
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path")
    slow_parser = sub.add_parser(
        "slow", help="run one node's pods at a fraction of full speed (needs the node agent)"
    )
    slow_parser.add_argument("node")
    slow_parser.add_argument("fraction", help="0.5 or 50%%: half speed; 1: full speed again")
    demo_parser = sub.add_parser(
        "demo", help="local cluster + operator chart + the example job's elastic story"
    )
    demo_parser.add_argument(
        "--quick", action="store_true", help="train the job to the end and do nothing to it"
    )
    args = parser.parse_args(argv)
    cp = ControlPlane(args.dir or default_dir())
    try:
        if args.command == "up":
            started = time.monotonic()
            cp.start(progress=lambda msg: print(f"starting {msg}", file=sys.stderr))
            print(
                f"control plane up in {time.monotonic() - started:.1f}s (binaries: {bin_dir()})",
                file=sys.stderr,
            )
            print(f"export KUBECONFIG={cp.kubeconfig}")
        elif args.command == "demo":
            from ddl_localcluster import demo

            return demo.run(cp, quick=args.quick)
        elif args.command == "slow":
            return _slow(cp.dir / "nodeagent", args.node, args.fraction)
        elif args.command == "down":
            cp.stop()
            left = cp.running()
            if left:
                print(f"still running: {left}", file=sys.stderr)
                return 1
            print("control plane stopped", file=sys.stderr)
        elif args.command == "status":
            running = cp.running()
            for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
                state = f"running (pid {running[name]})" if name in running else "stopped"
                print(f"{name:26} {state}")
            return 0 if running else 3
        else:
            print(cp.kubeconfig)
    except ControlPlaneError as err:
        print(f"ddl-cluster: {err}", file=sys.stderr)
        return 1
    return 0


def _slow(state_dir: Path, node: str, fraction: str) -> int:
    """Asks the running node agent to slow a node (its control socket is in state_dir)."""
    from ddl_localcluster.nodeagent.control import send

    try:
        answer = send(state_dir, {"command": "node-slow", "node": node, "fraction": fraction})
    except OSError as err:
        print(f"ddl-cluster: no node agent answers in {state_dir}: {err}", file=sys.stderr)
        return 1
    print(answer.get("message"), file=sys.stdout if answer.get("ok") else sys.stderr)
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
