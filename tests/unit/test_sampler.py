"""ElasticSampler: every sample once per epoch, whatever the world size does mid-epoch."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_worker.sampler import ElasticSampler, shard_bounds


def global_batch(samplers: list[ElasticSampler]) -> list[int]:
    """One step on every rank; the union of their shares, in rank order."""
    indices: list[int] = []
    for sampler in samplers:
        indices += sampler.next_batch().indices
    return indices


def run_phases(num_samples: int, batch: int, phases: list[tuple[int, int]]) -> list[list[int]]:
    """Train through (world size, steps) phases, re-forming from rank 0's state between them."""
    state = None
    batches = []
    for world_size, step_count in phases:
        samplers = [
            ElasticSampler(num_samples, batch, seed=7, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        if state is not None:
            for sampler in samplers:
                sampler.load_state_dict(state)
        for _ in range(step_count):
            batches.append(global_batch(samplers))
        states = [s.state_dict() for s in samplers]
        assert all(s == states[0] for s in states), "ranks disagree on the sampler state"
        state = states[0]
    return batches


@pytest.mark.parametrize(
    ("num_samples", "batch", "phases"),
    [
        (103, 10, [(3, 4), (2, 3), (5, 4)]),  # 11 steps: exactly one epoch, last batch of 3
        (96, 12, [(4, 3), (1, 2), (3, 3)]),  # divisible everywhere
        (50, 7, [(2, 1), (7, 2), (3, 5)]),  # shares of 0 and 1 sample
    ],
)
def test_world_size_change_mid_epoch_never_drops_or_repeats(
    num_samples: int, batch: int, phases: list[tuple[int, int]]
) -> None:
    batches = run_phases(num_samples, batch, phases)
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(num_samples))


@settings(max_examples=150, deadline=None)
@given(
    num_samples=st.integers(1, 200),
    batch=st.integers(1, 40),
    phases=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 12)), min_size=1, max_size=6),
)
def test_any_resharding_sequence_covers_each_epoch_exactly_once(
    num_samples: int, batch: int, phases: list[tuple[int, int]]
) -> None:
    batches = run_phases(num_samples, batch, phases)
    steps_per_epoch = -(-num_samples // batch)
    complete = len(batches) // steps_per_epoch
    for epoch in range(complete + 1):
        chunk = batches[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
        seen = [i for b in chunk for i in b]
        assert len(seen) == len(set(seen)), f"epoch {epoch} repeats a sample"
        if len(chunk) == steps_per_epoch:
            assert sorted(seen) == list(range(num_samples)), f"epoch {epoch} drops a sample"


def test_global_batches_do_not_depend_on_world_size() -> None:
    single = run_phases(90, 9, [(1, 15)])
    split = run_phases(90, 9, [(4, 15)])
    assert [sorted(b) for b in single] == [sorted(b) for b in split]


def test_weights_turn_per_rank_means_into_the_global_mean() -> None:
    rng = random.Random(3)
    losses = [rng.random() for _ in range(23)]
    world_size = 4
    samplers = [
        ElasticSampler(23, 23, shuffle=False, rank=r, world_size=world_size) for r in range(4)
    ]
    shares = [s.next_batch() for s in samplers]
    # What DDP computes: the average over ranks of each rank's weighted mean loss.
    ddp = sum(b.weight * sum(losses[i] for i in b.indices) / len(b.indices) for b in shares)
    assert ddp / world_size == pytest.approx(sum(losses) / len(losses))


def test_order_is_fixed_by_seed_and_epoch() -> None:
    first = ElasticSampler(20, 20, seed=1)
    again = ElasticSampler(20, 20, seed=1)
    other = ElasticSampler(20, 20, seed=2)
    epoch0 = first.next_batch().indices
    assert epoch0 == again.next_batch().indices
    assert epoch0 != other.next_batch().indices
    epoch1 = first.next_batch()
    assert epoch1.epoch == 1 and epoch1.indices != epoch0
    assert sorted(epoch1.indices) == sorted(epoch0)


def test_state_from_other_data_is_refused() -> None:
    state = ElasticSampler(100, 10).state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        ElasticSampler(99, 10).load_state_dict(state)


@pytest.mark.parametrize("size,world", [(10, 3), (2, 5), (0, 2), (7, 7)])
def test_shards_tile_the_batch(size: int, world: int) -> None:
    bounds = [shard_bounds(size, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
