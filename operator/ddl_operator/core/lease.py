"""Leader election on a coordination.k8s.io/v1 Lease: the pure decision, after client-go's
leaderelection.

Pure: leader.py reads the Lease, asks `decide` what to write, and writes it guarded by the
Lease's resourceVersion, so of two candidates that read the same record only one write lands.
Like client-go, a candidate judges another holder's lease expired by its own clock: the record
must stay unchanged for `leaseDurationSeconds` after this process first saw it. The holder's
renewTime is never compared with the local clock, so clock skew between machines cannot make a
live leader look expired.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, replace
from typing import Any, Final

# A released Lease says so with an empty holder and this duration, as client-go's does.
RELEASED_DURATION_SECONDS: Final = 1
_MICROTIME: Final = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True)
class Timing:
    """How long a lease lasts, how soon a leader gives up without a renewal, how often to try.

    duration > renew deadline keeps a leader that failed to renew from leading past the point
    where a standby may take over.
    """

    duration_seconds: float = 15.0
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.retry_seconds > 0:
            raise ValueError(f"retry_seconds must be > 0, got {self.retry_seconds}")
        if not self.renew_seconds > self.retry_seconds:
            raise ValueError(
                f"renew_seconds ({self.renew_seconds}) must exceed retry_seconds "
                f"({self.retry_seconds}): a leader needs more than one try per deadline"
            )
        if not self.duration_seconds > self.renew_seconds:
            raise ValueError(
                f"duration_seconds ({self.duration_seconds}) must exceed renew_seconds "
                f"({self.renew_seconds}): a leader must give up before a standby may take over"
            )


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec, as leader election reads and writes it. holder "" = nobody."""

    holder: str = ""
    duration_seconds: int = 0
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    transitions: int = 0


@dataclass(frozen=True)
class Seen:
    """A record and when (by this process's clock) it was first seen unchanged."""

    record: LeaseRecord | None
    at: dt.datetime


@dataclass(frozen=True)
class Step:
    """What to do now: `write` (holder = me) to lead, or None to leave the Lease alone;
    `seen` to pass to the next call; when to try again."""

    write: LeaseRecord | None
    seen: Seen
    wait_seconds: float


def decide(
    current: LeaseRecord | None, seen: Seen | None, me: str, now: dt.datetime, timing: Timing
) -> Step:
    """One try to acquire or renew. `current` is the Lease as read (None: it does not exist),
    `seen` what the previous call returned (None at first)."""
    if seen is None or seen.record != current:
        seen = Seen(current, now)  # changed since last look: the holder is alive as of now
    if current is not None and current.holder and current.holder != me:
        expires = seen.at + dt.timedelta(seconds=current.duration_seconds)
        if now < expires:
            # Look again when it would expire, if that is sooner than the next regular try.
            left = (expires - now).total_seconds()
            return Step(None, seen, min(timing.retry_seconds, left))
    duration = math.ceil(timing.duration_seconds)
    if current is None:
        record = LeaseRecord(me, duration, now, now, 0)
    elif current.holder == me:
        record = replace(current, duration_seconds=duration, renew_time=now)
        if record.acquire_time is None:
            record = replace(record, acquire_time=now)
    else:  # unheld or expired: a new holder
        record = LeaseRecord(me, duration, now, now, current.transitions + 1)
    return Step(record, seen, timing.retry_seconds)


def renew_overdue(last_renewed: dt.datetime, now: dt.datetime, timing: Timing) -> bool:
    """A leader with no successful renewal for the renew deadline must stop leading."""
    return (now - last_renewed).total_seconds() >= timing.renew_seconds


def released(current: LeaseRecord | None, me: str, now: dt.datetime) -> LeaseRecord | None:
    """The record that hands the Lease back (None: not mine to release), so a standby takes
    over at its next try instead of waiting out the duration."""
    if current is None or current.holder != me:
        return None
    return LeaseRecord("", RELEASED_DURATION_SECONDS, now, now, current.transitions)


# -- the API's JSON ---------------------------------------------------------------------------


def from_spec(spec: dict[str, Any] | None) -> LeaseRecord:
    """A Lease's `spec` as the API returns it (fields may be missing or null)."""
    spec = spec or {}
    return LeaseRecord(
        holder=spec.get("holderIdentity") or "",
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=_parse_time(spec.get("acquireTime")),
        renew_time=_parse_time(spec.get("renewTime")),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def to_spec(record: LeaseRecord) -> dict[str, Any]:
    """The `spec` to write; times as MicroTime (RFC 3339, six fraction digits, UTC)."""
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time is not None:
        spec["acquireTime"] = _format_time(record.acquire_time)
    if record.renew_time is not None:
        spec["renewTime"] = _format_time(record.renew_time)
    return spec


def _format_time(t: dt.datetime) -> str:
    # Always six digits: the API server parses MicroTime with a fixed-width fraction.
    return t.astimezone(dt.UTC).strftime(_MICROTIME)


def _parse_time(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
