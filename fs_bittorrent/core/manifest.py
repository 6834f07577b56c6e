"""Manifests: the tiny description of one owner's model for one round.

A manifest is all a peer needs to fetch, verify and decode an owner's model:
piece sizes, the sha256 of every piece, the tensor layout inside the
safetensors blob, and the owner's sample count (FedAvg weight).  The server
relays manifests; pieces travel peer to peer and are checked against them.

Encoding (version 1, big-endian)::

    magic "FSBM" | version u8 | owner u32 | round u32 | total_size u64 |
    piece_size u32 | sample_count u64 | n_pieces u32 | n_pieces x sha256[32] |
    n_tensors u32 | per tensor: name_len u16, name utf-8, dtype_len u8,
    dtype ascii, ndim u8, ndim x u64 dims, start u64, end u64

The decoder checks every field and raises :class:`ManifestError` naming it.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property

from ..errors import ManifestError

MANIFEST_MAGIC = b"FSBM"
MANIFEST_VERSION = 1
HASH_LEN = 32
MAX_PIECE_SIZE = 64 * 1024 * 1024
MAX_TENSOR_NAME = 4096
MAX_NDIM = 32

# safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in the serialized blob.

    ``start``/``end`` are absolute byte offsets in the safetensors blob
    (header included), so they map directly onto piece boundaries.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Manifest:
    owner: int
    round: int
    total_size: int
    piece_size: int
    piece_hashes: tuple[bytes, ...]
    sample_count: int
    tensors: tuple[TensorSpec, ...]
    version: int = MANIFEST_VERSION

    @property
    def num_pieces(self) -> int:
        return len(self.piece_hashes)

    def piece_length(self, index: int) -> int:
        """Length of piece ``index``; the last one may be shorter."""
        if not 0 <= index < self.num_pieces:
            raise ManifestError("piece_index", index, f"manifest has {self.num_pieces} pieces")
        if index == self.num_pieces - 1:
            return self.total_size - index * self.piece_size
        return self.piece_size

    def piece_range(self, index: int) -> tuple[int, int]:
        """Absolute [start, end) byte range of piece ``index`` in the blob."""
        start = index * self.piece_size
        return start, start + self.piece_length(index)

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:
        # Encoding validates every field (pure Python, ~1 ms for a CNN's
        # manifest); a frozen manifest encodes the same every time, and a
        # client's round start needs it three times (store, digest, swarm id).
        from .manifest_codec import encode_manifest
        return encode_manifest(self)

    @classmethod
    def decode(cls, data: bytes) -> "Manifest":
        from .manifest_codec import decode_manifest
        m = decode_manifest(data)
        # The encoding is canonical (manifest_codec: encode(decode(b)) == b),
        # so what was decoded is the encoding: a receiver stores and digests
        # the bytes it got instead of encoding them again.
        m.__dict__["_encoded"] = bytes(data)
        return m

    @cached_property
    def digest(self) -> bytes:
        """sha256 of the encoding: what the swarm id commits to."""
        return hashlib.sha256(self.encode()).digest()


def manifests_digest(manifests: "list[Manifest] | tuple[Manifest, ...]") -> bytes:
    """One digest over a round's manifests, in owner order."""
    h = hashlib.sha256()
    for m in sorted(manifests, key=lambda m: m.owner):
        h.update(struct.pack(">I", m.owner))
        h.update(m.digest)
    return h.digest()
