"""``fs-bittorrent inspect DB``: what a piece store holds, per round and peer.

Read-only (``sqlite-utils`` over a ``mode=ro`` connection), so it is safe on
the database of a run that is still going (WAL lets readers in).
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from typing import Optional

import sqlite_utils

SESSIONS = """
SELECT s.round, s.peer, s.state, s.pieces_received, s.bytes_up, s.bytes_down,
       ROUND(s.finished_at - s.started_at, 3) AS seconds, COALESCE(s.last_error, '') AS error,
       (SELECT COUNT(*) FROM bt_chunks c WHERE c.round = s.round AND c.holder = s.peer) AS held
FROM bt_sessions s ORDER BY s.round, s.peer
"""
PIECES = """
SELECT round, holder, COUNT(*) AS pieces, SUM(size) AS bytes,
       COUNT(DISTINCT source) AS owners, SUM(verified = 0) AS unverified
FROM bt_chunks GROUP BY round, holder ORDER BY round, holder
"""
MANIFESTS = """
SELECT round, owner, num_pieces, total_size, sample_count FROM bt_manifests ORDER BY round, owner
"""


def _table(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"{title}: none\n"
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [f"{title}:", line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out) + "\n"


def inspect(path: str, round_filter: Optional[int] = None) -> str:
    """The report as text; raises FileNotFoundError for a missing file."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True))
    try:
        names = set(db.table_names())
        missing = {"bt_chunks", "bt_sessions", "bt_manifests"} - names
        if missing:
            raise ValueError(f"{path} is not an fs_bittorrent piece store "
                             f"(missing tables {sorted(missing)})")

        def q(sql: str) -> list[dict]:
            rows = list(db.query(sql))
            return [r for r in rows if round_filter is None or r["round"] == round_filter]

        blobs = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM bt_blobs").fetchone()
        head = (f"piece store {path}: {os.path.getsize(path) / 1e6:.1f} MB on disk, "
                f"{blobs[0]} distinct pieces ({blobs[1] / 1e6:.1f} MB), "
                f"rounds {sorted({r['round'] for r in db.query('SELECT round FROM bt_manifests')})}\n")
        return "\n".join([head, _table("manifests", q(MANIFESTS)),
                          _table("pieces held per round and holder", q(PIECES)),
                          _table("sessions", q(SESSIONS))])
    finally:
        db.conn.close()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fs-bittorrent inspect",
                                 description="Sessions and pieces per round and peer.")
    ap.add_argument("db", help="path of a piece store: <outdir>/bittorrent/pieces.db "
                               "(standalone) or <outdir>/bittorrent/client_<id>.db "
                               "(distributed, one per client)")
    ap.add_argument("--round", type=int, default=None, help="only this round")
    args = ap.parse_args(argv)
    try:
        print(inspect(args.db, args.round), end="")
    except FileNotFoundError:
        print(f"fs-bittorrent inspect: no such file: {args.db}", file=sys.stderr)
        return 2
    except (ValueError, sqlite3.DatabaseError) as exc:
        print(f"fs-bittorrent inspect: {exc}", file=sys.stderr)
        return 2
    return 0
