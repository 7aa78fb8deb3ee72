"""Goodput on the local cluster, in one run: straggler replacement and throughput-driven sizing.

Run: .venv/bin/python benchmarks/goodput_bench.py [--only straggler|sizing]   (root; `make k8s`)

Starts the local cluster of examples/goodput-cluster.yaml (2 racks x 4 nodes x 2 "GPUs", node
uplinks shaped to 200 Mbit/s) with the operator from the chart, then trains real jobs
(ddl_localcluster/goodput.py) and prints:
  1. samples/s of a 3-worker job before one worker's node is slowed to half speed, while it is,
     and after the operator replaced that worker (spec.stragglers Replace) in the same rack;
     "Report" (today's default) would stay at the slowed figure;
  2. samples/s at each size a communication-heavy and a compute-heavy elastic job (1..3
     workers) tried under elastic.scaling Throughput, the size each stays at, and the
     communication-heavy job under the default policy (Replicas: all 3 workers) side by side.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ddl_localcluster import demo, goodput
from ddl_localcluster.controlplane import ControlPlane


def say(msg: str) -> None:
    print(f"[goodput {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def straggler_table(f: goodput.StragglerFigures) -> list[str]:
    base = f.before.samples_per_second
    rows = [
        ("before", f.before),
        (f"{f.slow_node} at half speed", f.slowed),
        (f"after replacement on {f.replacement_node} ({f.replacement_rack})", f.after),
    ]
    return [
        f"Straggler replacement: 3 workers x 2 GPUs in {f.gang_rack}",
        "| phase | samples/s | vs before | steps |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {what} | {r.samples_per_second:.1f} | {r.samples_per_second / base:.2f} "
            f"| {r.first}-{r.last} ({r.count} readings) |"
            for what, r in rows
        ),
        f"replaced {f.steps_to_replace} steps after the slowdown (forSteps {f.for_steps}); "
        f"training again {f.pause_seconds:.0f}s after the decision; recovered to "
        f"{f.recovered:.0%} of before; ranks of each node and rack contiguous after it: "
        f"{'yes' if f.packed else 'NO'}",
    ]


def sizing_table(runs: list[goodput.SizingFigures], stock: goodput.Reading | None) -> list[str]:
    sizes = sorted({t.workers for r in runs for t in r.tried} | {r.replicas for r in runs})
    lines = [
        "Throughput sizing (elastic 1..3 workers x 2 GPUs, scalingGain 0.5): samples/s per size",
        "| job | "
        + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in sizes)
        + " | stays at | ours/Replicas |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: |",
    ]
    for r in runs:
        cells = []
        for w in sizes:
            t = next((t for t in r.tried if t.workers == w), None)
            cells.append(
                "-"
                if t is None
                else f"{t.samples_per_second:.1f}" + ("" if t.kept else " (rejected)")
            )
        replicas_rate = (
            r.at(r.replicas) if r.kind == "compute" or stock is None else stock.samples_per_second
        )
        ratio = "-" if not replicas_rate else f"{r.final.samples_per_second / replicas_rate:.2f}"
        lines.append(
            f"| {r.kind}-heavy | " + " | ".join(cells) + f" | {r.final_workers} "
            f"({r.final.samples_per_second:.1f}) | {ratio} |"
        )
    if stock is not None:
        lines.append(f"communication-heavy under scaling Replicas (grows to 3 at once): {stock}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["straggler", "sizing"], help="run one part")
    parser.add_argument("--dir", type=Path, help="cluster state directory (default: a temp dir)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="ddl-goodput-"))
    cp = ControlPlane(work / "cluster")
    checkpoints = work / "checkpoints"
    began = time.monotonic()
    out: list[str] = []
    try:
        demo.start_cluster(cp, goodput.CLUSTER)
        if args.only in (None, "straggler"):
            figures = goodput.straggler_run(cp, "default", checkpoints, say, fraction=0.5)
            out += [*straggler_table(figures), ""]
        if args.only in (None, "sizing"):
            runs = [
                goodput.sizing_run(cp, "default", checkpoints, kind, say)
                for kind in ("communication", "compute")
            ]
            stock = goodput.fixed_size_run(cp, "default", checkpoints, "communication", say)
            out += sizing_table(runs, stock)
    finally:
        cp.stop()
    print("\n".join(out))
    print(f"({time.monotonic() - began:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
