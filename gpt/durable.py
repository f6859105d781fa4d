"""Durable writes: data that a crash cannot leave half-written.

Every output of the tool (shards, meta.json, checkpoints, metrics) is written under a
temporary name, flushed to disk with fsync, then renamed into place; a rename is atomic, so a
reader sees either the old file or the complete new one.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file or folder's metadata to disk so that a rename is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` and fsync it (the caller renames the folder or file into place)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with open(path, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def replace_atomically(path: Path, data: bytes | str) -> None:
    """Write a file next to `path`, fsync it and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_durably(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)
