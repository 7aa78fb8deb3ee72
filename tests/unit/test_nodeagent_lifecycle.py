"""Tests of a pod's life on the node agent: next steps, exits, restart back-off, its status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ddl_localcluster.netns import PodNetwork
from ddl_localcluster.nodeagent import lifecycle
from ddl_localcluster.nodeagent.lifecycle import (
    BACKOFF_RESET_SECONDS,
    PodRun,
    Restart,
    backoff_delay,
    container_exit_code,
    deletion_grace,
    exited,
    next_step,
    pod_status,
    restart_after,
)

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z", "2026-01-01T00:00:09Z"


class FakeProcess:
    """Stands in for a Popen in PodRun.proc: only whether one is there matters here."""

    pid = 4242


def make_pod(
    restart: str = "Always", deleting: bool = False, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "job-w0", "namespace": "team", "uid": "0f0e-uid"}
    if deleting:
        metadata["deletionTimestamp"] = T0
    pod: dict[str, Any] = {
        "metadata": metadata,
        "spec": {
            "restartPolicy": restart,
            "nodeName": "gpu-r0-n0",
            "containers": [{"name": "main", "image": "python:3.11", "command": ["true"]}],
        },
    }
    if status is not None:
        pod["status"] = status
    return pod


def make_run(**fields: Any) -> PodRun:
    base: dict[str, Any] = {
        "uid": "0f0e-uid",
        "namespace": "team",
        "name": "job-w0",
        "node": "gpu-r0-n0",
        "dir": Path("/nonexistent/pod"),
        "host_ip": "10.213.0.1",
        "start_time": T0,
        "grace": 30,
    }
    return PodRun(**{**base, **fields})


def running_run(**fields: Any) -> PodRun:
    run = make_run(ip="10.213.0.2", net=PodNetwork("10.213.0.2", 0), **fields)
    lifecycle.starting(run, T0, 100.0)
    lifecycle.running(run, 4242)
    return run


# -- restart policy and back-off --------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "code", "deleting", "restarts"),
    [
        ("Always", 0, False, True),
        ("Always", 1, False, True),
        ("Always", 137, False, True),
        ("OnFailure", 0, False, False),
        ("OnFailure", 3, False, True),
        ("OnFailure", 137, False, True),
        ("Never", 0, False, False),
        ("Never", 1, False, False),
        ("Always", 1, True, False),  # a pod being deleted never restarts
        ("OnFailure", 1, True, False),
    ],
)
def test_restart_policy_decides_whether_an_exit_restarts(
    policy: str, code: int, deleting: bool, restarts: bool
) -> None:
    got = restart_after(policy, code, deleting, backoff_step=0, ran_for=1.0)
    assert (got is not None) == restarts


@pytest.mark.parametrize(
    ("step", "delay"),
    [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 160.0), (6, 300.0), (7, 300.0)],
)
def test_backoff_doubles_from_ten_seconds_up_to_five_minutes(step: int, delay: float) -> None:
    assert backoff_delay(step) == delay


def test_backoff_of_a_very_long_crash_loop_stays_at_the_cap() -> None:
    assert backoff_delay(10_000) == 300.0


def test_a_crash_loop_backs_off_and_a_long_healthy_run_resets_it() -> None:
    step, delays = 0, []
    for _ in range(8):
        restart = restart_after("Always", 1, False, step, ran_for=2.0)
        assert restart is not None
        delays.append(restart.delay)
        step = restart.next_step
    assert delays == [0.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    assert restart_after("Always", 1, False, step, BACKOFF_RESET_SECONDS - 1) == Restart(
        300.0, step + 1
    )
    assert restart_after("Always", 1, False, step, BACKOFF_RESET_SECONDS) == Restart(0.0, 1)


@pytest.mark.parametrize(("returncode", "code"), [(0, 0), (3, 3), (-9, 137), (-15, 143)])
def test_signals_are_reported_as_128_plus_the_signal(returncode: int, code: int) -> None:
    assert container_exit_code(returncode) == code


# -- exits: phase and container state ---------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "code", "phase", "reason"),
    [
        ("Never", 0, "Succeeded", "Completed"),
        ("Never", 3, "Failed", "Error"),
        ("OnFailure", 0, "Succeeded", "Completed"),
    ],
)
def test_an_exit_that_does_not_restart_ends_the_pod(
    policy: str, code: int, phase: str, reason: str
) -> None:
    run = running_run()
    assert exited(run, make_pod(policy), code, T1, 105.0) is True
    assert run.phase == phase
    assert run.state == {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "startedAt": T0,
            "finishedAt": T1,
            "containerID": "local://4242",
        }
    }
    assert (run.restarts, run.restart_pending, run.last_state) == (0, False, {})


def test_an_exit_that_restarts_waits_in_crash_loop_back_off() -> None:
    run = running_run(backoff_step=2)
    assert exited(run, make_pod("OnFailure"), 7, T1, 105.0) is False
    assert run.phase == "Running"  # a restarting pod stays Running
    assert run.state == {
        "waiting": {
            "reason": "CrashLoopBackOff",
            "message": "back-off 20s restarting failed container",
        }
    }
    assert run.last_state["terminated"]["exitCode"] == 7
    assert run.last_state["terminated"]["reason"] == "Error"
    assert (run.not_before, run.backoff_step, run.restart_pending) == (125.0, 3, True)
    # The restart is counted when the next attempt starts.
    assert run.restarts == 0
    lifecycle.starting(run, T2, 125.0)
    assert (run.restarts, run.restart_pending, run.started_at) == (1, False, T2)


def test_a_start_error_is_an_exit_with_its_reason_and_message() -> None:
    run = make_run()
    lifecycle.starting(run, T0, 100.0)
    message = 'exec: "trainer": executable file not found'
    assert exited(run, make_pod("Never"), 128, T1, 100.0, message, "StartError") is True
    assert run.state == {
        "terminated": {
            "exitCode": 128,
            "reason": "StartError",
            "message": message,
            "startedAt": T0,
            "finishedAt": T1,
        }
    }
    assert run.phase == "Failed"


def test_an_exit_while_the_pod_is_deleted_does_not_restart() -> None:
    run = running_run()
    assert exited(run, make_pod("Always", deleting=True), 143, T1, 105.0) is True
    assert run.phase == "Failed"


def test_a_config_error_waits_and_retries_later() -> None:
    run = make_run()
    lifecycle.config_failed(run, "CreateContainerConfigError", "secret 'x' not found", 50.0)
    assert run.state == {
        "waiting": {"reason": "CreateContainerConfigError", "message": "secret 'x' not found"}
    }
    assert run.not_before == 50.0 + lifecycle.CONFIG_RETRY_SECONDS
    assert run.phase == "Pending"


# -- what the worker does next ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("proc", "phase", "deleting", "clock", "step"),
    [
        (True, "Running", True, 0.0, "terminate"),
        (False, "Running", True, 0.0, "remove"),
        (False, "Succeeded", True, 0.0, "remove"),
        (False, "Pending", False, 10.0, "start"),
        (False, "Running", False, 10.0, "start"),  # restart due
        (False, "Running", False, 9.0, "report"),  # still backing off (not_before 10)
        (True, "Running", False, 19.0, "report"),
        (True, "Running", False, 20.0, "refresh-token"),  # token_refresh_at 20
        (False, "Succeeded", False, 99.0, "report"),
        (False, "Failed", False, 99.0, "report"),
    ],
)
def test_next_step(proc: bool, phase: str, deleting: bool, clock: float, step: str) -> None:
    run = make_run(phase=phase, not_before=10.0, token_refresh_at=20.0)
    run.proc = FakeProcess() if proc else None  # type: ignore[assignment]
    assert next_step(run, deleting, clock) == step


# -- admission and deletion -------------------------------------------------------------------


def test_admission_keeps_the_start_time_a_previous_agent_reported() -> None:
    fresh = lifecycle.admitted(make_pod(), "gpu-r0-n0", "10.213.0.1", Path("/p"), T1)
    assert (fresh.start_time, fresh.grace, fresh.phase) == (T1, 30, "Pending")
    pod = make_pod(status={"startTime": T0})
    pod["spec"]["terminationGracePeriodSeconds"] = 5
    again = lifecycle.admitted(pod, "gpu-r0-n0", "10.213.0.1", Path("/p"), T1)
    assert (again.start_time, again.grace) == (T0, 5)


def test_resuming_a_pod_whose_container_was_running_reports_it_lost() -> None:
    run = make_run()
    status = {
        "phase": "Running",
        "containerStatuses": [
            {
                "restartCount": 2,
                "lastState": {"terminated": {"exitCode": 1}},
                "state": {"running": {"startedAt": T0}},
            }
        ],
    }
    assert lifecycle.resume(run, status) is True
    assert (run.phase, run.restarts, run.started_at) == ("Running", 2, T0)
    assert run.last_state == {"terminated": {"exitCode": 1}}
    assert exited(run, make_pod("Never"), lifecycle.LOST_EXIT_CODE, T1, 1e9, lifecycle.LOST_MESSAGE)
    assert run.state["terminated"]["exitCode"] == 137
    assert run.state["terminated"]["message"] == lifecycle.LOST_MESSAGE


def test_resuming_a_pod_that_was_backing_off_restarts_it() -> None:
    run = make_run()
    status = {"phase": "Running", "containerStatuses": [{"restartCount": 1, "state": {}}]}
    assert lifecycle.resume(run, status) is False
    assert (run.restart_pending, run.restarts) == (True, 1)


@pytest.mark.parametrize("phase", [None, "Pending", "Succeeded"])
def test_resuming_a_pod_that_was_not_running_starts_afresh(phase: str | None) -> None:
    run = make_run()
    assert lifecycle.resume(run, {} if phase is None else {"phase": phase}) is False
    assert (run.phase, run.restart_pending) == ("Pending", False)


@pytest.mark.parametrize(
    ("deletion", "termination", "grace"),
    [(None, None, 30), (None, 5, 5), (2, 5, 2), (0, 5, 0)],
)
def test_deletion_grace_prefers_the_deletion_request(
    deletion: int | None, termination: int | None, grace: int
) -> None:
    pod = make_pod(deleting=True)
    if deletion is not None:
        pod["metadata"]["deletionGracePeriodSeconds"] = deletion
    if termination is not None:
        pod["spec"]["terminationGracePeriodSeconds"] = termination
    assert deletion_grace(pod) == grace


# -- status -----------------------------------------------------------------------------------


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_a_pending_pod_has_no_address_and_is_not_ready() -> None:
    status = pod_status(make_run(), make_pod(), T0)
    assert status["phase"] == "Pending"
    assert (status["podIP"], status["podIPs"]) == (None, None)
    assert status["hostIPs"] == [{"ip": "10.213.0.1"}]
    got = conditions(status)
    assert got["PodReadyToStartContainers"]["status"] == "False"
    assert got["Ready"] == {
        "type": "Ready",
        "status": "False",
        "reason": "ContainersNotReady",
        "lastTransitionTime": T0,
    }
    (container,) = status["containerStatuses"]
    assert container["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert (container["ready"], container["started"]) == (False, False)
    assert "containerID" not in container


def test_a_running_pod_is_ready_with_its_address_and_container() -> None:
    status = pod_status(running_run(), make_pod(), T1)
    assert status["phase"] == "Running"
    assert (status["podIP"], status["podIPs"]) == ("10.213.0.2", [{"ip": "10.213.0.2"}])
    got = conditions(status)
    assert {k: c["status"] for k, c in got.items()} == {
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    assert "reason" not in got["Ready"]
    (container,) = status["containerStatuses"]
    assert container == {
        "name": "main",
        "image": "python:3.11",
        "imageID": "",
        "ready": True,
        "started": True,
        "restartCount": 0,
        "state": {"running": {"startedAt": T0}},
        "lastState": {},
        "containerID": "local://4242",
    }


@pytest.mark.parametrize(("code", "phase"), [(0, "Succeeded"), (1, "Failed")])
def test_a_finished_pod_is_not_ready_because_it_completed(code: int, phase: str) -> None:
    run = running_run()
    exited(run, make_pod("Never"), code, T1, 105.0)
    status = pod_status(run, make_pod("Never"), T1)
    assert status["phase"] == phase
    assert conditions(status)["Ready"]["reason"] == "PodCompleted"
    assert conditions(status)["ContainersReady"]["reason"] == "PodCompleted"
    assert status["containerStatuses"][0]["ready"] is False


def test_a_crash_looping_pod_is_running_but_not_ready() -> None:
    run = running_run()
    exited(run, make_pod("Always"), 1, T1, 105.0)
    status = pod_status(run, make_pod(), T1)
    assert status["phase"] == "Running"
    assert conditions(status)["Ready"]["reason"] == "ContainersNotReady"
    assert status["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 1


def test_condition_times_change_only_when_the_condition_does() -> None:
    run = make_run()
    assert conditions(pod_status(run, make_pod(), T0))["Ready"]["lastTransitionTime"] == T0
    assert conditions(pod_status(run, make_pod(), T1))["Ready"]["lastTransitionTime"] == T0
    lifecycle.starting(run, T2, 1.0)
    lifecycle.running(run, 1)
    after = conditions(pod_status(run, make_pod(), T2))
    assert (after["Ready"]["status"], after["Ready"]["lastTransitionTime"]) == ("True", T2)
    assert after["Initialized"]["lastTransitionTime"] == T0


def test_the_schedulers_pod_scheduled_condition_is_kept_as_it_is() -> None:
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "earlier"}
    pod = make_pod(status={"conditions": [scheduled]})
    assert conditions(pod_status(make_run(), pod, T1))["PodScheduled"] == scheduled
