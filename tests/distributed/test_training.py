"""wrap()ed training on Gloo equals single-process training; the example job learns locally."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from prometheus_client import REGISTRY
from torch import nn

from ddl_worker.checkpoint import Checkpointer

from workerutil import EXAMPLE_MANIFEST, job_log, read_json, start_local_job

GLOBAL_BATCH = 9  # odd: two ranks get 5 and 4 samples, so Batch.weight matters
STEPS = 4
SAMPLES = 36


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(SAMPLES, 2, 6, 6, generator=generator), torch.randint(
        0, 3, (SAMPLES,), generator=generator
    )


def worker_main(out: Path) -> None:
    """One rank: the same model and data, trained through ddl_worker.wrap on its share."""
    import ddl_worker

    rt = ddl_worker.init()
    net = tiny_model()
    if rt.rank == 1:  # DDP must start every rank from rank 0's parameters
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.add_(1.0)
    model = ddl_worker.wrap(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ddl_worker.ElasticSampler(SAMPLES, GLOBAL_BATCH, seed=5)
    images, targets = data()
    loop = ddl_worker.steps(STEPS)
    for _ in loop:
        batch = sampler.next_batch()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[batch.indices]), targets[batch.indices])
        (loss * batch.weight).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        loop.record(len(batch.indices), loss.item())
    torch.save(net.state_dict(), out / f"rank{rt.rank}.pt")
    labels = {"job": "local", "namespace": "default", "rank": str(rt.rank), "node": ""}
    counted = {}
    for tier in ("flat", "intra", "inter"):
        found = REGISTRY.get_sample_value("ddl_allreduce_bytes_total", {**labels, "tier": tier})
        if found is not None:
            seconds = REGISTRY.get_sample_value(
                "ddl_allreduce_seconds_total", {**labels, "tier": tier}
            )
            counted[tier] = (found, seconds)
    (out / f"rank{rt.rank}.json").write_text(json.dumps(counted))


def reference_parameters() -> dict[str, torch.Tensor]:
    """Single process, the whole global batch, plain mean loss."""
    from ddl_worker.sampler import ElasticSampler

    net = tiny_model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    sampler = ElasticSampler(SAMPLES, GLOBAL_BATCH, seed=5, rank=0, world_size=1)
    images, labels = data()
    for _ in range(STEPS):
        batch = sampler.next_batch()
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images[batch.indices]), labels[batch.indices])
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return net.state_dict()


@pytest.mark.parametrize(
    ("algorithm", "grid"),
    [("Ring", "2"), ("Hierarchical", "2x2")],
)
def test_wrapped_training_on_gloo_matches_single_process(
    tmp_path: Path, algorithm: str, grid: str
) -> None:
    """Ring: DDP's flat allreduce; Hierarchical: the native hook on a 2x2 grid."""
    world_size = math.prod(int(d) for d in grid.split("x"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = {
        **os.environ,
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DDL_ALLREDUCE_ALGORITHM": algorithm,
        "DDL_GRID": grid,
        "DDL_RENDEZVOUS_TIMEOUT": "60",
        "OMP_NUM_THREADS": "1",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(tmp_path)],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r % 2)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0] * world_size, "\n".join(outputs)

    expected = reference_parameters()
    initial = tiny_model().state_dict()
    for rank in range(world_size):
        trained = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            assert not torch.allclose(value, initial[name]), f"{name} did not train"
            torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)

    parameter_bytes = sum(v.numel() * v.element_size() for v in expected.values())
    for rank in range(world_size):
        counted = json.loads((tmp_path / f"rank{rank}.json").read_text())
        if algorithm == "Ring":
            # What a ring sends per rank, 2(p-1)/p = 1 of the gradients, every step.
            assert counted["flat"][0] == STEPS * parameter_bytes
            assert counted["flat"][1] > 0
        else:
            # The native hook's tiers; the flat tier is not counted a second time.
            assert set(counted) == {"intra", "inter"}
            assert all(nbytes > 0 and seconds > 0 for nbytes, seconds in counted.values())


def test_example_job_trains_to_a_falling_loss_locally(tmp_path: Path) -> None:
    """The shipped manifest as is: 2 workers x 2 processes on CPU, under a minute."""
    work = tmp_path / "run"
    started = time.monotonic()
    job = start_local_job(EXAMPLE_MANIFEST, work)
    code = job.wait(timeout=180)
    wall = time.monotonic() - started
    print(f"example job: exit {code} in {wall:.1f}s")
    assert code == 0, job_log(work)
    summary = read_json(work / "summary.json")
    print(f"example job: final loss {summary['finalLoss']:.3f} at step {summary['finalStep']}")
    assert summary["finalStep"] == 200
    assert summary["finalLoss"] < 1.0, "loss did not fall from ~2.3 (chance for 10 classes)"
    final = Checkpointer(work / "checkpoints").read(200)
    assert {"model", "optimizer", "sampler"} <= set(final.state)
    assert wall < 60, f"took {wall:.0f}s"


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]))
