"""Example training script: a small ResNet-style CNN on synthetic images, with the ddl_worker API.

The images are made here from a fixed seed (nothing is downloaded): each of 10 classes has a
random prototype pattern; a sample is its class's prototype, shifted a little, plus noise.
Run it through the agent, e.g. `python -m ddl_worker run examples/resnet-job.yaml --local`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ddl_worker

CLASSES = 10
IMAGE_SIZE = 16
NOISE = 0.5
MAX_SHIFT = 2
# The emulated device's clock tick: short against a step, long against a sleep's overhead.
DEVICE_TICK_SECONDS = 0.001


def synthetic_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [count, 3, 16, 16], labels [count]), the same on every rank for a seed."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(CLASSES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    offsets = range(-MAX_SHIFT, MAX_SHIFT + 1)
    # Every prototype under every (dy, dx) shift, then one of those per sample.
    shifted = torch.stack(
        [torch.roll(prototypes, shifts=(dy, dx), dims=(2, 3)) for dy in offsets for dx in offsets]
    )
    choice = torch.randint(0, len(shifted), (count,), generator=generator)
    images = shifted[choice, labels] + NOISE * torch.randn(
        count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator
    )
    return images, labels


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (1x1 projection when the shape changes).

    GroupNorm instead of BatchNorm: its result does not depend on how the global batch is
    split across ranks, so a re-form to another world size does not change the training.
    """

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(4, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(4, channels_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.skip = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.GroupNorm(4, channels_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.skip(x))


class SmallResNet(nn.Module):
    """`hidden` > 0 puts a wide hidden layer in the head: many parameters for little compute,
    so benchmarks can make the gradient exchange, not the CPU, the bottleneck."""

    def __init__(self, classes: int = CLASSES, hidden: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.GroupNorm(4, 16), nn.ReLU()
        )
        self.blocks = nn.Sequential(ResidualBlock(16, 16, 1), ResidualBlock(16, 32, 2))
        self.head: nn.Module = (
            nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, classes))
            if hidden
            else nn.Linear(32, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.blocks(self.stem(x))
        logits: torch.Tensor = self.head(features.mean(dim=(2, 3)))
        return logits


def run_on_device(seconds: float) -> None:
    """Stand-in for accelerator time on a machine whose "GPUs" are only counted.

    The time passes in short ticks that each count once, however long the tick took: the
    emulated device advances only while the process runs, so a node slowed by the local
    cluster's freeze knob slows it as a throttled GPU would, and it costs none of the host's
    CPU (two cores can stand in for eight devices computing at once).
    """
    for _ in range(round(seconds / DEVICE_TICK_SECONDS)):
        time.sleep(DEVICE_TICK_SECONDS)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200, help="training steps in total")
    parser.add_argument("--global-batch", type=int, default=48, help="samples per step, all ranks")
    parser.add_argument("--samples", type=int, default=4800, help="synthetic dataset size")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=1234, help="data and model seed")
    parser.add_argument(
        "--hidden", type=int, default=0, help="width of a hidden head layer (0: none)"
    )
    parser.add_argument(
        "--device-ms-per-sample",
        type=float,
        default=0.0,
        help="emulated accelerator time per sample on top of the CPU's work (0: none); "
        "makes a job compute-bound without taking the host's cores",
    )
    parser.add_argument(
        "--max-steps-per-second",
        type=float,
        default=0.0,
        help="pace training to at most this rate (0: as fast as it goes); the demo uses it so "
        "its story fits in about a minute on fast machines too",
    )
    parser.add_argument(
        "--hold-at-step",
        type=int,
        default=-1,
        help="before this step, wait until --hold-file exists (for tests and demos that act "
        "mid-training); a stop request (new epoch, pod ending) ends the wait",
    )
    parser.add_argument("--hold-file", type=Path, help="the file that releases the hold")
    return parser.parse_args()


def hold(rt: ddl_worker.Runtime, step: int, release: Path) -> None:
    """Wait at step until release exists; rank 0 says where it waits in release + '.held'.

    The marker ({epoch, step, worldSize}) tells an outside observer that training is
    mid-run and where, so it can act (kill, scale) without racing the job's end.
    """
    if rt.rank == 0:
        marker = release.with_name(release.name + ".held")
        temp = marker.with_name(f".{marker.name}.{os.getpid()}")
        temp.write_text(
            json.dumps({"epoch": rt.env.epoch, "step": step, "worldSize": rt.world_size})
        )
        temp.replace(marker)
    while not release.exists() and rt.control.requested is None:
        time.sleep(0.05)


def main() -> None:
    args = parse_args()
    rt = ddl_worker.init()
    images, labels = synthetic_images(args.samples, args.seed)
    torch.manual_seed(args.seed)
    net = SmallResNet(hidden=args.hidden)
    model = ddl_worker.wrap(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    sampler = ddl_worker.ElasticSampler(len(images), args.global_batch, seed=args.seed)

    start = 0
    resumed = ddl_worker.load_latest()
    if resumed is not None:
        net.load_state_dict(resumed.state["model"])
        optimizer.load_state_dict(resumed.state["optimizer"])
        sampler.load_state_dict(resumed.state["sampler"])
        start = resumed.step

    def state() -> dict[str, object]:
        return {
            "model": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
        }

    began = time.perf_counter()
    loop = ddl_worker.steps(args.steps, start=start, state=state)
    loss = torch.tensor(float("nan"))
    for step in loop:
        if step == args.hold_at_step and args.hold_file and not args.hold_file.exists():
            hold(rt, step, args.hold_file)
        batch = sampler.next_batch()
        x = images[batch.indices].to(rt.device)
        y = labels[batch.indices].to(rt.device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if args.device_ms_per_sample > 0:
            run_on_device(len(batch.indices) * args.device_ms_per_sample / 1000.0)
        (loss * batch.weight).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        loop.record(len(batch.indices), loss.item())
        if args.max_steps_per_second > 0:
            due = began + (step + 1 - start) / args.max_steps_per_second
            time.sleep(max(0.0, due - time.perf_counter()))
    if rt.rank == 0:
        print(
            f"finished at step {loop.total} (from {start}) in {time.perf_counter() - began:.1f}s, "
            f"last loss {loss.item():.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
