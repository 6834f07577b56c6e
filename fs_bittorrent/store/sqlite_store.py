"""A SQLite (WAL) piece store for one process hosting many simulated peers.

Why SQLite: one file that survives a crash (or a SIGKILL) without a partial
piece in it, that another process can read while the run goes on (WAL
readers never block the writer), and that needs no server.

Schema (``SCHEMA_VERSION`` 1, all tables STRICT)::

    bt_meta      (key TEXT PK, value TEXT)                  schema version
    bt_blobs     (sha256 BLOB PK, size, data BLOB)          the bytes, once
    bt_chunks    (round, source, piece_index, holder,       who holds what,
                  sha256 -> bt_blobs, size, received_at,     by reference
                  verified, PK(round, source, piece_index, holder))
    bt_sessions  (round, peer, state, started_at, finished_at,
                  bytes_up, bytes_down, pieces_received, last_error,
                  PK(round, peer))
    bt_manifests (round, owner, digest, sample_count, num_pieces,
                  total_size, encoded, PK(round, owner))

    idx_bt_chunks_holder (round, holder, source, piece_index)  held_pieces
    idx_bt_chunks_sha256 (sha256)                        blob GC, FK check

Design choices, and why:

* **Content addressed.**  In a simulation 64 holders end up with the same
  piece; ``bt_blobs`` keeps its bytes once (key = sha256) and ``bt_chunks``
  records each holder's copy by reference (``INSERT OR IGNORE`` dedups).  A
  foreign key (``PRAGMA foreign_keys=ON``) makes a chunk without its blob
  impossible, not just unlikely.
* **Verified before stored.**  :meth:`SQLitePieceStore.put_piece` checks
  index, size and sha256 against the owner's manifest (cached in memory)
  before anything is queued; on any error nothing is written.  Every
  ``bt_chunks`` row therefore has ``verified = 1``; the column exists so a
  future "store now, verify later" path would have to be explicit, and open
  drops any row that is not 1.
* **Batched commits, off the caller's thread.**  A commit per 256 KiB piece
  would cost more than the hashing, so pieces are committed ``batch_size``
  at a time, one transaction per batch.  By default a committer thread runs
  those transactions (SQLite and hashlib both release the GIL), so the
  caller hashes the next pieces while the previous batch is written and
  fsynced at checkpoints: measured 10-25 % more ingest than committing
  inline, on a noisy 2-vCPU VM (scripts/bench_store.py).  At most
  ``max_inflight`` sealed batches wait for it (back-pressure, bounded
  memory).  ``writer_thread=False`` commits inline.
* **Reads see everything accepted.**  Uncommitted pieces (the open batch and
  sealed ones) stay indexed in memory until their transaction has
  committed; every read looks there first, then in the database.  A reader
  therefore never has to flush and never sees an accepted piece vanish.  A
  crash loses at most the uncommitted batches -- the protocol fetches those
  pieces again -- and can never leave a partial piece: a batch is one
  transaction and WAL commits are atomic.
* **One writer.**  One long-lived write connection (``check_same_thread=
  False``) is used by the committer and, under a lock, by the caller's
  writes (manifests, sessions, cleanup); a second, read-only connection
  serves reads, so a read never waits for a batch being committed.  Every
  public method is serialized by a re-entrant lock, so the host may call
  the store from several threads, but it is *one* writer: two
  ``SQLitePieceStore`` objects writing one file are not supported (each has
  its own queue and manifest cache).  Other processes may read the file.
* **Pragmas.**  ``journal_mode=WAL`` + ``synchronous=NORMAL`` (survives a
  process crash; a power loss may drop the last commits but never corrupts),
  ``page_size=65536`` (a 256 KiB blob is 4 overflow pages, not 64: ~15-25 %
  faster ingest than 4 KiB pages, measured), ``auto_vacuum=INCREMENTAL``
  (so :meth:`~SQLitePieceStore.cleanup` can give space back, in small
  steps, see ``give_space_back``), ``secure_delete=FAST`` (Debian builds
  default to ON, which zeroes every freed page: dropping a 1 GiB round
  then wrote 1 GiB of zeros, 4-9 s), a 256 MiB
  ``mmap_size`` on the reader (blob reads skip a copy) and
  ``journal_size_limit`` so the WAL is truncated back after a checkpoint.
  page_size and auto_vacuum only take effect before the first table exists,
  so they are set at creation.
* **Integrity on open.**  ``PRAGMA quick_check`` must say ``ok``; rows that
  are unverified or point at a missing blob are dropped (none should
  exist); a 1 GiB store opens in ~0.15 s.  With ``verify_on_open=True``
  every blob is re-hashed and every chunk re-checked against its manifest,
  and bad ones are dropped so peers fetch them again (~1 s per GiB).  What
  was done is in :attr:`SQLitePieceStore.open_report`.
"""
from __future__ import annotations

import contextlib
import hashlib
import operator
import os
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from ..core.manifest import Manifest
from ..errors import BitTorrentError, HashMismatch, StoreError
from . import writer_lock

__all__ = ["SQLitePieceStore", "HolderView", "SCHEMA_VERSION", "SESSION_FIELDS",
           "delete_rounds", "delete_rows", "give_space_back"]

Bytes = Union[bytes, bytearray, memoryview]

SCHEMA_VERSION = 1
PAGE_SIZE = 65536
# Writer page cache, KiB: b-tree interior pages plus part of a batch (in WAL
# mode a spill just writes frames early).  Blob bytes need no caching here
# (OS page cache, the reader's mmap, the holder views' LRU); 8-32 MiB
# measured the same ingest, so the smaller middle.
CACHE_KIB = 16 * 1024
# The WAL is truncated back to this after a checkpoint instead of staying
# at its high-water mark.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
MMAP_SIZE = 256 * 1024 * 1024
# cleanup gives space back in incremental_vacuum steps this large: well
# under the writer's page cache, so freed pages are never spilled into the WAL
VACUUM_STEP_BYTES = 4 * 1024 * 1024
INT64_MAX = (1 << 63) - 1

SESSION_FIELDS = ("bytes_up", "bytes_down", "pieces_received", "state", "last_error")
_SESSION_INT_FIELDS = ("bytes_up", "bytes_down", "pieces_received")
_SESSION_COLUMNS = ("round", "peer", "state", "started_at", "finished_at", "bytes_up",
                    "bytes_down", "pieces_received", "last_error")

_ChunkKey = tuple[int, int, int, int]          # (round, source, piece_index, holder)

_INSERT_BLOB = "INSERT OR IGNORE INTO bt_blobs(sha256, size, data) VALUES (?, ?, ?)"
_INSERT_CHUNK = ("INSERT OR IGNORE INTO bt_chunks(round, source, piece_index, holder, sha256, "
                 "size, received_at, verified) VALUES (?, ?, ?, ?, ?, ?, ?, 1)")


def _uint(field: str, value: Any) -> int:
    """A non-negative int that fits an SQLite INTEGER, or StoreError naming ``field``."""
    if isinstance(value, bool):
        raise StoreError(field, value, "must be a non-negative integer, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise StoreError(field, value, "must be a non-negative integer") from None
    if not 0 <= v <= INT64_MAX:
        raise StoreError(field, v, "must be a non-negative integer")
    return v


def _piece_key(round: Any, source: Any, index: Any,
               holder: Any) -> tuple[int, int, int, Optional[int]]:
    """``(round, source, piece_index, holder)`` checked; holder None = anyone."""
    return (_uint("round", round), _uint("source", source), _uint("piece_index", index),
            None if holder is None else _uint("holder", holder))


def _pos_int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StoreError(field, value, f"must be an integer >= {minimum}")
    return value


def _as_bytes(field: str, data: Any) -> bytes:
    """``data`` as immutable bytes (copied unless it already is ``bytes``)."""
    if type(data) is bytes:
        return data
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, memoryview):
        return data.tobytes()
    raise StoreError(field, type(data).__name__, "must be bytes, bytearray or memoryview")


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _Batch:
    """Verified pieces to be committed in one transaction."""

    __slots__ = ("rows", "blobs")

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int, bytes, int, float]] = []
        self.blobs: dict[bytes, bytes] = {}


class SQLitePieceStore:
    """Verified pieces, manifests and session records of one process, in SQLite.

    Use as a context manager (or call :meth:`close`, which flushes): the
    committer thread only stops on close, and a store never closed loses
    its uncommitted batches at exit, exactly as in a crash.  See the module
    docstring for the schema and the design.

    Parameters: ``path`` of the database file (created if missing);
    ``batch_size`` pieces per transaction; ``now`` the clock for
    ``received_at``/``started_at``/``finished_at``; ``verify_on_open``
    re-hash every blob when opening; ``writer_thread`` commit batches on a
    background thread (default) or inline; ``max_inflight`` sealed batches
    allowed to wait for the committer before ``put_piece`` blocks.
    """

    def __init__(self, path: Union[str, os.PathLike], batch_size: int = 64,
                 now: Callable[[], float] = time.time, *, verify_on_open: bool = False,
                 writer_thread: bool = True, max_inflight: int = 2) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            # the writer and reader connections must open the same file
            raise StoreError("path", self.path, "needs a database file path")
        self.batch_size = _pos_int("batch_size", batch_size, 1)
        self.max_inflight = _pos_int("max_inflight", max_inflight, 1)
        self._now = now
        # _lock guards all in-memory state and the reader connection;
        # _wlock guards the write connection.  Order: _lock may be held while
        # taking _wlock; the committer never takes _lock while holding _wlock.
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._wlock = threading.Lock()
        self._closed = False
        # -- uncommitted pieces, all indexed for reads --------------------
        self._open = _Batch()                              # being filled
        self._sealed: deque[_Batch] = deque()               # waiting to commit
        self._pending: dict[_ChunkKey, tuple[bytes, int, float]] = {}
        self._pending_blobs: dict[bytes, list] = {}         # sha -> [bytes, n batches]
        self._pending_any: dict[tuple[int, int, int], int] = {}   # (r, s, i) -> n holders
        self._error: Optional[BaseException] = None         # last failed commit
        # The last 64 verified bytes objects by sha256 (references only):
        # putting the *same* object again (in-process holders handed one
        # interned buffer, e.g. from a ContentPool) skips re-hashing, which
        # is safe because bytes are immutable.
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        self._recent_max = 64
        self._manifests: dict[tuple[int, int], Manifest] = {}
        #: bumped by cleanup so holder views drop cached pieces of deleted rounds
        self.generation = 0
        #: what the checks on open found and did
        self.open_report: dict[str, Any] = {}
        self._thread: Optional[threading.Thread] = None
        self._wconn: Optional[sqlite3.Connection] = None
        self._rconn: Optional[sqlite3.Connection] = None
        # "a writer has this store open", for `fs-bittorrent clean` (writer_lock.py)
        self._writer_lock: Optional[int] = None
        try:
            self._wconn = self._connect()
            self._setup_writer()
            self._rconn = self._connect()
            self._setup_reader()
            self._check_on_open(verify_on_open)
            self._writer_lock = writer_lock.hold_shared(self.path)
        except sqlite3.DatabaseError as e:
            self._close_connections()
            raise StoreError("path", self.path, f"not a usable piece store: {e}") from None
        except BaseException:
            self._close_connections()
            raise
        if writer_thread:
            self._thread = threading.Thread(target=self._committer, daemon=True,
                                            name=f"bt-store-commit:{os.path.basename(self.path)}")
            self._thread.start()

    # ------------------------------------------------------------------
    # opening
    # ------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        except sqlite3.Error as e:
            raise StoreError("path", self.path, f"cannot open: {e}") from None

    def _setup_writer(self) -> None:
        c = self._wconn
        new = c.execute("PRAGMA page_count").fetchone()[0] == 0
        if new:
            # only effective before the first table is created
            c.execute(f"PRAGMA page_size={PAGE_SIZE}")
            c.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError("journal_mode", mode, "could not switch the database to WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        c.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        c.execute("PRAGMA foreign_keys=ON")
        # Debian/Ubuntu builds default to secure_delete=ON, which zeroes every
        # freed page: cleanup of a 1 GiB round then writes 1 GiB of zeros
        # (WAL, then checkpoint).  FAST still scrubs deleted cells inside
        # live b-tree pages; freed blob pages are cut off the file by
        # incremental_vacuum anyway, and pieces are no secret (the swarm
        # shares them).
        c.execute("PRAGMA secure_delete=FAST")
        self._create_schema(new)

    def _setup_reader(self) -> None:
        c = self._rconn
        c.execute(f"PRAGMA cache_size=-{CACHE_KIB // 4}")
        c.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
        c.execute("PRAGMA query_only=ON")

    def _schema_version(self) -> Optional[str]:
        try:
            row = self._wconn.execute(
                "SELECT value FROM bt_meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:          # no bt_meta table
            return None
        return None if row is None else row[0]

    def _create_schema(self, new: bool) -> None:
        version = None if new else self._schema_version()
        if version is not None:
            # the version row is written in the transaction that creates the
            # tables and indexes, so its presence means they all exist
            if version != str(SCHEMA_VERSION):
                raise StoreError("schema_version", version,
                                 f"this build reads version {SCHEMA_VERSION}")
            return
        # sqlite_utils for schema work only (imported here: it is slow to
        # import -- it pulls in pandas when installed -- and only creating a
        # store needs it)
        import sqlite_utils

        db = sqlite_utils.Database(self._wconn, execute_plugins=False, recursive_triggers=False)
        with db.atomic():
            db["bt_meta"].create({"key": str, "value": str}, pk="key",
                                 not_null={"key", "value"}, if_not_exists=True, strict=True)
            db["bt_blobs"].create({"sha256": bytes, "size": int, "data": bytes}, pk="sha256",
                                  not_null={"sha256", "size", "data"}, if_not_exists=True,
                                  strict=True)
            db["bt_chunks"].create(
                {"round": int, "source": int, "piece_index": int, "holder": int,
                 "sha256": bytes, "size": int, "received_at": float, "verified": int},
                pk=("round", "source", "piece_index", "holder"),
                not_null={"round", "source", "piece_index", "holder", "sha256", "size",
                          "received_at", "verified"},
                foreign_keys=[("sha256", "bt_blobs", "sha256")],
                if_not_exists=True, strict=True)
            db["bt_sessions"].create(
                {"round": int, "peer": int, "state": str, "started_at": float,
                 "finished_at": float, "bytes_up": int, "bytes_down": int,
                 "pieces_received": int, "last_error": str},
                pk=("round", "peer"),
                not_null={"round", "peer", "state", "started_at", "bytes_up", "bytes_down",
                          "pieces_received"},
                if_not_exists=True, strict=True)
            db["bt_manifests"].create(
                {"round": int, "owner": int, "digest": bytes, "sample_count": int,
                 "num_pieces": int, "total_size": int, "encoded": bytes},
                pk=("round", "owner"),
                not_null={"round", "owner", "digest", "sample_count", "num_pieces",
                          "total_size", "encoded"},
                if_not_exists=True, strict=True)
            # held_pieces(round, holder) and holder views: a covering index
            db["bt_chunks"].create_index(["round", "holder", "source", "piece_index"],
                                         index_name="idx_bt_chunks_holder", if_not_exists=True)
            # blob GC (is any chunk still using this sha256?) and the FK check
            db["bt_chunks"].create_index(["sha256"], index_name="idx_bt_chunks_sha256",
                                         if_not_exists=True)
            row = self._wconn.execute(
                "SELECT value FROM bt_meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._wconn.execute(
                    "INSERT INTO bt_meta(key, value) VALUES ('schema_version', ?), "
                    "('created_at', ?)", (str(SCHEMA_VERSION), repr(float(self._now()))))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError("schema_version", row[0],
                                 f"this build reads version {SCHEMA_VERSION}")

    def _check_on_open(self, verify: bool) -> None:
        rows = [r[0] for r in self._rconn.execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            raise StoreError("path", self.path, f"quick_check failed: {'; '.join(rows[:5])}")
        report: dict[str, Any] = {"quick_check": "ok"}
        c = self._wconn
        with self._wlock, _Tx(c):
            # Never expected (rows are only inserted verified, with their
            # blob, in one transaction) but a store must not serve what it
            # cannot vouch for.
            report["dropped_unverified"] = c.execute(
                "DELETE FROM bt_chunks WHERE verified != 1").rowcount
            report["dropped_dangling"] = c.execute(
                "DELETE FROM bt_chunks WHERE NOT EXISTS "
                "(SELECT 1 FROM bt_blobs b WHERE b.sha256 = bt_chunks.sha256)").rowcount
        if verify:
            report.update(self._verify_all())
        self.open_report = report

    def _verify_all(self) -> dict[str, int]:
        """Re-hash every blob and re-check every chunk against its manifest.

        Bad blobs are dropped with the chunks that use them; the protocol
        fetches those pieces again.
        """
        bad_blobs = []
        for sha, size, data in self._rconn.execute("SELECT sha256, size, data FROM bt_blobs"):
            if len(data) != size or hashlib.sha256(data).digest() != sha:
                bad_blobs.append(sha)
        bad_chunks = []
        for r, s, i, h, sha, size in self._rconn.execute(
                "SELECT round, source, piece_index, holder, sha256, size "
                "FROM bt_chunks").fetchall():
            try:
                m = self._manifest(r, s, "source")
            except StoreError:
                bad_chunks.append((r, s, i, h))
                continue
            if i >= m.num_pieces or m.piece_hashes[i] != sha or m.piece_length(i) != size:
                bad_chunks.append((r, s, i, h))
        c = self._wconn
        with self._wlock, _Tx(c):
            c.executemany("DELETE FROM bt_chunks WHERE round=? AND source=? AND piece_index=? "
                          "AND holder=?", bad_chunks)
            for sha in bad_blobs:
                c.execute("DELETE FROM bt_chunks WHERE sha256 = ?", (sha,))
                c.execute("DELETE FROM bt_blobs WHERE sha256 = ?", (sha,))
        return {"bad_blobs": len(bad_blobs), "bad_chunks": len(bad_chunks)}

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------

    def __enter__(self) -> "SQLitePieceStore":
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store", self.path, "store is closed")

    def close(self) -> None:
        """Commit everything queued, stop the committer, close (idempotent).

        If the final commit fails the store is closed anyway and the
        StoreError is raised: the uncommitted pieces are lost, as in a crash.
        """
        failure: Optional[BaseException] = None
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            except BaseException as e:
                failure = e
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        if failure is None:
            with self._wlock:
                try:
                    self._wconn.execute("PRAGMA optimize")
                except sqlite3.Error:
                    pass
        self._close_connections()
        if failure is not None:
            raise failure

    def _close_connections(self) -> None:
        for c in (self._rconn, self._wconn):
            if c is not None:
                c.close()
        writer_lock.release(self._writer_lock)
        self._writer_lock = None

    @property
    def pending_count(self) -> int:
        """Pieces accepted (verified) whose transaction has not committed yet."""
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------
    # committing
    # ------------------------------------------------------------------

    def _commit(self, batch: _Batch) -> None:
        """Write one batch in one transaction (any thread; takes only _wlock)."""
        c = self._wconn
        with self._wlock, _Tx(c):
            c.executemany(_INSERT_BLOB, [(sha, len(b), b) for sha, b in batch.blobs.items()])
            c.executemany(_INSERT_CHUNK, batch.rows)

    def _unindex(self, batch: _Batch) -> None:
        """Forget a committed batch's pieces from memory (caller holds _lock)."""
        pending, pany = self._pending, self._pending_any
        for r, s, i, h, _sha, _size, _t in batch.rows:
            del pending[(r, s, i, h)]
            k3 = (r, s, i)
            n = pany[k3] - 1
            if n:
                pany[k3] = n
            else:
                del pany[k3]
        pb = self._pending_blobs
        for sha in batch.blobs:
            ent = pb[sha]
            ent[1] -= 1
            if not ent[1]:
                del pb[sha]

    def _committer(self) -> None:
        """Background loop: commit sealed batches in order until closed."""
        cv = self._cv
        while True:
            with cv:
                while not self._sealed or self._error is not None:
                    if self._closed and (not self._sealed or self._error is not None):
                        return
                    cv.wait()
                batch = self._sealed[0]
            try:
                self._commit(batch)
            except BaseException as e:      # kept for the caller; retried by flush()
                with cv:
                    self._error = e
                    cv.notify_all()
                continue
            with cv:
                self._sealed.popleft()
                self._unindex(batch)
                cv.notify_all()

    def _seal(self) -> None:
        """Close the open batch and hand it to the committer (caller holds _lock)."""
        batch = self._open
        if not batch.rows:
            return
        self._open = _Batch()
        self._sealed.append(batch)
        self._cv.notify_all()

    def _drain_inline(self) -> None:
        while self._sealed:
            batch = self._sealed[0]
            try:
                self._commit(batch)
            except sqlite3.Error as e:
                self._error = e
                return
            self._sealed.popleft()
            self._unindex(batch)
        self._error = None

    def _raise_error(self) -> None:
        # the error stays set: the committer waits, the next flush/put retries
        e = self._error
        raise StoreError("flush", len(self._pending),
                         f"commit failed, pieces kept for a retry: {e}") from e

    def flush(self) -> None:
        """Commit every accepted piece now; returns once they are committed.

        If a commit fails the pieces stay queued (and readable), StoreError
        is raised, and the next ``flush``/``put_piece`` retries.
        """
        with self._cv:
            if self._closed:
                if self._sealed or self._open.rows:     # close() failed to commit them
                    raise StoreError("store", self.path, "closed with uncommitted pieces")
                return
            self._seal()
            if self._thread is None:
                self._drain_inline()              # also retries a failed batch
                if self._error is not None:
                    self._raise_error()
                return
            self._error = None                    # (re)try any failed batch
            self._cv.notify_all()
            while self._sealed and self._error is None:
                self._cv.wait()
            if self._error is not None:
                self._raise_error()

    # ------------------------------------------------------------------
    # manifests
    # ------------------------------------------------------------------

    def put_manifest(self, manifest: Manifest) -> None:
        """Record an owner's manifest for a round (committed at once).

        Putting the same manifest again is a no-op; a *different* manifest
        for a (round, owner) that already has one is refused
        (``StoreError("digest")``), since pieces already stored were verified
        against the first.  An invalid manifest raises ManifestError.
        """
        self.put_manifests([manifest])

    def put_manifests(self, manifests: Iterable[Manifest]) -> None:
        """:meth:`put_manifest` for several at once, in one transaction: a
        client's round start stores every other owner's manifest, and one
        commit each was most of that step's time.  All or nothing: if any
        manifest is invalid or conflicts with a stored one (or another in
        the batch), none is stored."""
        batch: dict[tuple[int, int], tuple[Manifest, bytes]] = {}
        for manifest in manifests:
            if not isinstance(manifest, Manifest):
                raise StoreError("manifest", type(manifest).__name__, "not a Manifest")
            encoded = manifest.encode()          # validates every field (ManifestError)
            key = (int(manifest.round), int(manifest.owner))
            if key in batch and batch[key][1] != encoded:
                raise StoreError("digest", manifest.digest.hex(),
                                 f"round {key[0]} owner {key[1]} given twice, differently")
            batch[key] = (manifest, encoded)
        if not batch:
            return
        with self._lock:
            self._check_open()
            new = []
            for key, (manifest, encoded) in batch.items():
                row = self._rconn.execute(
                    "SELECT encoded FROM bt_manifests WHERE round=? AND owner=?", key).fetchone()
                if row is None:
                    new.append((key, manifest, encoded))
                elif row[0] != encoded:
                    raise StoreError("digest", manifest.digest.hex(),
                                     f"round {key[0]} owner {key[1]} already has a different "
                                     f"manifest")
            if new:
                with self._wlock, self._writing("storing manifests"), \
                        _Tx(self._wconn) as conn:
                    conn.executemany(
                        "INSERT INTO bt_manifests(round, owner, digest, sample_count, "
                        "num_pieces, total_size, encoded) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(key[0], key[1], m.digest, int(m.sample_count), m.num_pieces,
                          int(m.total_size), encoded) for key, m, encoded in new])
            for key, (m, _) in batch.items():
                self._manifests[key] = m

    def _manifest(self, round: int, owner: int, owner_field: str) -> Manifest:
        m = self._manifests.get((round, owner))
        if m is not None:
            return m
        row = self._rconn.execute("SELECT encoded FROM bt_manifests WHERE round=? AND owner=?",
                                  (round, owner)).fetchone()
        if row is None:
            if self._rconn.execute("SELECT 1 FROM bt_manifests WHERE round=? LIMIT 1",
                                   (round,)).fetchone() is None:
                raise StoreError("round", round, "no manifest for this round")
            raise StoreError(owner_field, owner, f"no manifest for owner {owner} in round {round}")
        m = self._decode(row[0], round, owner)
        self._manifests[(round, owner)] = m
        return m

    @staticmethod
    def _decode(encoded: bytes, round: int, owner: int) -> Manifest:
        try:
            m = Manifest.decode(encoded)
        except BitTorrentError as e:
            raise StoreError("encoded", (round, owner),
                             f"stored manifest does not decode: {e}") from None
        if (m.round, m.owner) != (round, owner):
            raise StoreError("encoded", (round, owner),
                             f"stored manifest is for round {m.round} owner {m.owner}")
        return m

    def get_manifest(self, round: int, owner: int) -> Manifest:
        """The manifest of ``owner`` for ``round``; StoreError("round"/"owner") if unknown."""
        r, o = _uint("round", round), _uint("owner", owner)
        with self._lock:
            self._check_open()
            return self._manifest(r, o, "owner")

    def manifests(self, round: int) -> list[Manifest]:
        """All manifests of a round, in owner order (empty list if none)."""
        r = _uint("round", round)
        with self._lock:
            self._check_open()
            out = []
            for owner, enc in self._rconn.execute(
                    "SELECT owner, encoded FROM bt_manifests WHERE round=? ORDER BY owner",
                    (r,)).fetchall():
                m = self._manifests.get((r, owner))
                if m is None:
                    m = self._manifests[(r, owner)] = self._decode(enc, r, owner)
                out.append(m)
            return out

    def rounds(self) -> list[int]:
        """Rounds with a manifest or a session record, ascending."""
        with self._lock:
            self._check_open()
            return [r for (r,) in self._rconn.execute(
                "SELECT round FROM bt_manifests UNION SELECT round FROM bt_sessions "
                "ORDER BY 1").fetchall()]

    # ------------------------------------------------------------------
    # pieces
    # ------------------------------------------------------------------

    def put_piece(self, round: int, source: int, index: int, holder: int, data: Bytes,
                  sha256: Optional[bytes] = None) -> None:
        """Accept a piece for ``holder`` once it matches ``source``'s manifest.

        Errors, after which nothing is written: unknown ``round`` or
        ``source`` (no manifest) or ``piece_index`` out of range ->
        :class:`StoreError` naming that field; ``sha256`` given and not the
        manifest's, wrong ``size``, or ``data`` whose sha256 differs ->
        :class:`HashMismatch` naming that field; a previous commit failed ->
        ``StoreError("flush")``.  Putting a piece the holder already has is
        a no-op (the first ``received_at`` is kept).  The piece is readable
        at once and committed with its batch (or at :meth:`flush`).
        """
        self._put(round, source, index, holder, data, sha256)

    def _put(self, round: int, source: int, index: int, holder: int, data: Bytes,
             sha256: Optional[bytes]) -> bytes:
        r, s = _uint("round", round), _uint("source", source)
        i, h = _uint("piece_index", index), _uint("holder", holder)
        blob = _as_bytes("data", data)
        with self._lock:
            self._check_open()
            if self._error is not None:
                self.flush()                     # retry; raises if it fails again
            m = self._manifest(r, s, "source")
            if i >= m.num_pieces:
                raise StoreError("piece_index", i,
                                 f"owner {s} has {m.num_pieces} pieces in round {r}")
            want = m.piece_hashes[i]
            known = self._recent.get(want) is blob
        if sha256 is not None and sha256 != want:
            shown = bytes(sha256).hex() if isinstance(sha256, (bytes, bytearray, memoryview)) \
                else sha256
            raise HashMismatch("sha256", shown,
                               f"piece {s}/{i} of round {r}: not the manifest's hash {want.hex()}")
        if len(blob) != m.piece_length(i):
            raise HashMismatch("size", len(blob),
                               f"piece {s}/{i} of round {r} is {m.piece_length(i)} bytes")
        if not known:
            # Outside the lock: hashing 256 KiB releases the GIL, so the
            # committer (and other callers) run meanwhile.
            got = hashlib.sha256(blob).digest()
            if got != want:
                raise HashMismatch("data", got.hex(), f"piece {s}/{i} of round {r}: sha256 is "
                                                      f"not the manifest's {want.hex()}")
        with self._lock:
            self._check_open()
            if (r, s) not in self._manifests:
                self._manifest(r, s, "source")   # cleanup dropped the round meanwhile
            # verified; from here on nothing can fail before the piece is queued
            self._remember(want, blob)
            key = (r, s, i, h)
            if key in self._pending:
                return self._pending_blobs[want][0]
            batch = self._open
            ent = self._pending_blobs.get(want)
            if ent is None:
                self._pending_blobs[want] = [blob, 1]
                batch.blobs[want] = blob
            else:
                blob = ent[0]
                if want not in batch.blobs:
                    batch.blobs[want] = blob
                    ent[1] += 1
            t = float(self._now())
            batch.rows.append((r, s, i, h, want, len(blob), t))
            self._pending[key] = (want, len(blob), t)
            k3 = (r, s, i)
            self._pending_any[k3] = self._pending_any.get(k3, 0) + 1
            if len(batch.rows) >= self.batch_size:
                self._seal()
                if self._thread is None:
                    # a failure is kept and raised by the next put/flush:
                    # this piece was accepted and stays readable
                    self._drain_inline()
                # back-pressure: bounded memory if the disk is slower than us
                while len(self._sealed) > self.max_inflight and self._error is None:
                    self._cv.wait()
            return blob

    def put_refs(self, round: int, holder: int, keys: Any) -> int:
        """Record that ``holder`` now holds pieces whose bytes are already here.

        ``keys``: ``(source, piece_index)`` pairs.  Each piece's blob must be
        stored already (put by its owner, verified then): only a reference
        row is added, so a simulated holder costs a row, not a copy or a
        hash.  Everything is checked first (manifest known, index in range,
        blob present); on any error nothing is written.  Returns the rows
        added (pieces the holder already had are skipped).
        """
        r, h = _uint("round", round), _uint("holder", holder)
        with self._lock:
            self._check_open()
            self.flush()                          # the owners' blobs are committed
            t = float(self._now())
            rows = []
            for source, index in keys:
                s, i = _uint("source", source), _uint("piece_index", index)
                m = self._manifest(r, s, "source")
                if i >= m.num_pieces:
                    raise StoreError("piece_index", i,
                                     f"owner {s} has {m.num_pieces} pieces in round {r}")
                rows.append((r, s, i, h, m.piece_hashes[i], m.piece_length(i), t))
            if not rows:
                return 0
            c = self._wconn
            try:
                with self._wlock, _Tx(c):
                    before = c.total_changes
                    c.executemany(_INSERT_CHUNK, rows)
                    added = c.total_changes - before
            except sqlite3.IntegrityError as e:
                raise StoreError("keys", len(rows),
                                 f"a piece's bytes are not in the store: {e}") from None
            return added

    def check_piece(self, sha256: bytes, data: Bytes) -> bool:
        """A session's piece check (``SwarmSession(check=store.check_piece)``)
        that this store trusts: hash ``data``; if it matches, remember that
        very object as verified, so the ``put`` of it that follows does not
        hash it again.  (A client hashed every piece it received twice, once
        to verify it and once in ``put``: for FS's CNN its peer-message
        handling took 37 ms of CPU a round with the second hash, 27 without;
        docs/benchmarks.md.)  ``put`` still hashes anything else -- a copy,
        a different object.
        """
        if hashlib.sha256(data).digest() != sha256:
            return False
        if type(data) is bytes:
            with self._lock:
                self._remember(bytes(sha256), data)
        return True

    def _remember(self, sha: bytes, blob: bytes) -> None:
        rec = self._recent
        if rec.get(sha) is not blob:
            rec[sha] = blob
        rec.move_to_end(sha)
        if len(rec) > self._recent_max:
            rec.popitem(last=False)

    def _pending_blob(self, sha: bytes) -> bytes:
        return self._pending_blobs[sha][0]

    def get_piece(self, round: int, source: int, index: int,
                  holder: Optional[int] = None) -> Optional[bytes]:
        """The bytes of a piece held by ``holder`` (by anyone if None), else None."""
        r, s, i, h = _piece_key(round, source, index, holder)
        with self._lock:
            self._check_open()
            if h is None:
                if (r, s, i) in self._pending_any:
                    for (pr, ps, pi, _ph), (sha, _, _) in self._pending.items():
                        if (pr, ps, pi) == (r, s, i):
                            return self._pending_blob(sha)
                row = self._rconn.execute(
                    "SELECT b.data FROM bt_chunks c JOIN bt_blobs b ON b.sha256 = c.sha256 "
                    "WHERE c.round=? AND c.source=? AND c.piece_index=? LIMIT 1",
                    (r, s, i)).fetchone()
            else:
                p = self._pending.get((r, s, i, h))
                if p is not None:
                    return self._pending_blob(p[0])
                row = self._rconn.execute(
                    "SELECT b.data FROM bt_chunks c JOIN bt_blobs b ON b.sha256 = c.sha256 "
                    "WHERE c.round=? AND c.source=? AND c.piece_index=? AND c.holder=?",
                    (r, s, i, h)).fetchone()
            return None if row is None else row[0]

    def has_piece(self, round: int, source: int, index: int,
                  holder: Optional[int] = None) -> bool:
        """True if ``holder`` (anyone, if None) holds the piece."""
        r, s, i, h = _piece_key(round, source, index, holder)
        with self._lock:
            self._check_open()
            if h is None:
                if (r, s, i) in self._pending_any:
                    return True
                row = self._rconn.execute(
                    "SELECT 1 FROM bt_chunks WHERE round=? AND source=? AND piece_index=? LIMIT 1",
                    (r, s, i)).fetchone()
            else:
                if (r, s, i, h) in self._pending:
                    return True
                row = self._rconn.execute(
                    "SELECT 1 FROM bt_chunks WHERE round=? AND source=? AND piece_index=? "
                    "AND holder=?", (r, s, i, h)).fetchone()
            return row is not None

    def held_pieces(self, round: int, holder: int) -> set[tuple[int, int]]:
        """Every (source, piece_index) ``holder`` has in ``round``."""
        r, h = _uint("round", round), _uint("holder", holder)
        with self._lock:
            self._check_open()
            out = set(self._rconn.execute(
                "SELECT source, piece_index FROM bt_chunks WHERE round=? AND holder=?",
                (r, h)).fetchall())
            out.update((s, i) for (pr, s, i, ph) in self._pending if pr == r and ph == h)
            return out

    def holder_view(self, round: int, holder: int, cache_pieces: int = 8) -> "HolderView":
        """A :class:`~fs_bittorrent.core.storage.PieceStorage` for one (round, holder)."""
        return HolderView(self, _uint("round", round), _uint("holder", holder), cache_pieces)

    # ------------------------------------------------------------------
    # sessions
    # ------------------------------------------------------------------

    def _write(self, sql: str, params: Any) -> sqlite3.Cursor:
        """One autocommit statement on the write connection (caller holds _lock)."""
        with self._wlock, self._writing("writing a session record"):
            return self._wconn.execute(sql, params)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """SQLite's failure of a write (a full disk, an I/O error, a lock
        held past the busy timeout) as a ``StoreError`` naming this store's
        file, not a bare ``sqlite3`` error.  The write's transaction was
        rolled back (``_Tx``), so what was stored stays as it was."""
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError("store", self.path, f"{what} failed: {e}") from e

    def begin_session(self, round: int, peer: int, now: Optional[float] = None) -> None:
        """Start the session record of ``peer`` in ``round`` (state ``"running"``).

        Beginning it again restarts it: counters zeroed, error cleared.
        """
        r, p = _uint("round", round), _uint("peer", peer)
        t = float(self._now() if now is None else now)
        with self._lock:
            self._check_open()
            self._write("INSERT OR REPLACE INTO bt_sessions(round, peer, state, started_at, "
                        "finished_at, bytes_up, bytes_down, pieces_received, last_error) "
                        "VALUES (?, ?, 'running', ?, NULL, 0, 0, 0, NULL)", (r, p, t))

    def update_session(self, round: int, peer: int, **fields: Any) -> None:
        """Set any of ``bytes_up``, ``bytes_down``, ``pieces_received``, ``state``, ``last_error``.

        Values are totals, not increments.  An unknown field raises
        StoreError naming it; an unknown session ``StoreError("peer")``.
        """
        r, p = _uint("round", round), _uint("peer", peer)
        values = []
        for name, value in fields.items():
            if name not in SESSION_FIELDS:
                raise StoreError(name, value,
                                 f"unknown session field (known: {', '.join(SESSION_FIELDS)})")
            if name in _SESSION_INT_FIELDS:
                value = _uint(name, value)
            elif name == "state":
                if not isinstance(value, str) or not value:
                    raise StoreError("state", value, "must be a non-empty str")
            elif value is not None and not isinstance(value, str):
                raise StoreError(name, value, "must be a str or None")
            values.append((name, value))
        with self._lock:
            self._check_open()
            if not values:
                self.get_session(r, p)           # still report an unknown session
                return
            cur = self._write("UPDATE bt_sessions SET " + ", ".join(f"{n} = ?" for n, _ in values)
                              + " WHERE round = ? AND peer = ?", [v for _, v in values] + [r, p])
            if cur.rowcount == 0:
                raise StoreError("peer", p, f"no session in round {r}; call begin_session first")

    def finish_session(self, round: int, peer: int, state: str, error: Optional[str] = None,
                       now: Optional[float] = None) -> None:
        """Close a session record with its final ``state`` and error text (if any)."""
        r, p = _uint("round", round), _uint("peer", peer)
        if not isinstance(state, str) or not state:
            raise StoreError("state", state, "must be a non-empty str")
        if error is not None and not isinstance(error, str):
            raise StoreError("error", error, "must be a str or None")
        t = float(self._now() if now is None else now)
        with self._lock:
            self._check_open()
            cur = self._write("UPDATE bt_sessions SET state = ?, last_error = ?, finished_at = ? "
                              "WHERE round = ? AND peer = ?", (state, error, t, r, p))
            if cur.rowcount == 0:
                raise StoreError("peer", p, f"no session in round {r}; call begin_session first")

    def get_session(self, round: int, peer: int) -> dict[str, Any]:
        """The session record as a dict of its columns; StoreError("peer") if none."""
        r, p = _uint("round", round), _uint("peer", peer)
        with self._lock:
            self._check_open()
            row = self._rconn.execute(
                f"SELECT {', '.join(_SESSION_COLUMNS)} FROM bt_sessions WHERE round=? AND peer=?",
                (r, p)).fetchone()
        if row is None:
            raise StoreError("peer", p, f"no session in round {r}")
        return dict(zip(_SESSION_COLUMNS, row))

    # ------------------------------------------------------------------
    # maintenance
    # ------------------------------------------------------------------

    def cleanup(self, keep_rounds: int) -> dict[str, Any]:
        """Forget every round older than the newest ``keep_rounds``; give space back.

        Flushes, then deletes those rounds' chunks, sessions and manifests
        and every blob no chunk references, in one transaction; then returns
        the freed pages to the file system (``PRAGMA incremental_vacuum`` and
        a WAL truncate).  Returns ``{"rounds": [deleted rounds], "chunks",
        "sessions", "manifests", "blobs": rows deleted, "pages_freed"}``.
        """
        if isinstance(keep_rounds, bool) or not isinstance(keep_rounds, int) or keep_rounds < 1:
            raise StoreError("keep_rounds", keep_rounds, "must be an integer >= 1")
        with self._lock:
            self._check_open()
            self.flush()
            dropped = self.rounds()[:-keep_rounds]
            counts: dict[str, Any] = {"rounds": dropped}
            with self._wlock, self._writing("cleanup"):
                # nothing of round <= -1 exists: the blob sweep alone
                cutoff = dropped[-1] if dropped else -1
                counts.update(delete_rounds(self._wconn, "round <= ?", (cutoff,)))
            if dropped:
                self._forget_cached(lambda key: key[0] <= cutoff, counts)
            elif counts["blobs"]:
                self._recent.clear()
            return counts

    def drop_rounds_from(self, first_round: int) -> dict[str, Any]:
        """Forget ``first_round`` and every later round: their chunks,
        sessions and manifests, and every blob no chunk references any more;
        then give the space back (as :meth:`cleanup`, and returning the same
        counts).

        For a file that holds rounds an earlier run wrote (a reused
        ``db_dir``): a run never holds a round later than its current one,
        and :meth:`cleanup` keeps the *newest* rounds, so such rounds, left
        alone, would outlive the run's own and be served as its own."""
        r = _uint("first_round", first_round)
        with self._lock:
            self._check_open()
            self.flush()
            dropped = [x for x in self.rounds() if x >= r]
            counts = self._drop("dropping rounds",
                                lambda: delete_rounds(self._wconn, "round >= ?", (r,)),
                                lambda key: key[0] >= r)
            return {"rounds": dropped, **counts}

    def drop_owner(self, round: int, owner: int) -> dict[str, Any]:
        """Forget ``owner``'s manifest for ``round`` and every holder's copy
        of its pieces (session records stay), and every blob no chunk
        references any more; then give the space back.

        A (round, owner) holds one manifest for good (:meth:`put_manifests`
        refuses a different one, since the stored pieces were verified
        against it); this is the explicit way to replace it, for a slot an
        earlier run left in the file.  Returns rows deleted per kind."""
        r, o = _uint("round", round), _uint("owner", owner)
        with self._lock:
            self._check_open()
            self.flush()
            return self._drop("dropping an owner's round", lambda: delete_rows(self._wconn, [
                ("chunks", "bt_chunks", "round = ? AND source = ?", (r, o)),
                ("manifests", "bt_manifests", "round = ? AND owner = ?", (r, o))]),
                lambda key: key == (r, o))

    def _drop(self, what: str, delete: Callable[[], dict],
              dropped: Callable[[tuple[int, int]], bool]) -> dict[str, Any]:
        """Run ``delete`` on the write connection (SQLite's failures as
        ``StoreError`` naming ``what``), then forget the cached manifests
        ``dropped`` names, also when a step after the deletion failed: it
        may have committed first (caller holds _lock, has flushed)."""
        counts: dict[str, Any] = {}
        try:
            with self._wlock, self._writing(what):
                counts = delete()
        finally:
            self._forget_cached(dropped, counts)
        return counts

    def _forget_cached(self, dropped: Callable[[tuple[int, int]], bool],
                       counts: dict[str, Any]) -> None:
        """After a deletion (or a failed one: forgetting is always safe,
        these are caches of the database): drop the cached manifests of the
        deleted (round, owner) keys and invalidate the holder views' piece
        caches (caller holds _lock)."""
        for key in [k for k in self._manifests if dropped(k)]:
            del self._manifests[key]
        self.generation += 1
        if counts.get("blobs", 1):
            self._recent.clear()

    def stats(self) -> dict[str, Any]:
        """Rows per table, stored vs. logical bytes, pages and file sizes."""
        with self._lock:
            self._check_open()
            c = self._rconn
            out: dict[str, Any] = {}
            for t in ("bt_blobs", "bt_chunks", "bt_sessions", "bt_manifests"):
                out[t] = c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            out["blob_bytes"] = c.execute(
                "SELECT coalesce(sum(size), 0) FROM bt_blobs").fetchone()[0]
            out["chunk_bytes"] = c.execute(
                "SELECT coalesce(sum(size), 0) FROM bt_chunks").fetchone()[0]
            out["pending"] = len(self._pending)
            out["page_size"] = c.execute("PRAGMA page_size").fetchone()[0]
            out["page_count"] = c.execute("PRAGMA page_count").fetchone()[0]
            out["freelist_count"] = c.execute("PRAGMA freelist_count").fetchone()[0]
            out["db_bytes"] = _file_size(self.path)
            out["wal_bytes"] = _file_size(self.path + "-wal")
            return out


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        if et is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class HolderView:
    """The ``PieceStorage`` handed to the session of ``holder`` in ``round``.

    ``put`` verifies against the manifest (hash and size) like
    :meth:`SQLitePieceStore.put_piece` -- without hashing again the very
    object :meth:`SQLitePieceStore.check_piece` just verified.  The view
    keeps the last ``cache_pieces`` pieces it read or stored: a session
    serves one piece as many 16 KiB blocks, and a piece just received is the
    one neighbours ask for next.  Pieces are immutable (content addressed),
    so the cache is only invalidated by :meth:`SQLitePieceStore.cleanup`
    (``generation``).
    """

    def __init__(self, store: SQLitePieceStore, round: int, holder: int,
                 cache_pieces: int = 8) -> None:
        self.store = store
        self.round = round
        self.holder = holder
        self.cache_pieces = _pos_int("cache_pieces", cache_pieces, 0)
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._generation = store.generation
        self.hits = 0
        self.misses = 0

    def _sync(self) -> None:
        if self._generation != self.store.generation:
            self._cache.clear()
            self._generation = self.store.generation

    def _cached(self, key: tuple[int, int]) -> Optional[bytes]:
        self._sync()
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
        return data

    def _keep(self, key: tuple[int, int], data: bytes) -> None:
        if self.cache_pieces == 0:
            return
        self._sync()
        self._cache[key] = data
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_pieces:
            self._cache.popitem(last=False)

    def has(self, source: int, index: int) -> bool:
        if self._cached((source, index)) is not None:
            return True
        return self.store.has_piece(self.round, source, index, self.holder)

    def get(self, source: int, index: int) -> Optional[bytes]:
        key = (source, index)
        data = self._cached(key)
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        data = self.store.get_piece(self.round, source, index, self.holder)
        if data is not None:
            self._keep(key, data)
        return data

    def put(self, source: int, index: int, sha256: bytes, data: Bytes) -> None:
        blob = self.store._put(self.round, source, index, self.holder, data, sha256)
        self._keep((source, index), blob)

    def keys(self) -> set[tuple[int, int]]:
        """Every (source, index) this holder has in this round."""
        return self.store.held_pieces(self.round, self.holder)

    def __len__(self) -> int:
        return len(self.keys())


def delete_rounds(conn: sqlite3.Connection, where: str, params: tuple) -> dict[str, int]:
    """Delete the chunks, sessions and manifests of the rounds ``where``
    selects (an SQL condition on ``round``) and every blob no chunk still
    references, in one transaction; then give the space back and truncate
    the WAL.  Used by :meth:`SQLitePieceStore.cleanup` and by
    ``fs-bittorrent clean``.  Returns rows deleted per kind and pages freed."""
    return delete_rows(conn, [(what, table, where, params) for what, table in (
        ("chunks", "bt_chunks"), ("sessions", "bt_sessions"), ("manifests", "bt_manifests"))])


def delete_rows(conn: sqlite3.Connection,
                deletes: list[tuple[str, str, str, tuple]]) -> dict[str, int]:
    """Run ``DELETE FROM table WHERE where`` for each ``(name, table, where,
    params)`` and delete every blob no chunk still references, in one
    transaction; then give the space back and truncate the WAL.  Returns
    rows deleted per name, ``blobs`` and ``pages_freed``."""
    counts: dict[str, int] = {}
    with _Tx(conn):
        for what, table, where, params in deletes:
            counts[what] = conn.execute(f"DELETE FROM {table} WHERE {where}", params).rowcount
        counts["blobs"] = conn.execute(
            "DELETE FROM bt_blobs WHERE NOT EXISTS "
            "(SELECT 1 FROM bt_chunks c WHERE c.sha256 = bt_blobs.sha256)").rowcount
    counts["pages_freed"] = give_space_back(conn)
    # the file only shrinks once the WAL is checkpointed into it
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return counts


def give_space_back(conn: sqlite3.Connection) -> int:
    """``PRAGMA incremental_vacuum`` in small steps; returns pages released.

    One big incremental_vacuum makes every freed page dirty; once they
    outgrow the page cache they spill into the WAL, so dropping a 1 GiB
    round wrote ~1 GiB of dead pages (measured 5 s).  In steps smaller
    than the cache, each step commits with a truncated file and dead
    pages are never written (measured 0.6-0.9 s per GiB).  Each step is its
    own transaction, so a crash mid-way leaves a valid, smaller file.
    (``executescript``: the sqlite3 module's ``execute`` would step the
    pragma once and free a single page.)
    """
    step = max(1, VACUUM_STEP_BYTES // conn.execute("PRAGMA page_size").fetchone()[0])
    start = free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    while free:
        conn.executescript(f"PRAGMA incremental_vacuum({step});")
        left = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if left >= free:                     # cannot shrink further
            break
        free = left
    return start - free
