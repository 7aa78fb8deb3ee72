"""`ddl-cluster demo`: the control plane, kwok GPU nodes, the operator and the example job.

Shows placement and the job lifecycle on a default topology (2 racks x 2 nodes x 4 GPUs).
The processes keep running after the command returns; `ddl-cluster down` stops them all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import yaml

from ddl_localcluster.controlplane import REPO_ROOT, ControlPlane, binary, free_port

RACKS, NODES_PER_RACK, GPUS = 2, 2, 4
EXAMPLE = REPO_ROOT / "examples" / "demo-job.yaml"


def kubectl(cp: ControlPlane, *args: str, input: str | None = None) -> str:
    proc = subprocess.run(
        [str(binary("kubectl")), f"--kubeconfig={cp.kubeconfig}", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def demo_nodes() -> list[dict[str, Any]]:
    nodes = []
    for r in range(RACKS):
        for n in range(NODES_PER_RACK):
            name = f"gpu-r{r}-n{n}"
            capacity = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(GPUS)}
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake"},
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "topology.kubernetes.io/rack": f"rack-{r}",
                            "topology.kubernetes.io/zone": "zone-a",
                            "ddl-operator.dev/nvlink-domain": f"{name}-nvl",
                        },
                    },
                    "status": {"capacity": capacity, "allocatable": capacity},
                }
            )
    return nodes


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(cp: ControlPlane, timeout: float = 180) -> int:
    if not cp.running():
        say("starting the control plane")
        cp.start(progress=lambda m: say(f"  {m}"))
    kubectl(cp, "apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    kubectl(cp, "wait", "--for=condition=Established", "crd/ddljobs.ddl-operator.dev")
    running = cp.running()
    if "kwok" not in running:
        say(f"kwok GPU nodes: {RACKS} racks x {NODES_PER_RACK} nodes x {GPUS} GPUs")
        cp.spawn(
            "kwok",
            [
                str(binary("kwok")),
                f"--kubeconfig={cp.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.244.0.1",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
    kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump_all(demo_nodes()))
    if "ddl-operator" not in running:
        say("starting the operator")
        cp.spawn(
            "ddl-operator",
            [
                sys.executable,
                "-m",
                "ddl_operator",
                f"--metrics-port={free_port()}",
                f"--liveness-port={free_port()}",
            ],
            env={**os.environ, "KUBECONFIG": str(cp.kubeconfig)},
        )
    say(f"applying {EXAMPLE.relative_to(REPO_ROOT)}")
    kubectl(cp, "apply", "-f", str(EXAMPLE))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        job = json.loads(kubectl(cp, "get", "ddlj", "demo", "-o", "json"))
        st = job.get("status", {})
        line = (
            f"phase={st.get('phase', '-')} epoch={st.get('epoch', 0)} "
            f"ready={st.get('readyReplicas', 0)}/{job['spec']['replicas']} "
            f"{st.get('message', '')}"
        )
        if line != last:
            say(line)
            last = line
        if st.get("phase") in ("Running", "Succeeded", "Failed"):
            break
        time.sleep(1)
    else:
        say(f"the job did not start within {timeout:.0f}s; operator log: {cp.log('ddl-operator')}")
        return 1
    rdzv = st.get("rendezvous", {})
    for m in rdzv.get("members", []):
        say(
            f"  rank {m['rank']}: {m['pod']} on {m['node']} "
            f"({m['domains'].get('topology.kubernetes.io/rack', '?')})"
        )
    say(
        f"grid {'x'.join(map(str, rdzv.get('grid', [])))}, master {rdzv.get('masterAddr')}"
        f":{rdzv.get('masterPort')}"
    )
    print(kubectl(cp, "get", "ddlj"), end="")
    say(f"export KUBECONFIG={cp.kubeconfig}   # to look around; `make demo-down` stops it all")
    return 0
