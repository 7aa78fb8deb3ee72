"""Checkpoints: atomic, checksummed, pruned to K, and never unreadable after a kill mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddl_worker.checkpoint import Checkpointer, DamagedCheckpoint, checkpoint_name, decode
from ddl_worker.fileio import TEMP_SUFFIX


def make_state(step: int, size: int = 1000) -> dict[str, object]:
    return {"weights": torch.full((size,), float(step)), "step": step}


def test_round_trip_and_keep_last_k(tmp_path: Path) -> None:
    checkpoints = Checkpointer(tmp_path, every=5, keep=2)
    for step in (5, 10, 15):
        checkpoints.save(step, make_state(step))
    assert checkpoints.steps() == [10, 15]
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 15
    assert torch.equal(loaded.state["weights"], torch.full((1000,), 15.0))
    assert [checkpoints.due(s) for s in (0, 4, 5, 10)] == [False, False, True, True]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_newest_falls_back_to_the_one_before(tmp_path: Path, damage: str) -> None:
    checkpoints = Checkpointer(tmp_path, keep=3)
    checkpoints.save(1, make_state(1))
    checkpoints.save(2, make_state(2))
    newest = tmp_path / checkpoint_name(2)
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    newest.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint):
        decode(bytes(data))
    loaded = checkpoints.load_latest()
    assert loaded is not None and loaded.step == 1


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "absent").load_latest() is None


def _write_forever(directory: Path, state_size: int) -> None:
    """Child: resume from the newest checkpoint and keep writing newer ones until killed."""
    checkpoints = Checkpointer(directory, keep=3)
    latest = checkpoints.load_latest()
    step = 0 if latest is None else latest.step
    while True:
        step += 1
        checkpoints.save(step, make_state(step, state_size))


def kill_loop(directory: Path, kills: int, seed: int) -> None:
    """Fork a writer, SIGKILL it at a random moment, inspect the directory; repeat.

    Runs in a fresh process with one torch thread: forking a process that has used
    torch's OpenMP pool (like pytest's, after other tests) can deadlock the child.
    Prints one JSON line per kill.
    """
    torch.set_num_threads(1)
    rng = random.Random(seed)
    state_size = 1_000_000  # 4 MB of float32: most of a writer's time is spent writing
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the child only ever dies by SIGKILL
            try:
                _write_forever(directory, state_size)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        checkpoints = Checkpointer(directory, keep=3)
        unreadable = []
        for step in checkpoints.steps():
            try:
                state = decode((directory / checkpoint_name(step)).read_bytes())
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
        print(json.dumps(observation), flush=True)


def test_sigkill_during_writes_never_leaves_an_unreadable_checkpoint(tmp_path: Path) -> None:
    """25 kills at random moments: every checkpoint file stays whole, the newest loads and
    never goes backwards. Enough kills must land inside a write for this to mean anything."""
    kills = 25
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path), str(kills)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    observations = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(observations) == kills, result.stderr
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
