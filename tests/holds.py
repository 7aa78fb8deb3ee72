"""Hold the example trainer at a step, so a test strikes while training is surely mid-run.

`examples/train_resnet.py --hold-at-step N --hold-file F` waits before step N until F exists
(rank 0 writes where it waits to F.held). A chaos test waits for the marker, strikes (kills a
pod, scales, kills the operator), then releases: the job cannot have finished before the
strike, however fast the machine. A resumed gang that comes back to step N waits again until
released, so a test can also watch a re-form happen while the job stands still.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Hold:
    step: int
    release_file: Path

    @classmethod
    def at(cls, step: int, directory: Path) -> Hold:
        directory.mkdir(parents=True, exist_ok=True)
        return cls(step, directory / f"release-{step}")

    @property
    def marker(self) -> Path:
        return self.release_file.with_name(self.release_file.name + ".held")

    def args(self) -> list[str]:
        """The trainer's arguments that set this hold."""
        return ["--hold-at-step", str(self.step), "--hold-file", str(self.release_file)]

    def held(self) -> dict[str, Any] | None:
        """{epoch, step, worldSize} of the last gang that reached the hold, or None."""
        try:
            found: dict[str, Any] = json.loads(self.marker.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return found

    def wait_held(
        self,
        timeout: float = 180,
        *,
        when: Callable[[dict[str, Any]], bool] = lambda _: True,
        log: Callable[[], str] = lambda: "",
    ) -> dict[str, Any]:
        """Until a gang waits at the hold (and when(marker) holds); fails with the job's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.held()
            if found is not None and when(found):
                return found
            time.sleep(0.2)
        raise AssertionError(
            f"training never held at step {self.step} within {timeout:.0f}s "
            f"(last marker: {self.held()})\n{log()}"
        )

    def release(self) -> None:
        self.release_file.touch()
