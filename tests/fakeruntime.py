"""The operator's runtime around a fake kube client, for unit tests of the controller's
passes: no cluster, no event loop unless the test starts one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ddl_operator.runtime import Runtime, Settings, WorkQueue


class IdleCache:
    """The node cache, synced, holding no reservations and no other tenants' GPU pods."""

    synced = True

    def forget(self, key: Any) -> None:
        pass

    def assume(self, key: Any, charge: Any) -> None:
        pass

    def foreign_usage(self) -> dict[str, int]:
        return {}


class JobWatchSink:
    """What a fake kube client does with the DDLJob watch's bodies: nothing (its snapshot
    reads its own copies)."""

    def observe_job(self, body: Any) -> None:
        pass

    def forget_job(self, key: Any) -> None:
        pass


def fake_runtime(
    kube: Any,
    executor: ThreadPoolExecutor,
    settings: Settings | None = None,
    queue: WorkQueue | None = None,
) -> Runtime:
    """A Runtime built by hand around `kube` (a fake of ddl_operator.kube.Kube)."""
    return Runtime(
        settings=settings or Settings(),
        queue=queue or WorkQueue(),
        kube=cast(Any, kube),
        cache=cast(Any, IdleCache()),
        executor=executor,
    )
