"""Placement quality against the stock kube-scheduler, on the same kwok cluster, in one run.

Run: .venv/bin/python benchmarks/scheduler_compare.py      (needs `make k8s`)

For each job the same workers are placed twice on an identical, partly used cluster
(2 zones x 4 racks x 8 nodes x 8 GPUs): once as plain pods bound by kube-scheduler alone
(rank = pod index, as a stock operator numbers them), once as a DDLJob through this operator
(rank = the published rank map). Reported: nodes and racks spanned, and ring edges (rank r to
r+1) that cross a rack or a zone. Also: time from apply to the whole gang running.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ddl_localcluster.controlplane import ControlPlane, binary, free_port

ZONES, RACKS, NODES, GPUS = 2, 4, 8, 8
JOBS = [("2x8", 2, 8), ("8x8", 8, 8), ("6x4", 6, 4), ("16x2", 16, 2), ("32x1", 32, 1)]


def kubectl(cp: ControlPlane, *args: str, input: str | None = None) -> str:
    return cp.kubectl(*args, input=input)


def node_doc(name: str, zone: int, rack: int) -> dict[str, Any]:
    cap = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(GPUS)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": f"zone-{zone}",
                "topology.kubernetes.io/rack": f"z{zone}-rack-{rack}",
            },
        },
        "status": {"capacity": cap, "allocatable": cap},
    }


def pod_doc(name: str, ns: str, gpus: int, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "w",
                "image": "trainer",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
        "restartPolicy": "Never",
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"bench": ns}},
        "spec": spec,
    }


def wait_running(cp: ControlPlane, ns: str, count: int, timeout: float = 180) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        pods = json.loads(kubectl(cp, "get", "pods", "-n", ns, "-o", "json"))["items"]
        if len([p for p in pods if p["status"].get("phase") == "Running"]) >= count:
            return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(f"{ns}: fewer than {count} pods running after {timeout}s")


def ring_stats(nodes_in_rank_order: list[str], rack_of: dict[str, str]) -> dict[str, int]:
    ring = list(
        zip(nodes_in_rank_order, nodes_in_rank_order[1:] + nodes_in_rank_order[:1], strict=True)
    )
    zone_of = {n: r.split("-rack")[0] for n, r in rack_of.items()}
    return {
        "nodes": len(set(nodes_in_rank_order)),
        "racks": len({rack_of[n] for n in nodes_in_rank_order}),
        "rack_edges": sum(rack_of[a] != rack_of[b] for a, b in ring) if len(ring) > 1 else 0,
        "zone_edges": sum(zone_of[a] != zone_of[b] for a, b in ring) if len(ring) > 1 else 0,
    }


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlane(Path(tmp) / "cp")
        cp.start()
        try:
            return run(cp)
        finally:
            cp.stop()


def install_crds(cp: ControlPlane) -> None:
    kubectl(cp, "apply", "--server-side", "-f", str(Path(__file__).parents[1] / "crds"))
    kubectl(cp, "wait", "--for=condition=Established", "crd/ddljobs.ddl-operator.dev")


def start_kwok(cp: ControlPlane, *flags: str) -> None:
    """kwok plays the kubelet of every node annotated kwok.x-k8s.io/node=fake."""
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
            *flags,
        ],
    )


def start_operator(cp: ControlPlane, metrics_port: int = 0, *flags: str) -> int:
    """The operator as a component of `cp` (stopped with it); returns its pid."""
    cp.spawn(
        "ddl-operator",
        [
            sys.executable,
            "-m",
            "ddl_operator",
            f"--metrics-port={metrics_port}",
            f"--liveness-port={free_port()}",
            *flags,
        ],
        env={"KUBECONFIG": str(cp.kubeconfig), "PATH": "/usr/bin:/bin"},
    )
    return int(cp.state()["pids"]["ddl-operator"])


def run(cp: ControlPlane) -> int:
    install_crds(cp)
    start_kwok(cp)
    start_operator(cp)
    rack_of: dict[str, str] = {}
    docs = []
    for z in range(ZONES):
        for r in range(RACKS):
            for n in range(NODES):
                name = f"z{z}-r{r}-n{n}"
                rack_of[name] = f"z{z}-rack-{r}"
                docs.append(node_doc(name, z, r))
    kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump_all(docs))
    kubectl(cp, "wait", "--for=condition=Ready", "node", "--all", "--timeout=120s")
    # The same background load for both: 1-4 GPUs used on a quarter of the nodes.
    rng = random.Random(7)
    kubectl(cp, "create", "namespace", "filler")
    filler = [
        pod_doc(f"f{i}", "filler", rng.randint(1, 4), node)
        for i, node in enumerate(sorted(rack_of))
        if rng.random() < 0.25
    ]
    kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump_all(filler))
    wait_running(cp, "filler", len(filler))

    rows = []
    for label, workers, gpus in JOBS:
        ns = f"stock-{label}"
        kubectl(cp, "create", "namespace", ns)
        kubectl(
            cp,
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump_all([pod_doc(f"w{i}", ns, gpus) for i in range(workers)]),
        )
        stock_time = wait_running(cp, ns, workers)
        pods = json.loads(kubectl(cp, "get", "pods", "-n", ns, "-o", "json"))["items"]
        by_index = sorted(pods, key=lambda p: int(p["metadata"]["name"][1:]))
        stock = ring_stats([p["spec"]["nodeName"] for p in by_index], rack_of)
        kubectl(cp, "delete", "namespace", ns, "--wait=true", "--timeout=120s")

        ns = f"ours-{label}"
        kubectl(cp, "create", "namespace", ns)
        job = {
            "apiVersion": "ddl-operator.dev/v1alpha1",
            "kind": "DDLJob",
            "metadata": {"name": "job", "namespace": ns},
            "spec": {
                "replicas": workers,
                "gpusPerWorker": gpus,
                "template": {"spec": {"containers": [{"name": "w", "image": "trainer"}]}},
            },
        }
        started = time.monotonic()
        kubectl(cp, "apply", "-f", "-", input=yaml.safe_dump(job))
        kubectl(
            cp,
            "wait",
            "-n",
            ns,
            "ddlj/job",
            "--for=jsonpath={.status.phase}=Running",
            "--timeout=180s",
        )
        ours_time = time.monotonic() - started
        status = json.loads(kubectl(cp, "get", "ddlj", "job", "-n", ns, "-o", "json"))["status"]
        ours = ring_stats([m["node"] for m in status["rendezvous"]["members"]], rack_of)
        kubectl(cp, "delete", "namespace", ns, "--wait=true", "--timeout=120s")
        minimum = -(-workers * gpus // GPUS)
        rows.append((label, workers * gpus, minimum, stock, ours, stock_time, ours_time))

    print(
        f"\ncluster: {ZONES} zones x {RACKS} racks x {NODES} nodes x {GPUS} GPUs, "
        f"{len(filler)} nodes partly used; stock = kube-scheduler alone (default profile)"
    )
    print(
        f"{'job':>6} {'GPUs':>5} {'min':>4} | {'nodes':>11} {'racks':>9} "
        f"{'x-rack edges':>13} {'x-zone edges':>13} | {'running after (s)':>18}"
    )
    print(
        f"{'':>6} {'':>5} {'nodes':>4} | {'stock/ours':>11} {'stock/ours':>9} "
        f"{'stock/ours':>13} {'stock/ours':>13} | {'stock/ours':>18}"
    )
    for label, total, minimum, s, o, ts, to in rows:
        print(
            f"{label:>6} {total:>5} {minimum:>4} | {s['nodes']:>5}/{o['nodes']:<5} "
            f"{s['racks']:>4}/{o['racks']:<4} {s['rack_edges']:>6}/{o['rack_edges']:<6} "
            f"{s['zone_edges']:>6}/{o['zone_edges']:<6} | {ts:>8.1f}/{to:<8.1f}"
        )
    stock_nodes = sum(r[3]["nodes"] for r in rows)
    ours_nodes = sum(r[4]["nodes"] for r in rows)
    stock_edges = sum(r[3]["rack_edges"] for r in rows)
    ours_edges = sum(r[4]["rack_edges"] for r in rows)
    at_minimum = sum(r[4]["nodes"] == r[2] for r in rows)
    print(
        f"\nours spans the minimum number of nodes in {at_minimum}/{len(rows)} jobs; "
        f"nodes spanned stock/ours = {stock_nodes}/{ours_nodes} = "
        f"{stock_nodes / ours_nodes:.2f}x; cross-rack ring edges stock/ours = "
        f"{stock_edges}/{ours_edges}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
