"""Tests of the goodput decisions: straggler replacement in its domain, and throughput sizing."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import pytest

from ddl_operator.api.constants import (
    DEFAULT_TOPOLOGY_LEVELS,
    LABEL_HOSTNAME,
    LABEL_NVLINK_DOMAIN,
    LABEL_RACK,
    LABEL_ZONE,
)
from ddl_operator.api.models import Member, Rendezvous
from ddl_operator.core.goodput import (
    Keep,
    Observed,
    Replace,
    SizeRecord,
    SizingPolicy,
    SizingState,
    StragglerPolicy,
    StragglerState,
    StragglerVerdict,
    avoiding,
    best_size,
    choose_replacement_node,
    needed_throughput,
    replaced,
    size_by_throughput,
    slowest,
    watch_stragglers,
)
from ddl_operator.core.reports import WorkerReport
from ddl_operator.core.topology import NodeInfo

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
LEVELS = DEFAULT_TOPOLOGY_LEVELS
POLICY = StragglerPolicy(
    threshold=1.2,
    for_steps=10,
    min_observations=3,
    cool_down=dt.timedelta(minutes=30),
    min_interval=dt.timedelta(minutes=5),
    max_interval=dt.timedelta(minutes=60),
)


def make_nodes(
    zones: int = 1, racks: int = 2, per_rack: int = 3, gpus: int = 2, used: Mapping[str, int] = {}
) -> list[NodeInfo]:
    """zones x racks x per_rack nodes named z{z}-r{r}-n{n}, each its own NVLink domain."""
    out = []
    for z in range(zones):
        for r in range(racks):
            for n in range(per_rack):
                name = f"z{z}-r{r}-n{n}"
                labels = {
                    LABEL_HOSTNAME: name,
                    LABEL_NVLINK_DOMAIN: f"{name}-nvl",
                    LABEL_RACK: f"r{r}",
                    LABEL_ZONE: f"z{z}",
                }
                out.append(NodeInfo(name, labels, allocatable=gpus, used=used.get(name, 0)))
    return out


def gang(nodes: Sequence[str], epoch: int = 1) -> Rendezvous:
    members = [Member(rank=i, pod=f"w{i}", node=node) for i, node in enumerate(nodes)]
    return Rendezvous(epoch=epoch, workers=len(members), processes_per_worker=1, members=members)


def reports(
    rendezvous: Rendezvous, step: int, slow: Mapping[str, float] = {}, base: float = 1.0
) -> dict[str, WorkerReport]:
    """Every member at `step`, computing `base` seconds per step (or its `slow` value)."""
    return {
        m.pod: WorkerReport(
            epoch=rendezvous.epoch,
            step=step,
            step_seconds=slow.get(m.pod, base) * 2,
            sync_wait_ratio=0.5,  # compute = half the step
        )
        for m in rendezvous.members
    }


GANG_NODES = ["z0-r0-n0", "z0-r0-n1", "z0-r0-n2"]
# Each gang node runs one worker of 1 GPU, and its other GPU is taken by someone else.
BUSY = dict.fromkeys(GANG_NODES, 2)


def watch(
    state: StragglerState,
    rendezvous: Rendezvous,
    step: int,
    nodes: Sequence[NodeInfo],
    slow: Mapping[str, float] = {},
    now: dt.datetime = T0,
    required: str | None = None,
) -> StragglerVerdict:
    return watch_stragglers(
        state, POLICY, rendezvous, reports(rendezvous, step, slow), nodes, LEVELS, required, 1, now
    )


def confirm(
    rendezvous: Rendezvous,
    nodes: Sequence[NodeInfo],
    state: StragglerState | None = None,
    slow: Mapping[str, float] | None = None,
    now: dt.datetime = T0,
    required: str | None = None,
    first_step: int = 100,
) -> StragglerVerdict:
    """Reports with w1 (by default) 1.5x slower at steps first_step, +5, +10."""
    verdict = StragglerVerdict(state or StragglerState())
    for step in (first_step, first_step + 5, first_step + 10):
        verdict = watch(verdict.state, rendezvous, step, nodes, slow or {"w1": 1.5}, now, required)
    return verdict


# -- who is slow --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compute", "slow"),
    [
        ({"a": 1.0, "b": 1.0, "c": 1.3}, "c"),
        ({"a": 1.0, "b": 1.0, "c": 1.2}, None),  # at the threshold is not above it
        ({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.25}, "d"),
        ({"a": 1.0, "b": 3.0}, None),  # two workers: no median of others to speak of
        ({"a": 0.0, "b": 0.0, "c": 1e-7}, None),  # too little compute to compare
    ],
)
def test_the_slowest_worker_is_a_straggler_only_above_threshold_times_the_others_median(
    compute: dict[str, float], slow: str | None
) -> None:
    assert slowest(compute, 1.2) == slow


# -- when to replace ----------------------------------------------------------------------------


def test_a_straggler_for_long_enough_is_replaced_in_its_rack_not_on_its_node() -> None:
    rendezvous = gang(GANG_NODES)
    # The gang's nodes are full but for the slow one; rack r0 has one more node, r1 three.
    nodes = make_nodes(used={**BUSY, "z0-r0-n1": 1})
    nodes.append(
        NodeInfo(
            "z0-r0-n3",
            {LABEL_HOSTNAME: "z0-r0-n3", LABEL_RACK: "r0", LABEL_ZONE: "z0"},
            allocatable=2,
            used=0,
        )
    )
    verdict = confirm(rendezvous, nodes)
    assert isinstance(verdict.action, Replace)
    assert (verdict.action.pod, verdict.action.rank, verdict.action.node) == ("w1", 1, "z0-r0-n1")
    assert verdict.action.to == "z0-r0-n3"  # same rack; r1 has emptier nodes but is further
    assert verdict.action.where == "rack r0"
    assert "rank 1 (w1 on z0-r0-n1)" in verdict.action.message


def test_a_node_that_runs_other_workers_of_the_gang_comes_first() -> None:
    nodes = make_nodes(used={"z0-r0-n0": 1, "z0-r0-n1": 2, "z0-r0-n2": 1})
    choice = choose_replacement_node(
        Member(rank=1, pod="w1", node="z0-r0-n1"),
        gang(GANG_NODES).members,
        nodes,
        LEVELS,
        None,
        1,
        frozenset(),
    )
    assert choice == ("z0-r0-n0", "node z0-r0-n0, with other workers of the gang")


def test_with_its_rack_full_the_replacement_widens_to_the_zone() -> None:
    verdict = confirm(gang(GANG_NODES), make_nodes(used=BUSY))
    assert isinstance(verdict.action, Replace)
    assert verdict.action.to.startswith("z0-r1-") and verdict.action.where == "zone z0"


def test_the_replacement_never_leaves_the_required_domain_and_none_free_keeps_it() -> None:
    nodes = make_nodes(used=BUSY)
    verdict = confirm(gang(GANG_NODES), nodes, required=LABEL_RACK)
    assert isinstance(verdict.action, Keep) and verdict.action.pod == "w1"
    assert "it stays: no node of its rack outside the cool-down list has room" in (
        verdict.action.message
    )


def test_a_gang_of_the_cluster_may_widen_to_another_zone() -> None:
    nodes = [n for n in make_nodes(zones=2, used=BUSY) if n.name in GANG_NODES or "z1" in n.name]
    verdict = confirm(gang(GANG_NODES), nodes)
    assert isinstance(verdict.action, Replace)
    assert verdict.action.to.startswith("z1-") and verdict.action.where == "the cluster"


def test_a_short_spike_or_too_few_observations_replace_nothing() -> None:
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    state = StragglerState()
    for step in (100, 105):  # two observations only
        verdict = watch(state, rendezvous, step, nodes, {"w1": 2.0})
        state = verdict.state
    assert verdict.action is None and state.observations == 2
    # Many observations over too few steps are not enough either.
    state = StragglerState()
    for step in (100, 101, 102, 103):
        verdict = watch(state, rendezvous, step, nodes, {"w1": 2.0})
        state = verdict.state
    assert verdict.action is None and state.observations == 4


def test_the_same_report_seen_again_is_not_another_observation() -> None:
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    state = StragglerState()
    for _ in range(5):  # five passes, one report
        state = watch(state, rendezvous, 100, nodes, {"w1": 2.0}).state
    assert state.observations == 1


@pytest.mark.parametrize(
    "interruption",
    ["nobody slow", "someone else slow", "re-form"],
)
def test_a_streak_ends_when_the_worker_is_not_the_slow_one_or_the_gang_re_forms(
    interruption: str,
) -> None:
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    state = watch(StragglerState(), rendezvous, 100, nodes, {"w1": 2.0}).state
    state = watch(state, rendezvous, 105, nodes, {"w1": 2.0}).state
    if interruption == "nobody slow":
        state = watch(state, rendezvous, 107, nodes, {}).state
    elif interruption == "someone else slow":
        state = watch(state, rendezvous, 107, nodes, {"w2": 2.0}).state
    else:
        rendezvous = gang(GANG_NODES, epoch=2)
    verdict = watch(state, rendezvous, 110, nodes, {"w1": 2.0})
    assert verdict.action is None
    assert verdict.state.suspect == "w1" and verdict.state.observations == 1


def test_a_suspect_just_under_the_threshold_keeps_its_streak_but_not_under_the_lower_bar() -> None:
    # POLICY's threshold is 1.2x the others' median: the lower bar is 1.1x.
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    state = watch(StragglerState(), rendezvous, 100, nodes, {"w1": 2.0}).state
    state = watch(state, rendezvous, 105, nodes, {"w1": 1.15}).state
    assert state.suspect == "w1" and state.observations == 2
    assert slowest({"w0": 1.0, "w1": 1.15, "w2": 1.0}, 1.2) is None, "no new suspect at 1.15x"
    state = watch(state, rendezvous, 110, nodes, {"w1": 1.05}).state
    assert state.suspect is None and state.observations == 0


def test_an_incomplete_or_stale_set_of_reports_changes_nothing() -> None:
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    state = watch(StragglerState(), rendezvous, 100, nodes, {"w1": 2.0}).state
    partial = reports(rendezvous, 105, {"w1": 2.0})
    del partial["w2"]
    stale = {**reports(rendezvous, 105, {"w1": 2.0}), "w0": WorkerReport(epoch=0, step=105)}
    for seen in (partial, stale):
        verdict = watch_stragglers(state, POLICY, rendezvous, seen, nodes, LEVELS, None, 1, T0)
        assert verdict.state == state and verdict.action is None


# -- cool-down, back-off, one per re-form -------------------------------------------------------


def test_a_replaced_workers_node_cools_down_for_this_job_then_comes_back() -> None:
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    verdict = confirm(rendezvous, nodes)
    assert isinstance(verdict.action, Replace)
    state = replaced(verdict.state, POLICY, verdict.action, T0)
    assert state.avoid == {"z0-r0-n1": T0 + POLICY.cool_down}
    seen = {n.name: n for n in avoiding(nodes, state, T0 + dt.timedelta(minutes=29))}
    assert not seen["z0-r0-n1"].schedulable and seen["z0-r0-n1"].free == 0
    assert all(n.schedulable for name, n in seen.items() if name != "z0-r0-n1")
    later = T0 + dt.timedelta(minutes=31)
    assert all(n.schedulable for n in avoiding(nodes, state, later))
    # The expired entry also leaves the state at the next pass.
    assert watch(state, rendezvous, 200, nodes, now=later).state.avoid == {}


def test_the_replacement_is_never_a_node_on_the_cool_down_list() -> None:
    nodes = make_nodes(used=BUSY)
    free_r1 = sorted(n.name for n in nodes if "r1" in n.name)
    state = StragglerState(avoid={name: T0 + dt.timedelta(hours=1) for name in free_r1[:-1]})
    verdict = confirm(gang(GANG_NODES), nodes, state)
    assert isinstance(verdict.action, Replace) and verdict.action.to == free_r1[-1]
    state = StragglerState(avoid={name: T0 + dt.timedelta(hours=1) for name in free_r1})
    assert isinstance(confirm(gang(GANG_NODES), nodes, state).action, Keep)


def test_only_one_replacement_comes_from_one_epoch() -> None:
    rendezvous, nodes = gang(GANG_NODES), make_nodes(used=BUSY)
    verdict = confirm(rendezvous, nodes)
    assert isinstance(verdict.action, Replace)
    state = replaced(verdict.state, POLICY, verdict.action, T0)
    later = T0 + dt.timedelta(hours=2)  # well past the back-off
    again = confirm(rendezvous, nodes, state, {"w2": 1.5}, later, first_step=200)
    assert isinstance(again.action, Keep) and "one replacement per re-form" in again.action.message
    after_reform = confirm(gang(GANG_NODES, epoch=2), nodes, state, {"w2": 1.5}, later, None, 300)
    assert isinstance(after_reform.action, Replace) and after_reform.action.pod == "w2"


@pytest.mark.parametrize(
    ("replacements", "minutes"), [(0, 0), (1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (60, 60)]
)
def test_the_interval_between_replacements_doubles_up_to_the_cap(
    replacements: int, minutes: int
) -> None:
    assert POLICY.interval_after(replacements) == dt.timedelta(minutes=minutes)


def test_back_off_keeps_a_straggler_until_the_interval_passed() -> None:
    nodes = make_nodes(used=BUSY)
    state = StragglerState()
    at = T0
    for number in range(1, 4):  # three replacements, each in a new epoch
        verdict = confirm(
            gang(GANG_NODES, epoch=number), nodes, state, now=at, first_step=100 * number
        )
        assert isinstance(verdict.action, Replace), number
        state = replaced(verdict.state, POLICY, verdict.action, at)
        wait = POLICY.interval_after(number)
        soon = confirm(
            gang(GANG_NODES, epoch=number + 1),
            nodes,
            replace_avoid(state),
            now=at + wait - dt.timedelta(seconds=1),
            first_step=100 * number + 50,
        )
        assert isinstance(soon.action, Keep) and "back-off" in soon.action.message
        at += wait
        state = replace_avoid(soon.state)


def replace_avoid(state: StragglerState) -> StragglerState:
    """The state without its cool-down list, so every round may use every node again."""
    return StragglerState(
        epoch=state.epoch,
        replacements=state.replacements,
        last_replacement=state.last_replacement,
        replaced_epoch=state.replaced_epoch,
    )


# -- throughput sizing --------------------------------------------------------------------------

SIZING = SizingPolicy(
    gain=0.5, settle=dt.timedelta(seconds=60), min_samples=3, cool_down=dt.timedelta(minutes=20)
)


def measure(
    state: SizingState,
    epoch: int,
    workers: int,
    throughput: float,
    start: dt.datetime,
    max_workers: int = 6,
    first_step: int = 0,
) -> tuple[SizingState, dt.datetime]:
    """A gang re-formed at `start` reports `throughput` until its measurement is done."""
    now = start
    state = size_by_throughput(
        state, SIZING, Observed(epoch, workers, 1e6, first_step), 1, max_workers, now
    )
    for i in range(1, 4):
        now = start + SIZING.settle + dt.timedelta(seconds=10 * i)
        observed = Observed(epoch, workers, throughput, first_step + 10 * i)
        state = size_by_throughput(state, SIZING, observed, 1, max_workers, now)
    return state, now


@pytest.mark.parametrize(
    ("base", "workers", "needed"),
    [((2, 100.0), 3, 125.0), ((2, 100.0), 4, 150.0), ((4, 80.0), 5, 90.0)],
)
def test_needed_throughput_is_gain_times_linear_scaling(
    base: tuple[int, float], workers: int, needed: float
) -> None:
    assert needed_throughput(SizeRecord(*base, T0), workers, 0.5) == pytest.approx(needed)


def test_a_growth_that_pays_is_kept_and_the_job_grows_on() -> None:
    state, now = measure(SizingState(target=2), 1, 2, 100.0, T0)
    assert state.target == 3 and state.grew_from == 2
    state, now = measure(state, 2, 3, 130.0, now)  # 125 needed
    assert state.target == 4 and state.hold_until is None
    assert [(r.workers, r.throughput) for r in state.tried] == [(2, 100.0), (3, 130.0)]


def test_a_growth_that_does_not_pay_goes_back_to_the_best_size_and_holds() -> None:
    state, now = measure(SizingState(target=2), 1, 2, 100.0, T0)
    state, now = measure(state, 2, 3, 120.0, now)  # 125 needed
    assert state.target == 2
    assert state.hold_until == now + SIZING.cool_down
    assert "below the 125.0 that 0.5 of linear scaling from 2 (100.0) needs" in state.message
    # 3 workers were a little faster, but not by enough: the record says it was not kept.
    assert [(r.workers, r.throughput, r.kept) for r in state.tried] == [
        (2, 100.0, True),
        (3, 120.0, False),
    ]


def test_back_at_the_best_size_the_job_stays_until_the_cool_down_ends_then_tries_again() -> None:
    state, now = measure(SizingState(target=2), 1, 2, 100.0, T0)
    state, rejected_at = measure(state, 2, 3, 90.0, now)
    state, now = measure(state, 3, 2, 101.0, rejected_at)  # back at 2: recorded, not judged
    assert state.target == 2 and state.throughput_at(2) == 101.0
    before = size_by_throughput(
        state, SIZING, Observed(3, 2, 100.0, 99), 1, 6, rejected_at + SIZING.cool_down / 2
    )
    assert before.target == 2
    after = size_by_throughput(
        before, SIZING, Observed(3, 2, 100.0, 100), 1, 6, rejected_at + SIZING.cool_down
    )
    assert after.target == 3 and after.grew_from == 2 and after.hold_until is None


def test_a_cool_down_that_ends_before_the_shrink_happened_does_not_grow_from_the_bad_size() -> None:
    state, now = measure(SizingState(target=2), 1, 2, 100.0, T0)
    state, now = measure(state, 2, 3, 90.0, now)
    late = size_by_throughput(
        state, SIZING, Observed(2, 3, 90.0, 99), 1, 6, now + 2 * SIZING.cool_down
    )
    assert late.target == 2  # still waiting for the gang to shrink to the best size


def test_samples_during_settling_and_repeated_steps_are_ignored() -> None:
    state = size_by_throughput(SizingState(target=2), SIZING, Observed(1, 2, 500.0, 1), 1, 6, T0)
    for i in range(1, 6):  # a minute of fresh steps, all inside the settling time
        observed = Observed(1, 2, 500.0, 1 + i)
        state = size_by_throughput(state, SIZING, observed, 1, 6, T0 + dt.timedelta(seconds=10 * i))
    assert state.samples == () and not state.tried
    settled = T0 + SIZING.settle
    for _ in range(5):  # one step reported over and over
        state = size_by_throughput(state, SIZING, Observed(1, 2, 100.0, 50), 1, 6, settled)
    assert state.samples == (100.0,) and state.target == 2


def test_the_measurement_is_the_median_of_the_samples() -> None:
    state = size_by_throughput(SizingState(target=2), SIZING, Observed(1, 2, None, 0), 1, 6, T0)
    settled = T0 + SIZING.settle
    for step, value in ((10, 100.0), (20, 10.0), (30, 104.0)):
        state = size_by_throughput(state, SIZING, Observed(1, 2, value, step), 1, 6, settled)
    assert state.throughput_at(2) == 100.0


def test_the_job_stops_at_max_workers_and_follows_a_lower_max() -> None:
    state, now = measure(SizingState(target=3), 1, 3, 100.0, T0, max_workers=3)
    assert state.target == 3
    lowered = size_by_throughput(state, SIZING, Observed(1, 3, 100.0, 99), 1, 2, now)
    assert lowered.target == 2


def test_a_lost_worker_is_recorded_not_judged_and_the_job_wants_its_target_back() -> None:
    state, now = measure(SizingState(target=3), 1, 3, 150.0, T0)
    assert state.target == 4
    state, now = measure(state, 2, 4, 200.0, now)  # accepted (175 needed)
    assert state.target == 5
    state, now = measure(state, 3, 3, 60.0, now)  # a worker lost on the way: a poor reading
    assert state.target == 5 and state.hold_until is None
    assert state.throughput_at(3) == 60.0


@pytest.mark.parametrize(
    ("tried", "best"),
    [
        ([(2, 100.0, True), (3, 120.0, True)], 3),
        ([(2, 100.0, True), (3, 100.0, True)], 2),
        ([(2, 100.0, True), (8, 900.0, True)], 2),
        ([(2, 100.0, True), (3, 120.0, False)], 2),
    ],
)
def test_the_best_size_is_the_fastest_kept_one_that_fits_the_smaller_on_a_tie(
    tried: list[tuple[int, float, bool]], best: int
) -> None:
    records = [SizeRecord(w, t, T0, kept) for w, t, kept in tried]
    assert best_size(records, max_workers=4) == best
