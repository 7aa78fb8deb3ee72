"""Elastic data sampler: a fixed global batch order, re-sharded by the current world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist


@dataclass(frozen=True)
class Batch:
    """This rank's share of one global batch.

    weight makes a per-rank mean loss add up to the global-batch mean after DDP averages
    gradients over ranks (it is 1 when the global batch divides evenly): multiply the loss by it.
    """

    indices: list[int]
    weight: float
    global_size: int
    epoch: int


class ElasticSampler:
    """Hands out global batches in a per-epoch order that depends only on seed and epoch.

    The state is (epoch, global samples consumed in that epoch), so it means the same thing at
    any world size: after a re-form with more or fewer ranks, the next global batch starts
    exactly where the last one ended, and each global batch is split across the ranks of the
    moment. No sample is dropped or repeated within an epoch, whatever the world size does.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if num_samples < 1 or global_batch_size < 1:
            raise ValueError("num_samples and global_batch_size must be >= 1")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.epoch = 0
        self.consumed = 0
        self._order_epoch = -1
        self._order: np.ndarray[Any, np.dtype[np.int64]] = np.empty(0, dtype=np.int64)

    def next_batch(self) -> Batch:
        """This rank's indices of the next global batch; rolls into the next epoch at the end.

        The last global batch of an epoch is the remainder when num_samples does not divide by
        the global batch size; with fewer samples left than ranks some ranks get none.
        """
        if self.consumed >= self.num_samples:
            self.epoch += 1
            self.consumed = 0
        order = self._epoch_order()
        start = self.consumed
        size = min(self.global_batch_size, self.num_samples - start)
        lo, hi = shard_bounds(size, self.rank, self.world_size)
        indices = order[start + lo : start + hi].tolist()
        self.consumed += size
        return Batch(
            indices=indices,
            weight=self.world_size * len(indices) / size,
            global_size=size,
            epoch=self.epoch,
        )

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where state was taken, at the current world size."""
        for key in ("seed", "num_samples", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}: "
                    "resuming would change the data order"
                )
        if not 0 <= state["consumed"] <= self.num_samples:
            raise ValueError(f"sampler state consumed={state['consumed']} is out of range")
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]

    def _epoch_order(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order = rng.permutation(self.num_samples).astype(np.int64)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = self.epoch
        return self._order


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of size items; shares differ by at most one."""
    base, extra = divmod(size, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)
