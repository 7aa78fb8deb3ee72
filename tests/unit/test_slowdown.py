"""Tests of slowed nodes: the knob, the duty cycle, the freezers, and a real half-speed child."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddl_localcluster import netns
from ddl_localcluster.nodeagent import slowdown
from ddl_localcluster.nodeagent.control import Command, execute
from ddl_localcluster.nodeagent.throttle import (
    CGROUP_MOUNTS,
    Throttle,
    cgroup2_root,
    cleanup_cgroups,
    join_command,
    make_throttle,
)

# -- the knob -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("0.5", 0.5), (" 0.25 ", 0.25), ("50%", 0.5), ("1", 1.0), ("100%", 1.0), (0.05, 0.05)],
)
def test_a_fraction_is_a_number_or_a_percentage(text: str | float, fraction: float) -> None:
    assert slowdown.parse_fraction(text) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("half", "is not a fraction"),
        ("", "is not a fraction"),
        ("0", "outside [0.05, 1]"),
        ("0.01", "outside [0.05, 1]"),
        ("1.5", "outside [0.05, 1]"),
        ("-0.5", "outside [0.05, 1]"),
        ("nan", "outside [0.05, 1]"),
        ("inf", "outside [0.05, 1]"),
        (True, "is not a fraction"),
    ],
)
def test_a_fraction_outside_the_range_is_refused_naming_it(text: str | float, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        slowdown.parse_fraction(text)
    assert repr(text) in str(error.value)


# -- the duty cycle -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "phase", "frozen"),
    [
        (0.5, 0.0, False),
        (0.5, 0.049, False),
        (0.5, 0.05, True),
        (0.5, 0.099, True),
        (0.5, 0.1, False),  # the next period starts running
        (0.5, 0.37, True),  # phases wrap
        (0.25, 0.03, True),
        (1.0, 0.099, False),  # full speed is never frozen
    ],
)
def test_a_node_runs_its_fraction_of_the_period_then_freezes(
    fraction: float, phase: float, frozen: bool
) -> None:
    assert slowdown.is_frozen(fraction, phase, period=0.1) is frozen


def test_the_run_time_is_the_fraction_of_the_period() -> None:
    assert slowdown.run_seconds(0.3, period=0.2) == pytest.approx(0.06)


def test_frozen_nodes_and_the_time_to_the_next_change() -> None:
    fractions = {"a": 0.5, "b": 0.2}
    assert slowdown.frozen_nodes(fractions, 0.01, period=0.1) == set()
    assert slowdown.until_change(fractions, 0.01, period=0.1) == pytest.approx(0.01)  # b freezes
    assert slowdown.frozen_nodes(fractions, 0.03, period=0.1) == {"b"}
    assert slowdown.until_change(fractions, 0.03, period=0.1) == pytest.approx(0.02)  # a freezes
    assert slowdown.frozen_nodes(fractions, 0.07, period=0.1) == {"a", "b"}
    assert slowdown.until_change(fractions, 0.07, period=0.1) == pytest.approx(0.03)  # both thaw
    assert slowdown.until_change({}, 0.07, period=0.1) == pytest.approx(0.03)


def test_over_many_phases_a_node_runs_for_its_fraction_of_the_time() -> None:
    samples = [i / 1000 for i in range(1000)]  # one second, ten periods
    running = sum(not slowdown.is_frozen(0.3, t, period=0.1) for t in samples)
    assert running == pytest.approx(300, abs=10)


# -- the throttle, with a freezer that records --------------------------------------------------


class RecordingFreezer:
    description = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.closed = False

    def command_prefix(self, node: str) -> list[str]:
        return ["join", node]

    def set_frozen(self, node: str, frozen: bool) -> None:
        self.calls.append((node, frozen))

    def close(self) -> None:
        self.closed = True


def run_throttle(throttle: Throttle, seconds: float) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=throttle.run, args=(stop,))
    thread.start()
    threading.Event().wait(seconds)
    stop.set()
    throttle.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_the_throttle_cycles_only_slowed_nodes_and_leaves_them_running() -> None:
    freezer = RecordingFreezer()
    throttle = Throttle(freezer, print)
    throttle.set("slow", 0.5)
    throttle.set("fast", 1.0)
    assert throttle.fractions() == {"slow": 0.5}
    run_throttle(throttle, 0.5)
    freezes = [frozen for node, frozen in freezer.calls if node == "slow"]
    assert {node for node, _ in freezer.calls} == {"slow"}
    assert freezes.count(True) >= 3  # about five periods
    assert freezes[-1] is False  # stopping thaws
    throttle.close()
    assert freezer.closed


def test_full_speed_again_thaws_and_stops_cycling() -> None:
    freezer = RecordingFreezer()
    throttle = Throttle(freezer, print)
    throttle.set("n0", 0.2)
    stop = threading.Event()
    thread = threading.Thread(target=throttle.run, args=(stop,))
    thread.start()
    threading.Event().wait(0.3)
    throttle.set("n0", 1.0)
    threading.Event().wait(0.05)
    calls = len(freezer.calls)
    threading.Event().wait(0.3)
    stop.set()
    throttle.stop()
    thread.join(5)
    assert freezer.calls[-1] == ("n0", False)
    assert len(freezer.calls) == calls  # nothing more once it is at full speed
    assert throttle.fractions() == {}


def test_a_freezer_error_is_said_and_the_cycle_goes_on() -> None:
    class Failing(RecordingFreezer):
        def set_frozen(self, node: str, frozen: bool) -> None:
            super().set_frozen(node, frozen)
            raise OSError("read-only file system")

    said: list[str] = []
    freezer = Failing()
    throttle = Throttle(freezer, said.append)
    throttle.set("n0", 0.5)
    run_throttle(throttle, 0.35)
    assert len(freezer.calls) >= 4
    assert said and said[0] == "slowdown of n0: read-only file system"


# -- the control command ------------------------------------------------------------------------


class SlowAgent:
    def __init__(self) -> None:
        self.slowed: list[tuple[str, float]] = []

    def node_names(self) -> list[str]:
        return ["n0"]

    def status(self) -> dict[str, object]:
        return {}

    def node_down(self, node: str, kill_pods: bool) -> str:
        raise AssertionError("not this one")

    def node_up(self, node: str) -> str:
        raise AssertionError("not this one")

    def node_delete(self, node: str) -> str:
        raise AssertionError("not this one")

    def node_slow(self, node: str, fraction: float) -> str:
        self.slowed.append((node, fraction))
        return "slowed"


@pytest.mark.parametrize(("sent", "fraction"), [("50%", 0.5), (0.25, 0.25), ("1", 1.0)])
def test_node_slow_parses_the_fraction_before_it_reaches_the_agent(
    sent: str | float, fraction: float
) -> None:
    agent, command = SlowAgent(), Command("node-slow", "n0", fraction=sent)
    execute(command, agent)
    assert command.reply == {"ok": True, "message": "slowed"}
    assert agent.slowed == [("n0", fraction)]


def test_node_slow_with_a_bad_fraction_answers_why_and_changes_nothing() -> None:
    agent, command = SlowAgent(), Command("node-slow", "n0", fraction="2")
    execute(command, agent)
    assert command.reply["ok"] is False and "outside [0.05, 1]" in command.reply["message"]
    assert agent.slowed == []


# -- cgroups and processes ----------------------------------------------------------------------


def test_only_a_writable_v2_hierarchy_is_taken(tmp_path: Path) -> None:
    v1, v2, missing = tmp_path / "v1", tmp_path / "v2", tmp_path / "none"
    for path in (v1, v2):
        path.mkdir()
        (path / "cgroup.procs").write_text("")
    (v1 / "tasks").write_text("")
    assert cgroup2_root([missing, v1, v2]) == v2
    assert cgroup2_root([missing, v1]) is None


def test_the_join_prefix_moves_the_command_itself_then_execs_it(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    out = subprocess.run(
        [*join_command(procs), "sh", "-c", "echo $$"], capture_output=True, text=True, check=True
    )
    assert procs.read_text().strip() == out.stdout.strip()  # the same pid: nothing forked first


CPU_LOOP = """
import time
end = time.monotonic() + float(__import__("sys").argv[1])
while time.monotonic() < end:
    pass
print(time.process_time())
"""


@pytest.fixture(params=["cgroup", "signals"])
def throttle_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    if request.param == "cgroup" and cgroup2_root() is None:
        pytest.skip("no writable cgroup v2 hierarchy here")
    yield request.param, tmp_path


def _start(prefix: list[str], seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", CPU_LOOP, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_a_cpu_bound_child_of_a_node_at_half_speed_gets_about_half_the_cpu(
    throttle_kind: tuple[str, Path],
) -> None:
    """Two identical children side by side, so the host's other load hits both alike.

    The slowed one runs half of each period at the other's pace, and while it is frozen the
    other gets its CPU too, so on a busy host the ratio falls below a half (0.36 measured here
    on 2 cores at load 3.5): a straggler by any measure, which is what the knob is for.
    """
    kind, state_dir = throttle_kind
    children: dict[str, subprocess.Popen[str]] = {}

    def groups(node: str) -> list[int]:
        return [children[node].pid] if node in children else []

    roots = CGROUP_MOUNTS if kind == "cgroup" else (state_dir / "no-cgroups",)
    throttle = make_throttle(state_dir, ["slow", "fast"], groups, print, roots=roots)
    assert (kind == "signals") == ("SIGSTOP" in throttle.description)
    throttle.set("slow", 0.5)
    stop = threading.Event()
    thread = threading.Thread(target=throttle.run, args=(stop,))
    thread.start()
    try:
        for node in ("slow", "fast"):
            children[node] = _start(throttle.command_prefix(node), 2.0)
        cpu = {node: float(child.communicate(timeout=30)[0]) for node, child in children.items()}
    finally:
        stop.set()
        throttle.stop()
        thread.join(5)
        throttle.close()
        for child in children.values():
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    ratio = cpu["slow"] / cpu["fast"]
    assert 0.25 <= ratio <= 0.72, f"slowed child got {ratio:.2f} of the other's CPU ({cpu})"
    if kind == "cgroup":
        assert cleanup_cgroups(state_dir) == []  # close() removed them already


def test_cleanup_after_a_crash_thaws_kills_and_removes_a_frozen_node(tmp_path: Path) -> None:
    if cgroup2_root() is None:
        pytest.skip("no writable cgroup v2 hierarchy here")
    throttle = make_throttle(tmp_path, ["n0"], lambda node: [], print)
    child = _start(throttle.command_prefix("n0"), 60.0)
    try:
        threading.Event().wait(0.2)
        throttle.freezer.set_frozen("n0", True)  # as if the agent died mid-period
        assert cleanup_cgroups(tmp_path) == ["n0"]
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    root = cgroup2_root()
    assert root is not None and not (root / f"ddl{netns.tag(tmp_path)}").exists()
