"""Atomic file writes: write to a temporary file beside the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_path", "commit_dir", "remove_stale", "temp_dir_beside"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` atomically.

    A crash or an exception before the end leaves ``path`` as it was (and removes the
    temporary file).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, tmp = tempfile.mkstemp(**_temp_name(target))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def temp_dir_beside(target: Path) -> Path:
    """A new temporary directory beside ``target``, named for this process (so that
    :func:`remove_stale` can tell a dead writer's leftovers from a live one's), after removing
    the leftovers of dead writers."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    return Path(tempfile.mkdtemp(**_temp_name(target)))


def _temp_name(target: Path) -> dict[str, Any]:
    """Where and how a temporary of ``target`` is named: beside it, with this process's id
    (what :func:`remove_stale` reads)."""
    return {"prefix": f".{target.name}.{os.getpid()}.", "suffix": ".tmp", "dir": target.parent}


def _fsync_dir(path: Path) -> None:
    """Sync a directory's entries to disk (a rename in it survives a crash); best effort."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def commit_dir(tmp: Path, target: Path) -> None:
    """Make the finished directory ``tmp`` the directory ``target``: its files synced to disk,
    an older ``target`` removed, then one rename (and the parent directory synced)."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``path`` (:func:`commit_dir`). An
    exception before the end leaves ``path`` as it was and removes the temporary."""
    target = Path(path)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        commit_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: a temporary without a process id (older nnslim) counts as stale after this many seconds
STALE_AFTER_S = 3600.0


def remove_stale(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` left by writers that died (``kill -9`` mid-save): those
    whose process id names no running process, and unnamed ones older than an hour. A live
    writer's temporary is left alone. Returns what was removed."""
    removed = []
    prefix = f".{target.name}."
    with contextlib.suppress(OSError):
        for f in target.parent.iterdir():
            if not (f.name.startswith(prefix) and f.name.endswith(".tmp")):
                continue
            pid_text = f.name[len(prefix) :].split(".", 1)[0]
            if pid_text.isdigit():
                stale = int(pid_text) != os.getpid() and not _alive(int(pid_text))
            else:
                try:
                    stale = time.time() - f.stat().st_mtime > STALE_AFTER_S
                except OSError:
                    continue
            if stale:
                with contextlib.suppress(OSError):
                    if f.is_dir():
                        shutil.rmtree(f)
                    else:
                        f.unlink()
                    removed.append(f)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
