"""Shared builders for swarm tests: random-byte owners and checking storages."""
from __future__ import annotations

import hashlib
import random
from typing import Optional

from fs_bittorrent.core.manifest import Manifest, TensorSpec
from fs_bittorrent.core.storage import ContentPool, MemoryPieceStorage


def random_owner(owner: int, n_pieces: int, piece_size: int, rnd: int = 0, seed: int = 0,
                 short_last: bool = True) -> tuple[Manifest, list[bytes], bytes]:
    """An owner whose 'model' is random bytes: n_pieces pieces, last one short."""
    cut = piece_size // 3 if short_last and n_pieces else 0
    total = n_pieces * piece_size - cut
    blob = random.Random(seed * 100_003 + owner).randbytes(total)
    pieces = [blob[i:i + piece_size] for i in range(0, total, piece_size)]
    m = Manifest(owner, rnd, total, piece_size, tuple(hashlib.sha256(p).digest() for p in pieces),
                 10 + owner, (TensorSpec("w", "U8", (total,), 0, total),))
    return m, pieces, blob


def random_owners(counts: dict[int, int], piece_size: int, seed: int = 0, rnd: int = 0):
    out, blobs = {}, {}
    for owner, n in counts.items():
        m, pieces, blob = random_owner(owner, n, piece_size, rnd=rnd, seed=seed)
        out[owner] = (m, pieces)
        blobs[owner] = blob
    return out, blobs


class CheckingStorage(MemoryPieceStorage):
    """Records every put whose bytes do not match the swarm's manifest hash.

    The session must never store an unverified byte; this storage does not
    trust it and checks independently against the layout.
    """

    def __init__(self, layout_hashes: dict[tuple[int, int], bytes],
                 pool: Optional[ContentPool] = None) -> None:
        super().__init__(pool, verify=False)
        self.expected = layout_hashes
        self.bad_puts: list[tuple[int, int]] = []

    def put(self, source, index, sha256, data):
        if hashlib.sha256(data).digest() != self.expected[(source, index)]:
            self.bad_puts.append((source, index))
        super().put(source, index, sha256, data)


def expected_hashes(owners) -> dict[tuple[int, int], bytes]:
    return {(o, k): h for o, (m, _) in owners.items() for k, h in enumerate(m.piece_hashes)}


def blob_from_storage(storage, manifest: Manifest) -> bytes:
    """What the storage really holds (bypassing any lying ``get`` override)."""
    getter = MemoryPieceStorage.get if isinstance(storage, MemoryPieceStorage) else type(storage).get
    return b"".join(getter(storage, manifest.owner, k) for k in range(manifest.num_pieces))


def assert_bit_exact(storages, owners, blobs) -> None:
    """Every storage verified every put and holds every owner's exact bytes."""
    for pid, st in storages.items():
        assert st.bad_puts == []
        for owner, (m, _) in owners.items():
            assert blob_from_storage(st, m) == blobs[owner], (pid, owner)
