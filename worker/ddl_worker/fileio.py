"""Atomic file replacement: readers see the old content or the new one, never a mix."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write data to a temp file in the same directory, then rename it over path.

    durable=True also fsyncs the file before the rename and the directory after it, so a
    crash (or power loss) leaves either the previous file or the complete new one.
    """
    target = Path(path)
    fd, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        # The temp name is ours alone; removing it cannot touch a good file.
        Path(temp_name).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Persist a rename or unlink in directory."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | Path, value: Any) -> None:
    """Atomically replace path with compact JSON (not fsynced: status files, not data)."""
    atomic_write(path, json.dumps(value, separators=(",", ":")).encode(), durable=False)


def read_json(path: str | Path) -> Any:
    """The JSON in path, or None when the file does not exist yet."""
    try:
        return json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
