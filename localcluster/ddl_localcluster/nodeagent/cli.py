"""Command line of the local node agent: `run` it, or send a running one a command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Final

from ddl_localcluster import netns
from ddl_localcluster.controlplane import REPO_ROOT, cache_dir
from ddl_localcluster.nodeagent.agent import run_agent
from ddl_localcluster.nodeagent.api import ApiError
from ddl_localcluster.nodeagent.control import send
from ddl_localcluster.nodeagent.processes import cleanup
from ddl_localcluster.topology import TopologyError

DEFAULT_CLUSTER: Final = REPO_ROOT / "examples" / "local-cluster.yaml"
DESCRIPTION: Final = """\
Local node agent: registers simulated GPU nodes and runs the pods bound to them as processes.

A stand-in for the kubelet of the local cluster. It keeps each node's Lease and Ready condition
fresh, runs the first container of every pod bound to its nodes as a local process (in the
pod's own network namespace where root allows, see netns.py), gives the process the pod's
service-account identity through a KUBECONFIG with a pod-bound token, reports pod status like a
kubelet, honours deletion and restart policies, and takes node-down/up/delete commands on a
unix socket in its state directory, and slows a node's pods to a fraction of full speed.

    python -m ddl_localcluster.nodeagent run --kubeconfig K --cluster CLUSTER.yaml --state-dir D
    python -m ddl_localcluster.nodeagent node-down NAME [--kill-pods] --state-dir D
    python -m ddl_localcluster.nodeagent node-slow NAME 0.5 --state-dir D   # 1 = full speed
    python -m ddl_localcluster.nodeagent teardown --state-dir D   # after a crash
"""


def default_state_dir() -> Path:
    """Next to the default control plane's state (ddl-cluster's --dir)."""
    base = os.environ.get("DDL_CLUSTER_DIR") or str(cache_dir() / "cluster")
    return Path(base) / "nodeagent"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddl_localcluster.nodeagent",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, parents=[common])

    run = command("run", "register the nodes and run their pods until SIGTERM")
    run.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG"))
    run.add_argument("--cluster", type=Path, default=DEFAULT_CLUSTER)
    run.add_argument(
        "--network",
        choices=("auto", "netns", "loopback"),
        default="auto",
        help="auto: namespaces where root allows, else loopback addresses",
    )
    down = command("node-down", "stop a node's heartbeats (it turns NotReady)")
    down.add_argument("node")
    down.add_argument("--kill-pods", action="store_true", help="also SIGKILL its pods' processes")
    for name, text in (
        ("node-up", "resume a node (or register a deleted one again)"),
        ("node-delete", "kill a node's pods and delete the Node"),
    ):
        command(name, text).add_argument("node")
    slow = command("node-slow", "run a node's pods at a fraction of full speed (a straggler)")
    slow.add_argument("node")
    slow.add_argument("fraction", help="0.5 or 50%%: half speed; 1: full speed again")
    command("status", "nodes and pods of the running agent (JSON)")
    command("teardown", "kill leftover pods and remove namespaces (after a crash)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir
    try:
        if args.command == "run":
            if args.kubeconfig is None:
                parser.error("--kubeconfig (or KUBECONFIG) is required")
            return run_agent(args.kubeconfig, args.cluster, state_dir, args.network)
        if args.command == "teardown":
            removed = cleanup(state_dir)
            print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
            return 0
        request = {
            "command": args.command,
            "node": getattr(args, "node", ""),
            "kill_pods": getattr(args, "kill_pods", False),
        }
        if args.command == "node-slow":
            request["fraction"] = args.fraction
        answer = send(state_dir, request)
    except (OSError, ValueError, TopologyError, ApiError, netns.NetworkError) as err:
        print(f"nodeagent: {err}", file=sys.stderr)
        return 1
    message = answer.get("message")
    print(message if isinstance(message, str) else json.dumps(message, indent=2))
    return 0 if answer.get("ok") else 1
