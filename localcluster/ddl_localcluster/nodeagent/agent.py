"""The node agent's run loop: wires heartbeats, the pod cache, pod workers and control together.

Three threads feed one loop: heartbeats keep the nodes alive, the pod watch fills the cache,
the control socket queues commands. The loop alone touches the pod workers: it executes queued
commands, then syncs every pod bound to a node that is up. A fourth thread, the throttle, only
freezes and thaws the pods of slowed nodes.
"""

from __future__ import annotations

import queue
import signal
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ddl_localcluster import netns
from ddl_localcluster.kubeletapi import KubeletApi
from ddl_localcluster.nodeagent import control, slowdown
from ddl_localcluster.nodeagent.api import ApiError, KubeApi
from ddl_localcluster.nodeagent.control import SOCKET_NAME, SOCKET_PATH_MAX, Command
from ddl_localcluster.nodeagent.heartbeat import Heartbeats, NodeState
from ddl_localcluster.nodeagent.pods import PodWorkers
from ddl_localcluster.nodeagent.podwatch import PodCache
from ddl_localcluster.nodeagent.processes import cleanup
from ddl_localcluster.nodeagent.throttle import make_throttle
from ddl_localcluster.topology import ClusterSpec

SYNC_SECONDS: Final = 0.5
# Shows a node's slowdown on its Node (set while slowed, removed at full speed).
SLOWDOWN_ANNOTATION: Final = "ddl-localcluster.dev/slowdown"


def say(message: str) -> None:
    """The agent's log line (on stdout, which the caller usually sends to a file)."""
    print(f"[nodeagent] {message}", flush=True)


class NodeAgent:
    """The kubelet stand-in for every node of one cluster description."""

    def __init__(
        self,
        api: KubeApi,
        spec: ClusterSpec,
        state_dir: Path,
        network: netns.Network,
        say: Callable[[str], None],
    ) -> None:
        self.api, self.state_dir, self.network, self.say = api, state_dir, network, say
        self.nodes = {n.name: NodeState(n, network.host_ip(n.index)) for n in spec.nodes()}
        # Commands, or None: "the pods changed, sync now".
        self._queue: queue.Queue[Command | None] = queue.Queue()
        self._stop = threading.Event()
        self.cache = PodCache(api, say)
        server = urllib.parse.urlsplit(api.server)
        api_port = server.port or 443
        self.relay = netns.Relay(server.hostname or "127.0.0.1", api_port)
        self.pods = PodWorkers(api, network, self.relay, state_dir, api_port, self.cache.get)
        self.throttle = make_throttle(state_dir, self.nodes, self.pods.process_groups, say)
        self.pods.node_prefix = self.throttle.command_prefix
        self.kubelet_api = KubeletApi(self.pods.container_log, state_dir / "kubelet")
        self.heartbeats = Heartbeats(api, self.nodes, self.kubelet_api.port, say)

    def register(self, node: NodeState) -> None:
        self.heartbeats.register(node)
        self._restore_slowdown(node.spec.name)

    def _restore_slowdown(self, node: str) -> None:
        """A node slowed before the agent restarted stays slowed: its Node says how much."""
        try:
            found = self.api.call("GET", f"/api/v1/nodes/{node}")
        except ApiError as err:
            self.say(f"{node}: cannot read its slowdown annotation: {err}")
            return
        value = (found["metadata"].get("annotations") or {}).get(SLOWDOWN_ANNOTATION)
        if value is None:
            return
        try:
            fraction = slowdown.parse_fraction(value)
        except ValueError as err:
            self.say(f"{node}: {SLOWDOWN_ANNOTATION} ignored: {err}")
            return
        self.throttle.set(node, fraction)
        self.say(f"{node}: slowdown restored from its Node: {slowdown.describe(fraction)}")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Runs until stop(); then ends every pod and removes the network."""
        socket_path = self.state_dir / SOCKET_NAME
        threads = [
            threading.Thread(
                target=self.heartbeats.run, args=(self._stop,), name="heartbeats", daemon=True
            ),
            threading.Thread(
                target=self.cache.run,
                args=(self._stop, lambda: self._queue.put(None)),
                name="pod-watch",
                daemon=True,
            ),
            threading.Thread(
                target=control.serve,
                args=(socket_path, self._stop, self._queue.put),
                name="control",
                daemon=True,
            ),
        ]
        throttle = threading.Thread(
            target=self.throttle.run, args=(self._stop,), name="throttle", daemon=True
        )
        threads.append(throttle)
        for thread in threads:
            thread.start()
        self.say(
            f"ready: {len(self.nodes)} nodes ({', '.join(self.nodes)}), network "
            f"{self.network.mode}, slowdown by {self.throttle.description}, "
            f"control socket {socket_path}"
        )
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=SYNC_SECONDS)
                while True:
                    if item is not None:
                        control.execute(item, self)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            self._reconcile()
        # Every node at full speed before the pods get their SIGTERM.
        throttle.join(timeout=5)
        self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self.throttle.stop()

    def _reconcile(self) -> None:
        pods = self.cache.snapshot()
        self.pods.gone &= set(pods)
        for uid, pod in pods.items():
            node = self.nodes.get(pod["spec"].get("nodeName", ""))
            if node is None or not node.beating or uid in self.pods.gone:
                continue
            try:
                self.pods.sync(pod, node)
            except (ApiError, OSError, netns.NetworkError) as err:
                self.say(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}: {err}")
        for uid in [u for u in self.pods.runs if u not in pods]:
            run = self.pods.runs[uid]
            if self.nodes[run.node].up:
                self.pods.orphan(run)

    def _shutdown(self) -> None:
        """Stops every pod process (TERM, then KILL) and removes the emulated network."""
        ended = self.pods.stop_all()
        self.close()
        removed = cleanup(self.state_dir)
        self.say(f"stopped: {ended} pod processes ended, {len(removed)} namespaces removed")

    def close(self) -> None:
        """Closes the relay and the kubelet API (the agent's own listeners), thaws every node."""
        self.relay.close()
        self.kubelet_api.close()
        self.throttle.close()

    # -- control commands (control.Controlled) ----------------------------------------------

    def node_names(self) -> list[str]:
        return list(self.nodes)

    def status(self) -> dict[str, Any]:
        return {
            "network": self.network.mode,
            "slowdown": self.throttle.fractions(),
            "nodes": {
                n: ("deleted" if not s.registered else "up" if s.up else "down")
                for n, s in self.nodes.items()
            },
            "pods": {
                r.key: {"node": r.node, "phase": r.phase, "ip": r.ip, "restarts": r.restarts}
                for r in self.pods.runs.values()
            },
        }

    def node_down(self, node: str, kill_pods: bool) -> str:
        self.nodes[node].up = False
        killed = self.pods.kill_node(node, forget=False) if kill_pods else 0
        return (
            f"{node}: heartbeats stopped"
            + (f", {killed} pod processes killed" if kill_pods else "")
            + "; the controller-manager marks it NotReady after its grace period"
        )

    def node_up(self, node: str) -> str:
        state = self.nodes[node]
        if not state.registered:
            self.heartbeats.register(state)
            return f"{node}: registered again"
        self.heartbeats.resume(state)
        return f"{node}: heartbeats resumed, Ready posted"

    def node_slow(self, node: str, fraction: float) -> str:
        self.throttle.set(node, fraction)
        value = None if fraction >= slowdown.FULL_SPEED else f"{fraction:g}"
        try:
            self.api.patch(
                f"/api/v1/nodes/{node}", {"metadata": {"annotations": {SLOWDOWN_ANNOTATION: value}}}
            )
        except ApiError as err:
            if err.status != 404:  # a deleted node keeps its slowdown for when it comes back
                raise
        return f"{node}: pods run at {slowdown.describe(fraction)}"

    def node_delete(self, node: str) -> str:
        killed = self.pods.kill_node(node, forget=True)
        self.heartbeats.deregister(self.nodes[node])
        return f"{node}: deleted ({killed} pod processes killed)"


def run_agent(
    kubeconfig: Path,
    cluster: Path,
    state_dir: Path,
    network_mode: str,
    say: Callable[[str], None] = say,
) -> int:
    """Sets up the network and the nodes, then runs the agent until SIGTERM or SIGINT."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if len(str(state_dir / SOCKET_NAME)) > SOCKET_PATH_MAX:
        raise ValueError(
            f"state dir {state_dir} is too long for a unix socket path; use a shorter one"
        )
    spec = ClusterSpec.load(cluster)
    if left := cleanup(state_dir):
        say(f"removed {len(left)} namespaces a previous agent left in {state_dir}")
    api = KubeApi(kubeconfig, state_dir)
    network = netns.setup(state_dir, spec, network_mode, say)
    agent = NodeAgent(api, spec, state_dir, network, say)
    try:
        for node in agent.nodes.values():
            agent.register(node)
    except BaseException:
        agent.close()
        cleanup(state_dir)
        raise
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()
    return 0
