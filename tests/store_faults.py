"""A disk that fills during an exchange, for the store-failure tests.

Used in process (``monkeypatch``) and in a client process started through a
``python -c`` prefix, so both tests inject the very same fault.
"""
from __future__ import annotations

import sqlite3
from typing import Any, Callable

from fs_bittorrent.store.sqlite_store import SQLitePieceStore


def full_disk_patches() -> tuple[dict[str, Callable[..., Any]], list[int]]:
    """Replacements for ``SQLitePieceStore.__init__`` and ``._commit``, and
    the list the failed batches' sizes go to.  Commits run inline (the
    store's ``writer_thread=False`` mode: a failure is there for the very
    next ``put``, as in a real-time exchange), and from the first batch
    holding a received piece (source != holder) on, every commit fails as
    SQLite fails on a full disk."""
    init, commit = SQLitePieceStore.__init__, SQLitePieceStore._commit
    failed: list[int] = []

    def inline(self: SQLitePieceStore, *a: Any, **kw: Any) -> None:
        init(self, *a, **{**kw, "writer_thread": False})

    def full_disk(self: SQLitePieceStore, batch: Any) -> None:
        if failed or any(source != holder for _r, source, _i, holder, *_ in batch.rows):
            failed.append(len(batch.rows))
            raise sqlite3.OperationalError("database or disk is full")
        return commit(self, batch)

    return {"__init__": inline, "_commit": full_disk}, failed
