"""``fs-bittorrent inspect``: a read-only view of a piece store."""
from __future__ import annotations

import sqlite3

from fs_bittorrent.cli import main as cli_main
from fs_bittorrent.demo import run_demo
from fs_bittorrent.store.inspect import inspect


def test_inspect_reports_pieces_and_sessions_per_round_and_peer(tmp_path):
    db = tmp_path / "pieces.db"
    r = run_demo(peers=3, piece_size=128 * 1024, db_path=str(db))
    text = inspect(str(db))
    total = 3 * r.pieces_per_model
    assert f"{total} distinct pieces" in text and "rounds [0]" in text
    held = [line.split() for line in text.splitlines() if line.startswith("0 ")]
    # 3 manifest rows, 3 holder rows, 3 session rows
    assert len(held) == 9
    holder_rows = [row for row in held if len(row) == 6]
    assert [int(row[2]) for row in holder_rows] == [total] * 3      # pieces per holder
    assert all(row[5] == "0" for row in holder_rows)                 # nothing unverified
    assert sum("complete" in line for line in text.splitlines()) == 3
    assert inspect(str(db), round_filter=5).count("none") == 3       # unknown round: empty


def test_inspect_refuses_missing_files_and_foreign_databases(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "nope.db")]) == 2
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("create table t (x)").connection.commit()
    assert cli_main(["inspect", str(other)]) == 2
    assert "not an fs_bittorrent piece store" in capsys.readouterr().err
