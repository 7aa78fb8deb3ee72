"""Checkpoints: atomic, checksummed, the job's own, pruned to K good ones, never unreadable
after a kill mid-write."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddl_worker.checkpoint import (
    Checkpointer,
    DamagedCheckpoint,
    ForeignCheckpoint,
    checkpoint_name,
    decode,
    encode,
    verify_file,
)
from ddl_worker.env import JobIdentity
from ddl_worker.fileio import TEMP_SUFFIX

JOB = JobIdentity("ml", "train")
OTHER = JobIdentity("ml", "other")


def make_state(step: int, size: int = 1000) -> dict[str, object]:
    return {"weights": torch.full((size,), float(step)), "step": step}


def damage(path: Path, how: str = "flip") -> bytes:
    """Damage the file at path in place; returns the damaged bytes."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    return bytes(data)


def set_aside(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".pt." in p.name)


def test_round_trip_and_keep_last_k(tmp_path: Path) -> None:
    checkpoints = Checkpointer(tmp_path, job=JOB, every=5, keep=2)
    for step in (5, 10, 15):
        checkpoints.save(step, make_state(step))
    assert checkpoints.steps() == [10, 15]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000000010.ml.train.pt",
        "ckpt-000000000015.ml.train.pt",
    ]
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 15 and loaded.job == JOB
    assert torch.equal(loaded.state["weights"], torch.full((1000,), 15.0))
    assert [checkpoints.due(s) for s in (0, 4, 5, 10)] == [False, False, True, True]


@pytest.mark.parametrize("job", [JOB, None], ids=["job", "no-job"])
@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_damaged_newest_falls_back_to_the_one_before(
    tmp_path: Path, how: str, job: JobIdentity | None
) -> None:
    checkpoints = Checkpointer(tmp_path, job=job, keep=3)
    checkpoints.save(1, make_state(1))
    checkpoints.save(2, make_state(2))
    data = damage(tmp_path / checkpoint_name(2, job), how)
    with pytest.raises(DamagedCheckpoint):
        decode(data)
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 1


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "absent", job=JOB).load_latest() is None


@pytest.mark.parametrize("job", [JOB, None], ids=["job", "no-job"])
def test_a_damaged_higher_step_never_costs_the_good_ones(
    tmp_path: Path, job: JobIdentity | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported case: keep=1 and a damaged ckpt-900; saving 200 deleted both good
    checkpoints (100 and the 200 just written) and load_latest returned None."""
    checkpoints = Checkpointer(tmp_path, job=job, keep=1)
    checkpoints.save(900, make_state(900))
    damaged = damage(tmp_path / checkpoint_name(900, job))
    checkpoints.save(100, make_state(100))
    with caplog.at_level(logging.INFO, logger="ddl_worker.checkpoint"):
        checkpoints.save(200, make_state(200))
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 200
    assert checkpoints.steps() == [200]
    # The damaged file was not counted, and not lost either: it is set aside, byte for byte.
    aside = tmp_path / f"{checkpoint_name(900, job)}.damaged"
    assert set_aside(tmp_path) == [aside.name]
    assert aside.read_bytes() == damaged
    assert "kept steps 200" in caplog.text


def test_keep_one_with_a_damaged_newest_keeps_the_older_good_one(tmp_path: Path) -> None:
    Checkpointer(tmp_path, job=JOB, keep=2).save(100, make_state(100))
    Checkpointer(tmp_path, job=JOB, keep=2).save(200, make_state(200))
    damage(tmp_path / checkpoint_name(200, JOB), "truncate")
    checkpoints = Checkpointer(tmp_path, job=JOB, keep=1)
    assert checkpoints.prune() == [100]
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 100
    # After the next save, that one is the newest good one and the older goes.
    checkpoints.save(300, make_state(300))
    assert checkpoints.steps() == [300]


def test_the_checkpoint_just_written_always_survives(tmp_path: Path) -> None:
    """A script that restarts from scratch below an existing good checkpoint: keep=1 keeps
    the newest good one (what load_latest resumes from) and the one just written."""
    checkpoints = Checkpointer(tmp_path, job=JOB, keep=1)
    checkpoints.save(500, make_state(500))
    again = Checkpointer(tmp_path, job=JOB, keep=1)
    for step in (10, 20):
        assert again.save(step, make_state(step)) == tmp_path / checkpoint_name(step, JOB)
        assert again.path(step).exists()
    assert again.steps() == [20, 500]
    loaded = again.load_latest()
    assert loaded is not None and loaded.step == 500


def test_two_jobs_in_one_directory_keep_to_their_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported case: two jobs share a directory; the one at the lower step deleted its
    own new checkpoint and later resumed from the other job's state."""
    ahead = Checkpointer(tmp_path, job=OTHER, keep=2)
    for step in (700, 800, 900):
        ahead.save(step, make_state(step))
    behind = Checkpointer(tmp_path, job=JOB, keep=2)
    for step in (100, 200, 300):
        behind.save(step, make_state(step))
    assert behind.steps() == [200, 300]
    assert ahead.steps() == [800, 900]
    with caplog.at_level(logging.WARNING, logger="ddl_worker.checkpoint"):
        loaded = behind.load_latest()
    assert loaded is not None and (loaded.step, loaded.job) == (300, JOB)
    assert loaded.state["step"] == 300
    assert "also holds checkpoints of ml/other" in caplog.text
    theirs = ahead.load_latest()
    assert theirs is not None and (theirs.step, theirs.job) == (900, OTHER)
    # The same step in both jobs: two files, neither overwrites the other.
    ahead.save(1000, make_state(1000))
    behind.save(1000, make_state(-1000))
    assert Checkpointer(tmp_path, job=OTHER).read(1000).state["step"] == 1000
    assert Checkpointer(tmp_path, job=JOB).read(1000).state["step"] == -1000


def test_foreign_checkpoints_are_neither_loaded_nor_pruned(tmp_path: Path) -> None:
    """Other jobs' files, files without a job (older workers), and another job's checkpoint
    copied under this job's name: never resumed from, never deleted."""
    Checkpointer(tmp_path, job=OTHER, keep=5).save(900, make_state(900))
    Checkpointer(tmp_path, keep=5).save(800, make_state(800))  # no job
    legacy = tmp_path / checkpoint_name(700)
    legacy.write_bytes(legacy_v1(make_state(700)))
    copied = tmp_path / checkpoint_name(600, JOB)
    copied.write_bytes(encode(make_state(600), step=600, job=OTHER))
    renamed = tmp_path / checkpoint_name(650, JOB)
    renamed.write_bytes(encode(make_state(5), step=5, job=JOB))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    mine = Checkpointer(tmp_path, job=JOB, keep=1)
    assert mine.load_latest() is None
    with pytest.raises(ForeignCheckpoint, match="job ml/other, not of job ml/train"):
        mine.read(600)
    with pytest.raises(ForeignCheckpoint, match="step 5, not 650"):
        mine.read(650)
    for step in (100, 200, 300):
        mine.save(step, make_state(step))
    loaded = mine.load_latest()
    assert loaded is not None and loaded.step == 300
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {name: after.get(name) for name in before} == before
    # Without a job, only files without a job are its own.
    anonymous = Checkpointer(tmp_path, keep=5).load_latest()
    assert anonymous is not None and anonymous.step == 800 and anonymous.job is None


def test_writing_over_a_foreign_or_damaged_file_sets_it_aside_first(tmp_path: Path) -> None:
    mine = Checkpointer(tmp_path, job=JOB, keep=3)
    copied = encode(make_state(100), step=100, job=OTHER)
    mine.path(100).write_bytes(copied)
    mine.save(100, make_state(100))
    assert (tmp_path / f"{checkpoint_name(100, JOB)}.foreign").read_bytes() == copied
    damaged = damage(mine.path(100))
    mine.save(100, make_state(100))  # the same step again: rewritten, not trusted
    assert (tmp_path / f"{checkpoint_name(100, JOB)}.damaged").read_bytes() == damaged
    assert verify_file(mine.path(100)).job == JOB
    damaged_again = damage(mine.path(100), "truncate")
    mine.save(200, make_state(200))
    assert (tmp_path / f"{checkpoint_name(100, JOB)}.damaged.1").read_bytes() == damaged_again
    assert mine.steps() == [200]


def test_legacy_files_read_as_checkpoints_without_a_job(tmp_path: Path) -> None:
    (tmp_path / checkpoint_name(40)).write_bytes(legacy_v1(make_state(40)))
    loaded = Checkpointer(tmp_path).load_latest()
    assert loaded is not None and loaded.step == 40 and loaded.job is None
    assert Checkpointer(tmp_path, job=JOB).load_latest() is None


def test_an_unknown_format_version_is_left_alone(tmp_path: Path) -> None:
    future = tmp_path / checkpoint_name(900, JOB)
    future.write_bytes(b"DDLCKPT9" + bytes(100))
    checkpoints = Checkpointer(tmp_path, job=JOB, keep=1)
    with pytest.raises(ForeignCheckpoint, match="version 9"):
        checkpoints.read(900)
    checkpoints.save(10, make_state(10))
    checkpoints.save(20, make_state(20))
    assert future.exists() and checkpoints.steps() == [20, 900]
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 20


def test_without_a_job_steps_and_read_see_every_job(tmp_path: Path) -> None:
    """How tools and tests inspect a local run's directory."""
    Checkpointer(tmp_path, job=JOB).save(200, make_state(200))
    Checkpointer(tmp_path, job=OTHER).save(300, make_state(300))
    inspector = Checkpointer(tmp_path)
    assert inspector.steps() == [200, 300]
    assert inspector.read(200).job == JOB
    Checkpointer(tmp_path, job=OTHER).save(200, make_state(200))
    with pytest.raises(Exception, match="several jobs have a checkpoint of step 200"):
        inspector.read(200)


def test_only_this_jobs_stale_temp_files_are_removed(tmp_path: Path) -> None:
    old = time.time() - 3600
    mine = tmp_path / f".{checkpoint_name(5, JOB)}.abc123{TEMP_SUFFIX}"
    theirs = tmp_path / f".{checkpoint_name(5, OTHER)}.abc123{TEMP_SUFFIX}"
    fresh = tmp_path / f".{checkpoint_name(6, JOB)}.def456{TEMP_SUFFIX}"
    for temp in (mine, theirs, fresh):
        temp.write_bytes(b"partial")
    for temp in (mine, theirs):
        os.utime(temp, (old, old))
    Checkpointer(tmp_path, job=JOB).save(10, make_state(10))
    assert not mine.exists() and theirs.exists() and fresh.exists()


def legacy_v1(state: dict[str, object]) -> bytes:
    """A checkpoint as workers before job identities wrote it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return b"DDLCKPT1" + hashlib.sha256(payload).digest() + payload


def _write_forever(directory: Path, state_size: int) -> None:
    """Child: resume from the newest checkpoint and keep writing newer ones until killed."""
    checkpoints = Checkpointer(directory, job=JOB, keep=3)
    latest = checkpoints.load_latest()
    step = 0 if latest is None else latest.step
    while True:
        step += 1
        checkpoints.save(step, make_state(step, state_size))


def kill_loop(directory: Path, kills: int, seed: int, hits: int = 3, most: int = 200) -> None:
    """Fork a writer, SIGKILL it at a random moment, inspect the directory; repeat.

    At least `kills` times, and on until `hits` kills landed inside a write (a temp file left
    behind), at most `most` times: on a loaded machine fewer random moments fall in a write.

    Runs in a fresh process with one torch thread: forking a process that has used
    torch's OpenMP pool (like pytest's, after other tests) can deadlock the child.
    Prints one JSON line per kill.
    """
    torch.set_num_threads(1)
    rng = random.Random(seed)
    state_size = 1_000_000  # 4 MB of float32: most of a writer's time is spent writing
    interrupted: set[str] = set()
    done = 0
    while done < most and (done < kills or len(interrupted) < hits):
        done += 1
        pid = os.fork()
        if pid == 0:  # the child only ever dies by SIGKILL
            try:
                _write_forever(directory, state_size)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        checkpoints = Checkpointer(directory, job=JOB, keep=3)
        unreadable = []
        for step in checkpoints.steps():
            try:
                state = decode(checkpoints.path(step).read_bytes())
                assert state["step"] == step
            except Exception as error:
                unreadable.append(f"{step}: {error}")
        loaded = checkpoints.load_latest()
        whole = loaded is not None and torch.equal(
            loaded.state["weights"], torch.full((state_size,), float(loaded.step))
        )
        observation = {
            "steps": checkpoints.steps(),
            "unreadable": unreadable,
            "loaded": None if loaded is None else loaded.step,
            "whole": whole,
            "temps": sorted(p.name for p in directory.glob(f".*{TEMP_SUFFIX}")),
        }
        interrupted.update(observation["temps"])
        print(json.dumps(observation), flush=True)


def test_sigkill_during_writes_never_leaves_an_unreadable_checkpoint(tmp_path: Path) -> None:
    """25 or more kills at random moments: every checkpoint file stays whole, the newest loads
    and never goes backwards. Enough kills must land inside a write for this to mean anything."""
    kills = 25
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(kills)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    observations = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(observations) >= kills, result.stderr
    last_step = 0
    interrupted: set[str] = set()
    for seen in observations:
        assert seen["unreadable"] == [], seen
        interrupted.update(seen["temps"])
        if seen["loaded"] is None:
            assert seen["steps"] == [], f"checkpoints exist but none loads: {seen}"
            continue
        assert seen["whole"], seen
        assert seen["loaded"] >= last_step, "the newest checkpoint went backwards"
        last_step = seen["loaded"]
    assert last_step > 0, "no checkpoint was ever completed"
    assert len(interrupted) >= 3, f"only {len(interrupted)} of {kills} kills hit a write"


if __name__ == "__main__":
    kill_loop(Path(sys.argv[1]), int(sys.argv[2]), seed=20)
