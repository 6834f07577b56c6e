"""Where a session keeps verified pieces: an interface, plus an in-memory one.

The sans-IO session never touches a disk.  It is handed a ``PieceStorage``
bound to one (round, holder); the host chooses the implementation: the
SQLite store (``fs_bittorrent.store``) in real runs, ``MemoryPieceStorage``
in tests and demos.  A session only ever calls ``put`` with bytes whose
sha256 it has already checked against the owner's manifest.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Protocol, Union

from ..errors import HashMismatch  # (at import: put runs once per verified piece)

Bytes = Union[bytes, bytearray, memoryview]


class PieceStorage(Protocol):
    def has(self, source: int, index: int) -> bool:
        """True if the piece ``index`` of owner ``source`` is held."""

    def get(self, source: int, index: int) -> Optional[bytes]:
        """The verified bytes, or None if not held."""

    def put(self, source: int, index: int, sha256: bytes, data: Bytes) -> None:
        """Keep a verified piece.  Implementations may re-check the hash."""


class ContentPool:
    """Content-addressed bytes shared by many in-process holders.

    Simulating 64 clients in one process must not keep 64 copies of every
    piece: each distinct piece is kept once, keyed by its sha256.
    """

    def __init__(self) -> None:
        self._blobs: dict[bytes, bytes] = {}

    def intern(self, sha256: bytes, data: Bytes) -> bytes:
        blob = self._blobs.get(sha256)
        if blob is None:
            blob = bytes(data)
            self._blobs[sha256] = blob
        return blob

    def __len__(self) -> int:
        return len(self._blobs)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self._blobs.values())


class MemoryPieceStorage:
    """In-memory ``PieceStorage`` for one holder; may share a ``ContentPool``."""

    def __init__(self, pool: Optional[ContentPool] = None, verify: bool = True) -> None:
        self.pool = pool if pool is not None else ContentPool()
        self.verify = verify
        self._pieces: dict[tuple[int, int], bytes] = {}

    def has(self, source: int, index: int) -> bool:
        return (source, index) in self._pieces

    def get(self, source: int, index: int) -> Optional[bytes]:
        return self._pieces.get((source, index))

    def put(self, source: int, index: int, sha256: bytes, data: Bytes) -> None:
        if self.verify and hashlib.sha256(data).digest() != sha256:
            raise HashMismatch("sha256", sha256.hex(), f"piece {source}/{index} does not match")
        self._pieces[(source, index)] = self.pool.intern(sha256, data)

    def keys(self) -> set[tuple[int, int]]:
        return set(self._pieces)
