"""Crash-safe checkpoints of one job: atomic writes, a checksum and the job per file, keep K."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import torch
import torch.distributed as dist

from ddl_worker.env import JobIdentity
from ddl_worker.fileio import TEMP_SUFFIX, atomic_write, fsync_dir

log = logging.getLogger(__name__)

# File layout: MAGIC, sha256 of the rest, then the rest: the length of a JSON header (4 bytes,
# big-endian), the header ({"step": ..., "job": {"namespace": ..., "name": ...} or null}) and
# the payload (torch.save of the state dict). The checksum covers the header, so a damaged file
# never passes for another job's. It tells a damaged file (bad disk, truncated copy) from one
# torch cannot read for another reason, so only real damage makes load_latest fall back.
MAGIC: Final = b"DDLCKPT2"
# Version 1 (no header, no job) is still read: as a checkpoint without a job.
_MAGIC_V1: Final = b"DDLCKPT1"
_FAMILY: Final = b"DDLCKPT"
_DIGEST_SIZE: Final = 32
_LENGTH: Final = struct.Struct(">I")
_MAX_HEADER: Final = 64 * 1024
_CHUNK: Final = 1 << 20
# ckpt-<step>.pt (no job) or ckpt-<step>.<namespace>.<name>.pt. Namespaces have no dots, so the
# first dot after the step ends the namespace.
_NAME: Final = re.compile(r"^ckpt-(\d{12})(?:\.([^./]+)\.([^/]+))?\.pt$")
_TEMP: Final = re.compile(rf"^\.(ckpt-\d{{12}}.*\.pt)\.[^.]+{re.escape(TEMP_SUFFIX)}$")
# Temp files of a writer that was killed; anything this old is no live writer's.
_STALE_TEMP_SECONDS: Final = 600.0

Aside = Literal["damaged", "foreign"]


class CheckpointError(Exception):
    """A checkpoint cannot be written or the agreed one cannot be read."""


class DamagedCheckpoint(CheckpointError):
    """The file's bytes are not what was written (checksum or header mismatch)."""


class ForeignCheckpoint(CheckpointError):
    """A whole checkpoint that is not the one its name promises: another job's, another step's,
    or a format this version does not know. It is never resumed from, pruned or overwritten."""


@dataclass(frozen=True)
class Header:
    """What a checkpoint file says about itself."""

    step: int | None  # None in version 1 files, which only name the step in the file name
    job: JobIdentity | None


@dataclass(frozen=True)
class Loaded:
    """A checkpoint read back: the step it was taken after, and the saved state."""

    step: int
    state: dict[str, Any]
    path: Path
    job: JobIdentity | None = None


def checkpoint_name(step: int, job: JobIdentity | None = None) -> str:
    """ckpt-<step>.<namespace>.<name>.pt; ckpt-<step>.pt for a checkpoint without a job."""
    if job is None:
        return f"ckpt-{step:012d}.pt"
    return f"ckpt-{step:012d}.{job.namespace}.{job.name}.pt"


def parse_name(name: str) -> tuple[int, JobIdentity | None] | None:
    """(step, job) of a checkpoint file name; None for a name that is not a checkpoint's."""
    match = _NAME.match(name)
    if match is None:
        return None
    step, namespace, job_name = match.groups()
    if namespace is None:
        return int(step), None
    try:
        return int(step), JobIdentity(namespace, job_name)
    except ValueError:
        return None  # not a name this code writes: leave the file alone


def encode(state: dict[str, Any], *, step: int, job: JobIdentity | None) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    meta = {"step": step, "job": None if job is None else asdict(job)}
    header = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    rest = _LENGTH.pack(len(header)) + header + buffer.getvalue()
    return MAGIC + hashlib.sha256(rest).digest() + rest


def decode(data: bytes, *, weights_only: bool = True) -> dict[str, Any]:
    """The state in a checkpoint's bytes (DamagedCheckpoint when they are not whole)."""
    return _decode(data, weights_only)[1]


def verify_file(path: Path) -> Header:
    """The header of the checkpoint at path after checking its checksum, reading it in chunks."""
    with path.open("rb") as handle:
        header, digest, hasher = _read_prefix(handle)
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    if hasher.digest() != digest:
        raise DamagedCheckpoint("checksum mismatch")
    return header


def read_header(path: Path) -> Header:
    """The header of the checkpoint at path, unchecked (only the first bytes are read)."""
    with path.open("rb") as handle:
        return _read_prefix(handle)[0]


class Checkpointer:
    """Writes a job's checkpoints from rank 0 and loads its newest good one on every rank.

    Every rank must load the same checkpoint, or the sampler and optimizer state disagree
    across ranks; when a process group exists, rank 0 chooses and broadcasts its choice.

    job: whose checkpoints these are. It is part of every file name and recorded in every
    file; load_latest and pruning consider only files that are this job's by name and by
    content, so jobs sharing a directory never resume from, prune or overwrite each other's.
    Without a job (a script outside a DDLJob, a tool inspecting a directory) files carry no
    job and only such files are resumed from and pruned, while steps() and read() see the
    checkpoints of every job.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        job: JobIdentity | None = None,
        every: int = 100,
        keep: int = 3,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"every ({every}) and keep ({keep}) must be >= 1")
        self.directory = Path(directory)
        self.job = job
        self.every = every
        self.keep = keep
        self.group = group
        self.last_saved_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether step is a periodic checkpoint step (checkpoint.everySteps)."""
        return step > 0 and step % self.every == 0

    def path(self, step: int) -> Path:
        """Where this job's checkpoint after step lives."""
        return self.directory / checkpoint_name(step, self.job)

    def save(self, step: int, state: dict[str, Any]) -> Path | None:
        """Write state as the checkpoint after step (rank 0 only; other ranks return None).

        Then prune: keep the newest `keep` checkpoints of this job that verify, and always the
        one just written.
        """
        if _rank() != 0:
            return None
        path = self.path(step)
        if self.last_saved_step == step and self._holds_own(path, step):
            return path  # saved already (a stop right after a periodic checkpoint)
        self.directory.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if path.exists():
            self._clear_the_way(path, step)
        try:
            atomic_write(path, encode(state, step=step, job=self.job))
        except OSError as error:
            raise CheckpointError(f"cannot write checkpoint {path}: {error}") from error
        self.last_saved_step = step
        kept = self._prune(protect=step)
        seconds = time.perf_counter() - started
        log.info(
            "checkpoint step %d written in %.2fs: %s (kept steps %s)",
            step,
            seconds,
            path,
            ", ".join(map(str, kept)),
        )
        return path

    def prune(self) -> list[int]:
        """Keep the newest `keep` good checkpoints of this job; the steps kept, newest first."""
        if not self.directory.is_dir():
            return []
        return self._prune(protect=None)

    def steps(self) -> list[int]:
        """Steps of this job's checkpoint files (of every job's, without a job), oldest first,
        by name: damaged ones included."""
        if self.job is None:
            return sorted({step for step, _, _ in self._files()})
        return sorted(step for step, _ in self._own())

    def read(self, step: int, *, weights_only: bool = True) -> Loaded:
        """This job's checkpoint after step (without a job: the one checkpoint of that step).

        Raises DamagedCheckpoint when it is not whole, ForeignCheckpoint when it holds another
        job's or another step's state, CheckpointError when it cannot be read.
        """
        path = self.path(step)
        if self.job is None and not path.exists():
            found = [p for s, _, p in self._files() if s == step]
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise CheckpointError(f"several jobs have a checkpoint of step {step}: {names}")
            path = found[0] if found else path
        parsed = parse_name(path.name)
        assert parsed is not None, path
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
        header, state = _decode(data, weights_only)
        _check_matches_name(header, *parsed)
        return Loaded(step, state, path, header.job)

    def load_latest(self, *, weights_only: bool = True) -> Loaded | None:
        """This job's newest readable checkpoint, skipping damaged and foreign ones; None when
        there is none."""
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
                except (DamagedCheckpoint, ForeignCheckpoint) as error:
                    raise CheckpointError(
                        f"rank 0 chose checkpoint step {agreed} in {self.directory} but this "
                        f"rank reads {self.path(agreed).name} as {error}; do all workers "
                        "mount the same volume at the checkpoint path?"
                    ) from error
        if chosen is not None:
            log.info("resuming from checkpoint step %d: %s", chosen.step, chosen.path)
        return chosen

    def _newest_good(self, weights_only: bool) -> Loaded | None:
        self._mention_other_jobs()
        for step, path in sorted(self._own(), reverse=True):
            try:
                return self.read(step, weights_only=weights_only)
            except DamagedCheckpoint as error:
                log.warning("checkpoint %s is damaged (%s); trying the one before", path, error)
            except ForeignCheckpoint as error:
                log.warning("skipping checkpoint %s: %s; trying the one before", path, error)
        return None

    def _mention_other_jobs(self) -> None:
        others = sorted(
            {"(no job)" if job is None else str(job) for _, job, _ in self._files()}
            - {"(no job)" if self.job is None else str(self.job)}
        )
        if others:
            log.warning(
                "%s also holds checkpoints of %s, which %s never resumes from or prunes",
                self.directory,
                ", ".join(others),
                "a checkpointer without a job" if self.job is None else f"job {self.job}",
            )

    def _prune(self, protect: int | None) -> list[int]:
        """Newest first: count this job's checkpoints that verify (the one just written, protect,
        without reading it back) up to keep; set damaged ones among them aside; remove this
        job's older ones. Never touches another job's file."""
        kept: list[int] = []
        for step, path in sorted(self._own(), reverse=True):
            try:
                if step == protect:
                    kept.append(step)
                elif len(kept) < self.keep:
                    _check_matches_name(verify_file(path), step, self.job)
                    kept.append(step)
                else:
                    # Older than the K kept: a cheap look at the header is enough to know the
                    # file claims to be this job's before it goes.
                    _check_matches_name(read_header(path), step, self.job)
                    path.unlink()
            except DamagedCheckpoint as error:
                self._set_aside(path, "damaged", str(error))
            except ForeignCheckpoint as error:
                log.warning("leaving %s alone: %s", path, error)
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("cannot prune checkpoint %s: %s", path, error)
        self._remove_stale_temps()
        fsync_dir(self.directory)
        return kept

    def _holds_own(self, path: Path, step: int) -> bool:
        """Whether path is this job's whole checkpoint of step."""
        try:
            _check_matches_name(verify_file(path), step, self.job)
        except (CheckpointError, OSError):
            return False
        return True

    def _clear_the_way(self, path: Path, step: int) -> None:
        """Before writing over path: replacing this job's good checkpoint of the same step is
        fine, but damaged or foreign bytes a human may want go aside first."""
        try:
            _check_matches_name(verify_file(path), step, self.job)
        except DamagedCheckpoint as error:
            self._set_aside(path, "damaged", str(error))
        except ForeignCheckpoint as error:
            self._set_aside(path, "foreign", str(error))
        except FileNotFoundError:
            pass

    def _set_aside(self, path: Path, why: Aside, detail: str) -> None:
        """Rename path out of the checkpoint names (never deleted: someone may want it)."""
        target = path.with_name(f"{path.name}.{why}")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.{why}.{n}")
        try:
            path.rename(target)
        except FileNotFoundError:
            return
        except OSError as error:
            log.warning(
                "checkpoint %s is %s (%s) and cannot be moved aside: %s", path, why, detail, error
            )
            return
        log.warning(
            "checkpoint %s is %s (%s): moved it aside to %s; it is no longer counted or loaded, "
            "delete it when it is not needed",
            path,
            why,
            detail,
            target.name,
        )

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for temp in list(self.directory.iterdir()):
            match = _TEMP.match(temp.name)
            parsed = None if match is None else parse_name(match.group(1))
            if parsed is None or parsed[1] != self.job:
                continue
            try:
                if now - temp.stat().st_mtime > _STALE_TEMP_SECONDS:
                    temp.unlink()
            except FileNotFoundError:
                continue

    def _files(self) -> Iterator[tuple[int, JobIdentity | None, Path]]:
        """Every checkpoint file in the directory, by name: (step, job, path)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            parsed = parse_name(path.name)
            if parsed is not None:
                yield parsed[0], parsed[1], path

    def _own(self) -> Iterator[tuple[int, Path]]:
        return ((step, path) for step, job, path in self._files() if job == self.job)


def _read_prefix(handle: IO[bytes]) -> tuple[Header, bytes, Any]:
    """Header, stored digest and a hasher fed with what was read of the checked bytes."""
    magic = handle.read(len(MAGIC))
    version = magic[len(_FAMILY) :]
    if magic.startswith(_FAMILY) and version.isdigit() and magic not in (MAGIC, _MAGIC_V1):
        raise ForeignCheckpoint(f"unknown checkpoint format version {version.decode()}")
    if magic not in (MAGIC, _MAGIC_V1):
        raise DamagedCheckpoint("missing checkpoint header")
    digest = handle.read(_DIGEST_SIZE)
    if len(digest) < _DIGEST_SIZE:
        raise DamagedCheckpoint("truncated header")
    hasher = hashlib.sha256()
    if magic == _MAGIC_V1:
        return Header(step=None, job=None), digest, hasher
    length_bytes = handle.read(_LENGTH.size)
    if len(length_bytes) < _LENGTH.size:
        raise DamagedCheckpoint("truncated header")
    (length,) = _LENGTH.unpack(length_bytes)
    if length > _MAX_HEADER:
        raise DamagedCheckpoint(f"header length {length} is implausible")
    meta = handle.read(length)
    if len(meta) < length:
        raise DamagedCheckpoint("truncated header")
    hasher.update(length_bytes)
    hasher.update(meta)
    return _parse_header(meta), digest, hasher


def _parse_header(meta: bytes) -> Header:
    try:
        fields = json.loads(meta)
        step = fields["step"]
        job = fields["job"]
        if not isinstance(step, int):
            raise TypeError(f"step is {step!r}")
        identity = None if job is None else JobIdentity(job["namespace"], job["name"])
    except (ValueError, TypeError, KeyError) as error:
        raise DamagedCheckpoint(f"unreadable header: {error}") from None
    return Header(step=step, job=identity)


def _decode(data: bytes, weights_only: bool) -> tuple[Header, dict[str, Any]]:
    stream = io.BytesIO(data)
    header, digest, _ = _read_prefix(stream)
    view = memoryview(data)
    if hashlib.sha256(view[len(MAGIC) + _DIGEST_SIZE :]).digest() != digest:
        raise DamagedCheckpoint("checksum mismatch")
    payload = io.BytesIO(view[stream.tell() :])
    state = torch.load(payload, map_location="cpu", weights_only=weights_only)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint holds a {type(state).__name__}, not a dict")
    return header, state


def _check_matches_name(header: Header, step: int, job: JobIdentity | None) -> None:
    """ForeignCheckpoint unless the header is of the step and job the file name says."""
    if header.job != job:
        holder = "no job" if header.job is None else f"job {header.job}"
        owner = "no job" if job is None else f"job {job}"
        raise ForeignCheckpoint(f"it holds a checkpoint of {holder}, not of {owner}")
    if header.step is not None and header.step != step:
        raise ForeignCheckpoint(f"it holds step {header.step}, not {step} as its name says")


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0
