"""What the workers' reports say about the run: rank 0's summary and the straggler, if any."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from ddl_operator.api.models import Member, Rendezvous
from ddl_operator.core.reports import WorkerReport

STRAGGLER_RATIO: Final = 1.2
# Below a microsecond of compute per step the ratio says nothing (and could overflow).
STRAGGLER_MIN_SECONDS: Final = 1e-6


def find_straggler(
    rendezvous: Rendezvous | None,
    reports: Mapping[str, WorkerReport],
    threshold: float = STRAGGLER_RATIO,
) -> str | None:
    """A sentence naming the slowest worker if its compute time per step (step time minus
    sync-wait) exceeds `threshold` x the median of the others (spec.stragglers.threshold,
    by default 20% more); None otherwise.

    In synchronous training every rank's step takes as long as the slowest, so the step time
    cannot tell; the straggler is the one that waits least for communication.
    """
    if not rendezvous or len(rendezvous.members) < 3:
        return None
    compute: list[tuple[float, Member]] = []
    for member in rendezvous.members:
        report = reports.get(member.pod)
        if report is None or report.epoch != rendezvous.epoch:
            return None
        if report.step_seconds is None or report.sync_wait_ratio is None:
            return None
        compute.append((report.step_seconds * (1.0 - report.sync_wait_ratio), member))
    compute.sort(key=lambda pair: pair[0])
    slowest, member = compute[-1]
    others = [seconds for seconds, _ in compute[:-1]]
    median = others[len(others) // 2]
    if median < STRAGGLER_MIN_SECONDS or slowest <= threshold * median:
        return None
    return (
        f"rank {member.rank} ({member.pod} on {member.node}) computes "
        f"{(slowest / median - 1) * 100:.0f}% slower per step than the median worker"
    )


def rank0_summary(
    rendezvous: Rendezvous | None, reports: Mapping[str, WorkerReport]
) -> dict[str, Any]:
    """The progress rank 0 reported at the current epoch, as status fields."""
    if not rendezvous or not rendezvous.members:
        return {}
    report = reports.get(rendezvous.members[0].pod)
    if report is None or report.epoch != rendezvous.epoch:
        return {}
    fields = {
        "step": report.step,
        "throughput": report.throughput,
        "sync_wait_ratio": report.sync_wait_ratio,
    }
    return {key: value for key, value in fields.items() if value is not None}
