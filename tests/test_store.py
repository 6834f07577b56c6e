"""The SQLite piece store: verification, dedup, cleanup, holder views, crash safety."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_bittorrent.core.manifest import Manifest
from fs_bittorrent.errors import HashMismatch, ManifestError, StoreError
from fs_bittorrent.store import SESSION_FIELDS, HolderView, SQLitePieceStore

PIECE = 16 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = os.path.join(HERE, "store_writer_proc.py")


# ---------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------

def make_owner(owner: int, rnd: int, n_pieces: int, seed: int = 0, piece_size: int = PIECE,
               short_last: bool = True) -> tuple[Manifest, list[bytes]]:
    """Random bytes cut into pieces (last one short) and their real manifest."""
    rng = random.Random(seed * 1_000_003 + rnd * 1009 + owner)
    total = n_pieces * piece_size - (piece_size // 3 if short_last else 0)
    blob = rng.randbytes(total)
    pieces = [blob[i:i + piece_size] for i in range(0, total, piece_size)]
    return manifest_of(owner, rnd, pieces, piece_size), pieces


def manifest_of(owner: int, rnd: int, pieces: list[bytes], piece_size: int = PIECE) -> Manifest:
    return Manifest(owner=owner, round=rnd, total_size=sum(map(len, pieces)),
                    piece_size=piece_size,
                    piece_hashes=tuple(hashlib.sha256(p).digest() for p in pieces),
                    sample_count=10 + owner, tensors=())


def counts(store: SQLitePieceStore) -> dict:
    s = store.stats()
    return {k: s[k] for k in ("bt_blobs", "bt_chunks", "bt_sessions", "bt_manifests",
                              "blob_bytes", "chunk_bytes")}


def raw(path) -> sqlite3.Connection:
    """A second, independent connection: sees only what is committed."""
    return sqlite3.connect(str(path))


@pytest.fixture(params=["thread", "inline"])
def writer(request) -> bool:
    return request.param == "thread"


@pytest.fixture
def store(tmp_path, writer):
    with SQLitePieceStore(tmp_path / "pieces.db", batch_size=4, writer_thread=writer) as s:
        yield s


# ---------------------------------------------------------------------------
# schema and pragmas
# ---------------------------------------------------------------------------

def test_schema_and_pragmas(store, tmp_path):
    c = store._wconn
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 1          # NORMAL
    assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2          # INCREMENTAL
    assert c.execute("PRAGMA page_size").fetchone()[0] == 65536
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    names = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
    assert {"bt_meta", "bt_blobs", "bt_chunks", "bt_sessions", "bt_manifests",
            "idx_bt_chunks_holder", "idx_bt_chunks_sha256"} <= names
    assert c.execute("SELECT value FROM bt_meta WHERE key='schema_version'").fetchone()[0] == "1"
    pk = [r[1] for r in sorted(c.execute("PRAGMA table_info(bt_chunks)"), key=lambda r: r[5])
          if r[5]]
    assert pk == ["round", "source", "piece_index", "holder"]
    # the holder query is served by the covering index, not a table scan
    plan = " ".join(r[3] for r in c.execute(
        "EXPLAIN QUERY PLAN SELECT source, piece_index FROM bt_chunks WHERE round=1 AND holder=2"))
    assert "idx_bt_chunks_holder" in plan


def test_reopen_keeps_everything_and_rejects_other_schema_versions(tmp_path, writer):
    path = tmp_path / "p.db"
    m, pieces = make_owner(3, 1, 3)
    with SQLitePieceStore(path, writer_thread=writer) as s:
        s.put_manifest(m)
        for i, p in enumerate(pieces):
            s.put_piece(1, 3, i, 0, p)
    with SQLitePieceStore(path, writer_thread=writer) as s:
        assert s.get_manifest(1, 3) == m
        assert [s.get_piece(1, 3, i, 0) for i in range(3)] == pieces
        assert s.open_report == {"quick_check": "ok", "dropped_unverified": 0,
                                 "dropped_dangling": 0}
        with s._wlock:
            s._wconn.execute("UPDATE bt_meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError) as e:
        SQLitePieceStore(path)
    assert e.value.field == "schema_version"


def test_not_a_database_is_refused(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(200_000))
    with pytest.raises(StoreError) as e:
        SQLitePieceStore(path)
    assert e.value.field == "path"
    for bad in (":memory:", ""):               # reader and writer must share a file
        with pytest.raises(StoreError) as e:
            SQLitePieceStore(bad)
        assert e.value.field == "path"
    with pytest.raises(StoreError) as e:
        SQLitePieceStore(tmp_path / "ok.db", batch_size=0)
    assert e.value.field == "batch_size"


# ---------------------------------------------------------------------------
# put / get
# ---------------------------------------------------------------------------

def test_put_get_round_trip(store):
    m, pieces = make_owner(5, 2, 7)
    store.put_manifest(m)
    for i, p in enumerate(pieces):
        # bytes, bytearray and memoryview are all accepted
        data = p if i % 3 == 0 else (bytearray(p) if i % 3 == 1 else memoryview(p))
        store.put_piece(2, 5, i, 9, data, sha256=m.piece_hashes[i] if i % 2 else None)
    for i, p in enumerate(pieces):
        assert store.get_piece(2, 5, i, 9) == p
        assert store.get_piece(2, 5, i) == p                  # any holder
        assert store.has_piece(2, 5, i, 9) and store.has_piece(2, 5, i)
        assert not store.has_piece(2, 5, i, 8)
        assert store.get_piece(2, 5, i, 8) is None
    assert store.held_pieces(2, 9) == {(5, i) for i in range(7)}
    assert store.held_pieces(2, 8) == set()
    assert store.get_piece(3, 5, 0) is None                    # unknown round: just absent
    store.flush()
    assert store.pending_count == 0
    assert [store.get_piece(2, 5, i, 9) for i in range(7)] == pieces
    s = store.stats()
    assert s["bt_chunks"] == 7 and s["blob_bytes"] == m.total_size == s["chunk_bytes"]


def test_wrong_bytes_raise_and_store_nothing(store):
    m, pieces = make_owner(1, 1, 4)
    store.put_manifest(m)
    store.put_piece(1, 1, 0, 0, pieces[0])
    store.flush()
    before = counts(store)
    bad = bytearray(pieces[1])
    bad[100] ^= 1
    with pytest.raises(HashMismatch) as e:
        store.put_piece(1, 1, 1, 0, bytes(bad))
    assert e.value.field == "data"
    with pytest.raises(HashMismatch) as e:                    # claimed hash not the manifest's
        store.put_piece(1, 1, 1, 0, pieces[1], sha256=m.piece_hashes[2])
    assert e.value.field == "sha256"
    with pytest.raises(HashMismatch) as e:                    # right prefix, wrong length
        store.put_piece(1, 1, 3, 0, pieces[3] + b"\0")
    assert e.value.field == "size"
    with pytest.raises(HashMismatch):                         # another piece's bytes
        store.put_piece(1, 1, 2, 0, pieces[1])
    with pytest.raises(StoreError) as e:
        store.put_piece(1, 1, 1, 0, "not bytes")
    assert e.value.field == "data"
    assert store.pending_count == 0
    assert not store.has_piece(1, 1, 1) and not store.has_piece(1, 1, 2)
    store.flush()
    assert counts(store) == before


@pytest.mark.parametrize("args,field", [
    ((7, 1, 0, 0), "round"),            # no manifest at all in round 7
    ((1, 2, 0, 0), "source"),           # round known, owner 2 has no manifest
    ((1, 1, 4, 0), "piece_index"),      # 4 pieces: 0..3
    ((1, 1, -1, 0), "piece_index"),
    ((1, 1, 0, -3), "holder"),
    ((-1, 1, 0, 0), "round"),
    ((1, True, 0, 0), "source"),
    ((1, 1, 0.0, 0), "piece_index"),
])
def test_unknown_or_bad_keys_name_the_field(store, args, field):
    m, pieces = make_owner(1, 1, 4)
    store.put_manifest(m)
    before = counts(store)
    with pytest.raises(StoreError) as e:
        store.put_piece(*args, pieces[0])
    assert e.value.field == field
    assert store.pending_count == 0
    store.flush()
    assert counts(store) == before


def test_manifest_api(store):
    with pytest.raises(StoreError) as e:
        store.get_manifest(1, 0)
    assert e.value.field == "round"
    ms = [make_owner(o, 1, 2)[0] for o in (4, 0, 2)]
    for m in ms:
        store.put_manifest(m)
    store.put_manifest(ms[0])                                  # same again: no-op
    with pytest.raises(StoreError) as e:
        store.get_manifest(1, 1)
    assert e.value.field == "owner"
    assert store.get_manifest(1, 4) == ms[0]
    assert [m.owner for m in store.manifests(1)] == [0, 2, 4]
    assert store.manifests(9) == []
    store.put_manifest(make_owner(0, 3, 1)[0])
    assert store.rounds() == [1, 3]
    other = make_owner(4, 1, 2, seed=99)[0]                    # different content, same key
    with pytest.raises(StoreError) as e:
        store.put_manifest(other)
    assert e.value.field == "digest"
    assert store.get_manifest(1, 4) == ms[0]
    with pytest.raises(ManifestError):                         # invalid manifests never land
        store.put_manifest(Manifest(1, 1, 10, 4, (b"x" * 32,), 1, ()))
    with pytest.raises(StoreError):
        store.put_manifest("manifest")
    row = store._rconn.execute("SELECT digest, num_pieces, total_size, sample_count "
                               "FROM bt_manifests WHERE round=1 AND owner=4").fetchone()
    assert row == (ms[0].digest, 2, ms[0].total_size, ms[0].sample_count)


def test_put_manifests_stores_a_batch_all_or_nothing(store):
    """A round start stores every other owner's manifest in one
    transaction; a conflict anywhere in the batch stores none of it."""
    ms = [make_owner(o, 5, 2)[0] for o in (1, 2, 3)]
    store.put_manifest(ms[0])
    clash = make_owner(1, 5, 2, seed=99)[0]            # owner 1 again, different content
    fresh = make_owner(4, 5, 2)[0]
    with pytest.raises(StoreError) as e:
        store.put_manifests([fresh, ms[1], clash])
    assert e.value.field == "digest"
    assert [m.owner for m in store.manifests(5)] == [1]     # nothing of the batch landed
    with pytest.raises(StoreError) as e:
        store.put_manifests([fresh, make_owner(4, 5, 2, seed=7)[0]])   # twice, differently
    assert e.value.field == "digest" and [m.owner for m in store.manifests(5)] == [1]
    store.put_manifests(ms + [fresh, ms[2]])                 # repeats of the same: no-ops
    assert store.manifests(5) == ms + [fresh]


def test_duplicate_put_is_idempotent(tmp_path, writer):
    clock = [0.0]
    with SQLitePieceStore(tmp_path / "p.db", batch_size=3, writer_thread=writer,
                          now=lambda: clock[0]) as s:
        m, pieces = make_owner(0, 1, 2)
        s.put_manifest(m)
        clock[0] = 100.0
        s.put_piece(1, 0, 0, 5, pieces[0])
        clock[0] = 200.0
        s.put_piece(1, 0, 0, 5, pieces[0])                     # still pending
        s.flush()
        clock[0] = 300.0
        s.put_piece(1, 0, 0, 5, bytearray(pieces[0]))          # already committed
        s.flush()
        assert counts(s)["bt_chunks"] == 1 and counts(s)["bt_blobs"] == 1
        (t,) = s._rconn.execute("SELECT received_at FROM bt_chunks").fetchone()
        assert t == 100.0                                       # first arrival is kept
        assert s.get_piece(1, 0, 0, 5) == pieces[0]


def test_reads_see_queued_pieces_before_commit(tmp_path, writer):
    path = tmp_path / "p.db"
    with SQLitePieceStore(path, batch_size=1000, writer_thread=writer) as s:
        m, pieces = make_owner(2, 1, 5)
        s.put_manifest(m)
        for i, p in enumerate(pieces):
            s.put_piece(1, 2, i, 1, p)
        assert s.pending_count == 5
        other = raw(path)
        assert other.execute("SELECT count(*) FROM bt_chunks").fetchone()[0] == 0
        assert s.held_pieces(1, 1) == {(2, i) for i in range(5)}
        assert [s.get_piece(1, 2, i, 1) for i in range(5)] == pieces
        s.flush()
        assert s.pending_count == 0
        assert other.execute("SELECT count(*) FROM bt_chunks").fetchone()[0] == 5
        other.close()


def test_batches_commit_every_batch_size_pieces(tmp_path):
    path = tmp_path / "p.db"
    with SQLitePieceStore(path, batch_size=4, writer_thread=False) as s:
        m, pieces = make_owner(0, 1, 10)
        s.put_manifest(m)
        for i, p in enumerate(pieces):
            s.put_piece(1, 0, i, 0, p)
        other = raw(path)
        assert other.execute("SELECT count(*) FROM bt_chunks").fetchone()[0] == 8
        assert s.pending_count == 2
        other.close()


def test_failed_commit_keeps_pieces_and_retries(store):
    m, pieces = make_owner(0, 1, 3)
    store.put_manifest(m)
    real = store._commit
    calls = []

    def failing(batch):
        calls.append(len(batch.rows))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        real(batch)

    store._commit = failing
    store.put_piece(1, 0, 0, 0, pieces[0])
    with pytest.raises(StoreError) as e:
        store.flush()
    assert e.value.field == "flush"
    assert store.get_piece(1, 0, 0, 0) == pieces[0]            # still readable
    store.flush()                                              # retried, succeeds
    assert store.pending_count == 0 and counts(store)["bt_chunks"] == 1
    assert calls == [1, 1]


def test_closed_store_refuses(tmp_path):
    s = SQLitePieceStore(tmp_path / "p.db")
    s.close()
    s.close()                                                  # idempotent
    with pytest.raises(StoreError) as e:
        s.get_piece(0, 0, 0)
    assert e.value.field == "store"


def test_threads_putting_and_reading_concurrently(tmp_path):
    with SQLitePieceStore(tmp_path / "p.db", batch_size=8) as s:
        owners = [make_owner(o, 1, 6, piece_size=4096) for o in range(4)]
        for m, _ in owners:
            s.put_manifest(m)
        errors = []

        def work(holder):
            try:
                for m, pieces in owners:
                    for i, p in enumerate(pieces):
                        s.put_piece(1, m.owner, i, holder, bytes(bytearray(p)))
                        assert s.get_piece(1, m.owner, i, holder) == p
            except Exception as e:        # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(h,)) for h in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        s.flush()
        assert counts(s)["bt_chunks"] == 4 * 24 and counts(s)["bt_blobs"] == 24


# ---------------------------------------------------------------------------
# content dedup
# ---------------------------------------------------------------------------

def test_many_holders_keep_each_blob_once(store):
    owners = [make_owner(o, 1, 5) for o in range(3)]
    for m, _ in owners:
        store.put_manifest(m)
    holders = 12
    for h in range(holders):
        for m, pieces in owners:
            for i, p in enumerate(pieces):
                store.put_piece(1, m.owner, i, h, bytes(bytearray(p)))   # a copy per holder
    store.flush()
    c = counts(store)
    distinct = sum(m.num_pieces for m, _ in owners)
    total = sum(m.total_size for m, _ in owners)
    assert c["bt_blobs"] == distinct
    assert c["blob_bytes"] == total
    assert c["bt_chunks"] == holders * distinct
    assert c["chunk_bytes"] == holders * total
    (stored,) = store._rconn.execute("SELECT sum(length(data)) FROM bt_blobs").fetchone()
    assert stored == total
    # identical content under two owners is one blob too
    m, pieces = owners[0]
    twin = manifest_of(7, 1, pieces)
    store.put_manifest(twin)
    store.put_piece(1, 7, 0, 0, pieces[0])
    store.flush()
    assert counts(store)["bt_blobs"] == distinct
    assert store.get_piece(1, 7, 0, 0) == pieces[0]


# ---------------------------------------------------------------------------
# cleanup
# ---------------------------------------------------------------------------

def test_cleanup_drops_old_rounds_and_unreferenced_blobs(store):
    shared = make_owner(9, 1, 3)[1]          # the same bytes in every round
    for rnd in range(1, 6):
        m, pieces = make_owner(0, rnd, 4)
        store.put_manifest(m)
        twin = manifest_of(1, rnd, shared)
        store.put_manifest(twin)
        for h in range(3):
            for i, p in enumerate(pieces):
                store.put_piece(rnd, 0, i, h, p)
            for i, p in enumerate(shared):
                store.put_piece(rnd, 1, i, h, p)
        store.begin_session(rnd, 0)
    view = store.holder_view(2, 0)
    assert view.get(0, 0) is not None                          # cached in the view
    result = store.cleanup(keep_rounds=2)
    assert result["rounds"] == [1, 2, 3]
    assert result["chunks"] == 3 * 3 * 7 and result["sessions"] == 3
    assert result["manifests"] == 6 and result["blobs"] == 3 * 4   # shared blobs stay
    assert store.rounds() == [4, 5]
    for rnd in (1, 2, 3):
        with pytest.raises(StoreError) as e:
            store.get_manifest(rnd, 0)
        assert e.value.field == "round"
        assert store.held_pieces(rnd, 0) == set()
        with pytest.raises(StoreError):
            store.get_session(rnd, 0)
        with pytest.raises(StoreError):                        # can't store into a gone round
            store.put_piece(rnd, 1, 0, 0, shared[0])
    assert view.get(0, 0) is None and not view.has(0, 0)      # the view forgot it too
    for rnd in (4, 5):
        m, pieces = make_owner(0, rnd, 4)
        assert store.get_manifest(rnd, 0) == m
        assert [store.get_piece(rnd, 0, i, 2) for i in range(4)] == pieces
        assert [store.get_piece(rnd, 1, i, 1) for i in range(3)] == shared
        assert store.get_session(rnd, 0)["state"] == "running"
    c = counts(store)
    assert c["bt_blobs"] == 2 * 4 + 3
    # every remaining blob is referenced, every chunk has its blob
    assert store._rconn.execute("SELECT count(*) FROM bt_blobs b WHERE NOT EXISTS "
                                "(SELECT 1 FROM bt_chunks c WHERE c.sha256=b.sha256)"
                                ).fetchone()[0] == 0
    again = store.cleanup(keep_rounds=2)
    assert again["rounds"] == [] and again["chunks"] == 0 and again["blobs"] == 0
    for bad in (0, -1, True, 1.5):
        with pytest.raises(StoreError) as e:
            store.cleanup(bad)
        assert e.value.field == "keep_rounds"


def _fill_rounds(store, rounds, owners=(0, 1), holders=(0, 1, 2), n=3, seed=0):
    """Every owner's pieces of every round at every holder, plus sessions;
    returns {(round, owner): (manifest, pieces)} as stored."""
    out = {}
    for rnd in rounds:
        for o in owners:
            m, pieces = make_owner(o, rnd, n, seed=seed)
            store.put_manifest(m)
            for h in holders:
                for i, p in enumerate(pieces):
                    store.put_piece(rnd, o, i, h, p)
            out[(rnd, o)] = (m, pieces)
        for h in holders:
            store.begin_session(rnd, h)
    return out


def test_drop_rounds_from_forgets_that_round_and_later_ones_only(tmp_path, writer):
    with SQLitePieceStore(tmp_path / "p.db", batch_size=1000, writer_thread=writer) as s:
        kept = _fill_rounds(s, (1, 2, 3, 4))
        view = s.holder_view(3, 0)
        assert view.get(0, 0) == kept[(3, 0)][1][0]             # cached in the view
        assert s.pending_count > 0                              # queued pieces flushed first
        result = s.drop_rounds_from(3)
        assert result["rounds"] == [3, 4]
        assert result["chunks"] == 2 * 2 * 3 * 3 and result["manifests"] == 4
        assert result["sessions"] == 2 * 3 and result["blobs"] == 2 * 2 * 3
        assert s.rounds() == [1, 2] and s.pending_count == 0
        assert view.get(0, 0) is None                           # the view forgot it
        for rnd in (3, 4):
            assert s.held_pieces(rnd, 0) == set() and s.manifests(rnd) == []
            with pytest.raises(StoreError):
                s.get_session(rnd, 0)
        for (rnd, o), (m, pieces) in kept.items():
            if rnd < 3:
                assert s.get_manifest(rnd, o) == m
                assert [s.get_piece(rnd, o, i, 2) for i in range(3)] == pieces
                assert s.get_session(rnd, 2)["state"] == "running"
        # a round of a later run goes in where the old one was
        m, pieces = make_owner(0, 3, 3, seed=5)
        s.put_manifest(m)
        s.put_piece(3, 0, 0, 1, pieces[0])
        assert s.get_piece(3, 0, 0, 1) == pieces[0]
        assert s.drop_rounds_from(9)["rounds"] == []            # nothing that late: a no-op


def test_drop_owner_lets_a_different_manifest_in_and_keeps_the_rest(tmp_path, writer):
    with SQLitePieceStore(tmp_path / "p.db", batch_size=4, writer_thread=writer) as s:
        kept = _fill_rounds(s, (1, 2))
        new, pieces = make_owner(1, 2, 4, seed=7)               # another run's round 2
        with pytest.raises(StoreError) as e:
            s.put_manifest(new)
        assert e.value.field == "digest"
        result = s.drop_owner(2, 1)
        assert result["manifests"] == 1 and result["chunks"] == 3 * 3
        assert result["blobs"] == 3
        with pytest.raises(StoreError) as e:
            s.get_manifest(2, 1)
        assert e.value.field == "owner"
        assert s.held_pieces(2, 0) == {(0, 0), (0, 1), (0, 2)}  # the other owner's stay
        assert s.get_session(2, 0)["state"] == "running"        # sessions stay
        s.put_manifest(new)
        s.put_piece(2, 1, 3, 0, pieces[3])
        assert s.get_piece(2, 1, 3, 0) == pieces[3]
        for (rnd, o), (m, old) in kept.items():
            if (rnd, o) != (2, 1):
                assert s.get_manifest(rnd, o) == m
                assert [s.get_piece(rnd, o, i, 1) for i in range(3)] == old


@pytest.mark.parametrize("call, field", [
    (lambda s: s.drop_rounds_from(-1), "first_round"),
    (lambda s: s.drop_rounds_from("2"), "first_round"),
    (lambda s: s.drop_owner(-3, 0), "round"),
    (lambda s: s.drop_owner(1, None), "owner"),
])
def test_drop_refuses_bad_arguments_and_keeps_everything(tmp_path, call, field):
    with SQLitePieceStore(tmp_path / "p.db") as s:
        kept = _fill_rounds(s, (1, 2))
        with pytest.raises(StoreError) as e:
            call(s)
        assert e.value.field == field
        assert s.rounds() == [1, 2]
        for (rnd, o), (m, pieces) in kept.items():
            assert s.get_manifest(rnd, o) == m
            assert [s.get_piece(rnd, o, i, 0) for i in range(3)] == pieces


def test_cleanup_flushes_queued_pieces_first(tmp_path, writer):
    with SQLitePieceStore(tmp_path / "p.db", batch_size=100, writer_thread=writer) as s:
        for rnd in (1, 2):
            m, pieces = make_owner(0, rnd, 3)
            s.put_manifest(m)
            for i, p in enumerate(pieces):
                s.put_piece(rnd, 0, i, 0, p)
        assert s.pending_count == 6
        r = s.cleanup(1)
        assert r["chunks"] == 3 and s.pending_count == 0
        assert s.held_pieces(2, 0) == {(0, 0), (0, 1), (0, 2)}


def test_file_does_not_grow_over_many_rounds(tmp_path, writer):
    path = tmp_path / "p.db"
    sizes = {}
    with SQLitePieceStore(path, batch_size=16, writer_thread=writer) as s:
        for rnd in range(1, 21):
            owners = [make_owner(o, rnd, 8, seed=rnd, piece_size=32 * 1024) for o in range(3)]
            for m, _ in owners:
                s.put_manifest(m)
            for h in range(3):
                for m, pieces in owners:
                    for i, p in enumerate(pieces):
                        s.put_piece(rnd, m.owner, i, h, p)
            s.cleanup(keep_rounds=2)
            st_ = s.stats()
            sizes[rnd] = st_["db_bytes"] + st_["wal_bytes"]
            assert st_["freelist_count"] == 0                  # space was given back
        assert s.rounds() == [19, 20]
    # two rounds of ~0.75 MiB each are kept; the file stays that size
    assert sizes[20] <= sizes[5] * 1.05 + 4 * 65536, sizes
    assert sizes[20] < 4 * 1024 * 1024, sizes


# ---------------------------------------------------------------------------
# holder views (the PieceStorage a session gets)
# ---------------------------------------------------------------------------

def test_holder_view_implements_piece_storage(store):
    from fs_bittorrent.core.storage import PieceStorage
    m, pieces = make_owner(3, 4, 6)
    store.put_manifest(m)
    view = store.holder_view(4, 7, cache_pieces=2)
    other = store.holder_view(4, 8)
    assert isinstance(view, HolderView)
    for name in ("has", "get", "put"):                         # the protocol's methods
        assert callable(getattr(view, name)) and hasattr(PieceStorage, name)
    assert not view.has(3, 0) and view.get(3, 0) is None
    view.put(3, 0, m.piece_hashes[0], bytearray(pieces[0]))    # sessions hand buffers
    assert view.has(3, 0) and view.get(3, 0) == pieces[0]
    assert not other.has(3, 0) and other.get(3, 0) is None    # per holder
    assert store.has_piece(4, 3, 0, 7)
    with pytest.raises(HashMismatch):                          # the store re-verifies
        view.put(3, 1, m.piece_hashes[1], pieces[2])
    with pytest.raises(HashMismatch):
        view.put(3, 1, m.piece_hashes[2], pieces[1])
    assert not view.has(3, 1)
    with pytest.raises(StoreError) as e:
        view.put(3, 6, m.piece_hashes[0], pieces[0])
    assert e.value.field == "piece_index"
    for i in range(1, 6):
        view.put(3, i, m.piece_hashes[i], pieces[i])
    assert view.keys() == {(3, i) for i in range(6)} and len(view) == 6
    store.flush()
    # a piece is served as many blocks: repeated gets hit the small LRU
    view.hits = view.misses = 0
    for _ in range(16):
        assert view.get(3, 0) == pieces[0]
    assert view.misses == 1 and view.hits == 15
    assert len(view._cache) <= 2
    # a fresh view reads through to the database
    fresh = store.holder_view(4, 7)
    assert [fresh.get(3, i) for i in range(6)] == pieces


def test_swarm_runs_on_sqlite_holder_views(tmp_path, writer):
    """End to end: the simulated swarm's sessions use the store as storage."""
    from fs_bittorrent.core.config import SwarmConfig
    from fs_bittorrent.sim.network import LinkProfile
    from fs_bittorrent.sim.swarm import build_swarm

    piece = 8 * 1024
    cfg = SwarmConfig(piece_size=piece, block_size=4 * 1024, request_timeout=1.0,
                      handshake_retry=0.5, interest_retry=0.5, credit_bytes=256 * 1024)
    owners = {o: make_owner(o, 3, 5, seed=7, piece_size=piece) for o in range(5)}
    with SQLitePieceStore(tmp_path / "swarm.db", batch_size=16, writer_thread=writer) as s:
        for m, _ in owners.values():
            s.put_manifest(m)
        swarm = build_swarm(owners, cfg, LinkProfile(up=2e6, down=3e6, latency=0.002), seed=3,
                            storage_factory=lambda pid: s.holder_view(3, pid))
        result = swarm.run(until=600)
        assert result.complete
        s.flush()
        for pid in owners:
            for o, (m, pieces) in owners.items():
                assert [s.get_piece(3, o, i, pid) for i in range(m.num_pieces)] == pieces
        c = counts(s)
        assert c["bt_blobs"] == 25 and c["bt_chunks"] == 25 * 5


# ---------------------------------------------------------------------------
# sessions
# ---------------------------------------------------------------------------

def test_session_records(tmp_path):
    with SQLitePieceStore(tmp_path / "p.db", now=lambda: 50.0) as s:
        s.begin_session(2, 4)
        rec = s.get_session(2, 4)
        assert rec == {"round": 2, "peer": 4, "state": "running", "started_at": 50.0,
                       "finished_at": None, "bytes_up": 0, "bytes_down": 0,
                       "pieces_received": 0, "last_error": None}
        s.update_session(2, 4, bytes_up=10, bytes_down=2_000_000_000_000, pieces_received=3)
        s.update_session(2, 4, state="endgame")
        s.finish_session(2, 4, "failed", error="peer 3 sent a bad piece", now=60.5)
        rec = s.get_session(2, 4)
        assert rec["bytes_up"] == 10 and rec["bytes_down"] == 2_000_000_000_000
        assert rec["pieces_received"] == 3 and rec["state"] == "failed"
        assert rec["finished_at"] == 60.5 and rec["last_error"] == "peer 3 sent a bad piece"
        assert s.rounds() == [2]
        s.begin_session(2, 4, now=70.0)                        # restart
        assert s.get_session(2, 4)["bytes_up"] == 0
        assert s.get_session(2, 4)["started_at"] == 70.0
        with pytest.raises(StoreError) as e:
            s.update_session(2, 4, bytes_sideways=1)
        assert e.value.field == "bytes_sideways"
        with pytest.raises(StoreError) as e:
            s.update_session(2, 4, bytes_up=-1)
        assert e.value.field == "bytes_up"
        with pytest.raises(StoreError) as e:
            s.update_session(2, 4, state=3)
        assert e.value.field == "state"
        for call in (lambda: s.update_session(2, 5, bytes_up=1),
                     lambda: s.update_session(2, 5),
                     lambda: s.finish_session(3, 4, "done"),
                     lambda: s.get_session(2, 5)):
            with pytest.raises(StoreError) as e:
                call()
            assert e.value.field == "peer"
        assert set(SESSION_FIELDS) == {"bytes_up", "bytes_down", "pieces_received", "state",
                                       "last_error"}


# ---------------------------------------------------------------------------
# integrity on open
# ---------------------------------------------------------------------------

def test_verify_on_open_drops_corrupted_blobs(tmp_path):
    path = tmp_path / "p.db"
    m, pieces = make_owner(0, 1, 4)
    with SQLitePieceStore(path) as s:
        s.put_manifest(m)
        for h in (0, 1):
            for i, p in enumerate(pieces):
                s.put_piece(1, 0, i, h, p)
    c = raw(path)
    bad = bytearray(pieces[2])
    bad[0] ^= 0xFF
    c.execute("UPDATE bt_blobs SET data=? WHERE sha256=?", (bytes(bad), m.piece_hashes[2]))
    c.commit()
    c.close()
    with SQLitePieceStore(path) as s:                          # default: no re-hash
        assert "bad_blobs" not in s.open_report
    with SQLitePieceStore(path, verify_on_open=True) as s:
        assert s.open_report["bad_blobs"] == 1
        assert not s.has_piece(1, 0, 2)
        assert s.held_pieces(1, 0) == {(0, 0), (0, 1), (0, 3)}
        assert counts(s)["bt_blobs"] == 3
        s.put_piece(1, 0, 2, 0, pieces[2])                     # fetch it again
        assert s.get_piece(1, 0, 2, 0) == pieces[2]
    with SQLitePieceStore(path, verify_on_open=True) as s:
        assert s.open_report["bad_blobs"] == 0 and s.open_report["bad_chunks"] == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4), st.integers(0, 2),
                              st.booleans()), max_size=40),
       batch=st.integers(1, 6))
def test_store_matches_a_model(tmp_path_factory, ops, batch):
    """Random valid and corrupt puts: the store holds exactly the valid ones."""
    path = tmp_path_factory.mktemp("model") / "p.db"
    owners = {o: make_owner(o, 1, 4, seed=1) for o in range(3)}   # index 4 is out of range
    model: dict[tuple[int, int, int], bytes] = {}
    with SQLitePieceStore(path, batch_size=batch, writer_thread=batch % 2 == 0) as s:
        for m, _ in owners.values():
            s.put_manifest(m)
        for owner, index, holder, corrupt in ops:
            m, pieces = owners[owner]
            if index >= m.num_pieces:
                with pytest.raises(StoreError):
                    s.put_piece(1, owner, index, holder, b"x")
                continue
            data = pieces[index]
            if corrupt:
                with pytest.raises(HashMismatch):
                    s.put_piece(1, owner, index, holder, data[::-1] + b"!")
                continue
            s.put_piece(1, owner, index, holder, data)
            model[(owner, index, holder)] = data
        for h in range(3):
            assert s.held_pieces(1, h) == {(o, i) for (o, i, hh) in model if hh == h}
    with SQLitePieceStore(path) as s:
        for (o, i, h), data in model.items():
            assert s.get_piece(1, o, i, h) == data
        assert counts(s)["bt_chunks"] == len(model)
        assert counts(s)["bt_blobs"] == len({(o, i) for (o, i, _) in model})


# ---------------------------------------------------------------------------
# SIGKILL mid-write
# ---------------------------------------------------------------------------

def check_db_consistent(path) -> dict:
    """Everything a crash must never leave behind; returns counts for the caller."""
    c = raw(path)
    try:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        manifests = {(r, o): Manifest.decode(enc) for r, o, enc in
                     c.execute("SELECT round, owner, encoded FROM bt_manifests")}
        for (r, o), m in manifests.items():
            assert (m.round, m.owner) == (r, o)
        n = 0
        for r, s, i, h, sha, size, verified, data in c.execute(
                "SELECT c.round, c.source, c.piece_index, c.holder, c.sha256, c.size, "
                "c.verified, b.data FROM bt_chunks c LEFT JOIN bt_blobs b ON b.sha256 = c.sha256"):
            assert verified == 1
            assert data is not None, "chunk refers to a missing blob"
            assert hashlib.sha256(data).digest() == sha
            m = manifests[(r, s)]
            assert m.piece_hashes[i] == sha
            assert len(data) == size == m.piece_length(i)
            n += 1
        for sha, size, data in c.execute("SELECT sha256, size, data FROM bt_blobs"):
            assert hashlib.sha256(data).digest() == sha and len(data) == size
        per_round = dict(c.execute("SELECT round, count(*) FROM bt_chunks GROUP BY round"))
    finally:
        c.close()
    return {"chunks": n, "per_round": per_round}


@pytest.mark.parametrize("delay,writer_mode", [(0.0, "thread"), (0.04, "inline"),
                                               (0.13, "thread"), (0.31, "thread"),
                                               (0.5, "inline")])
def test_sigkill_mid_write_leaves_a_consistent_db(tmp_path, delay, writer_mode):
    path, lines = kill_writer(tmp_path, delay, writer_mode)
    found = check_db_consistent(path)
    # every batch the writer saw committed survived the kill
    last = [ln for ln in lines if ln[0] == "committed"][-1]
    rnd, n = int(last[1]), int(last[2])
    assert found["per_round"].get(rnd, 0) >= n, (last, found)
    # and the store opens it: nothing needed dropping
    with SQLitePieceStore(path, verify_on_open=True) as s:
        assert s.open_report == {"quick_check": "ok", "dropped_unverified": 0,
                                 "dropped_dangling": 0, "bad_blobs": 0, "bad_chunks": 0}
        assert s.rounds()[-1] >= rnd


def kill_writer(tmp_path, delay: float, writer_mode: str):
    """Run store_writer_proc.py (seed ``delay`` in ms), SIGKILL it ``delay``
    seconds after its first committed batch; returns (db path, its lines)."""
    path = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, WRITER, str(path), str(int(delay * 1000)),
                             "--writer", writer_mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    watchdog = threading.Timer(30, proc.kill)   # never hang the suite on a stuck child
    watchdog.start()
    try:
        while True:                             # wait for the first committed batch
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.split())
            if lines[-1][0] == "committed":
                break
        assert lines and lines[-1][0] == "committed", (lines, proc.stderr.read())
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        lines += [ln.split() for ln in proc.stdout.read().splitlines()]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return path, lines


@pytest.mark.parametrize("delay,writer_mode", [(0.07, "thread"), (0.23, "inline")])
def test_killed_client_store_reopens_and_rejoins_its_round_and_the_next(tmp_path, delay,
                                                                         writer_mode):
    """After a SIGKILL mid-write the client's database reopens with nothing
    unverified in it; the client then serves in a swarm on it: it resumes
    the interrupted round (fetching only what it had not committed) and
    completes the next round, and cleanup keeps the file to keep_rounds."""
    from fs_bittorrent.core.config import SwarmConfig
    from fs_bittorrent.sim.network import LinkProfile
    from fs_bittorrent.sim.swarm import build_swarm
    import store_writer_proc as writer

    path, lines = kill_writer(tmp_path, delay, writer_mode)
    check_db_consistent(path)
    seed = int(delay * 1000)
    cfg = SwarmConfig(piece_size=writer.PIECE, block_size=16 * 1024, request_timeout=1.0,
                      credit_bytes=1 << 20)
    link = LinkProfile(up=50e6, down=50e6, latency=0.002)
    with SQLitePieceStore(path, verify_on_open=True) as s:
        rep = s.open_report
        assert rep["quick_check"] == "ok" and rep["bad_blobs"] == rep["bad_chunks"] == 0
        assert rep["dropped_unverified"] == 0
        killed = s.rounds()[-1]
        # 1. the interrupted round, resumed: holder 2 keeps what it had committed
        pieces = writer.replay(seed, killed)
        owners = {}
        for m in s.manifests(killed):
            assert m == writer.manifest_for(m.owner, killed, pieces[m.owner])
            owners[m.owner] = (m, pieces[m.owner])
        had = s.held_pieces(killed, 2)
        swarm = build_swarm(owners, cfg, link, seed=killed, peers=[0, 1, 2],
                            storage_factory=lambda pid: s.holder_view(killed, pid))
        assert swarm.run(until=600).complete
        total = sum(m.num_pieces for m, _ in owners.values())
        d = swarm.sessions[2]
        assert d.stats.pieces_received == total - len(had)      # only what was missing
        # 2. the next round: three owners, the restarted client among them
        nxt = killed + 1
        fresh = {o: make_owner(o, nxt, 6, seed=seed, piece_size=writer.PIECE) for o in range(3)}
        for m, _ in fresh.values():
            s.put_manifest(m)
        swarm = build_swarm(fresh, cfg, link, seed=nxt,
                            storage_factory=lambda pid: s.holder_view(nxt, pid))
        assert swarm.run(until=600).complete
        s.flush()
        for pid in range(3):
            for o, (m, ps) in fresh.items():
                assert [s.get_piece(nxt, o, i, pid) for i in range(m.num_pieces)] == ps
        s.cleanup(keep_rounds=2)
        assert s.rounds() == [killed, nxt]
    found = check_db_consistent(path)
    assert set(found["per_round"]) == {killed, nxt}


# ---------------------------------------------------------------------------
# reference rows for simulated holders (put_refs)
# ---------------------------------------------------------------------------

def test_put_refs_adds_holders_by_reference(store):
    """A simulated holder costs a row: same blob, no new bytes."""
    m, pieces = make_owner(1, 0, 3)
    store.put_manifest(m)
    for k, p in enumerate(pieces):
        store.put_piece(0, 1, k, 1, p)
    store.flush()
    before = counts(store)
    assert store.put_refs(0, 2, [(1, 0), (1, 2)]) == 2
    assert store.put_refs(0, 2, [(1, 0)]) == 0          # already held: skipped
    after = counts(store)
    assert after["bt_blobs"] == before["bt_blobs"] and after["blob_bytes"] == before["blob_bytes"]
    assert after["bt_chunks"] == before["bt_chunks"] + 2
    assert store.held_pieces(0, 2) == {(1, 0), (1, 2)}
    assert store.get_piece(0, 1, 2, holder=2) == pieces[2]


@pytest.mark.parametrize("keys,field", [([(1, 0), (1, 7)], "piece_index"),
                                        ([(1, 0), (5, 0)], "source"),
                                        ([(1, 0), (2, 0)], "keys")])
def test_put_refs_refuses_bad_keys_and_writes_nothing(store, keys, field):
    m, pieces = make_owner(1, 0, 3)
    store.put_manifest(m)
    for k, p in enumerate(pieces):
        store.put_piece(0, 1, k, 1, p)
    m2, _ = make_owner(2, 0, 1)
    store.put_manifest(m2)                  # owner 2's manifest, but none of its bytes
    store.flush()
    before = counts(store)
    with pytest.raises(StoreError) as e:
        store.put_refs(0, 3, keys)
    assert e.value.field == field
    assert counts(store) == before and store.held_pieces(0, 3) == set()


def test_a_piece_its_check_verified_is_not_hashed_again_by_put(store, monkeypatch):
    """``check_piece`` is the session's check: the object it verified goes
    into the store without a second sha256; anything else is still hashed,
    and bad data is refused with the store unchanged."""
    import fs_bittorrent.store.sqlite_store as sqlite_store
    m, pieces = make_owner(1, 7, 3)
    store.put_manifest(m)
    calls = []
    real = hashlib.sha256

    def counting(data=b""):
        calls.append(len(data))
        return real(data)
    monkeypatch.setattr(sqlite_store.hashlib, "sha256", counting)
    data = pieces[0]
    assert store.check_piece(m.piece_hashes[0], data)
    store.put_piece(7, 1, 0, 2, data, m.piece_hashes[0])
    assert len(calls) == 1 and store.get_piece(7, 1, 0, 2) == data
    copy = bytes(bytearray(pieces[1]))
    assert store.check_piece(m.piece_hashes[1], pieces[1])
    store.put_piece(7, 1, 1, 2, copy, m.piece_hashes[1])          # another object: hashed
    assert len(calls) == 3
    bad = bytes(len(pieces[2]))
    assert not store.check_piece(m.piece_hashes[2], bad)
    with pytest.raises(HashMismatch) as e:
        store.put_piece(7, 1, 2, 2, bad, m.piece_hashes[2])
    assert e.value.field == "data" and not store.has_piece(7, 1, 2, 2)


# Run in a child process: a store whose files may not grow (RLIMIT_FSIZE: a
# write past the limit fails with EFBIG, as on a full disk; Python ignores
# SIGXFSZ).  Prints what each write raised and what the store reads after.
FULL_DISK_WRITES = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[2])
from test_store import make_owner
from fs_bittorrent.store import SQLitePieceStore
path = sys.argv[1]
out = {}
with SQLitePieceStore(path) as s:
    before, _ = make_owner(0, 1, 4)
    s.put_manifest(before)
    s.begin_session(1, 0)
    limit = max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)) + 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    big = [make_owner(o, 2, 2000)[0] for o in range(1, 4)]      # 3 x 2000 piece hashes
    for name, write in (("manifests", lambda: s.put_manifests(big)),
                        ("session", lambda: [s.begin_session(r, 5) for r in range(2, 400)])):
        try:
            write()
            out[name] = None
        except BaseException as e:
            out[name] = [type(e).__name__, getattr(e, "field", None), str(e)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out["kept"] = s.get_manifest(1, 0) == before and s.get_session(1, 0)["state"] == "running"
    out["none_of_big"] = s.manifests(2) == []
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"),
                    reason="no RLIMIT_FSIZE on this platform")
def test_writes_on_a_full_disk_raise_a_store_error_naming_the_file_and_keep_the_rest(tmp_path):
    path = str(tmp_path / "p.db")
    res = subprocess.run([sys.executable, "-c", FULL_DISK_WRITES, path,
                          os.path.dirname(__file__)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    for name, what in (("manifests", "storing manifests failed"),
                       ("session", "writing a session record failed")):
        kind, field, text = out[name]
        assert (kind, field) == ("StoreError", "store"), out
        assert path in text and what in text, out
    assert out["kept"] and out["none_of_big"], out                   # all or nothing
