"""Random histories of saves, damage, prunes and other jobs' saves never lose a good checkpoint."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddl_worker.checkpoint import Checkpointer, parse_name
from ddl_worker.env import JobIdentity

JOB = JobIdentity("ml", "train")
OTHERS = (JobIdentity("ml", "other"), JobIdentity("team", "train"), None)

Damage = Literal["truncate", "flip", "delete"]


@dataclass(frozen=True)
class Save:
    step: int


@dataclass(frozen=True)
class Harm:
    how: Damage
    target: int  # index into this job's files, modulo their number
    where: int  # byte position (flip) or new length (truncate), modulo the size


@dataclass(frozen=True)
class Prune:
    pass


@dataclass(frozen=True)
class ForeignSave:
    step: int
    job: JobIdentity | None


Op = Save | Harm | Prune | ForeignSave

steps = st.integers(min_value=1, max_value=25)  # few steps, so names and steps collide
ops = st.one_of(
    st.builds(Save, steps),
    st.builds(
        Harm,
        st.sampled_from(["truncate", "flip", "delete"]),
        st.integers(0, 1000),
        st.integers(0, 1 << 20),
    ),
    st.builds(Prune),
    st.builds(ForeignSave, steps, st.sampled_from(OTHERS)),
)


@dataclass
class Model:
    """What this job last wrote at each step (a file holding exactly that is a good one), and
    the bytes of damaged files."""

    directory: Path
    keep: int
    written: dict[int, bytes] = field(default_factory=dict)
    damaged: dict[int, bytes] = field(default_factory=dict)

    def own_path(self, step: int) -> Path:
        return Checkpointer(self.directory, job=JOB).path(step)

    def good_on_disk(self) -> set[int]:
        return {
            step
            for step, data in self.written.items()
            if self.own_path(step).is_file() and self.own_path(step).read_bytes() == data
        }

    def foreign_files(self) -> dict[str, bytes]:
        out = {}
        for path in self.directory.iterdir():
            parsed = parse_name(path.name)
            if parsed is not None and parsed[1] != JOB:
                out[path.name] = path.read_bytes()
        return out

    def preserved(self, step: int, data: bytes) -> bool:
        """Whether damaged bytes are still at their name or set aside next to it."""
        name = self.own_path(step).name
        return any(
            p.read_bytes() == data
            for p in self.directory.iterdir()
            if p.name == name or p.name.startswith(f"{name}.damaged")
        )


def state(step: int, job: JobIdentity | None) -> dict[str, object]:
    return {"step": step, "job": str(job), "weights": torch.full((64,), float(step))}


def apply(model: Model, mine: Checkpointer, op: Op) -> None:
    """Run one operation and check what it may and may not have changed."""
    good_before = set(model.good_on_disk())
    foreign_before = model.foreign_files()
    if isinstance(op, ForeignSave):
        Checkpointer(model.directory, job=op.job, keep=2).save(op.step, state(op.step, op.job))
        assert model.good_on_disk() == good_before, "another job's save touched this job's"
        return
    if isinstance(op, Harm):
        files = sorted(mine.steps())
        if not files:
            return
        step = files[op.target % len(files)]
        path = mine.path(step)
        data = bytearray(path.read_bytes())
        if op.how == "delete":
            path.unlink()
            model.damaged.pop(step, None)
            return
        if op.how == "truncate":
            data = data[: op.where % len(data)] if data else data
        elif data:
            data[op.where % len(data)] ^= 0xFF
        path.write_bytes(bytes(data))
        if bytes(data) == model.written.get(step):  # flipping a byte back repairs the file
            model.damaged.pop(step, None)
        else:
            model.damaged[step] = bytes(data)
        return
    if isinstance(op, Save):
        written = mine.save(op.step, state(op.step, JOB))
        assert written == mine.path(op.step) and written.is_file()
        model.written[op.step] = written.read_bytes()
        model.damaged.pop(op.step, None)  # (its old bytes were set aside, checked below)
        counted = good_before | {op.step}
        expected = set(sorted(counted)[-model.keep :]) | {op.step}
    else:
        counted = good_before
        mine.prune()
        expected = set(sorted(counted)[-model.keep :])
    assert model.good_on_disk() == expected, f"kept {model.good_on_disk()}, want {expected}"
    assert model.foreign_files() == foreign_before, "this job touched another job's files"
    # Damaged files among the newest K are set aside, never deleted; older ones may go.
    newest = sorted(counted)[-model.keep :]
    threshold = newest[0] if len(newest) == model.keep else -1
    for step, bad in list(model.damaged.items()):
        if step >= threshold:
            assert model.preserved(step, bad), f"damaged step {step} was lost"
        if not mine.path(step).exists() or mine.path(step).read_bytes() != bad:
            model.damaged.pop(step)  # set aside or pruned: no longer at its name


@settings(max_examples=100, deadline=None)
@given(keep=st.integers(min_value=1, max_value=3), history=st.lists(ops, max_size=30))
def test_load_latest_returns_the_newest_good_checkpoint_of_this_job(
    keep: int, history: list[Op]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Model(Path(tmp), keep)
        mine = Checkpointer(model.directory, job=JOB, keep=keep)
        for op in history:
            damaged_before = dict(model.damaged)
            apply(model, mine, op)
            for step, data in damaged_before.items():
                if isinstance(op, Save) and op.step == step:
                    assert model.preserved(step, data), "saving over damaged bytes lost them"
            good = model.good_on_disk()
            # A fresh process resuming, as after a restart.
            loaded = Checkpointer(model.directory, job=JOB, keep=keep).load_latest()
            if not good:
                assert loaded is None, f"resumed from {loaded} with no good checkpoint"
                continue
            assert loaded is not None, f"good checkpoints {sorted(good)} exist, none loaded"
            assert loaded.step == max(good)
            assert loaded.state["step"] == loaded.step and loaded.state["job"] == str(JOB)
