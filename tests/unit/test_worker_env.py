"""The worker's contracts: env parsing, published membership, reports, and the agent's behaviour.

Bad input (missing variable, malformed membership, unreachable master) must end in a clear
message and a retryable or permanent exit code, never a silent hang. The agent tests run the
real agent process on a local membership file with a tiny fake trainer (no torch).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddl_operator.api import constants
from ddl_operator.api.models import Member, Rendezvous
from ddl_worker import training
from ddl_worker.env import (
    EXIT_CODE_PERMANENT,
    EXIT_CODE_RETRYABLE,
    EXIT_CODE_TERMINATED,
    AgentConfig,
    ConfigError,
    TrainEnv,
)
from ddl_worker.fileio import write_json
from ddl_worker.local import ManifestError, load_manifest
from ddl_worker.membership import KubernetesMembership, MembershipError, parse_rendezvous
from ddl_worker.report import FileReporter, KubernetesReporter, Report

AGENT_ENV = {
    "POD_NAME": "job-w1",
    "POD_NAMESPACE": "team",
    "POD_IP": "10.0.0.2",
    "DDL_JOB_NAME": "job",
    "DDL_CHECKPOINT_DIR": "/ckpt",
    "DDL_CHECKPOINT_EVERY": "50",
    "DDL_CHECKPOINT_KEEP": "2",
    "DDL_ALLREDUCE_ALGORITHM": "Hierarchical",
    "DDL_COMPRESSION": "BF16",
    "DDL_BUCKET_MB": "16",
    "DDL_PROCS_PER_WORKER": "8",
    "DDL_METRICS_PORT": "9400",
    "DDL_RENDEZVOUS_TIMEOUT": "120",
}

TRAIN_ENV = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29500",
    "DDL_GRID": "2x2",
}


def rendezvous(
    epoch: int, pods: list[str], *, per_worker: int = 1, port: int = 29500
) -> Rendezvous:
    return Rendezvous(
        epoch=epoch,
        workers=len(pods),
        processes_per_worker=per_worker,
        master_addr="127.0.0.1",
        master_port=port,
        grid=[d for d in (per_worker, len(pods)) if d > 1] or [1],
        members=[Member(rank=i, pod=p, node=f"node-{i}") for i, p in enumerate(pods)],
    )


def wire(value: Rendezvous) -> dict[str, Any]:
    return value.model_dump(mode="json", by_alias=True)


# --- env parsing ---------------------------------------------------------------------------


def test_agent_config_reads_the_operator_env() -> None:
    config = AgentConfig.from_environ(AGENT_ENV)
    assert (config.pod_name, config.namespace, config.job_name) == ("job-w1", "team", "job")
    assert config.comm.algorithm == "Hierarchical" and config.comm.compression == "BF16"
    assert (config.comm.checkpoint_every, config.comm.checkpoint_keep) == (50, 2)
    assert config.procs_per_worker == 8
    assert (config.metrics_port, config.rendezvous_timeout) == (9400, 120)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"POD_NAME": None}, "POD_NAME is not set"),
        ({"POD_NAMESPACE": ""}, "POD_NAMESPACE is not set"),
        ({"DDL_JOB_NAME": None}, "DDL_JOB_NAME is not set"),
        ({"DDL_CHECKPOINT_DIR": None}, "DDL_CHECKPOINT_DIR is not set"),
        ({"DDL_BUCKET_MB": "lots"}, "DDL_BUCKET_MB='lots' is not an integer"),
        ({"DDL_CHECKPOINT_EVERY": "0"}, "DDL_CHECKPOINT_EVERY=0 must be >= 1"),
        ({"DDL_METRICS_PORT": "70000"}, "DDL_METRICS_PORT=70000 must be in [0, 65535]"),
        ({"DDL_ALLREDUCE_ALGORITHM": "Tree"}, "not one of Ring, Hierarchical, Auto"),
        ({"DDL_COMPRESSION": "INT8"}, "not one of None, BF16, FP16"),
        ({"DDL_RENDEZVOUS_TIMEOUT": "-1"}, "positive, finite number of seconds"),
    ],
)
def test_bad_agent_env_names_the_variable(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**AGENT_ENV, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AgentConfig.from_environ(env)


def test_train_env_reads_torchrun_and_ddl_variables() -> None:
    env = TrainEnv.from_environ(TRAIN_ENV)
    assert (env.rank, env.local_rank, env.world_size, env.group_rank) == (3, 1, 4, 1)
    assert env.grid == (2, 2) and env.comm.algorithm == "Auto" and env.comm.checkpoint_dir is None


def test_plain_torchrun_env_defaults_to_a_flat_grid() -> None:
    env = TrainEnv.from_environ({k: v for k, v in TRAIN_ENV.items() if k != "DDL_GRID"})
    assert env.grid == (4,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": None}, "RANK is not set"),
        ({"MASTER_ADDR": None}, "MASTER_ADDR is not set"),
        ({"RANK": "4"}, "RANK=4 must be smaller than WORLD_SIZE=4"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 must be smaller than LOCAL_WORLD_SIZE=2"),
        ({"DDL_GRID": "3x2"}, "has 6 processes but WORLD_SIZE=4"),
        ({"DDL_GRID": "2x"}, "is not a grid like '8x2'"),
        ({"MASTER_PORT": "0"}, r"MASTER_PORT=0 must be in \[1, 65535\]"),
    ],
)
def test_bad_train_env_names_the_variable(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**TRAIN_ENV, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        TrainEnv.from_environ(env)


def test_init_with_missing_variable_exits_permanent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in TRAIN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        training.init()
    assert exit_info.value.code == EXIT_CODE_PERMANENT
    assert "WORLD_SIZE is not set" in capsys.readouterr().err


def test_init_with_unreachable_master_exits_retryable_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**TRAIN_ENV, "MASTER_PORT": str(port), "DDL_RENDEZVOUS_TIMEOUT": "1.5"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        training.init()
    assert exit_info.value.code == EXIT_CODE_RETRYABLE
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert f"cannot reach the master at 127.0.0.1:{port} (MASTER_ADDR/MASTER_PORT)" in err


# --- published membership -------------------------------------------------------------------


def test_valid_membership_parses() -> None:
    parsed = parse_rendezvous(wire(rendezvous(3, ["a", "b"], per_worker=2)), "test")
    assert parsed.epoch == 3 and parsed.world_size == 4 and parsed.grid == [2, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": "three"}, "epoch: Input should be a valid integer"),
        ({"processesPerWorker": 0}, "processesPerWorker: Input should be greater than or equal"),
        ({"members": [{"rank": 0}]}, "members.0.pod: Field required"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"workers": 3}, "workers=3 but 2 members"),
        ({"grid": [3]}, "grid [3] has 3 processes"),
        ({"masterAddr": ""}, "masterAddr is empty"),
        (
            {"members": [{"rank": 1, "pod": "a"}, {"rank": 0, "pod": "b"}]},
            "member ranks [1, 0] are not 0..1 in order",
        ),
    ],
)
def test_malformed_membership_says_what_is_wrong(change: dict[str, Any], message: str) -> None:
    raw = {**wire(rendezvous(1, ["a", "b"])), **change}
    with pytest.raises(MembershipError) as error:
        parse_rendezvous(raw, "ddljob team/job")
    assert message in str(error.value) and "ddljob team/job" in str(error.value)


class InMemoryJobs:
    """A JobReader over a dict, with watch events fed by the test (the API server's part)."""

    def __init__(self, job: dict[str, Any] | None) -> None:
        self.job = job
        self.events: list[dict[str, Any] | None] = []
        self.fail_watches = 0

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.job

    def watch_job(
        self, namespace: str, name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[dict[str, Any] | None]:
        if self.fail_watches:
            self.fail_watches -= 1
            raise ConnectionError("connection refused")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if self.events:
                event = self.events.pop(0)
                self.job = event
                yield event
            time.sleep(0.01)


def job_object(rendezvous_wire: dict[str, Any] | None) -> dict[str, Any]:
    status = {} if rendezvous_wire is None else {"rendezvous": rendezvous_wire}
    return {"metadata": {"name": "job", "resourceVersion": "1"}, "status": status}


def eventually(check: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_kubernetes_membership_follows_the_watch_and_reports_malformed_status() -> None:
    jobs = InMemoryJobs(job_object(None))
    jobs.fail_watches = 1
    source = KubernetesMembership(jobs, "team", "job")
    source.MAX_BACKOFF = 0.1
    try:
        eventually(lambda: "connection refused" in (source.problem() or ""))
        assert source.latest() is None
        jobs.events.append(job_object(wire(rendezvous(1, ["job-w0"]))))
        assert eventually(source.latest).epoch == 1
        jobs.events.append(job_object({"epoch": 2, "workers": "many"}))
        eventually(lambda: "malformed" in (source.problem() or ""))
        with pytest.raises(MembershipError, match="workers: Input should be a valid integer"):
            source.latest()
        jobs.events.append(job_object(wire(rendezvous(2, ["job-w0", "job-w1"]))))
        assert eventually(lambda: _latest_or_none(source)).epoch == 2
    finally:
        source.close()


def _latest_or_none(source: KubernetesMembership) -> Rendezvous | None:
    try:
        return source.latest()
    except MembershipError:
        return None


class RecordingAnnotator:
    """A PodAnnotator that keeps annotations in a dict (and can be told to fail)."""

    def __init__(self) -> None:
        self.annotations: dict[tuple[str, str], dict[str, str]] = {}
        self.calls = 0
        self.fail = False

    def annotate_pod(self, namespace: str, pod: str, key: str, value: str) -> None:
        self.calls += 1
        if self.fail:
            raise ConnectionError("API server unavailable")
        self.annotations.setdefault((namespace, pod), {})[key] = value


def test_kubernetes_reporter_patches_compact_camel_case_json_rate_limited() -> None:
    annotator = RecordingAnnotator()
    reporter = KubernetesReporter(annotator, "team", "job-w0", min_interval=60)
    reporter.publish(Report(epoch=2, state="Running", step=10, throughput=5.5, restarts=1))
    text = annotator.annotations[("team", "job-w0")][constants.ANNOTATION_REPORT]
    assert " " not in text
    assert json.loads(text) == {
        "epoch": 2,
        "state": "Running",
        "step": 10,
        "throughput": 5.5,
        "syncWaitRatio": 0.0,
        "stepSeconds": 0.0,
        "restarts": 1,
        "message": "",
    }
    reporter.publish(Report(epoch=2, state="Running", step=11, restarts=1))  # progress only
    assert annotator.calls == 1
    annotator.fail = True
    reporter.publish(Report(epoch=3, state="Waiting"))  # must not raise
    annotator.fail = False
    reporter.publish(Report(epoch=3, state="Waiting"))
    latest = annotator.annotations[("team", "job-w0")][constants.ANNOTATION_REPORT]
    assert json.loads(latest)["epoch"] == 3


# --- the agent process ------------------------------------------------------------------------

FAKE_TRAINER = """
import json, os, signal, sys, time
out = sys.argv[1]
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "DDL_GRID", "DDL_EPOCH",
        "DDL_CHECKPOINT_DIR", "DDL_ALLREDUCE_ALGORITHM", "PROMETHEUS_MULTIPROC_DIR",
        "DDL_PROGRESS_FILE", "DDL_NODE_NAME"]
env = {k: os.environ.get(k) for k in keys}
name = f"{os.environ['DDL_EPOCH']}-{os.environ['RANK']}"
def stop(signum, frame):
    open(os.path.join(out, name + ".stopped"), "w").write(signal.Signals(signum).name)
    sys.exit(75)
if os.environ.get("FAKE_IGNORE_STOP") != os.environ["LOCAL_RANK"]:
    signal.signal(signal.SIGUSR1, stop)
    signal.signal(signal.SIGTERM, stop)
else:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
json.dump(env, open(os.path.join(out, name + ".json"), "w"))
if os.environ["DDL_EPOCH"] == os.environ.get("FAKE_FINISH_EPOCH"):
    sys.exit(int(os.environ.get("FAKE_EXIT_CODE", "0")))
time.sleep(60)
sys.exit(3)
"""


class AgentHarness:
    """One real agent process on a local membership file."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.dir = tmp_path
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.membership = tmp_path / "rendezvous.json"
        trainer = tmp_path / "fake_trainer.py"
        trainer.write_text(FAKE_TRAINER)
        self.env = {
            **os.environ,
            "POD_NAME": "job-w1",
            "POD_NAMESPACE": "team",
            "DDL_JOB_NAME": "job",
            "DDL_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
            "DDL_MEMBERSHIP_FILE": str(self.membership),
            "DDL_REPORT_DIR": str(tmp_path / "reports"),
            "DDL_WORK_DIR": str(tmp_path / "work"),
            "DDL_METRICS_PORT": "0",
            "DDL_RENDEZVOUS_TIMEOUT": "20",
            "DDL_STOP_TIMEOUT": "5",
            **env,
        }
        command = [sys.executable, "-m", "ddl_worker", "agent", "--"]
        self.process = subprocess.Popen(
            [*command, sys.executable, str(trainer), str(self.out)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def publish(self, value: Rendezvous | dict[str, Any]) -> None:
        write_json(self.membership, wire(value) if isinstance(value, Rendezvous) else value)

    def wait_file(self, name: str, timeout: float = 20) -> dict[str, Any]:
        path = self.out / name
        eventually(path.exists, timeout)
        time.sleep(0.05)
        return dict(json.loads(path.read_text()))

    def finish(self, timeout: float = 30) -> tuple[int, str, Report | None]:
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
            raise AssertionError(f"agent did not exit within {timeout}s:\n{output}") from None
        return self.process.returncode, output, FileReporter.read(self.dir / "reports", "job-w1")


def test_agent_without_pod_name_exits_permanent_naming_it(tmp_path: Path) -> None:
    harness = AgentHarness(tmp_path, POD_NAME="")
    code, output, _ = harness.finish(timeout=20)
    assert code == EXIT_CODE_PERMANENT
    assert "required environment variable POD_NAME is not set" in output


def test_agent_gives_the_training_processes_the_env_and_reforms_on_a_new_epoch(
    tmp_path: Path,
) -> None:
    harness = AgentHarness(tmp_path, FAKE_FINISH_EPOCH="1", DDL_GRID="ignored")
    harness.publish(rendezvous(0, ["job-w0", "job-w1"], per_worker=2, port=29601))
    first = [harness.wait_file(f"0-{rank}.json") for rank in (2, 3)]
    assert [e["LOCAL_RANK"] for e in first] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in first} == {"4"}
    assert {(e["GROUP_RANK"], e["GROUP_WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in first} == {
        ("1", "2", "2")
    }
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"], e["DDL_GRID"]) for e in first} == {
        ("127.0.0.1", "29601", "2x2")
    }
    assert {e["TORCHELASTIC_RESTART_COUNT"] for e in first} == {"0"}
    assert {e["DDL_NODE_NAME"] for e in first} == {"node-1"}
    assert first[0]["DDL_PROGRESS_FILE"] and first[1]["DDL_PROGRESS_FILE"] is None
    assert first[0]["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "work" / "metrics")

    # Epoch 1: worker 0 is gone, this pod becomes rank 0 of 1. The old processes must be
    # stopped with the re-form signal before the new ones start.
    harness.publish(rendezvous(1, ["job-w1"], per_worker=2, port=29602))
    second = [harness.wait_file(f"1-{rank}.json") for rank in (0, 1)]
    assert all((harness.out / f"0-{r}.stopped").read_text() == "SIGUSR1" for r in (2, 3))
    assert {(e["WORLD_SIZE"], e["GROUP_RANK"], e["DDL_EPOCH"]) for e in second} == {("2", "0", "1")}
    assert {e["TORCHELASTIC_RESTART_COUNT"] for e in second} == {"1"}
    code, output, report = harness.finish()
    assert code == 0, output
    assert report is not None
    assert (report.state, report.epoch, report.restarts) == ("Succeeded", 1, 1)


def test_agent_hard_kills_a_process_that_ignores_the_stop_signal(tmp_path: Path) -> None:
    harness = AgentHarness(
        tmp_path, FAKE_FINISH_EPOCH="1", FAKE_IGNORE_STOP="1", DDL_STOP_TIMEOUT="1"
    )
    harness.publish(rendezvous(0, ["job-w1"], per_worker=2))
    harness.wait_file("0-1.json")
    harness.publish(rendezvous(1, ["job-w1"], per_worker=2))
    harness.wait_file("1-1.json", timeout=10)
    code, output, _ = harness.finish()
    assert code == 0 and "ignored SIGUSR1 for 1s; killing it" in output


def test_agent_standby_times_out_retryable_saying_why(tmp_path: Path) -> None:
    harness = AgentHarness(tmp_path, DDL_RENDEZVOUS_TIMEOUT="1")
    harness.publish(rendezvous(4, ["job-w0"]))
    code, _, report = harness.finish()
    assert code == EXIT_CODE_RETRYABLE
    assert report is not None and report.state == "Failed"
    assert "not a member of epoch 4" in report.message and "within 1s" in report.message


def test_agent_refuses_a_membership_for_another_pod_shape(tmp_path: Path) -> None:
    harness = AgentHarness(tmp_path, DDL_RENDEZVOUS_TIMEOUT="1", DDL_PROCS_PER_WORKER="8")
    harness.publish(rendezvous(0, ["job-w1"], per_worker=2))
    code, _, report = harness.finish()
    assert code == EXIT_CODE_PERMANENT
    assert report is not None and "made for DDL_PROCS_PER_WORKER=8" in report.message
    assert not list(harness.out.iterdir()), "no training process may start"


def test_agent_with_malformed_membership_exits_permanent_naming_the_field(tmp_path: Path) -> None:
    harness = AgentHarness(tmp_path, DDL_RENDEZVOUS_TIMEOUT="1")
    harness.publish({**wire(rendezvous(0, ["job-w1"])), "masterPort": "http"})
    code, _, report = harness.finish()
    assert code == EXIT_CODE_PERMANENT
    assert report is not None and report.state == "Failed"
    assert "masterPort: Input should be a valid integer" in report.message


def test_agent_passes_on_a_permanent_training_failure(tmp_path: Path) -> None:
    harness = AgentHarness(tmp_path, FAKE_FINISH_EPOCH="0", FAKE_EXIT_CODE="42")
    harness.publish(rendezvous(0, ["job-w1"]))
    code, _, report = harness.finish()
    assert code == EXIT_CODE_PERMANENT
    assert report is not None and "rank 0 exited 42 (a retry cannot help)" in report.message


def test_agent_sigterm_stops_training_and_exits_terminated(tmp_path: Path) -> None:
    harness = AgentHarness(tmp_path)
    harness.publish(rendezvous(0, ["job-w1"]))
    harness.wait_file("0-0.json")
    harness.process.send_signal(signal.SIGTERM)
    code, _, report = harness.finish(timeout=15)
    assert code == EXIT_CODE_TERMINATED
    assert (harness.out / "0-0.stopped").read_text() == "SIGTERM"
    assert report is not None and report.message == "terminated by SIGTERM"


# --- manifests in local mode ------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "resnet-job.yaml"


def test_example_manifest_is_a_valid_cpu_job_running_the_agent() -> None:
    local_job = load_manifest(EXAMPLE)
    spec = local_job.job.spec
    assert local_job.job.api_version == "ddl-operator.dev/v1alpha1"
    assert (spec.gpus_per_worker, spec.procs_per_worker, spec.replicas) == (0, 2, 2)
    assert (spec.min_replicas, spec.max_replicas) == (1, 4)
    assert local_job.command == [sys.executable, "examples/train_resnet.py", "--steps", "200"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"replicas": 5}, "spec.replicas=5 must be within"),
        ({"gpusPerWorker": -1}, "spec.gpusPerWorker: Input should be greater than or equal to 0"),
        ({"gpusPerWorker": 8, "processesPerWorker": 2}, "processesPerWorker must equal"),
        (
            {"template": {"spec": {"containers": [{"name": "w", "command": ["python", "t.py"]}]}}},
            "must run the agent: ddl-worker agent -- python train.py",
        ),
    ],
)
def test_bad_manifest_names_the_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["spec"].update(change)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(path)
