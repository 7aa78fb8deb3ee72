"""The native hierarchical allreduce on 8 real Gloo processes, against torch.distributed.

One pool of 8 processes serves every test; 2x2 and 3x2 grids run on subgroups of it, which
also covers the group argument and rank mapping.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import torch
import torch.distributed as dist
from procs import GlooWorld, WorkerError, run_workers

WORLD: Final = 8
DTYPES: Final = (torch.float32, torch.float16, torch.bfloat16)
# 1 element up to several chunks, none divisible by the grids' inner sizes.
SIZES: Final = (1, 7, 1000, 65_537, 300_001)
# Several chunks (with a ragged, padded tail) for the larger sizes.
CHUNK_BYTES: Final = 1 << 16
# (grid, group ranks): subgroups use non-contiguous ranks so the mapping is exercised.
GRIDS: Final = {
    "2x2": ((2, 2), (1, 3, 5, 7)),
    "4x2": ((4, 2), tuple(range(8))),
    "2x2x2": ((2, 2, 2), tuple(range(8))),
    "3x2": ((3, 2), (2, 3, 4, 5, 6, 7)),
}
UNIT_ROUNDOFF: Final = {"BF16": 2.0**-8, "FP16": 2.0**-11}


@pytest.fixture(scope="module")
def world() -> Iterator[GlooWorld]:
    # DDP and the first optimizer step import much of torch (dynamo, sympy): once, here.
    preload = (
        "torch",
        "torch.distributed",
        "torch.nn.parallel",
        "torch._dynamo",
        "ddl_worker.allreduce",
    )
    with GlooWorld(WORLD, timeout=120, preload=preload) as pool:
        yield pool


def _group(ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
    """Every rank creates the group (new_group's rule); None means the default group."""
    if ranks == tuple(range(dist.get_world_size())):
        return None
    group: dist.ProcessGroup = dist.new_group(list(ranks))
    return group


def _integers(seed: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    # Small integers sum exactly in every dtype, so results must match bit for bit.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (size,), generator=g).to(dtype)


def case_matches_all_reduce(rank: int, world: int, grid_name: str, shared_memory: bool) -> int:
    from ddl_worker import allreduce as ar

    dims, ranks = GRIDS[grid_name]
    group = _group(ranks)
    if rank not in ranks:
        # Group creation is collective over the default group: mirror the two states the
        # members create below (one explicitly, one by their first allreduce call).
        for _ in range(2):
            ar.make_hook_state(dims, group=group, shared_memory=shared_memory)
        return 0
    state = ar.make_hook_state(dims, group=group, shared_memory=shared_memory)
    assert state.hierarchical is not None
    # One host: every tier below the slowest can share memory; the slowest is the network's.
    expected = ["shm" if shared_memory and d > 1 else "gloo" for d in dims[:-1]] + ["gloo"]
    assert state.hierarchical.transports() == expected
    # The segment's name is gone once every member mapped it: nothing for a crash to leak.
    import os

    assert not list(Path("/dev/shm").glob(f"ddl-tier-{os.getpid()}-*"))
    checked = 0
    for size in SIZES:
        for dtype in DTYPES:
            eps = torch.finfo(dtype).eps
            for op in ("sum", "avg"):
                ours = _integers(1000 * rank + size, size, dtype)
                ref = ours.clone()
                ar.allreduce(
                    ours,
                    dims,
                    op=op,
                    group=group,
                    chunk_bytes=CHUNK_BYTES,
                    shared_memory=shared_memory,
                )
                dist.all_reduce(ref, group=group)
                where = f"grid={grid_name} size={size} dtype={dtype} op={op}"
                if op == "sum":
                    assert torch.equal(ours, ref), where
                else:
                    # Scaled before the slow tier: two roundings in the data's dtype.
                    expected = (ref.double() / len(ranks)).to(dtype)
                    torch.testing.assert_close(
                        ours, expected, rtol=2 * eps, atol=4 * eps, msg=where
                    )
                checked += 1
    return checked


def case_random_float32(rank: int, world: int, size: int, grid_name: str) -> float:
    from ddl_worker import allreduce as ar

    dims = GRIDS[grid_name][0]
    g = torch.Generator().manual_seed(rank)
    ours = torch.randn(size, generator=g)
    ref = ours.clone()
    ar.allreduce(ours, dims, op="sum")
    dist.all_reduce(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    return float((ours - ref).abs().max())


def case_compression_bound(rank: int, world: int) -> dict[str, Any]:
    from ddl_worker import allreduce as ar

    dims = (4, 2)
    size = 100_003
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(size, generator=g) * (1 + 10 * torch.rand(size, generator=g))
    everyone = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone, x)
    stacked = torch.stack(everyone).double()
    report: dict[str, Any] = {}
    for compression in ("BF16", "FP16"):
        for op in ("sum", "avg"):
            scale = 1.0 if op == "sum" else 1.0 / world
            exact = stacked.sum(0) * scale
            ours = x.clone()
            ar.allreduce(ours, dims, op=op, compression=compression)
            error = (ours.double() - exact).abs()
            # Stated bound: slow-tier size x unit roundoff x sum of |inputs| (scaled), plus
            # float32 rounding of the intra-node sums.
            bound = (dims[-1] * UNIT_ROUNDOFF[compression] + 8 * 2.0**-24) * (
                stacked.abs().sum(0) * scale
            )
            assert bool((error <= bound).all()), (compression, op, float((error / bound).max()))
            assert float(error.max()) > 0, f"{compression} left the data uncompressed"
            report[f"{compression}-{op}"] = float((error / bound).max())
    return report


def case_slow_tier_bytes(rank: int, world: int) -> dict[str, dict[str, int]]:
    from ddl_worker import allreduce as ar

    dims = (4, 2)
    size = 1 << 20  # divisible by 8: no padding in the byte count
    out: dict[str, dict[str, int]] = {}
    for compression in ("None", "BF16"):
        before = ar.stats()
        ar.allreduce(torch.ones(size), dims, compression=compression)
        after = ar.stats()
        out[compression] = {
            tier: after[tier][0] - before.get(tier, (0, 0.0))[0] for tier in ("intra", "inter")
        }
        assert all(after[t][1] >= before.get(t, (0, 0.0))[1] for t in ("intra", "inter"))
    return out


def case_algorithms_agree(rank: int, world: int) -> dict[str, Any]:
    from ddl_worker import allreduce as ar

    dims = (4, 2)
    results: dict[str, Any] = {}
    for algorithm in ("Ring", "Auto"):
        state = ar.make_hook_state(dims, algorithm, "None", op="sum")
        for size in (5, 200_003):
            ours = _integers(rank + size, size, torch.float32)
            ref = ours.clone()
            fut = ar.submit(state, ours, "sum")
            fut.wait()
            dist.all_reduce(ref)
            assert torch.equal(ours, ref), (algorithm, size)
        results[algorithm] = {k: (v.alpha, v.beta) for k, v in state.fits.items()}
    return results


def case_boundary_errors(rank: int, world: int) -> list[str]:
    from ddl_worker import allreduce as ar

    messages = []
    with pytest.raises(ValueError, match="grid"):
        ar.make_hook_state((3, 2))
    with pytest.raises(ValueError, match="compression"):
        ar.make_hook_state((4, 2), compression="INT8")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="nccl-hierarchical") as error:
        ar.make_hook_state((4, 2), backend="nccl-hierarchical")
    messages.append(str(error.value))
    state = ar.make_hook_state((4, 2))
    with pytest.raises(RuntimeError, match="tensor: dtype must be float32") as error:
        ar.submit(state, torch.ones(8, dtype=torch.int64), "sum").wait()
    messages.append(str(error.value).splitlines()[0])
    assert state.hierarchical is not None
    with pytest.raises(RuntimeError, match="residual: must have"):
        torch.ops.ddl.allreduce_(torch.ones(64), state.hierarchical, "sum", "bf16", torch.ones(3))
    return messages


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(32, 64)
        self.out = torch.nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.out(torch.tanh(self.hidden(x)))
        return y


def case_training_curve(rank: int, world: int, compression: str, seed: int) -> list[float]:
    """Eval-set loss every few steps of a small DDP regression onto a random teacher net."""
    from torch.nn.parallel import DistributedDataParallel

    from ddl_worker import allreduce as ar

    torch.manual_seed(0)
    teacher = _Net()
    eval_x = torch.randn(512, 32)
    with torch.no_grad():
        eval_y = teacher(eval_x)
    torch.manual_seed(1)
    ddp = DistributedDataParallel(_Net(), bucket_cap_mb=0.004)  # several buckets
    state = ar.make_hook_state((4, 2), "Hierarchical", compression)  # type: ignore[arg-type]
    ddp.register_comm_hook(state, ar.hierarchical_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(seed * 1000 + rank)
    curve = []
    for step in range(80):
        x = torch.randn(32, 32, generator=data)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        if step % 5 == 4:
            with torch.no_grad():
                curve.append(float(torch.nn.functional.mse_loss(ddp.module(eval_x), eval_y)))
    if compression != "None":
        assert state.residuals, "no error-feedback residual was kept"
        assert any(float(r.abs().max()) > 0 for r in state.residuals.values())
    return curve


def case_peer_dies_mid_collective(rank: int, world: int, outcome: str) -> None:
    """Rank 1 exits; rank 0, its node-mate, waits for it in a shared-memory reduce-scatter
    and writes what happened to `outcome` (the test sees the world fail because of rank 1)."""
    import os
    import pathlib
    import time

    from ddl_worker import allreduce as ar

    state = ar.make_hook_state((2, 2), op="sum")
    assert state.hierarchical is not None and state.hierarchical.transports()[0] == "shm"
    if rank == 1:
        os._exit(3)
    if rank != 0:
        return
    messages = []
    start = time.monotonic()
    for _ in range(2):  # the second call finds the row marked failed
        try:
            ar.submit(state, torch.ones(1 << 16), "sum").wait()
            messages.append("no error")
        except RuntimeError as error:
            messages.append(str(error).splitlines()[0])
    pathlib.Path(outcome).write_text(f"{time.monotonic() - start:.2f}\n" + "\n".join(messages))


def case_rank_sum(rank: int, world: int) -> int:
    total = torch.tensor([rank])
    dist.all_reduce(total)
    return int(total)


def case_fail_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    return rank


def test_run_workers_returns_results_by_rank_and_reports_failures() -> None:
    assert run_workers(case_rank_sum, 3, timeout=60) == [3, 3, 3]
    with pytest.raises(WorkerError, match=r"rank 1 ---(.|\n)*on purpose"):
        run_workers(case_fail_on_rank_one, 2, timeout=60)


@pytest.mark.parametrize("transport", ["shm", "gloo"])
@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_matches_torch_all_reduce(world: GlooWorld, grid_name: str, transport: str) -> None:
    checked = world.run(case_matches_all_reduce, grid_name, transport == "shm")
    members = GRIDS[grid_name][1]
    assert all(checked[r] == len(SIZES) * len(DTYPES) * 2 for r in members)


def test_a_dead_node_mate_fails_the_collective_instead_of_hanging(tmp_path: Path) -> None:
    outcome = tmp_path / "rank0.txt"
    with pytest.raises(WorkerError, match="rank 1"):
        run_workers(case_peer_dies_mid_collective, 4, str(outcome), timeout=120)
    seconds, first, second = outcome.read_text().split("\n")
    assert "member 1" in first and "exited during a collective" in first, first
    assert "cannot be used again" in second, second
    assert float(seconds) < 5.0, f"rank 0 waited {seconds} s for a dead peer"


EXIT_WITH_WORK_IN_FLIGHT = """
import sys, datetime, torch, torch.distributed as dist
from torch._C._distributed_c10d import TCPStore
from ddl_worker import allreduce as ar
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = TCPStore("127.0.0.1", port, world, rank == 0, timeout=datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
state = ar.make_hook_state((2, 2), op="sum")
data = torch.ones(1 << 22)
futures = [ar.submit(state, data, "sum").then(lambda f: f.value()) for _ in range(3)]
print("submitted", flush=True)
"""  # and the interpreter exits with the allreduces (and their Python continuations) queued


def test_exiting_with_allreduces_in_flight_exits_cleanly(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "exit_in_flight.py"
    script.write_text(EXIT_WITH_WORK_IN_FLIGHT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), "4", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(4)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{out}"
        assert "submitted" in out and "terminate" not in out, out


def case_post_after_drain_is_refused(rank: int, world: int) -> str:
    from ddl_worker import allreduce as ar

    state = ar.make_hook_state((4, 2), op="sum")
    torch.ops.ddl.drain_communicators()
    with pytest.raises(RuntimeError, match="shut down") as error:
        ar.submit(state, torch.ones(8), "sum").wait()
    return str(error.value).splitlines()[0]


def test_an_allreduce_after_the_exit_drain_is_refused_clearly() -> None:
    messages = run_workers(case_post_after_drain_is_refused, 8, timeout=120)
    assert all("process is exiting" in m for m in messages), messages[0]


def case_large_integers(rank: int, world: int, size: int, dtype_name: str) -> bool:
    from ddl_worker import allreduce as ar

    dtype = getattr(torch, dtype_name)
    ours = _integers(rank, size, dtype)
    ref = ours.clone()
    ar.allreduce(ours, (4, 2), op="sum")
    dist.all_reduce(ref)
    return bool(torch.equal(ours, ref))


def test_tens_of_megabytes_float32(world: GlooWorld) -> None:
    # 40 MB per rank through the 3-tier schedule with its default chunking.
    errors = world.run(case_random_float32, 10_000_003, "2x2x2")
    assert max(errors) < 1e-4


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_tens_of_megabytes_16_bit(world: GlooWorld, dtype_name: str) -> None:
    # 20 MB per rank, not a multiple of the grid; small integers sum exactly in 16 bits.
    assert all(world.run(case_large_integers, 10_000_003, dtype_name))


def test_compression_within_stated_bound(world: GlooWorld) -> None:
    ratios = world.run(case_compression_bound)
    assert all(v <= 1.0 for r in ratios for v in r.values())


def test_only_a_quarter_of_the_data_crosses_the_slow_tier(world: GlooWorld) -> None:
    nbytes = 4 << 20
    per_rank = world.run(case_slow_tier_bytes)
    for counts in per_rank:
        # intra: reduce-scatter + all-gather over 4 ranks = 2 * 3/4 of the data.
        assert counts["None"]["intra"] == 2 * nbytes * 3 // 4
        # inter: allreduce over 2 of the quarter this rank owns = 2 * 1/2 * 1/4.
        assert counts["None"]["inter"] == nbytes // 4
        # BF16 on the slow tier halves it again.
        assert counts["BF16"]["inter"] == nbytes // 8
        assert counts["BF16"]["intra"] == counts["None"]["intra"]


def test_ring_and_auto_match_and_ranks_agree_on_auto(world: GlooWorld) -> None:
    fits = world.run(case_algorithms_agree)
    assert all(f == fits[0] for f in fits), "ranks fitted different Auto models"
    assert set(fits[0]["Auto"]) == {"flat", "hierarchical"}


def test_boundary_errors_name_the_argument(world: GlooWorld) -> None:
    messages = world.run(case_boundary_errors)
    assert "make install" in messages[0][0] or "pip install" in messages[0][0]


def test_error_feedback_keeps_loss_curve_within_noise(world: GlooWorld) -> None:
    baseline = world.run(case_training_curve, "None", 1)[0]
    other_data = world.run(case_training_curve, "None", 2)[0]
    compressed = world.run(case_training_curve, "BF16", 1)[0]
    assert baseline[-1] < 0.5 * baseline[0], f"the run did not learn: {baseline}"
    # Noise: how far two uncompressed runs on different data draws end up apart on the same
    # eval set, over the second half of training (floor: 1% of the loss).
    tail = slice(len(baseline) // 2, None)
    noise = max(
        max(abs(a - b) for a, b in zip(baseline[tail], other_data[tail], strict=True)),
        0.01 * baseline[-1],
    )
    drift = max(abs(a - b) for a, b in zip(baseline[tail], compressed[tail], strict=True))
    assert drift <= noise, (drift, noise, baseline, compressed)
    assert math.isfinite(compressed[-1])
