"""A TCP <-> unix-socket relay, so a port inside a network namespace can be reached from the
host: one end runs in the namespace, the other on the host, and they meet at a socket file.

    python -m ddl_localcluster.forward unix-to-tcp --unix S --connect 127.0.0.1:9090  # in the ns
    python -m ddl_localcluster.forward tcp-to-unix --listen 127.0.0.1:19090 --unix S  # on host
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


def _relay(open_upstream: Opener) -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await open_upstream()
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return handle


async def serve(args: argparse.Namespace) -> None:
    if args.mode == "unix-to-tcp":
        host, port = args.connect.rsplit(":", 1)
        Path(args.unix).unlink(missing_ok=True)
        server = await asyncio.start_unix_server(
            _relay(lambda: asyncio.open_connection(host, int(port))), path=args.unix
        )
    else:
        host, port = args.listen.rsplit(":", 1)
        server = await asyncio.start_server(
            _relay(lambda: asyncio.open_unix_connection(args.unix)), host, int(port)
        )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddl_localcluster.forward", description=__doc__)
    parser.add_argument("mode", choices=["unix-to-tcp", "tcp-to-unix"])
    parser.add_argument("--unix", required=True, help="the socket file both ends share")
    parser.add_argument("--connect", help="unix-to-tcp: HOST:PORT to connect to")
    parser.add_argument("--listen", help="tcp-to-unix: HOST:PORT to listen on")
    args = parser.parse_args(argv)
    if (args.mode == "unix-to-tcp") != bool(args.connect) or (args.mode == "tcp-to-unix") != bool(
        args.listen
    ):
        parser.error("unix-to-tcp needs --connect, tcp-to-unix needs --listen")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
