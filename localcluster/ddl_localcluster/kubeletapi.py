"""The slice of the kubelet's HTTPS API that `kubectl logs` needs, served by the node agent.

`kubectl logs POD` asks the API server, which connects to the node's kubelet endpoint
(`status.daemonEndpoints.kubeletEndpoint` on the node's preferred address) and streams
`GET /containerLogs/{namespace}/{pod}/{container}` back. The agent serves that one path for all
of its nodes on 127.0.0.1 (the nodes' own addresses live in network namespaces the API server
cannot reach). TLS with a self-signed certificate made at start: the API server does not check
kubelet certificates unless told a CA. Clients are not authenticated: the port is on loopback
and the logs are files the same user can read anyway.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

from ddl_localcluster.pki import write_self_signed

FOLLOW_POLL_SECONDS: Final = 0.2


@dataclass(frozen=True)
class ContainerLog:
    """Where a container's output goes, and whether it may still grow."""

    path: Path
    running: Callable[[], bool]


class LogError(Exception):
    """An answer other than the log: HTTP status and the message a kubelet would give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# (namespace, pod, container) -> the log, or LogError.
Lookup = Callable[[str, str, str], ContainerLog]


def tail_offset(path: Path, lines: int) -> int:
    """Byte offset where the last `lines` lines of the file start."""
    data = path.read_bytes()
    if lines <= 0:
        return len(data)
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    offset = end
    for _ in range(lines):
        offset = data.rfind(b"\n", 0, offset)
        if offset < 0:
            return 0
    return offset + 1


class KubeletApi:
    """HTTPS on 127.0.0.1 (a free port) answering /containerLogs from `lookup`."""

    def __init__(self, lookup: Lookup, cert_dir: Path) -> None:
        cert_file, key_file = write_self_signed(cert_dir, "ddl-nodeagent")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        self._stopping = threading.Event()
        handler = _handler(lookup, self._stopping)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kubelet-api", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


def _handler(lookup: Lookup, stopping: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # the agent's log is for pods and nodes, not for each request

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._error(404, f"{url.path}: only /containerLogs/NAMESPACE/POD/CONTAINER")
                return
            query = urllib.parse.parse_qs(url.query)
            try:
                if query.get("previous", ["false"])[0] == "true":
                    raise LogError(
                        400,
                        "previous terminated container not found: the local node agent keeps "
                        "one log per container, restarts append to it",
                    )
                log = lookup(parts[1], parts[2], parts[3])
                tail = query.get("tailLines")
                start = tail_offset(log.path, int(tail[0])) if tail else 0
            except LogError as err:
                self._error(err.status, str(err))
                return
            except (OSError, ValueError) as err:
                self._error(400, str(err))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            follow = query.get("follow", ["false"])[0] == "true"
            self._stream(log, start, follow)

        def _stream(self, log: ContainerLog, offset: int, follow: bool) -> None:
            with log.path.open("rb") as source:
                source.seek(offset)
                while True:
                    chunk = source.read(1 << 16)
                    if chunk:
                        try:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                        except OSError:
                            return  # the client went away
                        continue
                    if not follow or stopping.is_set():
                        return
                    if not log.running():
                        # One last read: output written just before the exit.
                        rest = source.read()
                        if rest:
                            self.wfile.write(rest)
                        return
                    time.sleep(FOLLOW_POLL_SECONDS)

        def _error(self, status: int, message: str) -> None:
            body = message.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
