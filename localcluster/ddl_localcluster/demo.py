"""`ddl-cluster demo`: the whole product on one machine, from a clean start to a trained job.

Starts the control plane and the local node agent (simulated GPU nodes, one network namespace
per node and pod, shaped inter-node links), `helm install`s the operator chart so the operator
runs as a pod under the chart's RBAC, applies examples/demo-job.yaml and follows it until it
succeeds. Everything keeps running afterwards for a look around; `ddl-cluster down` stops it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ddl_localcluster.controlplane import REPO_ROOT, ControlPlane, binary

CLUSTER = REPO_ROOT / "examples" / "local-cluster.yaml"
JOB = REPO_ROOT / "examples" / "demo-job.yaml"
CHART = REPO_ROOT / "charts" / "ddl-operator"
RELEASE, RELEASE_NS = "ddl", "ddl-system"
CHECKPOINTS = Path("/tmp/ddl-demo")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kubectl(cp: ControlPlane, *args: str, input: str | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(binary("kubectl")), f"--kubeconfig={cp.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def helm(cp: ControlPlane, *args: str) -> str:
    proc = subprocess.run(
        [str(binary("helm")), f"--kubeconfig={cp.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=360,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def start_cluster(cp: ControlPlane) -> None:
    """Control plane, node agent and the operator chart; reuses whatever already runs."""
    running = cp.running()
    if "kube-apiserver" not in running:
        say("starting the control plane (etcd, kube-apiserver, controller-manager, scheduler)")
        cp.start(progress=lambda m: say(f"  {m}"))
    if "nodeagent" not in running:
        say(f"starting the node agent: {CLUSTER.relative_to(REPO_ROOT)}")
        cp.spawn(
            "nodeagent",
            [
                sys.executable,
                "-m",
                "ddl_localcluster.nodeagent",
                "run",
                "--kubeconfig",
                str(cp.kubeconfig),
                "--cluster",
                str(CLUSTER),
                "--state-dir",
                str(cp.dir / "nodeagent"),
            ],
        )
    deadline = time.monotonic() + 120
    while not json.loads(kubectl(cp, "get", "nodes", "-o", "json"))["items"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node registered; see {cp.log('nodeagent')}")
        time.sleep(0.5)
    kubectl(cp, "wait", "--for=condition=Ready", "node", "--all", "--timeout=120s")
    say("helm install the operator chart (the operator runs as a pod under its RBAC)")
    helm(
        cp,
        "upgrade",
        "--install",
        RELEASE,
        str(CHART),
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--wait",
        "--timeout=5m",
    )
    kubectl(
        cp,
        "rollout",
        "status",
        f"deployment/{RELEASE}-ddl-operator",
        "-n",
        RELEASE_NS,
        "--timeout=180s",
    )


def follow(cp: ControlPlane, name: str, timeout: float) -> dict[str, Any]:
    """Prints a line whenever the job's phase, epoch or progress changes; returns its status."""
    deadline = time.monotonic() + timeout
    last = ""
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = json.loads(kubectl(cp, "get", "ddlj", name, "-o", "json"))
        status = job.get("status", {})
        line = (
            f"{status.get('phase', 'Pending'):9} epoch={status.get('epoch', 0)} "
            f"ready={status.get('readyReplicas', 0)}/{job['spec']['replicas']} "
            f"step={status.get('step', 0)} "
            f"throughput={status.get('throughput', 0):.1f} samples/s "
            f"sync-wait={status.get('syncWaitRatio', 0):.0%}"
        )
        if status.get("message"):
            line += f"  ({status['message']})"
        if line != last:
            say(line)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(1)
    raise RuntimeError(f"job {name} did not finish within {timeout:.0f}s; status: {status}")


def run(cp: ControlPlane, timeout: float = 900) -> int:
    started = time.monotonic()
    start_cluster(cp)
    shutil.rmtree(CHECKPOINTS, ignore_errors=True)
    name = "demo"
    kubectl(cp, "delete", "ddlj", name, "--ignore-not-found", "--wait=true")
    say(f"kubectl apply -f {JOB.relative_to(REPO_ROOT)}")
    kubectl(cp, "apply", "-f", str(JOB))
    seen_rendezvous = False
    status = follow(cp, name, timeout)
    rdzv = status.get("rendezvous") or {}
    if rdzv.get("members"):
        seen_rendezvous = True
        say(f"last membership: epoch {rdzv['epoch']}, grid {'x'.join(map(str, rdzv['grid']))}")
        for m in rdzv["members"]:
            say(
                f"  worker rank {m['rank']}: {m['pod']} on {m['node']} "
                f"({m['domains'].get('topology.kubernetes.io/rack', '?')})"
            )
    print(kubectl(cp, "get", "ddlj", name), end="")
    events = kubectl(
        cp,
        "get",
        "events",
        "--field-selector",
        f"involvedObject.name={name}",
        "--sort-by=.lastTimestamp",
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
        "--no-headers",
    )
    for line in events.splitlines():
        say(f"  event {line}")
    say(
        f"{status.get('phase')} in {time.monotonic() - started:.0f}s: step {status.get('step')}, "
        f"throughput {status.get('throughput', 0):.1f} samples/s, "
        f"sync-wait {status.get('syncWaitRatio', 0):.0%} of step time (rank 0's last report)"
    )
    say(
        f"look around: export KUBECONFIG={cp.kubeconfig}; worker logs under "
        f"{cp.dir / 'nodeagent' / 'pods'}; checkpoints in {CHECKPOINTS}; "
        "`make demo-down` stops everything"
    )
    return 0 if status.get("phase") == "Succeeded" and seen_rendezvous else 1
