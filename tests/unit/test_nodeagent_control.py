"""Tests of the node agent's control socket: request parsing, command dispatch, a round trip."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ddl_localcluster.nodeagent.api import ApiError
from ddl_localcluster.nodeagent.control import (
    SOCKET_NAME,
    Command,
    execute,
    parse_command,
    send,
    serve,
)


class FakeAgent:
    """A control target that records what it was told to do."""

    def __init__(self, nodes: tuple[str, ...] = ("n0", "n1"), fail: Exception | None = None):
        self.nodes, self.fail = nodes, fail
        self.calls: list[tuple[Any, ...]] = []

    def node_names(self) -> list[str]:
        return list(self.nodes)

    def status(self) -> dict[str, Any]:
        return {"nodes": {n: "up" for n in self.nodes}}

    def _act(self, *call: Any) -> str:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail
        return f"{call[0]} {call[1]} done"

    def node_down(self, node: str, kill_pods: bool) -> str:
        return self._act("down", node, kill_pods)

    def node_up(self, node: str) -> str:
        return self._act("up", node)

    def node_delete(self, node: str) -> str:
        return self._act("delete", node)

    def node_slow(self, node: str, fraction: float) -> str:
        return self._act("slow", node, fraction)


@pytest.mark.parametrize(
    ("line", "name", "node", "kill_pods"),
    [
        ('{"command": "status"}', "status", "", False),
        ('{"command": "node-down", "node": "n0", "kill_pods": true}\n', "node-down", "n0", True),
        ('{"command": "node-up", "node": "n1"}', "node-up", "n1", False),
    ],
)
def test_parse_command(line: str, name: str, node: str, kill_pods: bool) -> None:
    command = parse_command(line)
    assert (command.name, command.node, command.kill_pods) == (name, node, kill_pods)
    assert not command.done.is_set()


def test_parse_command_carries_node_slows_fraction_and_defaults_to_full_speed() -> None:
    assert parse_command('{"command": "node-slow", "node": "n0", "fraction": "50%"}').fraction == (
        "50%"
    )
    assert parse_command('{"command": "node-slow", "node": "n0"}').fraction == 1.0


@pytest.mark.parametrize(
    ("line", "error"),
    [("", ValueError), ("not json", ValueError), ("[1]", ValueError), ('{"node": "n0"}', KeyError)],
)
def test_parse_command_rejects_what_is_not_a_request(line: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_command(line)


@pytest.mark.parametrize(
    ("command", "call", "message"),
    [
        (Command("node-down", "n0"), ("down", "n0", False), "down n0 done"),
        (Command("node-down", "n1", kill_pods=True), ("down", "n1", True), "down n1 done"),
        (Command("node-up", "n1"), ("up", "n1"), "up n1 done"),
        (Command("node-delete", "n0"), ("delete", "n0"), "delete n0 done"),
        (Command("node-slow", "n1", fraction="50%"), ("slow", "n1", 0.5), "slow n1 done"),
    ],
)
def test_node_commands_reach_the_agent(
    command: Command, call: tuple[Any, ...], message: str
) -> None:
    agent = FakeAgent()
    execute(command, agent)
    assert command.done.is_set()
    assert command.reply == {"ok": True, "message": message}
    assert agent.calls == [call]


def test_status_needs_no_node() -> None:
    command = Command("status")
    execute(command, FakeAgent())
    assert command.reply == {"ok": True, "message": {"nodes": {"n0": "up", "n1": "up"}}}


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Command("node-down", "n9"), "no node 'n9' here (nodes: n0, n1)"),
        (Command("reboot", "n9"), "no node 'n9' here (nodes: n0, n1)"),  # the node comes first
        (Command("reboot", "n0"), "unknown command 'reboot'"),
    ],
)
def test_bad_commands_answer_what_is_wrong(command: Command, message: str) -> None:
    agent = FakeAgent()
    execute(command, agent)
    assert command.reply == {"ok": False, "message": message}
    assert command.done.is_set() and agent.calls == []


def test_an_api_error_of_a_command_is_its_answer() -> None:
    command = Command("node-up", "n0")
    execute(command, FakeAgent(fail=ApiError(409, "conflict")))
    assert command.reply == {"ok": False, "message": "HTTP 409: conflict"}
    assert command.done.is_set()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, FakeAgent]]:
    """A control socket whose commands run at once against a FakeAgent."""
    agent, stop = FakeAgent(), threading.Event()
    thread = threading.Thread(
        target=serve, args=(tmp_path / SOCKET_NAME, stop, lambda c: execute(c, agent))
    )
    thread.start()
    try:
        yield tmp_path, agent
    finally:
        stop.set()
        thread.join(5)


def wait_for_socket(path: Path) -> None:
    """Until the server accepts connections (the file appears at bind, before listen)."""
    for _ in range(250):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
        threading.Event().wait(0.02)
    raise AssertionError(f"{path} does not accept connections")


def test_send_round_trips_through_the_socket(served: tuple[Path, FakeAgent]) -> None:
    state_dir, agent = served
    wait_for_socket(state_dir / SOCKET_NAME)
    answer = send(state_dir, {"command": "node-down", "node": "n1", "kill_pods": True}, timeout=5)
    assert answer == {"ok": True, "message": "down n1 done"}
    assert agent.calls == [("down", "n1", True)]
    assert send(state_dir, {"command": "status"}, timeout=5)["message"]["nodes"] == {
        "n0": "up",
        "n1": "up",
    }


def test_a_malformed_request_gets_an_error_and_the_socket_keeps_serving(
    served: tuple[Path, FakeAgent],
) -> None:
    state_dir, agent = served
    wait_for_socket(state_dir / SOCKET_NAME)
    answer = send(state_dir, {"node": "n0"}, timeout=5)
    assert answer["ok"] is False and "command" in answer["message"]
    assert send(state_dir, {"command": "node-up", "node": "n0"}, timeout=5)["ok"] is True
    assert agent.calls == [("up", "n0")]
