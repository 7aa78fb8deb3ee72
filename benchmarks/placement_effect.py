"""Why topology-aware rank order matters: the same training job three ways, in one run.

Run (root, needs `make k8s`): .venv/bin/python benchmarks/placement_effect.py [--steps 150]

On the local cluster (node agent, one network namespace per pod, inter-node links shaped to
--rate, default 200 Mbit/s), with the example model given a wide head (16 MB of gradients),
4 ranks of examples/train_resnet.py run on 2 nodes, 2 ranks each, as plain pods with a
hand-made rank map (no operator, so the rank order can be set on purpose):

  flat             ranks A,A,B,B   Ring allreduce (DDP's default)
  hierarchical     ranks A,A,B,B   grid 2x2: intra-node tier inside a node, as we place them
  hier. misplaced  ranks A,B,A,B   grid 2x2 claims ranks 0,1 share a node; they do not, so the
                                   "fast" tier crosses the slow link

Prints rank 0's throughput and sync-wait (its progress over the last steps) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ddl_localcluster.controlplane import REPO_ROOT, ControlPlane, binary

CLUSTER = REPO_ROOT / "examples" / "local-cluster.yaml"
# A 4M-parameter head (16 MB of gradients per step): the 200 Mbit/s link, not 2 CPU cores,
# bounds the step, as the network does for real models on real GPUs.
HIDDEN = 100_000
VARIANTS = [
    ("flat", "AABB", "Ring"),
    ("hierarchical", "AABB", "Hierarchical"),
    ("hier. misplaced", "ABAB", "Hierarchical"),
]


def kubectl(cp: ControlPlane, *args: str, input: str | None = None) -> str:
    return cp.kubectl(*args, input=input)


def rank_pod(name: str, node: str, env: dict[str, str], steps: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "bench", "labels": {"bench": "placement"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "train",
                    "image": "ddl-worker",
                    "command": [
                        "python",
                        "examples/train_resnet.py",
                        "--steps",
                        str(steps),
                        "--hidden",
                        str(HIDDEN),
                    ],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                }
            ],
        },
    }


def pod_json(cp: ControlPlane, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(kubectl(cp, "get", "pod", name, "-n", "bench", "-o", "json"))
    return found


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def run_variant(
    cp: ControlPlane,
    label: str,
    layout: str,
    algorithm: str,
    nodes: list[str],
    steps: int,
    work: Path,
    port: int,
) -> dict[str, float]:
    where = {"A": nodes[0], "B": nodes[1]}
    progress = work / f"{label.replace(' ', '-').replace('.', '')}.json"
    local_rank: dict[str, int] = {}
    names = [f"r{i}-{port}" for i in range(len(layout))]
    master_ip = ""
    for rank, (name, slot) in enumerate(zip(names, layout, strict=True)):
        lr = local_rank.setdefault(slot, 0)
        local_rank[slot] += 1
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(len(layout)),
            "LOCAL_RANK": str(lr),
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": str(rank // 2),
            "MASTER_ADDR": master_ip or "127.0.0.1",
            "MASTER_PORT": str(port),
            "DDL_GRID": "2x2",
            "DDL_ALLREDUCE_ALGORITHM": algorithm,
            "DDL_COMPRESSION": "None",
            "DDL_BUCKET_MB": "4",
            "DDL_JOB_NAME": "bench",
            "OMP_NUM_THREADS": "1",
        }
        if rank == 0:
            env["DDL_PROGRESS_FILE"] = str(progress)
        kubectl(
            cp, "apply", "-f", "-", input=yaml.safe_dump(rank_pod(name, where[slot], env, steps))
        )
        if rank == 0:
            master_ip = wait(
                "rank 0's IP", lambda: pod_json(cp, names[0]).get("status", {}).get("podIP"), 60
            )
    started = time.monotonic()
    for name in names:
        phase = wait(
            f"{name} to finish",
            lambda n=name: (
                pod_json(cp, n)["status"].get("phase")
                if pod_json(cp, n)["status"].get("phase") in ("Succeeded", "Failed")
                else None
            ),
            900,
        )
        if phase != "Succeeded":
            raise RuntimeError(f"{label}: {name} {phase}; logs under {cp.dir / 'nodeagent'}")
    elapsed = time.monotonic() - started
    data = json.loads(progress.read_text())
    kubectl(cp, "delete", "pods", "-n", "bench", "-l", "bench=placement", "--wait=true")
    return {
        "throughput": data["throughput"],
        "sync_wait": data["sync_wait_ratio"],
        "seconds": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rate", default="200mbit", help="inter-node link rate (tc tbf)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        description = yaml.safe_load(CLUSTER.read_text())
        description["network"]["linkRate"] = args.rate
        cluster = Path(tmp) / "cluster.yaml"
        cluster.write_text(yaml.safe_dump(description))
        cp = ControlPlane(Path(tmp) / "cp")
        cp.start()
        try:
            cp.start_node_agent(cluster)
            kubectl(cp, "create", "namespace", "bench")
            wait(
                "default service account",
                lambda: (
                    subprocess.run(
                        [
                            str(binary("kubectl")),
                            f"--kubeconfig={cp.kubeconfig}",
                            "get",
                            "sa",
                            "default",
                            "-n",
                            "bench",
                        ],
                        capture_output=True,
                    ).returncode
                    == 0
                ),
                60,
            )
            nodes = sorted(
                n["metadata"]["name"]
                for n in json.loads(kubectl(cp, "get", "nodes", "-o", "json"))["items"]
            )[:2]
            results = {}
            for i, (label, layout, algorithm) in enumerate(VARIANTS):
                results[label] = run_variant(
                    cp, label, layout, algorithm, nodes, args.steps, Path(tmp), 29400 + i
                )
                print(f"  {label}: {results[label]}", flush=True)
        finally:
            cp.stop()
    flat = results["flat"]
    print(
        f"\n4 ranks on 2 nodes ({nodes[0]}, {nodes[1]}), {args.rate} between nodes, "
        f"{args.steps} steps of examples/train_resnet.py; rank 0's last-window progress"
    )
    print(f"{'variant':>16} {'samples/s':>10} {'sync-wait':>10} {'throughput / flat':>18}")
    for label, r in results.items():
        print(
            f"{label:>16} {r['throughput']:>10.1f} {r['sync_wait']:>10.0%} "
            f"{r['throughput'] / flat['throughput']:>17.2f}x"
        )
    hier, bad = results["hierarchical"], results["hier. misplaced"]
    print(f"\nhierarchical / misplaced throughput = {hier['throughput'] / bad['throughput']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
