"""Benchmark of gang placement on a 1,000-node snapshot: latency, and span vs the stock scheduler.

Run: .venv/bin/python benchmarks/placement_bench.py [--runs 50] [--seed 1]

The "stock" column models kube-scheduler placing the same number of pods one by one in rank
order: nodes with room pass the filter, NodeResourcesFit's default LeastAllocated score picks
the node with the most free GPUs, ties broken at random (as kube-scheduler's selectHost does).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ddl_operator.api.constants import (
    DEFAULT_TOPOLOGY_LEVELS,
    LABEL_HOSTNAME,
    LABEL_NVLINK_DOMAIN,
    LABEL_RACK,
    LABEL_ZONE,
)
from ddl_operator.core.placement import (
    Assignment,
    GangRequest,
    Placement,
    place,
    ring_cross_edges,
)
from ddl_operator.core.topology import NodeInfo, level_name

ZONES, RACKS, NODES, GPUS, NVLINK_PER_RACK = 4, 10, 25, 8, 5
LATENCY_GOAL_MS = 50.0


def snapshot(seed: int, busy_share: float = 0.3) -> list[NodeInfo]:
    """4 zones x 10 racks x 25 nodes x 8 GPUs; about `busy_share` of nodes partly or fully used."""
    rng = random.Random(seed)
    nodes = []
    for z in range(ZONES):
        for r in range(RACKS):
            for n in range(NODES):
                name = f"z{z}-r{r}-n{n}"
                labels = {
                    LABEL_HOSTNAME: name,
                    LABEL_ZONE: f"zone-{z}",
                    LABEL_RACK: f"z{z}-rack-{r}",
                    LABEL_NVLINK_DOMAIN: f"z{z}-r{r}-nvl-{n * NVLINK_PER_RACK // NODES}",
                }
                used = rng.randint(1, GPUS) if rng.random() < busy_share else 0
                nodes.append(NodeInfo(name, labels, allocatable=GPUS, used=used))
    return nodes


def stock_scheduler(
    nodes: Sequence[NodeInfo], workers: int, request: GangRequest, seed: int
) -> Placement:
    """kube-scheduler's default outcome, pod by pod: most free GPUs first, random ties."""
    rng = random.Random(seed)
    free = {node.name: node.free for node in nodes}
    by_name = {node.name: node for node in nodes}
    placed = []
    for rank in range(workers):
        fits = [name for name, room in free.items() if room >= request.units_per_worker]
        most = max(free[name] for name in fits)
        chosen = rng.choice([name for name in fits if free[name] == most])
        free[chosen] -= request.units_per_worker
        labels = by_name[chosen].labels
        domains = {level: labels[level] for level in request.levels if level in labels}
        placed.append(Assignment(rank=rank, node=chosen, domains=domains))
    return Placement(workers=tuple(placed), grid=(), levels=request.levels)


def fewest_domains(
    nodes: Sequence[NodeInfo], workers: int, units: int, level: str, within: str | None
) -> int:
    """The fewest domains of `level` that hold the gang, all inside one domain of `within`
    when some domain of `within` can hold it (the whole cluster otherwise)."""
    groups: dict[str, dict[str, int]] = {}
    for node in nodes:
        outer = node.labels[within] if within else ""
        key = node.name if level == LABEL_HOSTNAME else node.labels[level]
        room = groups.setdefault(outer, {})
        room[key] = room.get(key, 0) + node.free // units
    if within and all(sum(room.values()) < workers for room in groups.values()):
        return fewest_domains(nodes, workers, units, level, None)
    best = len(nodes) + 1
    for room in groups.values():
        have = count = 0
        for slots in sorted(room.values(), reverse=True):
            if have >= workers:
                break
            have, count = have + slots, count + 1
        if have >= workers:
            best = min(best, count)
    return best


@dataclass
class Row:
    """One job's results."""

    job: str
    median_ms: float
    p95_ms: float
    cpu_ms: float
    spans: dict[str, tuple[int, int, int]]  # level -> (ours, stock, fewest possible)
    edges: dict[str, tuple[int, int]]  # level -> (ours, stock) ring edges crossing it


def measure(nodes: list[NodeInfo], request: GangRequest, runs: int, seed: int) -> Row:
    """Time `runs` placements, then compare the placement with the stock scheduler's."""
    wall: list[float] = []
    cpu: list[float] = []
    result = None
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = place(nodes, request)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - cpu_start) * 1000)
    assert isinstance(result, Placement), result
    size = len(result.workers)
    stock = stock_scheduler(nodes, size, request, seed)
    spans: dict[str, tuple[int, int, int]] = {}
    for level, within in ((LABEL_HOSTNAME, None), (LABEL_RACK, LABEL_ZONE), (LABEL_ZONE, None)):
        fewest = fewest_domains(nodes, size, request.units_per_worker, level, within)
        spans[level] = (_span(result, level), _span(stock, level), fewest)
    edges = {
        level: (ring_cross_edges(result, level), ring_cross_edges(stock, level))
        for level in (LABEL_RACK, LABEL_ZONE)
    }
    wall.sort()
    p95 = wall[round(0.95 * (len(wall) - 1))]
    job = f"{size} x {request.units_per_worker} GPUs"
    if request.required:
        job += f" in 1 {level_name(request.required)}"
    return Row(job, statistics.median(wall), p95, statistics.median(cpu), spans, edges)


def _span(placement: Placement, level: str) -> int:
    if level == LABEL_HOSTNAME:
        return len(placement.nodes)
    return len({worker.domains[level] for worker in placement.workers})


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}" if b else ("1.00" if a == 0 else "inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    nodes = snapshot(args.seed)
    print(
        f"snapshot: {len(nodes)} nodes ({ZONES} zones x {RACKS} racks x {NODES} nodes x "
        f"{GPUS} GPUs, {NVLINK_PER_RACK} NVLink domains per rack), "
        f"{sum(1 for n in nodes if n.used)} partly or fully used, "
        f"{sum(n.free for n in nodes)} free GPUs; {args.runs} runs per job"
    )
    jobs = [
        GangRequest(64, 64, 8, DEFAULT_TOPOLOGY_LEVELS, None, 8),
        GangRequest(512, 512, 1, DEFAULT_TOPOLOGY_LEVELS, None, 1),
        # Elastic 16..64 workers that must share a rack: gets as many as the best rack holds.
        GangRequest(16, 64, 8, DEFAULT_TOPOLOGY_LEVELS, LABEL_RACK, 8),
    ]
    rows = [measure(nodes, job, args.runs, args.seed) for job in jobs]

    print(f"\nplace() latency, wall clock (goal < {LATENCY_GOAL_MS:.0f} ms); cpu = process time")
    print(f"{'job':<24}{'median ms':>10}{'p95 ms':>9}{'p95/goal':>10}{'cpu ms':>9}")
    for row in rows:
        print(
            f"{row.job:<24}{row.median_ms:>10.2f}{row.p95_ms:>9.2f}"
            f"{row.p95_ms / LATENCY_GOAL_MS:>10.2f}{row.cpu_ms:>9.2f}"
        )

    print("\ndomains spanned: ours, stock kube-scheduler, fewest possible (racks: within a zone)")
    print(
        f"{'job':<24}{'level':<7}{'ours':>6}{'stock':>7}{'fewest':>8}"
        f"{'ours/fewest':>13}{'stock/ours':>12}"
    )
    for row in rows:
        for level, (ours, stock, fewest) in row.spans.items():
            name = "node" if level == LABEL_HOSTNAME else level_name(level)
            print(
                f"{row.job:<24}{name:<7}{ours:>6}{stock:>7}{fewest:>8}"
                f"{_ratio(ours, fewest):>13}{_ratio(stock, ours):>12}"
            )

    print(
        "(fewest racks counts GPUs, not nodes: placement minimises nodes first, so 1-GPU\n"
        " workers fill whole free nodes and may need a rack more than that bound)"
    )
    print("\nworker-ring edges (rank r -> r+1 mod n) that cross a boundary: ours vs stock")
    print(f"{'job':<24}{'level':<7}{'ours':>6}{'stock':>7}{'stock/ours':>12}")
    for row in rows:
        for level, (ours, stock) in row.edges.items():
            print(
                f"{row.job:<24}{level_name(level):<7}{ours:>6}{stock:>7}{_ratio(stock, ours):>12}"
            )


if __name__ == "__main__":
    main()
