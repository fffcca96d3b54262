"""One writer at a time: an inter-process lock around every read-modify-write of a shared folder.

`locked(folder)` holds an exclusive `filelock.FileLock` on FOLDER/.lock (flock on POSIX) for the
duration of the block. It is reentrant within a thread and excludes other threads and processes; the
kernel drops it when its holder dies (kill -9 leaves no stale lock). Writers still write through
`util.io`'s temp-file-and-rename, so readers never take the lock and never see half a file.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

LOCK_NAME = ".lock"
# a registry operation holds the lock for at most a copy of one adapter folder or a cache write
DEFAULT_TIMEOUT_S = 600.0


class LockTimeout(RuntimeError):
    """Another writer held the lock for longer than the timeout."""


def lock_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / LOCK_NAME


@contextmanager
def locked(folder: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold FOLDER's writer lock for the block (the folder is created if missing)."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    # is_singleton: one FileLock object per path in this process, so nested and concurrent uses in one
    # process share its reentrancy counter instead of deadlocking on two flocks of one file;
    # preserve_lock_file: deleting it on release would let a late opener lock a different inode
    lock = FileLock(str(path), is_singleton=True, preserve_lock_file=True)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise LockTimeout(f"{folder} is locked by another writer (held for over {timeout:g} s: {path}); "
                          "retry when it has finished") from None
    try:
        yield
    finally:
        lock.release()
