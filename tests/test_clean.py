"""``fs-bittorrent clean``: dry run, deleting chosen rounds, a consistent
store afterwards, and refusing a store a writer has open."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from fs_bittorrent.cli import main as cli_main
from fs_bittorrent.core.manifest import Manifest
from fs_bittorrent.store import SQLitePieceStore

PIECE = 4096
OWNERS = (1, 2, 3)
ROUNDS = (0, 1, 2, 3)


def pieces_of(owner: int, rnd: int) -> list[bytes]:
    return [hashlib.sha256(f"{owner}:{rnd}:{k}".encode()).digest() * (PIECE // 32)
            for k in range(3)]


def build_store(path: str) -> None:
    """Rounds 0..3; every owner's pieces held by every client, one session each."""
    with SQLitePieceStore(path, batch_size=8) as store:
        for rnd in ROUNDS:
            for owner in OWNERS:
                data = pieces_of(owner, rnd)
                m = Manifest(owner=owner, round=rnd, total_size=PIECE * len(data),
                             piece_size=PIECE,
                             piece_hashes=tuple(hashlib.sha256(p).digest() for p in data),
                             sample_count=10, tensors=())
                store.put_manifest(m)
                for holder in OWNERS:
                    for k, p in enumerate(data):
                        store.put_piece(rnd, owner, k, holder, p, m.piece_hashes[k])
            for holder in OWNERS:
                store.begin_session(rnd, holder, now=1.0)
                store.finish_session(rnd, holder, "complete", now=2.0)
        store.flush()


def rows_per_round(path: str) -> dict[str, dict[int, int]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: dict(conn.execute(f"SELECT round, COUNT(*) FROM {t} GROUP BY round"))
                for t in ("bt_chunks", "bt_sessions", "bt_manifests")}
    finally:
        conn.close()


def blob_count(path: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM bt_blobs").fetchone()[0]
    finally:
        conn.close()


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "exp" / "bittorrent" / "pieces.db")
    os.makedirs(os.path.dirname(path))
    build_store(path)
    return path


FULL = {"bt_chunks": {r: 27 for r in ROUNDS}, "bt_sessions": {r: 3 for r in ROUNDS},
        "bt_manifests": {r: 3 for r in ROUNDS}}


def test_dry_run_lists_the_rounds_and_deletes_nothing(store_path, capsys):
    before = file_bytes(store_path)
    assert cli_main(["clean", store_path, "--before", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 0: 27 pieces" in out and "round 1: 27 pieces" in out
    assert "round 2" not in out and "round 3" not in out
    assert "dry run: nothing deleted" in out
    assert rows_per_round(store_path) == FULL
    assert file_bytes(store_path) == before


@pytest.mark.parametrize("args, gone", [
    (["--round", "1"], {1}),
    (["--before", "2"], {0, 1}),
    (["--all"], set(ROUNDS)),
])
def test_yes_deletes_exactly_the_chosen_rounds_and_leaves_a_consistent_store(
        store_path, args, gone, capsys):
    blobs = blob_count(store_path)
    # the outdir form: the store is found below the experiment directory
    outdir = os.path.dirname(os.path.dirname(store_path))
    assert cli_main(["clean", outdir, *args, "--yes"]) == 0
    assert "integrity_check ok" in capsys.readouterr().out
    keep = [r for r in ROUNDS if r not in gone]
    assert rows_per_round(store_path) == {t: {r: n for r, n in per.items() if r in keep}
                                          for t, per in FULL.items()}
    assert blob_count(store_path) == blobs * len(keep) // len(ROUNDS)  # distinct per round
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        conn.close()
    wal = store_path + "-wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0   # checkpointed
    # the rounds left are intact: a writer reopens the store and reads them
    with SQLitePieceStore(store_path, verify_on_open=True) as store:
        report = store.open_report
        assert (report["dropped_unverified"], report["dropped_dangling"],
                report["bad_blobs"], report["bad_chunks"]) == (0, 0, 0, 0)
        for rnd in keep:
            assert store.get_piece(rnd, 2, 1, 3) == pieces_of(2, rnd)[1]


def test_refuses_a_store_open_in_this_process(store_path, capsys):
    with SQLitePieceStore(store_path):
        assert cli_main(["clean", store_path, "--all", "--yes"]) == 2
    assert "in use by a running writer" in capsys.readouterr().err
    assert rows_per_round(store_path) == FULL


def test_refuses_a_store_open_in_another_process(store_path, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {root!r})
        from fs_bittorrent.store import SQLitePieceStore
        s = SQLitePieceStore({store_path!r})
        print("open", flush=True)
        sys.stdin.read()
        s.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        assert cli_main(["clean", store_path, "--round", "0", "--yes"]) == 2
        assert rows_per_round(store_path) == FULL
    finally:
        proc.communicate("", timeout=30)
    # the writer is gone (closed, or killed: the kernel drops its lock): clean works
    assert cli_main(["clean", store_path, "--round", "0", "--yes"]) == 0
    assert 0 not in rows_per_round(store_path)["bt_chunks"]


@pytest.mark.parametrize("args, message", [
    (["--round", "1", "--before", "2"], None),            # argparse: not allowed together
    (["--round", "-1"], "rounds are numbered from 0"),
])
def test_bad_selection_is_refused(store_path, args, message, capsys):
    with pytest.raises(SystemExit) if message is None else _no_raise():
        assert cli_main(["clean", store_path, *args]) == 2
    if message:
        assert message in capsys.readouterr().err
    assert rows_per_round(store_path) == FULL


def test_not_a_store(tmp_path, capsys):
    bad = tmp_path / "x.db"
    bad.write_bytes(b"not sqlite at all" * 100)
    assert cli_main(["clean", str(bad), "--all", "--yes"]) == 2
    assert "not an fs_bittorrent piece store" in capsys.readouterr().err
    assert cli_main(["clean", str(tmp_path / "missing"), "--all"]) == 2


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
