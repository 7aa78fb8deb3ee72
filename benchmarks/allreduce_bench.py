"""Allreduce on two simulated nodes joined by a shaped link: flat vs hierarchical (+BF16, Auto).

Two network namespaces stand for two hosts, joined by a veth pair shaped with
`tc ... tbf rate 200mbit burst 32kb latency 50ms` on both ends; each runs 4 ranks on Gloo
(grid 4x2: 4 ranks per node, 2 nodes). First a plain TCP stream measures what the link
really carries; then, for each message size, it times torch's flat Gloo allreduce, the native
hierarchical one, the same with BF16 on the slow tier, and Auto, in rotating order over
several rounds (best of the rounds), and prints bus bandwidth (nccl-tests' definition:
algbw * 2(n-1)/n), the ratios to flat, and an alpha-beta prediction next to each measurement.
Needs root (ip netns, tc); traffic stays on loopback and the namespaces it creates, which are
removed on exit.

    sudo .venv/bin/python benchmarks/allreduce_bench.py [--sizes 64K,1M,8M,64M,256M]
        [--rate 200mbit] [--rounds 3]
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Final

RANKS_PER_NODE: Final = 4
NODES: Final = 2
WORLD: Final = RANKS_PER_NODE * NODES
SUBNET: Final = "10.213.7"
PORT: Final = 29531
VARIANTS: Final = ("flat", "ours", "ours+bf16", "auto")
# Seconds of timed iterations per (size, variant, round) after one warm-up.
TIME_BUDGET: Final = 1.0
MAX_ITERATIONS: Final = 20
PROBE_PORT: Final = 29532
# Bytes the link probe streams: a few seconds at 200 Mbit/s.
PROBE_BYTES: Final = 48 << 20
# The goals, checked in the summary.
GOAL_OURS: Final = 1.6
GOAL_BF16: Final = 3.0
GOAL_AUTO: Final = 0.95
GOAL_MODEL_ERROR: Final = 0.15


@dataclass(frozen=True)
class Link:
    bytes_per_second: float
    rate: str


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_rate(text: str) -> Link:
    scale = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, factor in scale.items():
        if text.endswith(suffix):
            return Link(float(text.removesuffix(suffix)) * factor / 8, text)
    raise SystemExit(f"--rate: expected e.g. 200mbit, got {text!r}")


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes} GB"


# ---------------------------------------------------------------- orchestrator (root) --


class Namespaces:
    """Two namespaces joined by a shaped veth pair; removed by close() or at exit."""

    def __init__(self, rate: str) -> None:
        tag = str(os.getpid())[-6:]
        self.names = (f"ddlbench{tag}a", f"ddlbench{tag}b")
        self.devices = (f"vdb{tag}a", f"vdb{tag}b")
        self.addresses = (f"{SUBNET}.1", f"{SUBNET}.2")
        self.rate = rate
        self._created: list[str] = []

    def _ip(self, *args: str, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True)

    def create(self) -> None:
        for name in self.names:
            self._ip("ip", "netns", "add", name)
            self._created.append(name)
        a, b = self.devices
        self._ip("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for name, device, address in zip(self.names, self.devices, self.addresses, strict=True):
            self._ip("ip", "link", "set", device, "netns", name)
            self._ip("ip", "addr", "add", f"{address}/24", "dev", device, netns=name)
            self._ip("ip", "link", "set", device, "up", netns=name)
            self._ip("ip", "link", "set", "lo", "up", netns=name)
            self._ip(
                "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", self.rate,
                "burst", "32kb", "latency", "50ms", netns=name,
            )  # fmt: skip

    def close(self) -> None:
        while self._created:
            name = self._created.pop()
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def measure_link(nets: Namespaces) -> float:
    """Bytes per second a single TCP stream moves across the shaped link (after slow start).

    The model uses this rather than the tc rate: TCP/IP headers and the shaper's burst
    accounting take a few percent that no allreduce can get back.
    """
    server = subprocess.Popen(
        ["ip", "netns", "exec", nets.names[1], sys.executable, __file__, "--probe-server"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        server.stdout.readline()  # "listening"
        client = subprocess.run(
            ["ip", "netns", "exec", nets.names[0], sys.executable, __file__,
             "--probe-client", nets.addresses[1]],
            capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        return float(client.stdout.strip())
    finally:
        server.kill()
        server.wait()


def probe_server() -> None:
    with socket.create_server(("0.0.0.0", PROBE_PORT)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1 << 20):
                pass
            conn.sendall(b"k")


def probe_client(address: str) -> None:
    block = b"\0" * (1 << 20)
    with socket.create_connection((address, PROBE_PORT), timeout=60) as conn:
        for _ in range(8):  # past slow start and the shaper's initial burst
            conn.sendall(block)
        start = time.perf_counter()
        for _ in range(PROBE_BYTES >> 20):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        print(PROBE_BYTES / (time.perf_counter() - start))


def orchestrate(args: argparse.Namespace) -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        raise SystemExit("allreduce_bench: needs root with `ip` and `tc` (network namespaces)")
    link = parse_rate(args.rate)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    nets = Namespaces(args.rate)
    procs: list[subprocess.Popen[bytes]] = []

    def cleanup() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        nets.close()

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nets.create()
    measured = measure_link(nets)
    print(
        f"link: tc {link.rate} = {link.bytes_per_second / 1e6:.1f} MB/s per direction; "
        f"a TCP stream measured {measured / 1e6:.1f} MB/s ({measured / link.bytes_per_second:.0%})",
        flush=True,
    )
    link = Link(measured, link.rate)
    with tempfile.TemporaryDirectory() as scratch:
        results_path = Path(scratch) / "results.json"
        for rank in range(WORLD):
            node = rank // RANKS_PER_NODE
            env = dict(
                os.environ,
                GLOO_SOCKET_IFNAME=nets.devices[node],
                OMP_NUM_THREADS="1",
                TORCH_CPP_LOG_LEVEL="ERROR",  # namespaces have no hostname entries to resolve
            )
            worker = ["--worker", str(rank), "--master", nets.addresses[0]]
            worker += ["--sizes", ",".join(map(str, sizes)), "--results", str(results_path)]
            worker += ["--rounds", str(args.rounds)]
            enter = ["ip", "netns", "exec", nets.names[node]]
            procs.append(subprocess.Popen([*enter, sys.executable, __file__, *worker], env=env))
        deadline = time.monotonic() + args.timeout
        for proc in procs:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise SystemExit(f"allreduce_bench: a worker exited with {code}")
        report(json.loads(results_path.read_text()), link)
    cleanup()


def predicted_seconds(variant: str, nbytes: int, link: Link, alpha: float) -> float:
    """Alpha-beta model of the slow link: beta from the measured link, alpha fitted at the
    smallest size (so the model is judged on the other sizes).

    Flat ring over 8 ranks, 4 per node: one ring edge crosses the link in each direction
    and carries 2(p-1)/p of the data. Hierarchical: each rank sends 2(N-1)/N of its quarter
    over the link, the 4 ranks of a node side by side, so the link carries 2(N-1)/N of the
    data per direction; BF16 halves that. Intra-node traffic is memory-speed and overlapped.
    """
    if variant == "flat":
        link_bytes = 2 * (WORLD - 1) / WORLD * nbytes
    else:
        link_bytes = 2 * (NODES - 1) / NODES * nbytes
        if variant == "ours+bf16":
            link_bytes /= 2
    return alpha + link_bytes / link.bytes_per_second


def report(results: dict[str, dict[str, float]], link: Link) -> None:
    """Prints the table; results[size][variant] = seconds, [size]["auto_choice"] = algorithm."""
    sizes = sorted(int(s) for s in results)
    smallest = sizes[0]
    alpha = {
        v: results[str(smallest)][v] - predicted_seconds(v, smallest, link, 0.0) for v in VARIANTS
    }
    bus = 2 * (WORLD - 1) / WORLD
    print(
        f"\n{WORLD} ranks = {NODES} nodes x {RANKS_PER_NODE}, link {link.rate} "
        f"({link.bytes_per_second / 1e6:.1f} MB/s measured); busbw = size/time * {bus:.2f}"
    )
    print(
        f"{'size':>9} {'variant':>10} {'time ms':>9} {'busbw MB/s':>11} {'of link':>8} "
        f"{'model ms':>9} {'meas/model':>10} {'vs flat':>8}"
    )
    errors: list[float] = []
    for size in sizes:
        row = results[str(size)]
        for variant in VARIANTS:
            seconds = row[variant]
            model = predicted_seconds(variant, size, link, max(alpha[variant], 0.0))
            if size != smallest:
                errors.append(abs(seconds / model - 1))
            busbw = size / seconds * bus
            print(
                f"{human(size):>9} {variant:>10} {seconds * 1e3:>9.1f} "
                f"{busbw / 1e6:>11.1f} {busbw / link.bytes_per_second:>8.0%} "
                f"{model * 1e3:>9.1f} {seconds / model:>10.2f} {row['flat'] / seconds:>7.2f}x"
                + (f"  (chose {row['auto_choice']})" if variant == "auto" else "")
            )
    print("\ngoals (sizes >= 64 MB for the speed-ups):")
    large = [s for s in sizes if s >= 64 << 20] or sizes[-1:]

    def check(name: str, value: float, goal: float, at_most: bool = False) -> None:
        met = value <= goal if at_most else value >= goal
        sign = "<=" if at_most else ">="
        print(f"  {name:<44} {value:6.2f}   goal {sign} {goal:.2f}   {'met' if met else 'NOT MET'}")

    for size in large:
        row = results[str(size)]
        check(f"ours / flat at {human(size)}", row["flat"] / row["ours"], GOAL_OURS)
        check(f"ours+bf16 / flat at {human(size)}", row["flat"] / row["ours+bf16"], GOAL_BF16)
    worst = min(
        min(results[str(s)]["flat"], results[str(s)]["ours"]) / results[str(s)]["auto"]
        for s in sizes
    )
    check("Auto / better of flat and ours, worst size", worst, GOAL_AUTO)
    if errors:
        check(
            "model error |meas/model - 1|, median",
            statistics.median(errors),
            GOAL_MODEL_ERROR,
            at_most=True,
        )


# ----------------------------------------------------------------- worker (namespace) --


def work(rank: int, master: str, sizes: list[int], results: Path, rounds: int) -> None:
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import TCPStore

    from ddl_worker import allreduce as ar

    torch.set_num_threads(1)
    store = TCPStore(master, PORT, WORLD, rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    grid = (RANKS_PER_NODE, NODES)
    ours = ar.make_hook_state(grid, "Hierarchical", op="sum")
    # BF16 as training uses it: with error feedback (one residual, like one DDP bucket).
    ours_bf16 = ar.make_hook_state(grid, "Hierarchical", "BF16", op="sum")
    auto = ar.make_hook_state(grid, "Auto", op="sum")
    runs: dict[str, Callable[[torch.Tensor], object]] = {
        "flat": lambda t: dist.all_reduce(t),
        "ours": lambda t: ar.submit(ours, t).wait(),
        "ours+bf16": lambda t: ar.submit(ours_bf16, t, residual_key=0).wait(),
        "auto": lambda t: ar.submit(auto, t).wait(),
    }
    table: dict[str, dict[str, float | str]] = {}
    for size in sizes:
        data = torch.ones(size // 4)
        best = dict.fromkeys(runs, float("inf"))
        for run in runs.values():
            run(data)  # warm-up: first-call set-up stays out of the timings
        # Rounds in rotating order, best of each variant: drift in machine load hits all alike.
        for r in range(rounds):
            order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
            for variant in order:
                run = runs[variant]
                dist.barrier()
                start = time.perf_counter()
                run(data)
                one = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(one, op=dist.ReduceOp.MAX)
                best[variant] = min(best[variant], float(one))
                iterations = min(MAX_ITERATIONS, int(TIME_BUDGET / max(float(one), 1e-6)))
                if iterations < 2:
                    continue
                dist.barrier()
                start = time.perf_counter()
                for _ in range(iterations):
                    run(data)
                elapsed = torch.tensor([(time.perf_counter() - start) / iterations])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                best[variant] = min(best[variant], float(elapsed))
        table[str(size)] = dict(best)
        table[str(size)]["auto_choice"] = auto.communicator_for(size)[0]
        if rank == 0:
            print(f"  measured {human(size)}", flush=True)
    if rank == 0:
        results.write_text(json.dumps(table))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="64K,1M,8M,64M,256M", help="comma-separated, e.g. 64K,256M"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per size (best of)")
    parser.add_argument("--rate", default="200mbit", help="tc rate of the inter-node link")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the workers")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--master", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe-client", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_server:
        probe_server()
    elif args.probe_client:
        probe_client(args.probe_client)
    elif args.worker is None:
        orchestrate(args)
    else:
        sizes = [int(s) for s in args.sizes.split(",")]
        work(args.worker, args.master, sizes, Path(args.results), args.rounds)


if __name__ == "__main__":
    main()
