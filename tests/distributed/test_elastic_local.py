"""Elastic training in local mode: lose workers mid-run, re-form, resume, finish."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ddl_worker.checkpoint import Checkpointer

from workerutil import job_log, make_job_manifest, progress, read_json, start_local_job, wait_for

EVERY = 10
STEPS = 100
BATCH = 48
SAMPLES = 1200  # 25 steps per data epoch: the re-forms land mid-epoch
REFORM_LIMIT = 30.0


def rank0_progress(work: Path, epoch: int, at_least: int) -> int | None:
    """Rank 0's step once it reached at_least in epoch, else None."""
    membership = read_json(work / "rendezvous.json")
    if membership is None or membership["epoch"] != epoch:
        return None
    current = progress(work, membership["members"][0]["pod"])
    if current is None or current.epoch != epoch or current.step < at_least:
        return None
    return current.step


def test_lost_worker_and_killed_process_reform_and_resume(tmp_path: Path) -> None:
    manifest = make_job_manifest(
        tmp_path / "job.yaml",
        name="elastic",
        replicas=4,
        min_replicas=2,
        max_replicas=4,
        every_steps=EVERY,
        script_args=[
            "--steps",
            str(STEPS),
            "--samples",
            str(SAMPLES),
            "--global-batch",
            str(BATCH),
        ],
    )
    work = tmp_path / "run"
    job = start_local_job(manifest, work)
    try:
        # 1. SIGKILL the agent of worker 0 (rank 0, the master): its training process dies
        #    with it; the other three must re-form at epoch 1 without it.
        wait_for("step 25 in epoch 0", lambda: rank0_progress(work, 0, 25), 120, job_log(work))
        agents = read_json(work / "agents.json")
        os.kill(agents["elastic-w0"], signal.SIGKILL)
        killed_at = time.monotonic()
        resumed = wait_for(
            "a step in epoch 1", lambda: rank0_progress(work, 1, 1), 60, job_log(work)
        )
        print(
            f"lost agent: first step of epoch 1 {time.monotonic() - killed_at:.1f}s after the kill"
        )

        # 2. SIGKILL one training process of worker 2: its agent survives, the gang restarts.
        wait_for("12 more steps", lambda: rank0_progress(work, 1, resumed + 12), 60, job_log(work))
        gang = read_json(work / "pods" / "elastic-w2" / "gang.json")
        assert gang["epoch"] == 1
        os.kill(gang["pids"][0], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for("a step in epoch 2", lambda: rank0_progress(work, 2, 1), 60, job_log(work))
        print(f"killed process: first step of epoch 2 {time.monotonic() - killed_at:.1f}s later")

        code = job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert code == 0, job_log(work)

    summary = read_json(work / "summary.json")
    reforms = summary["reforms"]
    assert [(r["epoch"], r["workers"]) for r in reforms] == [(1, 3), (2, 3)], reforms
    assert "elastic-w0 lost" in reforms[0]["reason"]
    assert "elastic-w2 reported" in reforms[1]["reason"]
    for reform in reforms:
        redone = reform["last_step"] - reform["resumed_from"]
        print(
            f"re-form to epoch {reform['epoch']}: {reform['seconds']:.1f}s, resumed from step "
            f"{reform['resumed_from']}, {redone} steps redone ({reform['reason']})"
        )
        assert reform["seconds"] <= REFORM_LIMIT
        assert reform["resumed_from"] > 0 and reform["resumed_from"] % EVERY == 0
        assert 0 <= redone <= EVERY

    final = Checkpointer(work / "checkpoints").read(STEPS)
    sampler = final.state["sampler"]
    # Every step consumed one global batch exactly once, across both re-forms.
    consumed = sampler["epoch"] * SAMPLES + sampler["consumed"]
    assert consumed == STEPS * BATCH
