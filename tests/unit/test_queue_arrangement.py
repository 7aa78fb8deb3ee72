"""The runtime's walk of the GPU queue: shared by every waiting job's pass while nothing
changes, redone when a demand or the capacity does, going only as far as asked, and giving
each job the slot that walking up to it alone gives."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, cast

from ddl_operator.api import constants as c
from ddl_operator.core.placement import GangRequest
from ddl_operator.core.queueing import Demand, arrange
from ddl_operator.runtime import Runtime, Settings, WorkQueue

from builders import T0, rack_nodes

LEVELS = (c.LABEL_HOSTNAME, c.LABEL_RACK, c.LABEL_ZONE)


def waiting(name: str, workers: int, at: float) -> Demand:
    request = GangRequest(workers, workers, 8, LEVELS, c.LABEL_RACK, 1)
    return Demand(("ml", name), 0, T0 + dt.timedelta(seconds=at), request)


def runtime(*demands: Demand) -> Runtime:
    rt = Runtime(
        settings=Settings(),
        queue=WorkQueue(),
        kube=cast(Any, None),
        cache=cast(Any, None),
        executor=ThreadPoolExecutor(1),
    )
    rt.demands.update({d.key: d for d in demands})
    return rt


def test_each_slot_is_what_walking_up_to_that_job_gives_in_any_asking_order() -> None:
    nodes = tuple(replace(n, used=8 if n.name == "r0-n0" else 0) for n in rack_nodes(2, 4))
    jobs = [waiting("big", 4, 0), waiting("mid", 3, 1), waiting("small", 1, 2)]
    for asking in (jobs, jobs[::-1], [jobs[1], jobs[0], jobs[2]]):
        rt = runtime(*jobs)
        for job in asking:
            alone = arrange(jobs, nodes, until=job.key).slots[job.key]
            assert rt.slot(job.key, nodes, {}) == alone, job.key


def test_one_walk_serves_every_pass_until_capacity_or_a_demand_changes() -> None:
    nodes = tuple(rack_nodes(2, 4))
    rt = runtime(waiting("big", 4, 0), waiting("small", 1, 1))
    rt.slot(("ml", "small"), nodes, {})
    first = rt.arrangement
    assert first is not None and set(first.slots) == {("ml", "big"), ("ml", "small")}
    rt.slot(("ml", "big"), tuple(replace(n) for n in nodes), {})
    assert rt.arrangement is first, "equal capacity and demands: the same walk"
    busier = tuple(replace(n, used=8) if n.name == "r1-n0" else n for n in nodes)
    rt.slot(("ml", "big"), busier, {})
    second = rt.arrangement
    assert second is not first and second is not None
    assert set(second.slots) == {("ml", "big")}, "walks only as far as asked"
    rt.demands[("ml", "late")] = waiting("late", 2, 5)
    assert rt.slot(("ml", "late"), busier, {}) is not None
    assert rt.arrangement is not second
    assert rt.slot(("ml", "gone"), busier, {}) is None
