"""Network emulation for the local cluster: a namespace per node and per pod, shaped node uplinks.

Layout (netns mode, needs root and `ip netns`):

    spine ns: bridge "spine" ── n<i> ══tbf══ up0 ── node ns <i>: bridge "br0" (host IP)
                                                       └── p<k> ── pod ns: eth0 (pod IP)

Every address (10.213.0.0/16 by default) lives inside namespaces made here, so deleting those
namespaces removes every veth, bridge and qdisc with them, and the host's network is never
touched. Pods reach the API server on the host through a relay: the agent listens on
127.0.0.1:<apiserver port> inside each pod's namespace and carries connections to the host.
Without root (or when `ip netns` fails) pods share the host namespace and get distinct
loopback addresses instead (no isolation of ports between nodes, no shaping).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeVar

from ddl_localcluster.topology import ClusterSpec, rate_bits

RECORD: Final = "network.json"
NETNS_DIR: Final = Path("/run/netns")
CLONE_NEWNET: Final = 0x40000000
SPINE_BRIDGE: Final = "spine"
NODE_BRIDGE: Final = "br0"
UPLINK: Final = "up0"
# tbf queue bound: packets waiting longer than this are dropped (TCP then backs off).
TBF_LATENCY: Final = "50ms"

# $0: the pod's hosts file, $1: its hostname, then the command.
_SANDBOX: Final = (
    'mount --bind "$0" /etc/hosts && mount -t tmpfs -o mode=1777 ddl-shm /dev/shm && '
    'hostname "$1" && shift && exec "$@"'
)

Mode = Literal["netns", "loopback"]
T = TypeVar("T")


class NetworkError(RuntimeError):
    """An `ip`/`tc` command failed; the message has the command and its stderr."""


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _ip(netns: str | None, *args: str) -> str:
    return _run(["ip", *(["-n", netns] if netns else []), *args])


def tag(state_dir: Path) -> str:
    """Short id of one agent's state directory: its namespaces are named ddl<tag>-*."""
    return hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:6]


def tbf_burst(rate: str) -> int:
    """Bucket size in bytes: 10 ms at line rate, at least 64 KiB so a GSO packet fits."""
    return max(rate_bits(rate) // 8 // 100, 64 * 1024)


@dataclass(frozen=True)
class PodNetwork:
    """A pod's address and, in netns mode, its namespace and the veth on its node's bridge."""

    ip: str
    node_index: int
    netns: str | None = None
    node_netns: str | None = None
    link: str | None = None


class Network:
    """The namespaces and addresses of one agent; every namespace made is recorded first."""

    def __init__(self, state_dir: Path, mode: Mode, spec: ClusterSpec) -> None:
        self.state_dir = state_dir
        self.mode: Mode = mode
        self.tag = tag(state_dir)
        if mode == "netns":
            net = ipaddress.ip_network(spec.subnet)
            self.base = int(net.network_address)
            self.prefixlen = net.prefixlen
        else:
            # A second octet per agent, so two agents' pods do not share loopback addresses.
            self.base = int(ipaddress.ip_address(f"127.{16 + int(self.tag, 16) % 200}.0.0"))
            self.prefixlen = 8
        self._used: dict[int, set[int]] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._namespaces: list[str] = []

    # -- addresses --------------------------------------------------------------------------

    def _address(self, node_index: int, host: int) -> str:
        """Node i owns the /24 at base + i*256: .1 is the node, .2-.254 its pods."""
        return str(ipaddress.ip_address(self.base + node_index * 256 + host))

    def host_ip(self, node_index: int) -> str:
        """The node's own address (status.hostIP): its bridge in netns mode."""
        return self._address(node_index, 1)

    @property
    def spine_ip(self) -> str:
        """An address in the spine namespace: run a process there to reach every pod."""
        return str(ipaddress.ip_address(self.base + 255 * 256 + 254))

    def spine_netns(self) -> str:
        return f"ddl{self.tag}-spine"

    def node_netns(self, node_index: int) -> str:
        return f"ddl{self.tag}-n{node_index}"

    def _allocate(self, node_index: int, prefer: str | None) -> str:
        used = self._used.setdefault(node_index, set())
        candidates = list(range(2, 255))
        if prefer is not None:
            wanted = [h for h in candidates if self._address(node_index, h) == prefer]
            candidates = wanted + candidates
        for host in candidates:
            if host not in used:
                used.add(host)
                return self._address(node_index, host)
        raise NetworkError(f"node {node_index} has no free pod address left")

    def _release(self, pod: PodNetwork) -> None:
        # Every node block is 256-aligned, so the last byte is the pod's host number.
        self._used.get(pod.node_index, set()).discard(int(ipaddress.ip_address(pod.ip)) % 256)

    # -- record -----------------------------------------------------------------------------

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / RECORD
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"mode": self.mode, "namespaces": self._namespaces}, indent=1))
        tmp.replace(path)

    def _add_netns(self, name: str) -> None:
        """Records the name before creating it, so a crash in between still gets cleaned up."""
        self._namespaces.append(name)
        self._save()
        _run(["ip", "netns", "add", name])
        _ip(name, "link", "set", "lo", "up")

    def _delete_netns(self, name: str) -> None:
        kill_namespace_processes(name)
        with contextlib.suppress(NetworkError):
            _run(["ip", "netns", "delete", name])
        self._namespaces.remove(name)
        self._save()

    # -- building ---------------------------------------------------------------------------

    def build(self, spec: ClusterSpec, say: Callable[[str], None]) -> None:
        """Spine and one namespace per node, each node's uplink shaped in both directions."""
        spine = self.spine_netns()
        self._add_netns(spine)
        _ip(spine, "link", "add", SPINE_BRIDGE, "type", "bridge")
        _ip(spine, "addr", "add", f"{self.spine_ip}/{self.prefixlen}", "dev", SPINE_BRIDGE)
        _ip(spine, "link", "set", SPINE_BRIDGE, "up")
        for node in spec.nodes():
            ns = self.node_netns(node.index)
            port = f"n{node.index}"
            self._add_netns(ns)
            _ip(ns, "link", "add", NODE_BRIDGE, "type", "bridge")
            _ip(
                ns,
                "addr",
                "add",
                f"{self.host_ip(node.index)}/{self.prefixlen}",
                "dev",
                NODE_BRIDGE,
            )
            _ip(ns, "link", "set", NODE_BRIDGE, "up")
            _ip(ns, "link", "add", UPLINK, "type", "veth", "peer", "name", port, "netns", spine)
            _ip(ns, "link", "set", UPLINK, "master", NODE_BRIDGE, "up")
            _ip(spine, "link", "set", port, "master", SPINE_BRIDGE, "up")
            if spec.link_rate:
                for where, dev in ((ns, UPLINK), (spine, port)):
                    burst = str(tbf_burst(spec.link_rate))
                    qdisc = ["tbf", "rate", spec.link_rate, "burst", burst, "latency", TBF_LATENCY]
                    _run(["tc", "-n", where, "qdisc", "add", "dev", dev, "root", *qdisc])
        shaped = f"uplinks shaped to {spec.link_rate} (tc tbf)" if spec.link_rate else "unshaped"
        say(
            f"network: namespaces ddl{self.tag}-* on {spec.subnet}, spine {self.spine_ip} in "
            f"{spine}, {shaped}"
        )
        if spec.link_delay:
            say(
                f"network: linkDelay {spec.link_delay} is NOT applied: delay needs the netem "
                "qdisc, which this agent does not use (this kernel has tbf only); links are "
                "rate-limited without added delay"
            )

    def add_pod(self, node_index: int, prefer: str | None = None) -> PodNetwork:
        """A fresh address (the preferred one if free) and, in netns mode, the pod's namespace."""
        with self._lock:
            ip = self._allocate(node_index, prefer)
            if self.mode == "loopback":
                return PodNetwork(ip=ip, node_index=node_index)
            self._seq += 1
            name, link, node_ns = (
                f"ddl{self.tag}-p{self._seq}",
                f"p{self._seq}",
                self.node_netns(node_index),
            )
            pod = PodNetwork(ip, node_index, name, node_ns, link)
            try:
                self._add_netns(name)
                _ip(
                    node_ns,
                    "link",
                    "add",
                    link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    name,
                )
                _ip(node_ns, "link", "set", link, "master", NODE_BRIDGE, "up")
                _ip(name, "addr", "add", f"{ip}/{self.prefixlen}", "dev", "eth0")
                _ip(name, "link", "set", "eth0", "up")
            except NetworkError:
                self._remove(pod)
                raise
            return pod

    def remove_pod(self, pod: PodNetwork) -> None:
        """Kills what still runs in the pod's namespace and deletes it with its veth."""
        with self._lock:
            self._remove(pod)

    def _remove(self, pod: PodNetwork) -> None:
        if pod.netns is not None and pod.netns in self._namespaces:
            if pod.node_netns and pod.link:
                with contextlib.suppress(NetworkError):
                    _ip(pod.node_netns, "link", "delete", pod.link)
            self._delete_netns(pod.netns)
        self._release(pod)

    def command_prefix(self, pod: PodNetwork, hostname: str, hosts: Path) -> list[str]:
        """What runs a command as the pod: in its namespace, with its hostname and /etc/hosts.

        Like a kubelet's sandbox, so a program that resolves its own hostname (Gloo does) gets
        the pod's address, and with the pod's own /dev/shm (the memory-backed volume the
        operator renders), so ranks of different pods cannot share memory as they could not on
        real nodes. `ip netns exec` already gives a private mount namespace for the mounts;
        every step execs, so the pod's pid is the one Popen returns. Nothing in
        loopback mode: there the pod shares the host's name and address space.
        """
        if pod.netns is None:
            return []
        return [
            *("ip", "netns", "exec", pod.netns, "unshare", "--uts", "--"),
            *("sh", "-c", _SANDBOX, str(hosts), hostname),
        ]

    def teardown(self) -> list[str]:
        with self._lock:
            removed = teardown(self.state_dir)
            self._namespaces = []
            self._used.clear()
            return removed


def setup(
    state_dir: Path, spec: ClusterSpec, mode: str = "auto", say: Callable[[str], None] = print
) -> Network:
    """Builds the emulated network; `auto` falls back to loopback addresses (and says so)."""
    if mode not in ("auto", "netns", "loopback"):
        raise ValueError(f"network mode must be auto, netns or loopback, not {mode!r}")
    if mode == "loopback":
        net = Network(state_dir, "loopback", spec)
        say(
            f"network: loopback addresses ({net.host_ip(0)} ...) as asked, no namespaces or shaping"
        )
        return net
    reason = ""
    if os.geteuid() != 0:
        reason = "not root"
    else:
        net = Network(state_dir, "netns", spec)
        try:
            net.build(spec, say)
            return net
        except NetworkError as err:
            net.teardown()
            if mode == "netns":
                raise
            reason = str(err)
    if mode == "netns":
        raise NetworkError(f"network namespaces need root ({reason})")
    net = Network(state_dir, "loopback", spec)
    say(
        f"network: FALLBACK to loopback addresses ({net.host_ip(0)} ...), no namespaces, "
        f"no link shaping, pods of all nodes share ports: {reason}"
    )
    return net


def kill_namespace_processes(name: str) -> None:
    """SIGKILLs every process whose network namespace is `name`."""
    try:
        pids = _run(["ip", "netns", "pids", name]).split()
    except NetworkError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def teardown(state_dir: Path) -> list[str]:
    """Removes every namespace (and with them every veth, bridge, qdisc) recorded in state_dir.

    Works from the record alone, so it also cleans up after an agent that was SIGKILLed.
    """
    path = state_dir / RECORD
    try:
        names: list[str] = json.loads(path.read_text()).get("namespaces", [])
    except (OSError, ValueError):
        return []
    removed = []
    for name in reversed(names):
        if not (NETNS_DIR / name).exists():
            continue
        kill_namespace_processes(name)
        with contextlib.suppress(NetworkError):
            _run(["ip", "netns", "delete", name])
            removed.append(name)
    path.unlink(missing_ok=True)
    return removed


# -- the API relay ----------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Runs fn in a short-lived thread that joined namespace `name` (setns is per thread)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({name}): {os.strerror(code)}")
            finally:
                os.close(fd)
            results.append(fn())
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=target, name=f"setns-{name}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def listen_in(pod: PodNetwork, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:port inside the pod's namespace (it stays bound there)."""
    assert pod.netns is not None, "loopback-mode pods share the host's loopback"

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.setblocking(False)
        return sock

    return in_netns(pod.netns, make)


class Relay:
    """Carries TCP connections accepted on sockets inside pod namespaces to host:port."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._servers: dict[str, asyncio.Server] = {}
        self._conns: dict[str, set[asyncio.StreamWriter]] = {}
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._thread.start()

    def add(self, key: str, sock: socket.socket) -> None:
        asyncio.run_coroutine_threadsafe(self._serve(key, sock), self._loop).result(10)

    def remove(self, key: str) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(key), self._loop).result(10)

    def close(self) -> None:
        for key in list(self._servers):
            self.remove(key)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, key: str, sock: socket.socket) -> None:
        self._servers[key] = await asyncio.start_server(
            functools.partial(self._connection, key), sock=sock
        )

    async def _stop(self, key: str) -> None:
        server = self._servers.pop(key, None)
        if server is not None:
            server.close()
        for writer in self._conns.pop(key, set()):
            writer.close()

    async def _connection(
        self, key: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        conns = self._conns.setdefault(key, set())
        conns.update((writer, up_writer))
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                conns.discard(w)
                w.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One direction of a relayed connection; EOF is passed on as a half-close."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
