"""Durable writes and folder locks: data that a crash or a second process cannot break.

Every output of the tool (shards, meta.json, checkpoints, metrics) is written under a
temporary name, flushed to disk with fsync, then renamed into place; a rename is atomic, so a
reader sees either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Iterator

from gpt.errors import GptError


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
    try:
        write_durably(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def link_atomically(link: Path, target: str) -> None:
    """Point the symlink `link` at `target` (relative to its folder) by renaming a new link over it."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_path(link.parent)


def temporary_folder(final: Path) -> Path:
    """Where `replacing_folder` writes the folder that becomes `final` (`NAME.tmp`)."""
    return final.with_name(f"{final.name}.tmp")


def replace_folder(new: Path, final: Path) -> None:
    """Make the folder `new` durable (everything in it, then itself) and rename it to `final`.
    An existing `final` is first renamed aside (hidden, `.NAME.old-PID`) and deleted after:
    readers see the old folder or the new one, never a mix of both."""
    for path in new.rglob("*"):
        fsync_path(path)
    fsync_path(new)
    aside = final.with_name(f".{final.name}.old-{os.getpid()}") if final.exists() else None
    if aside is not None:
        final.rename(aside)
    new.rename(final)
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def replacing_folder(final: Path) -> Iterator[Path]:
    """Yield `temporary_folder(final)` (not yet created) to write a new folder at. When the block
    succeeds it replaces `final` (`replace_folder`); when it fails it is removed."""
    tmp = temporary_folder(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, final)


def save_png(fig, path: Path, dpi: int = 100) -> None:
    """Write a matplotlib figure to a temporary name, then rename: never a half-written picture.
    The figure is closed either way."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings():
            # Tokens in scripts the font lacks are drawn as boxes; one warning per glyph is noise.
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GptError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


class FolderLock:
    """Keeps a second process out of a folder in use (a run's out_dir, a dataset being
    prepared). The lock is an flock on a lock file, which the kernel releases when the process
    dies however it dies; the file names the holder's pid and host for the message, and is
    removed on release. A lock file left by a dead process is taken over with a warning."""

    def __init__(self, path: Path, what: str):
        """`path` is the lock file; `what` names the locked thing in messages ("train.out_dir runs/x")."""
        self.path, self.what = path, what
        self.handle = None

    def __enter__(self) -> FolderLock:
        while self.handle is None:
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read().strip() or "another process"
                handle.close()
                raise GptError(f"{self.what} is in use by {holder}; wait for it to end or choose another "
                               "folder") from None
            if self._still_linked(handle):
                self.handle = handle
            else:  # its holder removed the file between our open and our flock: lock the new one
                handle.close()
        previous = self.handle.read().strip()
        if previous:
            print(f"warning: taking over the lock of {self.what} left by {previous}, which is no longer running",
                  file=sys.stderr)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)  # while still locked, so nobody locks the removed file
        self.handle.close()
        self.handle = None

    def _open(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise GptError(f"cannot write to {self.what} ({exc.strerror}); choose another folder") from None
        handle.seek(0)
        return handle

    def _still_linked(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False
