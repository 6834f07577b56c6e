"""Who writes a piece store: an advisory lock file beside the database.

SQLite's own locks last one transaction, so they cannot tell "a run has
this store open" from "nobody is using it".  Every ``SQLitePieceStore``
therefore holds a *shared* ``flock`` on ``<db>-lock`` for as long as it is
open, and ``fs-bittorrent clean`` takes it *exclusively*, without waiting:
if any process (or this one) has the store open, clean refuses.  The
kernel drops the lock when its holder exits, so a crashed run leaves no
stale lock behind.

Why a separate file: SQLite holds POSIX (``fcntl``) locks on the database
file, and closing *any* descriptor of that file in a process drops all of
that process's POSIX locks on it; opening and closing the database file
for a ``flock`` would silently unlock SQLite.
"""
from __future__ import annotations

import fcntl
import os
from typing import Optional

SUFFIX = "-lock"


def lock_path(db_path: str) -> str:
    return os.fspath(db_path) + SUFFIX


def _open(db_path: str) -> int:
    return os.open(lock_path(db_path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def hold_shared(db_path: str) -> Optional[int]:
    """Mark the store as open by a writer (shared: several may hold it);
    returns the descriptor to pass to :func:`release`.  None when the lock
    file cannot be created (a read-only directory): the store still works,
    only ``clean`` cannot see it."""
    try:
        fd = _open(db_path)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def try_exclusive(db_path: str) -> Optional[int]:
    """The store for ourselves, or None if any writer holds it (no waiting)."""
    fd = _open(db_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)   # closing the descriptor drops its flock
