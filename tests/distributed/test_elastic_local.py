"""Elastic training in local mode: lose workers mid-run, re-form, resume, finish."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from ddl_worker.checkpoint import Checkpointer

from holds import Hold
from workerutil import job_log, make_job_manifest, read_json, start_local_job, wait_for

EVERY = 10
STEPS = 100
BATCH = 48
SAMPLES = 1200  # 25 steps per data epoch: the re-forms land mid-epoch
REFORM_LIMIT = 30.0
HOLD_STEP = 25  # every gang waits here until released; each resumes from the checkpoint at 20


def coordinator_saw(work: Path, epoch: int) -> None:
    """Until the local coordinator noticed the epoch train (it polls; the hold is faster)."""
    line = f"re-formed at epoch {epoch} "
    wait_for(f"the coordinator to see epoch {epoch} train", lambda: line in job_log(work), 30)


def test_lost_worker_and_killed_process_reform_and_resume(tmp_path: Path) -> None:
    hold = Hold.at(HOLD_STEP, tmp_path / "hold")
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
            *hold.args(),
        ],
    )
    work = tmp_path / "run"
    job = start_local_job(manifest, work)
    try:
        # 1. SIGKILL the agent of worker 0 (rank 0, the master) while the gang waits at the
        #    hold: its training process dies with it; the other three must re-form at epoch 1
        #    without it, resume from step 20 and come back to the hold.
        held = hold.wait_held(120, log=lambda: job_log(work))
        assert (held["epoch"], held["worldSize"]) == (0, 4), held
        agents = read_json(work / "agents.json")
        os.kill(agents["elastic-w0"], signal.SIGKILL)
        killed_at = time.monotonic()
        held = hold.wait_held(60, when=lambda m: m["epoch"] == 1, log=lambda: job_log(work))
        assert held["worldSize"] == 3, held
        coordinator_saw(work, 1)
        print(f"lost agent: epoch 1 at the hold {time.monotonic() - killed_at:.1f}s after the kill")

        # 2. SIGKILL one training process of worker 2: its agent survives, the gang restarts.
        gang = read_json(work / "pods" / "elastic-w2" / "gang.json")
        assert gang["epoch"] == 1
        os.kill(gang["pids"][0], signal.SIGKILL)
        killed_at = time.monotonic()
        held = hold.wait_held(60, when=lambda m: m["epoch"] == 2, log=lambda: job_log(work))
        assert held["worldSize"] == 3, held
        coordinator_saw(work, 2)
        print(f"killed process: epoch 2 at the hold {time.monotonic() - killed_at:.1f}s later")

        hold.release()
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
