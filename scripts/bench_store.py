"""Benchmark the SQLite piece store: ingest and read throughput of 256 KiB pieces.

Ingest = ``put_piece`` for every (holder, owner, piece) -- manifest lookup,
sha256, size check, batching -- plus the final ``flush``, timed together, so
the figure includes hashing and every commit.  Two scenarios:

* ``distinct``: every holder stores different owners' pieces (no dedup: each
  byte is hashed and written once);
* ``dedup``: every holder stores the *same* owners' pieces, each holder
  receiving its own copy of the bytes (a fresh ``bytes`` object, so every
  put is hashed), as when peers receive a piece over the wire; the store
  writes each blob once.

Each configuration runs with the committer thread and inline (``--writer``).
Then: ``get_piece`` of every stored piece after reopening (OS page cache
warm); 16 ``get`` per piece through a ``holder_view`` as a session serving
16 KiB blocks would (1 miss + 15 LRU hits); and ``cleanup(keep_rounds=1)``
when the next round arrives (delete the whole round, give the space back).

Figures are MiB/s (2**20 bytes), medians over ``--repeat`` fresh databases,
configurations interleaved.  On a shared or freshly booted VM, writing into
never-touched guest memory (new page-cache pages) costs host page faults;
that shows up as sys time and makes single runs vary by +-25 %.

Usage: python scripts/bench_store.py [--total-mib 1024] [--holders 4]
       [--batch 64] [--repeat 3] [--writer both|thread|inline] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fs_bittorrent.core.manifest import Manifest  # noqa: E402
from fs_bittorrent.store import SQLitePieceStore  # noqa: E402

PIECE = 256 * 1024


def make_owner(owner: int, rnd: int, n_pieces: int) -> tuple[Manifest, list[bytes]]:
    pieces = [os.urandom(PIECE) for _ in range(n_pieces)]
    m = Manifest(owner=owner, round=rnd, total_size=PIECE * n_pieces, piece_size=PIECE,
                 piece_hashes=tuple(hashlib.sha256(p).digest() for p in pieces),
                 sample_count=1, tensors=())
    return m, pieces


def run(scenario: str, total_mib: int, holders: int, batch: int, workdir: str,
        writer_thread: bool) -> dict:
    n_total = total_mib * 1024 * 1024 // PIECE
    per_holder = n_total // holders
    owners_per_holder = 4
    pieces_per_owner = per_holder // owners_per_holder
    path = os.path.join(workdir, f"bench_{scenario}.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    # owners: distinct -> a fresh set per holder; dedup -> one set for all
    n_owner_sets = holders if scenario == "distinct" else 1
    owners = [make_owner(o, 1, pieces_per_owner) for o in range(owners_per_holder * n_owner_sets)]
    jobs = []
    for h in range(holders):
        base = h * owners_per_holder if scenario == "distinct" else 0
        for o in range(base, base + owners_per_holder):
            m, pieces = owners[o]
            for i, p in enumerate(pieces):
                # dedup: a private copy per holder so nothing short-circuits the hash
                jobs.append((o, i, h, p if scenario == "distinct" else bytes(bytearray(p))))
    nbytes = len(jobs) * PIECE

    store = SQLitePieceStore(path, batch_size=batch, writer_thread=writer_thread)
    for m, _ in owners:
        store.put_manifest(m)
    t0 = time.perf_counter()
    for o, i, h, p in jobs:
        store.put_piece(1, o, i, h, p)
    store.flush()
    t_ingest = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.close()
    t_close = time.perf_counter() - t0

    store = SQLitePieceStore(path, batch_size=batch)
    t0 = time.perf_counter()
    got = 0
    for o, i, h, _ in jobs:
        got += len(store.get_piece(1, o, i, h))
    t_read = time.perf_counter() - t0
    assert got == nbytes
    # a session serving blocks: 16 reads of every piece through a holder view
    view = store.holder_view(1, 0)
    mine = [(o, i) for (o, i, h, _) in jobs if h == 0]
    t0 = time.perf_counter()
    for o, i in mine:
        for _ in range(16):
            view.get(o, i)
    t_view = time.perf_counter() - t0
    st = store.stats()
    # the next round arrives: dropping this one (1 GiB of blobs) and giving
    # the space back is what cleanup costs per round
    store.put_manifest(make_owner(0, 2, 1)[0])
    t0 = time.perf_counter()
    dropped = store.cleanup(keep_rounds=1)
    t_cleanup = time.perf_counter() - t0
    assert dropped["blobs"] == st["bt_blobs"]
    after = store.stats()
    store.close()
    return {
        "scenario": scenario, "writer": "thread" if writer_thread else "inline",
        "pieces": len(jobs), "mib": nbytes / 2**20,
        "ingest": nbytes / 2**20 / t_ingest, "close_s": t_close,
        "read": nbytes / 2**20 / t_read,
        "view_gets_per_s": 16 * len(mine) / t_view,
        "db_mib": (st["db_bytes"] + st["wal_bytes"]) / 2**20,
        "cleanup_s": t_cleanup,
        "after_cleanup_mib": (after["db_bytes"] + after["wal_bytes"]) / 2**20,
        "blobs": st["bt_blobs"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--holders", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--writer", choices=("thread", "inline", "both"), default="both",
                    help="commit batches on the committer thread, inline, or compare both")
    ap.add_argument("--dir", default=None, help="where the tmp db goes (default: system tmp)")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench_store_", dir=args.dir)
    try:
        h = hashlib.sha256
        blob = os.urandom(PIECE)
        t0 = time.perf_counter()
        for _ in range(2048):
            h(blob).digest()
        sha_mbs = 2048 * PIECE / 2**20 / (time.perf_counter() - t0)
        writers = {"thread": [True], "inline": [False], "both": [True, False]}[args.writer]
        results: dict = {}
        # interleave configurations so slow phases of a shared machine hit all
        for _ in range(args.repeat):
            for scenario in ("distinct", "dedup"):
                for wt in writers:
                    r = run(scenario, args.total_mib, args.holders, args.batch, workdir, wt)
                    results.setdefault((scenario, r["writer"]), []).append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"cpu_count={os.cpu_count()}, Python {platform.python_version()}, "
          f"SQLite {__import__('sqlite3').sqlite_version}")
    print(f"Command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"sha256 alone: {sha_mbs:.0f} MiB/s; piece = 256 KiB; batch = {args.batch}; "
          f"holders = {args.holders}; db dir = {args.dir or tempfile.gettempdir()}")
    print()
    print("| scenario | writer | logical MiB | pieces | blobs stored "
          "| ingest MiB/s (median, [min-max]) | close s | read MiB/s | holder_view gets/s "
          "| db+wal MiB | cleanup s | MiB after cleanup |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for (scenario, writer), runs in results.items():
        ing = [r["ingest"] for r in runs]
        rd = [r["read"] for r in runs]
        r0 = runs[0]
        print(f"| {scenario} | {writer} | {r0['mib']:.0f} | {r0['pieces']} | {r0['blobs']} | "
              f"{statistics.median(ing):.0f} [{min(ing):.0f}-{max(ing):.0f}] | "
              f"{statistics.median(r['close_s'] for r in runs):.2f} | "
              f"{statistics.median(rd):.0f} | "
              f"{statistics.median(r['view_gets_per_s'] for r in runs):.0f} | "
              f"{r0['db_mib']:.0f} | {statistics.median(r['cleanup_s'] for r in runs):.2f} | "
              f"{r0['after_cleanup_mib']:.1f} |")


if __name__ == "__main__":
    main()
