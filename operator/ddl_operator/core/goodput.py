"""Goodput decisions: which straggler to replace and where, and which size trains fastest.

Pure functions over what reconcile already has (the rendezvous, the workers' reports, the node
snapshot, `now`) and a small state it keeps in status between passes. Nothing here acts: the
caller replaces a worker or changes the size at the next checkpoint boundary, then tells the
state what it did (`replaced`), so a decision that is never carried out leaves no trace.

Straggler replacement
  * A worker's compute time per step is its step time minus sync-wait (in synchronous training
    every step takes as long as the slowest, so only the waiting tells ranks apart).
  * It is a suspect when that exceeds `threshold` x the median of the others' (>= 3 workers),
    and stays one while it exceeds the lower bar halfway between the median and that (1.15x
    for 1.3x): a worker measured near the threshold on a noisy host keeps its streak instead
    of starting over at every reading that dips just under it (hysteresis).
  * One observation per new step reported; an observation without every member's report at the
    current epoch says nothing and changes nothing. Another worker over the threshold, or the
    suspect under the lower bar, ends the streak; so does a re-form (a new epoch).
  * Replacement is due once the same worker was the suspect in every observation over at least
    `for_steps` steps and `min_observations` observations, at most one per epoch.
  * Back-off: after the n-th replacement the next waits min_interval x 2**(n-1) (capped), so a
    job whose every node looks slow (it is the job, not the nodes) never loops replacing.
  * The new node is in the same domain as the rest of the gang, innermost first: a node that
    already runs other members, then the gang's NVLink domain, rack, ... up to `required` (the
    gang never leaves that) or the whole cluster. Among the gang's domains at a level, the one
    with most members wins, then the node with most free units, then its name. Never the slow
    node, never one on the job's cool-down list. None free: keep the straggler and say so.
  * The slow node goes on the job's cool-down list (node -> until) that placement avoids
    (`avoiding`); not a cluster-wide taint: another job may run fine on that node.

Throughput-driven sizing
  * The job grows one worker at a time from where it runs toward max_workers.
  * A size is measured once the gang has trained `settle_seconds` past its re-form (start-up,
    checkpoint load and the rate window's warm-up would read low), as the median of
    `min_samples` reports at new steps.
  * A growth from p to w workers is kept only if samples/s rose by at least
    gain x (w - p) x (samples/s at p) / p, i.e. `gain` of linear scaling; otherwise the job goes
    back to the best size seen and does not grow for `cool_down_seconds`. After that it tries
    again (the cluster, the placement or the rates may have changed).
  * The best size is the fastest kept one: a rejected growth is not kept even if it was a
    little faster (its workers bought less than their share). `tried` keeps the latest
    measurement at each size, kept or not, for status.

State in status
  * Both states live in the job's status between passes (status.stragglers, status.sizing),
    bounded by the schema. Anyone with status RBAC can write them, so they are read back
    with clamps: no time later than now (a cool-down for the list), no epoch later than the
    job's, so a forged value delays a decision by one cool-down at most.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from ddl_operator.api.constants import LABEL_HOSTNAME
from ddl_operator.api.models import (
    MAX_COOLING_NODES,
    MAX_GOODPUT_MESSAGE,
    MAX_SIZE_SAMPLES,
    MAX_SIZES_TRIED,
    CoolingNode,
    Elastic,
    Member,
    Rendezvous,
    Sizing,
    Stragglers,
    StragglerWatch,
    TriedSize,
)
from ddl_operator.core.reports import WorkerReport
from ddl_operator.core.topology import NodeInfo, domain_path, level_name

# Below a microsecond of compute per step the ratio says nothing (as in progress.py).
MIN_COMPUTE_SECONDS: Final = 1e-6
MIN_GANG: Final = 3


# -- straggler replacement ----------------------------------------------------------------------


@dataclass(frozen=True)
class StragglerPolicy:
    """When a slow worker is replaced, and how long its node is avoided."""

    threshold: float = 1.2
    for_steps: int = 20
    min_observations: int = 3
    cool_down: dt.timedelta = dt.timedelta(minutes=30)
    min_interval: dt.timedelta = dt.timedelta(minutes=5)
    max_interval: dt.timedelta = dt.timedelta(hours=4)

    def __post_init__(self) -> None:
        if not self.threshold > 1.0:
            raise ValueError(f"threshold must be above 1, got {self.threshold}")
        if self.for_steps < 1 or self.min_observations < 1:
            raise ValueError("for_steps and min_observations must be at least 1")

    def interval_after(self, replacements: int) -> dt.timedelta:
        """The least time between replacement number `replacements` and the next one."""
        if replacements <= 0:
            return dt.timedelta(0)
        doublings = min(replacements - 1, 32)  # 2**32 x anything is far past the cap
        return min(self.min_interval * (1 << doublings), self.max_interval)


@dataclass(frozen=True)
class StragglerState:
    """What one job's straggler watch remembers between passes (kept in status)."""

    epoch: int = -1
    suspect: str | None = None
    since_step: int = 0
    last_step: int = -1
    observations: int = 0
    replacements: int = 0
    last_replacement: dt.datetime | None = None
    replaced_epoch: int = -1
    avoid: Mapping[str, dt.datetime] = field(default_factory=dict)


@dataclass(frozen=True)
class Replace:
    """Replace `pod` (rank `rank` on `node`) by a new worker on `to`; `where` says why there."""

    pod: str
    rank: int
    node: str
    to: str
    where: str
    message: str


@dataclass(frozen=True)
class Keep:
    """A straggler that stays for now (no node free, back-off); the message says why."""

    pod: str
    message: str


@dataclass(frozen=True)
class StragglerVerdict:
    """The watch's new state and, when a straggler is confirmed, what to do about it."""

    state: StragglerState
    action: Replace | Keep | None = None


def _compute_seconds(
    rendezvous: Rendezvous, reports: Mapping[str, WorkerReport]
) -> tuple[dict[str, float], int] | None:
    """Each member's compute seconds per step and the lowest step reported, if all reported."""
    compute: dict[str, float] = {}
    steps: list[int] = []
    for member in rendezvous.members:
        report = reports.get(member.pod)
        if report is None or report.epoch != rendezvous.epoch:
            return None
        if report.step_seconds is None or report.sync_wait_ratio is None or report.step is None:
            return None
        compute[member.pod] = report.step_seconds * (1.0 - report.sync_wait_ratio)
        steps.append(report.step)
    return compute, min(steps)


def slowest(compute: Mapping[str, float], threshold: float) -> str | None:
    """The worker whose compute time exceeds threshold x the median of the others', if any."""
    if not compute:
        return None
    pod = max(compute, key=lambda p: (compute[p], p))
    return pod if _slower(compute, pod, threshold) else None


def _slower(compute: Mapping[str, float], pod: str, factor: float) -> bool:
    """Whether `pod`'s compute time exceeds factor x the median of the others' (a gang of
    at least MIN_GANG: with fewer, no median says who is slow)."""
    if len(compute) < MIN_GANG:
        return False
    median = statistics.median(v for p, v in compute.items() if p != pod)
    return median >= MIN_COMPUTE_SECONDS and compute[pod] > factor * median


def _release_bar(threshold: float) -> float:
    """Below this a suspect is one no longer: halfway between the median and the threshold."""
    return 1.0 + (threshold - 1.0) / 2


def _observe(
    state: StragglerState,
    policy: StragglerPolicy,
    rendezvous: Rendezvous,
    reports: Mapping[str, WorkerReport],
) -> StragglerState:
    """The streak after this pass's reports (unchanged when they say nothing new)."""
    if rendezvous.epoch != state.epoch:
        state = replace(state, epoch=rendezvous.epoch, suspect=None, observations=0, last_step=-1)
    seen = _compute_seconds(rendezvous, reports)
    if seen is None or seen[1] <= state.last_step:
        return state
    compute, step = seen
    suspect = slowest(compute, policy.threshold)
    held = state.suspect
    release = _release_bar(policy.threshold)
    if suspect is None and held in compute and _slower(compute, held, release):
        suspect = held  # still slow, just under the threshold this time
    if suspect is None:
        return replace(state, suspect=None, observations=0, last_step=step)
    if suspect != state.suspect:
        return replace(state, suspect=suspect, since_step=step, observations=1, last_step=step)
    return replace(state, observations=state.observations + 1, last_step=step)


def active_avoid(state: StragglerState, now: dt.datetime) -> dict[str, dt.datetime]:
    """The cool-down list without the entries that expired."""
    return {node: until for node, until in state.avoid.items() if until > now}


def avoiding(nodes: Sequence[NodeInfo], state: StragglerState, now: dt.datetime) -> list[NodeInfo]:
    """The snapshot as this job's placement should see it: cooling nodes take no new workers.

    They read as cordoned, so running workers there stay (placement keeps kept workers on
    unschedulable nodes) and no new one lands there.
    """
    cooling = active_avoid(state, now)
    return [replace(n, schedulable=False) if n.name in cooling else n for n in nodes]


def _member_path(
    member: Member, nodes: Mapping[str, NodeInfo], levels: Sequence[str]
) -> tuple[str, ...]:
    node = nodes.get(member.node)
    labels = node.labels if node is not None else member.domains
    return domain_path(member.node, labels, levels)


def choose_replacement_node(
    straggler: Member,
    members: Sequence[Member],
    nodes: Sequence[NodeInfo],
    levels: Sequence[str],
    required: str | None,
    units_per_worker: int,
    avoid: frozenset[str],
) -> tuple[str, str] | None:
    """A node for the straggler's replacement and the domain it shares, or None.

    `levels` innermost first, starting with the node level. The straggler's node and `avoid`
    are out; a job without a resource count (units_per_worker 0) gets one worker per node.
    """
    by_name = {n.name: n for n in nodes}
    others = [m for m in members if m.pod != straggler.pod]
    occupied = {m.node for m in others}
    depth = len(levels)
    last = levels.index(required) if required is not None else depth

    def fits(node: NodeInfo) -> bool:
        if node.name == straggler.node or node.name in avoid or not node.usable:
            return False
        if units_per_worker == 0:
            return node.name not in occupied
        return node.free >= units_per_worker

    candidates = [n for n in nodes if fits(n)]
    paths = {n.name: domain_path(n.name, n.labels, levels) for n in candidates}
    member_paths = [_member_path(m, by_name, levels) for m in others]
    for index in range(min(last + 1, depth + 1)):
        # A domain at levels[index] is the path's outer part; index == depth: the cluster.
        keep = depth - index
        counts: dict[tuple[str, ...], int] = {}
        for path in member_paths:
            counts[path[:keep]] = counts.get(path[:keep], 0) + 1
        ranked = [n for n in candidates if paths[n.name][:keep] in counts]
        if not ranked:
            continue
        best = min(ranked, key=lambda n: (-counts[paths[n.name][:keep]], -n.free, n.name))
        if index == depth:
            return best.name, "the cluster"
        where = paths[best.name][keep - 1]
        if levels[index] == LABEL_HOSTNAME:
            return best.name, f"node {where}, with other workers of the gang"
        return best.name, f"{level_name(levels[index])} {where}"
    return None


def watch_stragglers(
    state: StragglerState,
    policy: StragglerPolicy,
    rendezvous: Rendezvous | None,
    reports: Mapping[str, WorkerReport],
    nodes: Sequence[NodeInfo],
    levels: Sequence[str],
    required: str | None,
    units_per_worker: int,
    now: dt.datetime,
) -> StragglerVerdict:
    """One pass: update the streak; a confirmed straggler gives a Replace, or a Keep saying why."""
    state = replace(state, avoid=active_avoid(state, now))
    if rendezvous is None or not rendezvous.members:
        return StragglerVerdict(state)
    state = _observe(state, policy, rendezvous, reports)
    if state.suspect is None:
        return StragglerVerdict(state)
    steps = state.last_step - state.since_step
    if steps < policy.for_steps or state.observations < policy.min_observations:
        return StragglerVerdict(state)
    member = next(m for m in rendezvous.members if m.pod == state.suspect)
    slow = (
        f"rank {member.rank} ({member.pod} on {member.node}) has computed over "
        f"{policy.threshold:g}x the median of the others for {steps} steps"
    )
    if state.replaced_epoch >= rendezvous.epoch:
        return StragglerVerdict(state, Keep(member.pod, f"{slow}; one replacement per re-form"))
    if state.last_replacement is not None:
        allowed = state.last_replacement + policy.interval_after(state.replacements)
        if now < allowed:
            return StragglerVerdict(
                state,
                Keep(
                    member.pod,
                    f"{slow}; it stays: after {state.replacements} replacements the next "
                    f"waits until {allowed.isoformat()} (back-off)",
                ),
            )
    avoid = frozenset(state.avoid)
    choice = choose_replacement_node(
        member, rendezvous.members, nodes, levels, required, units_per_worker, avoid
    )
    if choice is None:
        scope = f"its {level_name(required)}" if required is not None else "the cluster"
        return StragglerVerdict(
            state,
            Keep(
                member.pod,
                f"{slow}; it stays: no node of {scope} outside the cool-down list has room",
            ),
        )
    to, where = choice
    message = f"{slow}; replace it on {to} ({where})"
    return StragglerVerdict(
        state, Replace(member.pod, member.rank, member.node, to, where, message)
    )


def replaced(
    state: StragglerState, policy: StragglerPolicy, action: Replace, now: dt.datetime
) -> StragglerState:
    """The state once the caller carried out `action`: back-off, cool-down, one per epoch.

    No second replacement comes from the epoch the straggler was seen in, whatever passes
    go by before the gang re-forms.
    """
    avoid = dict(state.avoid)
    avoid[action.node] = max(avoid.get(action.node, now), now + policy.cool_down)
    return replace(
        state,
        suspect=None,
        observations=0,
        replacements=state.replacements + 1,
        last_replacement=now,
        replaced_epoch=state.epoch,
        avoid=avoid,
    )


# -- throughput-driven sizing -------------------------------------------------------------------


@dataclass(frozen=True)
class SizingPolicy:
    """How growth is judged: by `gain` of linear scaling, measured after settling."""

    gain: float = 0.5
    settle: dt.timedelta = dt.timedelta(seconds=60)
    min_samples: int = 3
    cool_down: dt.timedelta = dt.timedelta(minutes=30)

    def __post_init__(self) -> None:
        if not 0.0 <= self.gain <= 1.0:
            raise ValueError(f"gain must be in [0, 1], got {self.gain}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {self.min_samples}")


@dataclass(frozen=True)
class SizeRecord:
    """Samples/s measured at one size (for status), when, and whether the size was kept.

    A rejected growth is not kept even when it trained a little faster: its workers bought
    less than `gain` of their share, and their GPUs serve other jobs better.
    """

    workers: int
    throughput: float
    at: dt.datetime
    kept: bool = True


@dataclass(frozen=True)
class SizingState:
    """What throughput sizing remembers between passes (kept in status).

    `target` is the size the job should run at; `workers` the size measured now, at `epoch`;
    `grew_from` the size a growth under test started from; `tried` one record per size.
    """

    target: int
    epoch: int = -1
    workers: int = 0
    formed_at: dt.datetime | None = None
    last_step: int = -1
    samples: tuple[float, ...] = ()
    measured: bool = False
    tried: tuple[SizeRecord, ...] = ()
    grew_from: int | None = None
    hold_until: dt.datetime | None = None
    message: str = ""

    def throughput_at(self, workers: int) -> float | None:
        return next((r.throughput for r in self.tried if r.workers == workers), None)


@dataclass(frozen=True)
class Observed:
    """The gang as it trains now: its epoch and size, rank 0's samples/s and step."""

    epoch: int
    workers: int
    throughput: float | None
    step: int | None


def _record(tried: tuple[SizeRecord, ...], record: SizeRecord) -> tuple[SizeRecord, ...]:
    kept = [r for r in tried if r.workers != record.workers]
    return tuple(sorted([*kept, record], key=lambda r: r.workers))


def best_size(tried: Sequence[SizeRecord], max_workers: int) -> int | None:
    """The kept size with the highest throughput measured (the smaller one on a tie)."""
    fitting = [r for r in tried if r.workers <= max_workers and r.kept]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (-r.throughput, r.workers)).workers


def needed_throughput(base: SizeRecord, workers: int, gain: float) -> float:
    """What `workers` must reach to keep a growth from `base`: gain x linear scaling."""
    return base.throughput * (1.0 + gain * (workers - base.workers) / base.workers)


def size_by_throughput(
    state: SizingState,
    policy: SizingPolicy,
    observed: Observed,
    min_workers: int,
    max_workers: int,
    now: dt.datetime,
) -> SizingState:
    """One pass: fold in rank 0's report, judge a finished measurement, set the target.

    Start from `SizingState(target=<workers it runs with>)`; the caller sizes the gang to
    `target` (as far as capacity allows) at the next checkpoint boundary.
    """
    if observed.epoch != state.epoch or observed.workers != state.workers:
        state = replace(
            state,
            epoch=observed.epoch,
            workers=observed.workers,
            formed_at=now,
            last_step=-1,
            samples=(),
            measured=False,
        )
    state = replace(state, target=max(min_workers, min(state.target, max_workers)))
    if state.measured or observed.workers < 1:
        if state.measured and (state.hold_until is None or now >= state.hold_until):
            return _grow(state, max_workers)
        return state
    assert state.formed_at is not None
    fresh = observed.step is not None and observed.step > state.last_step
    if not fresh or observed.throughput is None or now - state.formed_at < policy.settle:
        return state
    assert observed.step is not None
    state = replace(state, last_step=observed.step, samples=(*state.samples, observed.throughput))
    if len(state.samples) < policy.min_samples:
        return state
    return _judge(state, policy, max_workers, now)


def _judge(
    state: SizingState, policy: SizingPolicy, max_workers: int, now: dt.datetime
) -> SizingState:
    """A measurement is complete: keep a growth and grow on, or go back to the best size.

    Only a growth this state asked for is judged; a size reached otherwise (a lost worker,
    the way back to the best size) is only recorded, so one low reading cannot cascade down.
    """
    workers = state.workers
    record = SizeRecord(workers, statistics.median(state.samples), now)
    base = next((r for r in state.tried if r.workers == state.grew_from), None)
    tried = _record(state.tried, record)
    state = replace(state, measured=True, tried=tried)
    if base is not None and workers > base.workers and base.throughput > 0:
        state = replace(state, grew_from=None)
        needed = needed_throughput(base, workers, policy.gain)
        if record.throughput < needed and not math.isclose(record.throughput, needed):
            tried = _record(tried, replace(record, kept=False))
            back = best_size(tried, max_workers) or base.workers
            until = now + policy.cool_down
            return replace(
                state,
                target=back,
                tried=tried,
                hold_until=until,
                message=(
                    f"{workers} workers train at {record.throughput:.1f} samples/s, below the "
                    f"{needed:.1f} that {policy.gain:g} of linear scaling from {base.workers} "
                    f"({base.throughput:.1f}) needs; back to {back}, no growth until "
                    f"{until.isoformat()}"
                ),
            )
    state = replace(state, message=f"{workers} workers train at {record.throughput:.1f} samples/s")
    if state.hold_until is not None and now < state.hold_until:
        return state
    return _grow(state, max_workers)


def _grow(state: SizingState, max_workers: int) -> SizingState:
    """One more worker, once the gang runs at its target and below max_workers.

    A gang not at its target (capacity short, a worker lost, a shrink under way) waits, and
    a hold that ended meanwhile still ends only with this growth.
    """
    if state.target != state.workers or state.workers >= max_workers:
        return state
    return replace(
        state,
        target=state.workers + 1,
        grew_from=state.workers,
        hold_until=None,
        message=f"{state.message}; trying {state.workers + 1}" if state.message else "",
    )


# -- the state in status ------------------------------------------------------------------------
# Status is writable by anyone with status RBAC: the schema bounds it, and what it says is
# clamped here so that a forged entry can at worst delay a decision by one cool-down.


def _timestamp(text: str | None) -> dt.datetime | None:
    """A time of our own status; None when absent or unreadable."""
    if not text:
        return None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_after(t: dt.datetime | None, latest: dt.datetime) -> dt.datetime | None:
    return None if t is None else min(t, latest)


def straggler_policy(spec: Stragglers) -> StragglerPolicy:
    return StragglerPolicy(
        threshold=spec.threshold,
        for_steps=spec.for_steps,
        cool_down=dt.timedelta(seconds=spec.cool_down_seconds),
    )


def straggler_state(
    watch: StragglerWatch | None, policy: StragglerPolicy, epoch: int, now: dt.datetime
) -> StragglerState:
    """The watch's state from status: no time past now (+ a cool-down for the list), and no
    epoch past the job's, so a forged value cannot bar replacements for good. A replacement
    always re-forms the gang, so the replaced epoch is an earlier one."""
    if watch is None:
        return StragglerState()
    avoid: dict[str, dt.datetime] = {}
    for entry in watch.cooling:
        until = _not_after(_timestamp(entry.until), now + policy.cool_down)
        if until is not None:
            avoid[entry.node] = max(until, avoid.get(entry.node, until))
    return StragglerState(
        epoch=min(watch.epoch, epoch),
        suspect=watch.suspect,
        since_step=watch.since_step,
        last_step=watch.last_step,
        observations=watch.observations,
        replacements=watch.replacements,
        last_replacement=_not_after(_timestamp(watch.last_replacement), now),
        replaced_epoch=min(watch.replaced_epoch, epoch - 1),
        avoid=avoid,
    )


def straggler_watch(state: StragglerState, placing_on: str | None) -> StragglerWatch:
    """The state as status; the cool-down list keeps the entries that expire last."""
    cooling = sorted(state.avoid.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return StragglerWatch(
        epoch=state.epoch,
        suspect=state.suspect,
        since_step=state.since_step,
        last_step=state.last_step,
        observations=state.observations,
        replacements=state.replacements,
        last_replacement=_stamp(state.last_replacement) if state.last_replacement else None,
        replaced_epoch=state.replaced_epoch,
        cooling=[
            CoolingNode(node=node, until=_stamp(until))
            for node, until in sorted(cooling[:MAX_COOLING_NODES])
        ],
        placing_on=placing_on,
    )


def sizing_policy(elastic: Elastic) -> SizingPolicy:
    return SizingPolicy(
        gain=elastic.scaling_gain,
        settle=dt.timedelta(seconds=elastic.scaling_settle_seconds),
        cool_down=dt.timedelta(seconds=elastic.scaling_cool_down_seconds),
    )


def sizing_state(
    sizing: Sizing | None, policy: SizingPolicy, start: int, now: dt.datetime
) -> SizingState:
    """The sizing state from status (a new one at `start` workers when there is none)."""
    if sizing is None:
        return SizingState(target=start)
    tried = [
        SizeRecord(r.workers, r.samples_per_second, at, r.kept)
        for r in sizing.tried
        if (at := _not_after(_timestamp(r.at), now)) is not None
    ]
    return SizingState(
        target=sizing.target,
        epoch=sizing.epoch,
        workers=sizing.workers,
        formed_at=_not_after(_timestamp(sizing.formed_at), now),
        last_step=sizing.last_step,
        samples=tuple(sizing.samples),
        measured=sizing.measured,
        tried=_record_all(tried),
        grew_from=sizing.grew_from,
        hold_until=_not_after(_timestamp(sizing.hold_until), now + policy.cool_down),
        message=sizing.message,
    )


def _record_all(records: Sequence[SizeRecord]) -> tuple[SizeRecord, ...]:
    out: tuple[SizeRecord, ...] = ()
    for record in records:
        out = _record(out, record)
    return out


def sizing_status(state: SizingState, max_workers: int) -> Sizing:
    """The state as status: the best size and the latest measurements, within bounds."""
    tried = list(state.tried)
    if len(tried) > MAX_SIZES_TRIED:
        best = best_size(tried, max_workers)
        kept = [r for r in tried if r.workers == best]
        newest = sorted((r for r in tried if r.workers != best), key=lambda r: r.at, reverse=True)
        tried = sorted(kept + newest[: MAX_SIZES_TRIED - len(kept)], key=lambda r: r.workers)
    message = state.message
    if len(message) > MAX_GOODPUT_MESSAGE:
        message = message[: MAX_GOODPUT_MESSAGE - 1] + "…"
    return Sizing(
        target=state.target,
        epoch=state.epoch,
        workers=state.workers,
        formed_at=_stamp(state.formed_at) if state.formed_at else None,
        last_step=state.last_step,
        samples=list(state.samples[-MAX_SIZE_SAMPLES:]),
        measured=state.measured,
        tried=[
            TriedSize(
                workers=r.workers, samples_per_second=r.throughput, at=_stamp(r.at), kept=r.kept
            )
            for r in tried
        ],
        grew_from=state.grew_from,
        hold_until=_stamp(state.hold_until) if state.hold_until else None,
        message=message,
    )


def avoided(
    nodes: Sequence[NodeInfo], watch: StragglerWatch | None, now: dt.datetime
) -> list[NodeInfo]:
    """The snapshot as this job's placement sees it, from the watch it wrote to status."""
    if watch is None or not watch.cooling:
        return list(nodes)
    avoid = {c.node: t for c in watch.cooling if (t := _timestamp(c.until)) is not None}
    return avoiding(nodes, StragglerState(avoid=avoid), now)


def pinned(nodes: Sequence[NodeInfo], node: str) -> list[NodeInfo]:
    """The snapshot in which only `node` takes new workers (kept workers stay put)."""
    return [n if n.name == node else replace(n, schedulable=False) for n in nodes]
