"""Crash-safe checkpoints: atomic writes, a checksum per file, keep the last K."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist

from ddl_worker.fileio import TEMP_SUFFIX, atomic_write, fsync_dir

log = logging.getLogger(__name__)

# File layout: MAGIC, sha256 of the payload, payload (torch.save of the state dict). The
# checksum tells a damaged file (bad disk, truncated copy) from one torch cannot read for
# another reason, so only real damage makes load_latest fall back to an older checkpoint.
MAGIC: Final = b"DDLCKPT1"
_DIGEST_SIZE: Final = 32
_NAME: Final = re.compile(r"^ckpt-(\d{12})\.pt$")
# Temp files of a writer that was killed; anything this old is no live writer's.
_STALE_TEMP_SECONDS: Final = 600.0


class CheckpointError(Exception):
    """A checkpoint cannot be written or the agreed one cannot be read."""


class DamagedCheckpoint(CheckpointError):
    """The file's bytes are not what was written (checksum or header mismatch)."""


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read back: the step it was taken after, and the saved state."""

    step: int
    state: dict[str, Any]
    path: Path


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:012d}.pt"


def encode(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, *, weights_only: bool = True) -> dict[str, Any]:
    header = len(MAGIC) + _DIGEST_SIZE
    if len(data) < header or not data.startswith(MAGIC):
        raise DamagedCheckpoint("missing checkpoint header")
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : header]:
        raise DamagedCheckpoint("checksum mismatch")
    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=weights_only)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint holds a {type(state).__name__}, not a dict")
    return state


class Checkpointer:
    """Writes checkpoints from rank 0 and loads the newest good one on every rank.

    Every rank must load the same checkpoint, or the sampler and optimizer state disagree
    across ranks; when a process group exists, rank 0 chooses and broadcasts its choice.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        every: int = 100,
        keep: int = 3,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"every ({every}) and keep ({keep}) must be >= 1")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.group = group
        self.last_saved_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether step is a periodic checkpoint step (checkpoint.everySteps)."""
        return step > 0 and step % self.every == 0

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Write state as the checkpoint after step (rank 0 only; other ranks return None)."""
        if _rank() != 0:
            return None
        path = self.directory / checkpoint_name(step)
        if self.last_saved_step == step and path.exists():
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            atomic_write(path, encode(state))
        except OSError as error:
            raise CheckpointError(f"cannot write checkpoint {path}: {error}") from error
        self.last_saved_step = step
        self._prune()
        seconds = time.perf_counter() - started
        log.info("checkpoint step %d written in %.2fs: %s", step, seconds, path)
        return path

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first (damaged ones included)."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def read(self, step: int, *, weights_only: bool = True) -> Loaded:
        path = self.directory / checkpoint_name(step)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
        return Loaded(step, decode(data, weights_only=weights_only), path)

    def load_latest(self, *, weights_only: bool = True) -> Loaded | None:
        """The newest readable checkpoint, skipping damaged ones; None when there is none."""
        chosen = self._newest_good(weights_only) if _rank() == 0 else None
        if dist.is_available() and dist.is_initialized():
            box: list[Any] = [None if chosen is None else chosen.step]
            dist.broadcast_object_list(box, src=0, group=self.group)
            agreed: int | None = box[0]
            if agreed is None:
                return None
            if chosen is None:
                try:
                    chosen = self.read(agreed, weights_only=weights_only)
                except DamagedCheckpoint as error:
                    raise CheckpointError(
                        f"rank 0 chose checkpoint step {agreed} in {self.directory} but this "
                        f"rank reads it as damaged ({error}); is the directory shared?"
                    ) from error
        if chosen is not None:
            log.info("resuming from checkpoint step %d: %s", chosen.step, chosen.path)
        return chosen

    def _newest_good(self, weights_only: bool) -> Loaded | None:
        for step in reversed(self.steps()):
            try:
                return self.read(step, weights_only=weights_only)
            except DamagedCheckpoint as error:
                log.warning(
                    "checkpoint %s is damaged (%s); trying the one before",
                    self.directory / checkpoint_name(step),
                    error,
                )
        return None

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep]:
            (self.directory / checkpoint_name(step)).unlink(missing_ok=True)
        now = time.time()
        for temp in self.directory.glob(f".ckpt-*{TEMP_SUFFIX}"):
            try:
                if now - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                    temp.unlink()
            except FileNotFoundError:
                continue
        fsync_dir(self.directory)


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0
