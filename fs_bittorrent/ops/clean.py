"""``fs-bittorrent clean``: delete rounds from piece stores, for rollback.

``TARGET`` is a piece store (``pieces.db`` in standalone runs,
``client_<id>.db`` per client in distributed runs) or a directory searched
for them (an experiment outdir).  Exactly one of ``--round N`` (that
round), ``--before N`` (every round < N) or ``--all`` chooses the rounds.

Without ``--yes`` it is a dry run: it lists per store and round what would
go (pieces, bytes, sessions, manifests) and touches nothing (the store is
opened read-only).  With ``--yes`` it

1. takes the store's writer lock exclusively, without waiting: a store
   that a run has open (``SQLitePieceStore`` holds the lock shared, see
   ``store/writer_lock.py``) is refused, exit status 2, nothing deleted;
2. deletes the rounds' chunks, sessions and manifests and the blobs no
   other chunk uses, in one transaction (``sqlite_store.delete_rounds``,
   the code the runs' own ``keep_rounds`` cleanup uses);
3. gives the freed pages back to the file system and checkpoints the WAL
   (``wal_checkpoint(TRUNCATE)``: the ``-wal`` file is empty afterwards);
4. checks the result: ``PRAGMA integrity_check`` says ``ok`` and
   ``PRAGMA foreign_key_check`` finds no chunk without its blob.

Exit status: 0 done (or nothing to do), 2 refused or bad input.
"""
from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from typing import Optional

from ..store import writer_lock
from ..store.sqlite_store import delete_rounds

log = logging.getLogger(__name__)

TABLES = ("bt_chunks", "bt_sessions", "bt_manifests")


class CleanError(Exception):
    """Refused or impossible; the message names the store and why."""


@dataclass(frozen=True)
class Selection:
    """Which rounds: one (``round``), all before ``before``, or all."""
    round: Optional[int] = None
    before: Optional[int] = None
    everything: bool = False

    def __post_init__(self) -> None:
        chosen = [self.round is not None, self.before is not None, self.everything]
        if sum(chosen) != 1:
            raise CleanError("choose exactly one of --round N, --before N, --all")
        for name in ("round", "before"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise CleanError(f"--{name} {v}: rounds are numbered from 0")

    def where(self) -> tuple[str, tuple]:
        if self.round is not None:
            return "round = ?", (self.round,)
        if self.before is not None:
            return "round < ?", (self.before,)
        return "1", ()

    def describe(self) -> str:
        if self.round is not None:
            return f"round {self.round}"
        if self.before is not None:
            return f"rounds before {self.before}"
        return "all rounds"


@dataclass
class RoundRows:
    round: int
    pieces: int = 0
    piece_bytes: int = 0
    sessions: int = 0
    manifests: int = 0


@dataclass
class StorePlan:
    """What cleaning one store would delete (or did)."""
    path: str
    rounds: list[RoundRows] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def empty(self) -> bool:
        return not self.rounds


def is_piece_store(path: str) -> bool:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()
    return set(TABLES) <= names


def find_stores(target: str) -> list[str]:
    """The piece stores ``target`` names: itself, or every one below a directory."""
    if os.path.isfile(target):
        if not is_piece_store(target):
            raise CleanError(f"{target}: not an fs_bittorrent piece store "
                             f"(no {', '.join(TABLES)} tables)")
        return [target]
    if not os.path.isdir(target):
        raise CleanError(f"{target}: no such file or directory")
    found = []
    for root, _, files in os.walk(target):
        for name in sorted(files):
            if name.endswith(".db") and is_piece_store(os.path.join(root, name)):
                found.append(os.path.join(root, name))
    return sorted(found)


def plan(path: str, sel: Selection) -> StorePlan:
    """What ``sel`` selects in one store, read-only (safe beside a running writer)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    where, params = sel.where()
    rows: dict[int, RoundRows] = {}
    try:
        for rnd, n, size in conn.execute(
                f"SELECT round, COUNT(*), COALESCE(SUM(size), 0) FROM bt_chunks WHERE {where} "
                "GROUP BY round", params):
            rows.setdefault(rnd, RoundRows(rnd)).pieces = n
            rows[rnd].piece_bytes = size
        for table, attr in (("bt_sessions", "sessions"), ("bt_manifests", "manifests")):
            for rnd, n in conn.execute(f"SELECT round, COUNT(*) FROM {table} WHERE {where} "
                                       "GROUP BY round", params):
                setattr(rows.setdefault(rnd, RoundRows(rnd)), attr, n)
    finally:
        conn.close()
    return StorePlan(path, [rows[r] for r in sorted(rows)], _file_bytes(path))


def _file_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def check_consistent(conn: sqlite3.Connection, path: str) -> None:
    """``integrity_check`` ok and no chunk without its blob, or CleanError."""
    result = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    if result != ["ok"]:
        raise CleanError(f"{path}: integrity_check after cleaning: {result[:5]}")
    orphans = conn.execute("PRAGMA foreign_key_check").fetchall()
    if orphans:
        raise CleanError(f"{path}: {len(orphans)} rows fail foreign_key_check after cleaning")


def delete(path: str, sel: Selection) -> dict[str, int]:
    """Delete the selection from one store that no writer has open."""
    fd = writer_lock.try_exclusive(path)
    if fd is None:
        raise CleanError(f"{path}: in use by a running writer (a run or another process has "
                         f"it open); stop that run first, nothing was deleted")
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        try:
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA secure_delete=FAST")
            where, params = sel.where()
            counts = delete_rounds(conn, where, params)
            check_consistent(conn, path)
            return counts
        finally:
            conn.close()
    finally:
        writer_lock.release(fd)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def render(p: StorePlan, sel: Selection) -> str:
    if p.empty:
        return f"{p.path}: {sel.describe()}: nothing stored ({_mb(p.file_bytes)} on disk)"
    lines = [f"{p.path} ({_mb(p.file_bytes)} on disk): {sel.describe()}:"]
    for r in p.rounds:
        lines.append(f"  round {r.round}: {r.pieces} pieces ({_mb(r.piece_bytes)}), "
                     f"{r.sessions} sessions, {r.manifests} manifests")
    return "\n".join(lines)


def clean(target: str, sel: Selection, yes: bool = False, out=None) -> list[StorePlan]:
    """Dry run (``yes`` False) or delete; returns the plans.  CleanError
    when a store is in use (stores before it in the list were cleaned)."""
    out = out if out is not None else sys.stdout
    stores = find_stores(target)
    if not stores:
        raise CleanError(f"{target}: no fs_bittorrent piece store found in it or below it")
    plans = [plan(s, sel) for s in stores]
    for p in plans:
        print(render(p, sel), file=out)
    if not yes:
        print("dry run: nothing deleted; add --yes to delete the rounds listed", file=out)
        return plans
    for p in plans:
        if p.empty:
            continue
        counts = delete(p.path, sel)
        print(f"{p.path}: deleted {counts['chunks']} pieces, {counts['sessions']} sessions, "
              f"{counts['manifests']} manifests, {counts['blobs']} blobs; "
              f"{_mb(p.file_bytes)} -> {_mb(_file_bytes(p.path))} on disk; "
              f"integrity_check ok, WAL checkpointed", file=out)
    return plans


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fs-bittorrent clean",
        description="Delete rounds from piece stores (rollback). A dry run unless --yes.")
    ap.add_argument("target", help="a piece store (pieces.db, client_<id>.db) or a directory "
                                   "(an experiment outdir) searched for them")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--round", type=int, help="this round only")
    which.add_argument("--before", type=int, metavar="N", help="every round < N")
    which.add_argument("--all", action="store_true", help="every round")
    ap.add_argument("--yes", action="store_true", help="really delete (default: dry run)")
    args = ap.parse_args(argv)
    try:
        clean(args.target, Selection(args.round, args.before, args.all), yes=args.yes)
    except CleanError as exc:
        print(f"fs-bittorrent clean: {exc}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as exc:
        print(f"fs-bittorrent clean: {args.target}: {exc}", file=sys.stderr)
        return 2
    return 0
