"""A node's slowdown as data: the knob's parsing and the duty cycle that runs a node at a fraction.

A slowed node's pods run for `fraction` of every PERIOD_SECONDS and are frozen for the rest,
so each of its processes gets `fraction` of the CPU time it would otherwise get, however busy
the host is. (A CPU quota caps absolute CPU instead: on a host where eight training processes
share two cores, a node capped at half a CPU may not slow down at all, so it would not make the
relative straggler a test needs.) No I/O and no clock here: the phase comes in as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

FULL_SPEED: Final = 1.0
# Below this a node is all but stopped: that is node-down's job, not a straggler's.
MIN_FRACTION: Final = 0.05
# Short enough that a frozen phase (at most 95 ms) never trips a heartbeat or a collective's
# timeout; long enough that two file writes per node and period cost next to nothing.
PERIOD_SECONDS: Final = 0.1


def parse_fraction(text: str | float) -> float:
    """The speed a knob value asks for, in [MIN_FRACTION, 1]: `0.5`, `50%`, or `1` for full.

    ValueError, naming the value, for anything else.
    """
    raw = text.strip() if isinstance(text, str) else text
    try:
        if isinstance(raw, str) and raw.endswith("%"):
            value = float(raw[:-1]) / 100.0
        elif isinstance(raw, bool):
            raise ValueError
        else:
            value = float(raw)
    except ValueError:
        raise ValueError(f"slowdown {text!r} is not a fraction such as 0.5 or 50%") from None
    if not math.isfinite(value) or not MIN_FRACTION <= value <= FULL_SPEED:
        raise ValueError(
            f"slowdown {text!r} is outside [{MIN_FRACTION:g}, {FULL_SPEED:g}] "
            "(1 is full speed; to stop a node use node-down)"
        )
    return value


def run_seconds(fraction: float, period: float = PERIOD_SECONDS) -> float:
    """How long of each period a node at `fraction` runs; it is frozen for the rest."""
    return fraction * period


def is_frozen(fraction: float, phase: float, period: float = PERIOD_SECONDS) -> bool:
    """Whether a node at `fraction` is frozen `phase` seconds into a period (it runs first)."""
    return fraction < FULL_SPEED and phase % period >= run_seconds(fraction, period)


def frozen_nodes(
    fractions: Mapping[str, float], phase: float, period: float = PERIOD_SECONDS
) -> frozenset[str]:
    """The nodes that are frozen at this phase of the period."""
    return frozenset(node for node, f in fractions.items() if is_frozen(f, phase, period))


def until_change(
    fractions: Mapping[str, float], phase: float, period: float = PERIOD_SECONDS
) -> float:
    """Seconds from `phase` to the next freeze or thaw of any node (at most one period).

    Every slowed node thaws at the start of a period and freezes after its run time.
    """
    at = phase % period
    edges = [period] + [run_seconds(f, period) for f in fractions.values() if f < FULL_SPEED]
    return min(edge - at for edge in edges if edge > at)


def describe(fraction: float) -> str:
    """How status and messages show a speed."""
    return "full speed" if fraction >= FULL_SPEED else f"{fraction:g} of full speed"
