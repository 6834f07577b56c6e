"""Writer process for the SIGKILL test of the SQLite piece store.

Usage: python store_writer_proc.py DB_PATH SEED [--writer thread|inline]

Writes rounds forever: each round puts two owners' manifests (owner 1
shares half its pieces with owner 0, so blobs are deduplicated), runs
``cleanup(keep_rounds=2)`` (deletes, incremental vacuum, checkpoint), then
puts every piece for several holders with small batches.  After every
explicit ``flush()`` it prints ``committed <round> <n>``: ``n`` chunks of
that round are committed, so the database must still hold at least that
many after the process is killed.  The parent test kills it with SIGKILL
at some point and checks the file; ``replay(seed, round)`` gives it the
pieces of any round back, so it can rejoin that round or the next.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fs_bittorrent.core.manifest import Manifest  # noqa: E402
from fs_bittorrent.store import SQLitePieceStore  # noqa: E402

PIECE = 64 * 1024
N_PIECES = 12
HOLDERS = 3


def manifest_for(owner: int, rnd: int, pieces: list[bytes]) -> Manifest:
    total = sum(len(p) for p in pieces)
    return Manifest(owner=owner, round=rnd, total_size=total, piece_size=PIECE,
                    piece_hashes=tuple(hashlib.sha256(p).digest() for p in pieces),
                    sample_count=1, tensors=())


def round_owners(rng: random.Random) -> dict[int, list[bytes]]:
    """One round's two owners (draws from ``rng``; owner 1 shares the even
    pieces of owner 0, so those blobs are stored once)."""
    p0 = [rng.randbytes(PIECE) for _ in range(N_PIECES - 1)] + [rng.randbytes(PIECE // 3)]
    p1 = [p0[i] if i % 2 == 0 else rng.randbytes(PIECE) for i in range(N_PIECES - 1)]
    p1.append(rng.randbytes(PIECE // 2))
    return {0: p0, 1: p1}


def replay(seed: int, rnd: int) -> dict[int, list[bytes]]:
    """The pieces the writer made in round ``rnd`` (rounds count from 1)."""
    rng = random.Random(seed)
    for _ in range(rnd - 1):
        round_owners(rng)
    return round_owners(rng)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("seed", type=int)
    ap.add_argument("--writer", choices=("thread", "inline"), default="thread")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    store = SQLitePieceStore(args.db, batch_size=5, writer_thread=args.writer == "thread")
    print("open", flush=True)
    rnd = 0
    while True:
        rnd += 1
        owners = round_owners(rng)
        for owner, pieces in owners.items():
            store.put_manifest(manifest_for(owner, rnd, pieces))
        store.cleanup(keep_rounds=2)
        print(f"cleanup {rnd}", flush=True)
        done = 0
        for holder in range(HOLDERS):
            for owner, pieces in owners.items():
                for i, p in enumerate(pieces):
                    # a fresh object each time, as if received from the wire
                    store.put_piece(rnd, owner, i, holder, bytes(bytearray(p)))
                    done += 1
                    if done % 7 == 0:
                        store.flush()
                        print(f"committed {rnd} {done}", flush=True)


if __name__ == "__main__":
    main()
