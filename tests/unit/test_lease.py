"""The Lease decision (core/lease.py): acquire, renew, expiry by local observation, takeover,
release, and two candidates racing on one resourceVersion-guarded record."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_operator.core.lease import (
    RELEASED_DURATION_SECONDS,
    LeaseRecord,
    Seen,
    Timing,
    decide,
    from_spec,
    released,
    renew_overdue,
    to_spec,
)

T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
TIMING = Timing(duration_seconds=15, renew_seconds=10, retry_seconds=2)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def held_by(holder: str, renewed: float, transitions: int = 3) -> LeaseRecord:
    return LeaseRecord(holder, 15, at(-100), at(renewed), transitions)


def test_no_lease_is_created_with_me_as_holder() -> None:
    step = decide(None, None, "a", at(0), TIMING)
    assert step.write == LeaseRecord("a", 15, at(0), at(0), 0)
    assert step.wait_seconds == TIMING.retry_seconds


def test_renewal_keeps_acquire_time_and_transitions_and_moves_renew_time() -> None:
    mine = LeaseRecord("a", 15, at(0), at(0), 4)
    step = decide(mine, Seen(mine, at(0)), "a", at(2), TIMING)
    assert step.write == LeaseRecord("a", 15, at(0), at(2), 4)


def test_a_lease_already_ours_is_renewed_at_once_after_a_restart() -> None:
    # Same identity (a pod restarted under its name), nothing seen yet: no wait for expiry.
    mine = LeaseRecord("a", 15, at(-50), at(-1), 2)
    step = decide(mine, None, "a", at(0), TIMING)
    assert step.write == LeaseRecord("a", 15, at(-50), at(0), 2)


def test_a_fresh_lease_of_another_is_left_alone() -> None:
    other = held_by("b", renewed=0)
    step = decide(other, None, "a", at(0), TIMING)
    assert step.write is None
    assert step.seen == Seen(other, at(0))
    assert step.wait_seconds == TIMING.retry_seconds


def test_an_unchanged_lease_expires_after_its_duration_by_my_clock() -> None:
    other = held_by("b", renewed=0)
    seen = decide(other, None, "a", at(0), TIMING).seen
    just_before = decide(other, seen, "a", at(14.9), TIMING)
    assert just_before.write is None
    # The next look is due when it expires, not a whole retry period later.
    assert just_before.wait_seconds == pytest.approx(0.1)
    takeover = decide(other, just_before.seen, "a", at(15), TIMING)
    assert takeover.write == LeaseRecord("a", 15, at(15), at(15), 4)


def test_a_renewing_holder_keeps_its_lease_however_old_its_clock_says_it_is() -> None:
    # b's clock runs an hour behind: every renewTime it writes looks long expired to us.
    seen = None
    for t in range(0, 60, 2):
        step = decide(held_by("b", renewed=t - 3600), seen, "a", at(t), TIMING)
        assert step.write is None, f"took a live lease at {t} s"
        seen = step.seen


def test_a_stale_looking_lease_seen_for_the_first_time_still_waits_a_duration() -> None:
    # Its renewTime says an hour ago, but this process cannot know the writer's clock.
    other = held_by("b", renewed=-3600)
    first = decide(other, None, "a", at(0), TIMING)
    assert first.write is None
    assert decide(other, first.seen, "a", at(15), TIMING).write is not None


def test_the_holders_duration_counts_not_mine() -> None:
    other = LeaseRecord("b", 60, at(0), at(0), 0)
    seen = decide(other, None, "a", at(0), TIMING).seen
    assert decide(other, seen, "a", at(30), TIMING).write is None
    assert decide(other, seen, "a", at(60), TIMING).write is not None


def test_a_released_lease_is_taken_at_once_and_counts_a_transition() -> None:
    gone = LeaseRecord("", RELEASED_DURATION_SECONDS, at(0), at(0), 5)
    step = decide(gone, None, "a", at(0.1), TIMING)
    assert step.write == LeaseRecord("a", 15, at(0.1), at(0.1), 6)


def test_release_clears_the_holder_and_keeps_the_count() -> None:
    mine = LeaseRecord("a", 15, at(0), at(8), 2)
    assert released(mine, "a", at(9)) == LeaseRecord("", 1, at(9), at(9), 2)
    assert released(held_by("b", 0), "a", at(9)) is None
    assert released(None, "a", at(9)) is None


def test_renew_deadline() -> None:
    assert not renew_overdue(at(0), at(9.99), TIMING)
    assert renew_overdue(at(0), at(10), TIMING)


@pytest.mark.parametrize(
    ("duration", "renew", "retry", "field"),
    [(15, 10, 0, "retry_seconds"), (15, 2, 2, "renew_seconds"), (10, 10, 2, "duration_seconds")],
)
def test_timings_that_could_elect_two_leaders_are_refused(
    duration: float, renew: float, retry: float, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        Timing(duration, renew, retry)


def test_spec_round_trip_in_the_api_servers_format() -> None:
    record = LeaseRecord("op-1", 15, at(0.5), at(7.25), 3)
    spec = to_spec(record)
    assert spec == {
        "holderIdentity": "op-1",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 3,
        "acquireTime": "2025-03-01T12:00:00.500000Z",
        "renewTime": "2025-03-01T12:00:07.250000Z",
    }
    assert from_spec(spec) == record
    # Whole seconds still get six fraction digits; other zones are written as UTC.
    cet = dt.timezone(dt.timedelta(hours=1))
    whole = to_spec(LeaseRecord("x", 1, dt.datetime(2025, 3, 1, 13, tzinfo=cet), None, 0))
    assert whole["acquireTime"] == "2025-03-01T12:00:00.000000Z"
    assert "renewTime" not in whole


def test_an_empty_or_partial_spec_reads_as_unheld() -> None:
    assert from_spec(None) == LeaseRecord()
    assert from_spec({"holderIdentity": None, "leaseTransitions": 2}) == LeaseRecord(transitions=2)


# -- two candidates on one Lease ----------------------------------------------------------


@dataclass
class Store:
    """The API server's view of one Lease: a record and a resourceVersion."""

    record: LeaseRecord | None = None
    version: int = 0

    def write(self, record: LeaseRecord, read_version: int) -> bool:
        if read_version != self.version:
            return False  # 409: someone wrote since this candidate read
        self.record, self.version = record, self.version + 1
        return True


@dataclass
class Candidate:
    """leader.py's loop over decide/renew_overdue, stepped by the test's clock. Like the
    operator, a candidate that lost the lease exits."""

    name: str
    next_try: float
    seen: Seen | None = None
    leading: bool = False
    exited: bool = False
    last_renewed: dt.datetime = T0
    read: tuple[LeaseRecord | None, int] | None = None
    led: list[tuple[float, float]] = field(default_factory=list)  # (from, to) seconds

    def read_lease(self, store: Store, reachable: bool) -> None:
        self.read = (store.record, store.version) if reachable else None

    def write_lease(self, store: Store, t: float) -> None:
        wrote, held_by_other = False, False
        self.next_try = t + TIMING.retry_seconds
        if self.read is not None:  # else the read failed: nothing learned, nothing written
            current, version = self.read
            step = decide(current, self.seen, self.name, at(t), TIMING)
            self.seen, self.next_try = step.seen, t + step.wait_seconds
            wrote = step.write is not None and store.write(step.write, version)
            held_by_other = step.write is None
        if self.leading:
            if wrote:
                self.last_renewed = at(t)
            elif held_by_other or renew_overdue(self.last_renewed, at(t), TIMING):
                self.exit(t)
        elif wrote:
            self.leading, self.last_renewed = True, at(t)
            self.led.append((t, float("inf")))

    def exit(self, t: float) -> None:
        if self.leading:
            self.led[-1] = (self.led[-1][0], t)
        self.leading, self.exited = False, True


@settings(max_examples=200, deadline=None)
@given(
    offsets=st.tuples(st.floats(0, 3), st.floats(0, 3)),
    b_writes_first=st.booleans(),
    cut=st.tuples(st.floats(0, 40), st.floats(0, 30)),
    kill_at=st.floats(20, 60),
)
def test_two_candidates_never_lead_at_once_and_the_survivor_takes_over(
    offsets: tuple[float, float],
    b_writes_first: bool,
    cut: tuple[float, float],
    kill_at: float,
) -> None:
    """Both start together (reads before either write: a race); a's API calls fail for a
    while (a leader partitioned from the API server); then a dies."""
    store = Store()
    a, b = Candidate("a", offsets[0]), Candidate("b", offsets[1])
    cut_from, cut_to = cut[0], cut[0] + cut[1]
    tick = 0.25
    t = 0.0
    while t < 120:
        if t >= kill_at and not a.exited:
            a.exit(kill_at)
        due = [x for x in (a, b) if not x.exited and x.next_try <= t]
        for x in due:  # every due candidate reads before any writes: the worst interleaving
            x.read_lease(store, reachable=not (x is a and cut_from <= t < cut_to))
        for x in sorted(due, key=lambda x: (x.name == "b") != b_writes_first):
            x.write_lease(store, t)
        t += tick
    spans = sorted(a.led + b.led)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"two leaders at once: a {a.led}, b {b.led}"
    assert not b.exited and b.leading
    assert store.record is not None and store.record.holder == "b"
    # Once a is gone, b leads within one lease duration and a retry period.
    assert b.led[0][0] <= kill_at + TIMING.duration_seconds + TIMING.retry_seconds + tick
    assert store.record.transitions == len(spans) - 1
