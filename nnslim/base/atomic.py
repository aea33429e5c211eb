"""Atomic file writes: write to a temporary file beside the target, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` atomically.

    A crash or an exception before the end leaves ``path`` as it was (and removes the
    temporary file).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        with contextlib.suppress(OSError):
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


#: a temporary without a process id (older nnslim) counts as stale after this many seconds
STALE_AFTER_S = 3600.0


def remove_stale(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` left by writers that died (``kill -9`` mid-save): those
    whose process id names no running process, and unnamed ones older than an hour. A live
    writer's temporary is left alone. Returns what was removed."""
    import time

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
                        import shutil

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
