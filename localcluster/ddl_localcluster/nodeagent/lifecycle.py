"""A pod's life on the agent as data: admission, start, exit, restart back-off, its status.

No I/O here and no clock of its own: times come in as arguments (`now` is an API timestamp,
`clock` a monotonic reading), so every transition is a plain function of what the caller saw.
The process, the network and the API writes are pods.py's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from ddl_localcluster import netns

TERMINAL: Final = ("Succeeded", "Failed")
DEFAULT_GRACE: Final = 30
CONFIG_RETRY_SECONDS: Final = 5.0
BACKOFF_FIRST: Final = 10.0
BACKOFF_MAX: Final = 300.0
# A container that ran this long without trouble restarts without back-off again (kubelet).
BACKOFF_RESET_SECONDS: Final = 600.0
# Beyond this many doublings the delay is long past BACKOFF_MAX; keeps 2**n a small number.
_BACKOFF_DOUBLINGS_MAX: Final = 32
LOST_EXIT_CODE: Final = 137
LOST_MESSAGE: Final = "the node agent restarted and the container was lost"


@dataclass
class PodRun:
    """What the agent knows of one pod it runs (a kubelet's pod worker)."""

    uid: str
    namespace: str
    name: str
    node: str
    dir: Path
    host_ip: str
    start_time: str
    grace: int
    net: netns.PodNetwork | None = None
    ip: str = ""
    proc: subprocess.Popen[bytes] | None = None
    container_id: str = ""
    started_at: str = ""
    started: float = 0.0
    phase: str = "Pending"
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    restart_pending: bool = False
    backoff_step: int = 0
    not_before: float = 0.0
    kill_at: float | None = None
    token_refresh_at: float = 0.0
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    reported: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# -- admission --------------------------------------------------------------------------------


def admitted(pod: Mapping[str, Any], node: str, host_ip: str, directory: Path, now: str) -> PodRun:
    """The record of a pod this agent takes on (no network or process yet)."""
    meta, spec = pod["metadata"], pod["spec"]
    status = pod.get("status") or {}
    return PodRun(
        uid=meta["uid"],
        namespace=meta["namespace"],
        name=meta["name"],
        node=node,
        dir=directory,
        host_ip=host_ip,
        start_time=status.get("startTime") or now,
        grace=int(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)),
    )


def resume(run: PodRun, status: Mapping[str, Any]) -> bool:
    """Carries on from what a previous agent reported for a Running pod.

    True when that agent's container was running: its process died with the agent, and the
    caller reports it like a crash (LOST_EXIT_CODE, LOST_MESSAGE).
    """
    if status.get("phase") != "Running":
        return False
    previous = (status.get("containerStatuses") or [{}])[0]
    run.phase = "Running"
    run.restarts = int(previous.get("restartCount", 0))
    run.last_state = previous.get("lastState") or {}
    if "running" in previous.get("state", {}):
        run.started_at = previous["state"]["running"].get("startedAt", "")
        return True
    run.restart_pending = True
    return False


def deletion_grace(pod: Mapping[str, Any]) -> int:
    """Seconds between SIGTERM and SIGKILL for a pod being deleted."""
    meta = pod["metadata"]
    if meta.get("deletionGracePeriodSeconds") is not None:
        return int(meta["deletionGracePeriodSeconds"])
    return int(pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE))


# -- what to do next --------------------------------------------------------------------------

Step = Literal["terminate", "remove", "start", "refresh-token", "report"]


def next_step(run: PodRun, deleting: bool, clock: float) -> Step:
    """The pod worker's next move once the process has been polled.

    terminate: a deleted pod's process still runs (signal it); remove: a deleted pod has no
    process left (report, release, delete the object); start: its container is due to
    (re)start; refresh-token: the running container's token is due; report: nothing but status.
    """
    if deleting:
        return "terminate" if run.proc is not None else "remove"
    if run.phase not in TERMINAL:
        if run.proc is None and clock >= run.not_before:
            return "start"
        if run.proc is not None and clock >= run.token_refresh_at:
            return "refresh-token"
    return "report"


# -- start ------------------------------------------------------------------------------------


def config_failed(run: PodRun, reason: str, message: str, clock: float) -> None:
    """The container could not be configured (yet): wait, and try again in a while."""
    run.state = {"waiting": {"reason": reason, "message": message}}
    run.not_before = clock + CONFIG_RETRY_SECONDS


def starting(run: PodRun, now: str, clock: float) -> None:
    """A start attempt begins: a pending restart is counted, the start time stamped."""
    if run.restart_pending:
        run.restarts += 1
        run.restart_pending = False
    run.started_at, run.started = now, clock


def running(run: PodRun, pid: int) -> None:
    """The container's process is up."""
    run.container_id = f"local://{pid}"
    run.state = {"running": {"startedAt": run.started_at}}
    run.phase = "Running"
    run.kill_at = None


# -- exit -------------------------------------------------------------------------------------


def container_exit_code(returncode: int) -> int:
    """A killed process reports -signal; a container runtime reports 128 + signal."""
    return returncode if returncode >= 0 else 128 - returncode


def restarts_after(policy: str, exit_code: int) -> bool:
    """Whether restartPolicy restarts a container that ended with exit_code."""
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


def backoff_delay(step: int) -> float:
    """Seconds before restart number `step` of a crash loop: 0, 10, 20, 40, ... at most 300."""
    if step <= 0:
        return 0.0
    return min(BACKOFF_FIRST * (1 << min(step - 1, _BACKOFF_DOUBLINGS_MAX)), BACKOFF_MAX)


@dataclass(frozen=True)
class Restart:
    """A container restart: after `delay` seconds, and the back-off step that comes next."""

    delay: float
    next_step: int


def restart_after(
    policy: str, exit_code: int, deleting: bool, backoff_step: int, ran_for: float
) -> Restart | None:
    """The restart an exit leads to, or None when the pod is done (or being deleted)."""
    if deleting or not restarts_after(policy, exit_code):
        return None
    step = 0 if ran_for >= BACKOFF_RESET_SECONDS else backoff_step
    return Restart(backoff_delay(step), step + 1)


def terminated_state(
    run: PodRun, exit_code: int, now: str, message: str = "", reason: str = ""
) -> dict[str, Any]:
    """A containerStatus's `terminated` for the container's end."""
    terminated: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": run.started_at or None,
        "finishedAt": now,
    }
    if run.container_id:
        terminated["containerID"] = run.container_id
    if message:
        terminated["message"] = message
    return terminated


def exited(
    run: PodRun,
    pod: Mapping[str, Any],
    exit_code: int,
    now: str,
    clock: float,
    message: str = "",
    reason: str = "",
) -> bool:
    """Records a container's end and applies the restart policy; True when the pod is done."""
    terminated = terminated_state(run, exit_code, now, message, reason)
    restart = restart_after(
        pod["spec"].get("restartPolicy", "Always"),
        exit_code,
        bool(pod["metadata"].get("deletionTimestamp")),
        run.backoff_step,
        clock - run.started,
    )
    if restart is not None:
        run.backoff_step = restart.next_step
        run.last_state = {"terminated": terminated}
        run.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {restart.delay:.0f}s restarting failed container",
            }
        }
        run.not_before = clock + restart.delay
        run.restart_pending = True
        return False
    run.state = {"terminated": terminated}
    run.phase = "Succeeded" if exit_code == 0 else "Failed"
    return True


# -- status -----------------------------------------------------------------------------------


def condition(run: PodRun, kind: str, ok: bool, now: str, reason: str = "") -> dict[str, Any]:
    """A pod condition; its lastTransitionTime is when it last changed (kept in the run)."""
    status = "True" if ok else "False"
    previous = run.transitions.get(kind)
    if previous is None or previous[0] != status:
        run.transitions[kind] = (status, now)
    cond = {"type": kind, "status": status, "lastTransitionTime": run.transitions[kind][1]}
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_status(run: PodRun, pod: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status a kubelet would write for the pod's (first) container as the run sees it."""
    container = pod["spec"]["containers"][0]
    is_running = "running" in run.state
    not_ready = "PodCompleted" if run.phase in TERMINAL else "ContainersNotReady"
    scheduled = next(
        (
            c
            for c in (pod.get("status") or {}).get("conditions") or []
            if c.get("type") == "PodScheduled"
        ),
        None,
    ) or condition(run, "PodScheduled", True, now)
    container_status: dict[str, Any] = {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": is_running,
        "started": is_running,
        "restartCount": run.restarts,
        "state": run.state,
        "lastState": run.last_state,
    }
    if run.container_id:
        container_status["containerID"] = run.container_id
    ips = [{"ip": run.ip}] if run.ip else []
    return {
        "phase": run.phase,
        "hostIP": run.host_ip,
        "hostIPs": [{"ip": run.host_ip}],
        "podIP": run.ip or None,
        "podIPs": ips or None,
        "startTime": run.start_time,
        "conditions": [
            condition(run, "PodReadyToStartContainers", run.net is not None, now),
            condition(run, "Initialized", True, now),
            condition(run, "Ready", is_running, now, not_ready),
            condition(run, "ContainersReady", is_running, now, not_ready),
            scheduled,
        ],
        "containerStatuses": [container_status],
    }
