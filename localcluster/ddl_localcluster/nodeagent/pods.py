"""The pod workers: each bound pod's first container as a local process, and its status.

The decisions (what comes next, restart back-off, the status itself) are lifecycle.py's; this
module does what they say: processes, network namespaces and the relay, tokens, API writes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from ddl_localcluster import netns
from ddl_localcluster.controlplane import REPO_ROOT
from ddl_localcluster.kubeletapi import ContainerLog, LogError
from ddl_localcluster.nodeagent import lifecycle
from ddl_localcluster.nodeagent.api import ApiError, KubeApi, timestamp
from ddl_localcluster.nodeagent.containerspec import (
    ConfigError,
    base_env,
    container_argv,
    container_env,
    hosts_file,
    pod_hostname,
    resolve_executable,
)
from ddl_localcluster.nodeagent.heartbeat import NodeState
from ddl_localcluster.nodeagent.identity import write_identity
from ddl_localcluster.nodeagent.lifecycle import TERMINAL, PodRun
from ddl_localcluster.nodeagent.processes import forget_pid, record_pid, signal_group

SHUTDOWN_GRACE: Final = 5.0
SHUTDOWN_POLL_SECONDS: Final = 0.1
# The exit code a runtime reports when a container's program cannot be executed.
START_ERROR_EXIT_CODE: Final = 128


def pod_dir(state_dir: Path, namespace: str, name: str, uid: str) -> Path:
    """A pod's files: logs (<container>.log), token, kubeconfig."""
    return state_dir / "pods" / f"{namespace}_{name}_{uid[:8]}"


def _alive(run: PodRun) -> bool:
    return run.proc is not None and run.proc.poll() is None


class PodWorkers:
    """The runs of every pod on the agent's nodes, keyed by pod uid."""

    def __init__(
        self,
        api: KubeApi,
        network: netns.Network,
        relay: netns.Relay,
        state_dir: Path,
        api_port: int,
        pod_of: Callable[[str], Mapping[str, Any] | None],
        node_prefix: Callable[[str], list[str]] = lambda node: [],
    ) -> None:
        self.api, self.network, self.relay, self.state_dir = api, network, relay, state_dir
        self.api_port, self.pod_of = api_port, pod_of
        # What a pod's command runs under to join its node (the node's slowdown cgroup).
        self.node_prefix = node_prefix
        self.runs: dict[str, PodRun] = {}
        # Pods whose object this agent deleted: not admitted again while the API still lists them.
        self.gone: set[str] = set()

    # -- one pass over one pod --------------------------------------------------------------

    def sync(self, pod: dict[str, Any], node: NodeState) -> None:
        meta = pod["metadata"]
        run = self.runs.get(meta["uid"])
        deleting = bool(meta.get("deletionTimestamp"))
        if run is None:
            if (pod.get("status") or {}).get("phase") in TERMINAL:
                return
            if deleting:
                self._delete_pod(pod)
                return
            run = self._admit(pod, node)
        self._poll(run, pod)
        step = lifecycle.next_step(run, deleting, time.monotonic())
        if step == "terminate":
            self._terminate(run, lifecycle.deletion_grace(pod))
            return
        if step == "remove":
            self._report(run, pod)
            self._release(run)
            self._delete_pod(pod)
            del self.runs[run.uid]
            return
        if step == "start":
            self._start(run, pod)
        elif step == "refresh-token":
            self._write_token(run, pod)
        self._report(run, pod)

    def orphan(self, run: PodRun) -> None:
        """The pod object is gone (force-deleted): stop its process, then forget it."""
        if _alive(run):
            self._terminate(run, run.grace)
            return
        run.proc = None
        forget_pid(self.state_dir, run.uid)
        self._release(run)
        del self.runs[run.uid]

    # -- admission and start ----------------------------------------------------------------

    def _admit(self, pod: dict[str, Any], node: NodeState) -> PodRun:
        meta = pod["metadata"]
        status = pod.get("status") or {}
        directory = pod_dir(self.state_dir, meta["namespace"], meta["name"], meta["uid"])
        run = lifecycle.admitted(pod, node.spec.name, node.host_ip, directory, timestamp())
        run.dir.mkdir(parents=True, exist_ok=True)
        # A pod this node already ran (the agent restarted) keeps its address where it can.
        run.net = self.network.add_pod(node.spec.index, status.get("podIP"))
        run.ip = run.net.ip
        if run.net.netns is not None:
            try:
                self.relay.add(run.uid, netns.listen_in(run.net, self.api_port))
            except OSError:
                self.network.remove_pod(run.net)
                raise
        self.runs[run.uid] = run
        if lifecycle.resume(run, status):
            self._exited(run, pod, lifecycle.LOST_EXIT_CODE, lifecycle.LOST_MESSAGE)
        return run

    def _start(self, run: PodRun, pod: dict[str, Any]) -> None:
        container = pod["spec"]["containers"][0]
        env = base_env(pod)
        try:
            kubeconfig = self._write_token(run, pod)
            if kubeconfig is not None:
                env["KUBECONFIG"] = str(kubeconfig)
            env.update(container_env(pod, container, run.ip, run.host_ip, self._lookup))
            argv = container_argv(container, env)
        except (ConfigError, ApiError) as err:
            reason = (
                "CreateContainerConfigError"
                if isinstance(err, ConfigError)
                else "ContainerCreating"
            )
            lifecycle.config_failed(run, reason, str(err), time.monotonic())
            return
        lifecycle.starting(run, timestamp(), time.monotonic())
        program = resolve_executable(argv[0], env["PATH"])
        if program is None:
            message = f'exec: "{argv[0]}": executable file not found'
            self._exited(run, pod, START_ERROR_EXIT_CODE, message, "StartError")
            return
        assert run.net is not None
        hosts = run.dir / "hosts"
        hosts.write_text(hosts_file(pod, run.ip))
        sandbox = self.network.command_prefix(run.net, pod_hostname(pod), hosts)
        with (run.dir / f"{container['name']}.log").open("ab") as log:
            run.proc = subprocess.Popen(
                [*self.node_prefix(run.node), *sandbox, program, *argv[1:]],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        record_pid(self.state_dir, run.uid, run.proc.pid)
        lifecycle.running(run, run.proc.pid)

    def _write_token(self, run: PodRun, pod: Mapping[str, Any]) -> Path | None:
        return write_identity(self.api, run, pod, relayed=self.network.mode == "netns")

    def _lookup(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.call("GET", f"/api/v1/namespaces/{namespace}/{resource}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    # -- exit and stop ----------------------------------------------------------------------

    def _poll(self, run: PodRun, pod: dict[str, Any]) -> None:
        if run.proc is None or (code := run.proc.poll()) is None:
            return
        self._exited(run, pod, lifecycle.container_exit_code(code))

    def _exited(
        self, run: PodRun, pod: Mapping[str, Any], code: int, message: str = "", reason: str = ""
    ) -> None:
        """Ends the container's processes, records its end; releases the pod when it is done."""
        if run.proc is not None:
            # Like a container runtime: the main process's end ends the whole container.
            signal_group(run.proc.pid, signal.SIGKILL)
            run.proc = None
        forget_pid(self.state_dir, run.uid)
        if lifecycle.exited(run, pod, code, timestamp(), time.monotonic(), message, reason):
            self._release(run)

    def _terminate(self, run: PodRun, grace: int) -> None:
        """SIGTERM to the process group now, SIGKILL once the grace period is over."""
        assert run.proc is not None
        if run.kill_at is None:
            signal_group(run.proc.pid, signal.SIGTERM)
            run.kill_at = time.monotonic() + grace
        elif time.monotonic() >= run.kill_at:
            signal_group(run.proc.pid, signal.SIGKILL)

    def _release(self, run: PodRun) -> None:
        """Gives back the pod's namespace and address (the status keeps showing its IP)."""
        if run.net is None:
            return
        if run.net.netns is not None:
            self.relay.remove(run.uid)
        self.network.remove_pod(run.net)
        run.net = None

    def _delete_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": meta["uid"]},
        }
        try:
            self.api.call(
                "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", options
            )
        except ApiError as err:
            if err.status not in (404, 409):
                raise
        self.gone.add(meta["uid"])

    def kill_node(self, node: str, forget: bool) -> int:
        """SIGKILLs a node's pod processes, as if the machine died; `forget` drops them too."""
        killed = 0
        for run in [r for r in self.runs.values() if r.node == node]:
            if _alive(run):
                assert run.proc is not None
                signal_group(run.proc.pid, signal.SIGKILL)
                killed += 1
            if forget:
                if run.proc is not None:
                    run.proc.wait()
                    run.proc = None
                forget_pid(self.state_dir, run.uid)
                self._release(run)
                del self.runs[run.uid]
        return killed

    def process_groups(self, node: str) -> list[int]:
        """The process groups of a node's running pods (each pod's process leads its own)."""
        procs = [r.proc for r in list(self.runs.values()) if r.node == node]
        return [proc.pid for proc in procs if proc is not None]

    def stop_all(self) -> int:
        """Stops every pod process (TERM, then KILL after SHUTDOWN_GRACE); how many ran."""
        live = [r for r in self.runs.values() if _alive(r)]
        for run in live:
            assert run.proc is not None
            signal_group(run.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline and any(_alive(r) for r in live):
            time.sleep(SHUTDOWN_POLL_SECONDS)
        for run in live:
            assert run.proc is not None
            signal_group(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
        return len(live)

    # -- status -----------------------------------------------------------------------------

    def _report(self, run: PodRun, pod: Mapping[str, Any]) -> None:
        """One status write when something changed since the last one."""
        status = lifecycle.pod_status(run, pod, timestamp())
        text = json.dumps(status, sort_keys=True)
        if text == run.reported:
            return
        try:
            self.api.patch(
                f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status}
            )
        except ApiError as err:
            if err.status != 404:
                raise
        run.reported = text

    def container_log(self, namespace: str, name: str, container: str) -> ContainerLog:
        """Answers `kubectl logs` (through the kubelet API, on its threads): the newest run."""
        key = f"{namespace}/{name}"
        run = next((r for r in reversed(list(self.runs.values())) if r.key == key), None)
        if run is None:
            raise LogError(404, f'pod "{name}" in namespace "{namespace}" is not on this agent')
        pod = self.pod_of(run.uid) or {}
        names = [c["name"] for c in pod.get("spec", {}).get("containers", [])]
        if names and container not in names:
            raise LogError(400, f"container {container} is not valid for pod {name}")
        if names and container != names[0]:
            raise LogError(
                400, f"the local node agent runs only a pod's first container ({names[0]})"
            )
        path = run.dir / f"{container}.log"
        if not path.exists():
            reason = run.state.get("waiting", {}).get("reason", "ContainerCreating")
            raise LogError(
                400, f'container "{container}" in pod "{name}" is waiting to start: {reason}'
            )
        proc = run.proc
        return ContainerLog(path, lambda: proc is not None and proc.poll() is None)
