"""The agent's control socket: node-down/up/delete/slow and status requests, `send()` to ask.

One JSON line in, one JSON line out, on a unix socket in the state directory. The socket's
thread only parses and waits: the agent's main loop executes each Command (see `execute`), so
commands never race the pod workers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from ddl_localcluster import netns
from ddl_localcluster.nodeagent import slowdown
from ddl_localcluster.nodeagent.api import ApiError

SOCKET_NAME: Final = "agent.sock"
# A unix socket path longer than this does not fit sockaddr_un (108 bytes, with some margin).
SOCKET_PATH_MAX: Final = 100
ANSWER_SECONDS: Final = 60
SEND_SECONDS: Final = 90
ACCEPT_POLL_SECONDS: Final = 0.5


@dataclass
class Command:
    """A control request from the CLI, executed by the agent's main loop."""

    name: str
    node: str = ""
    kill_pods: bool = False
    # node-slow's speed as sent (a number or text such as "50%"); parsed when executed.
    fraction: str | float = slowdown.FULL_SPEED
    reply: dict[str, Any] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


def parse_command(line: str) -> Command:
    """A request line as a Command; ValueError or KeyError when it is not one."""
    request = json.loads(line)
    if not isinstance(request, dict):
        raise ValueError(f"a request is a JSON object, not {type(request).__name__}")
    return Command(
        request["command"],
        request.get("node", ""),
        request.get("kill_pods", False),
        request.get("fraction", slowdown.FULL_SPEED),
    )


def _answer(conn: socket.socket, reply: Mapping[str, Any]) -> None:
    conn.sendall(json.dumps(reply).encode() + b"\n")


def serve(path: Path, stop: threading.Event, submit: Callable[[Command], None]) -> None:
    """Answers requests on the socket at path until stop is set; submit queues each command."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(8)
        server.settimeout(ACCEPT_POLL_SECONDS)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(ANSWER_SECONDS)
                try:
                    command = parse_command(conn.makefile("r").readline())
                except (ValueError, KeyError, OSError) as err:
                    with contextlib.suppress(OSError):
                        _answer(conn, {"ok": False, "message": str(err)})
                    continue
                submit(command)
                if not command.done.wait(ANSWER_SECONDS):
                    command.reply = {"ok": False, "message": "the agent did not answer"}
                with contextlib.suppress(OSError):
                    _answer(conn, command.reply)


class Controlled(Protocol):
    """What the control commands act on: the agent's nodes and pods."""

    def node_names(self) -> Collection[str]: ...

    def status(self) -> dict[str, Any]: ...

    def node_down(self, node: str, kill_pods: bool) -> str: ...

    def node_up(self, node: str) -> str: ...

    def node_delete(self, node: str) -> str: ...

    def node_slow(self, node: str, fraction: float) -> str: ...


def _dispatch(command: Command, target: Controlled) -> Any:
    if command.name == "status":
        return target.status()
    names = target.node_names()
    if command.node not in names:
        raise ValueError(f"no node {command.node!r} here (nodes: {', '.join(names)})")
    if command.name == "node-down":
        return target.node_down(command.node, command.kill_pods)
    if command.name == "node-up":
        return target.node_up(command.node)
    if command.name == "node-delete":
        return target.node_delete(command.node)
    if command.name == "node-slow":
        return target.node_slow(command.node, slowdown.parse_fraction(command.fraction))
    raise ValueError(f"unknown command {command.name!r}")


def execute(command: Command, target: Controlled) -> None:
    """Runs one command against target and hands its reply to the waiting socket thread."""
    try:
        command.reply = {"ok": True, "message": _dispatch(command, target)}
    except (ApiError, OSError, ValueError, netns.NetworkError) as err:
        command.reply = {"ok": False, "message": str(err)}
    command.done.set()


def send(
    state_dir: Path, request: Mapping[str, Any], timeout: float = SEND_SECONDS
) -> dict[str, Any]:
    """One request to a running agent over its control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(state_dir / SOCKET_NAME))
        sock.sendall(json.dumps(request).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("r").readline())
        return answer
