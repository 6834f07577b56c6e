"""Bitfields: one bit per piece, high bit of byte 0 is piece 0 (BEP 3)."""
from __future__ import annotations

from itertools import compress, count
from typing import Iterable

from ..errors import BadLength, SpareBitsSet


def bitfield_len(num_pieces: int) -> int:
    return (num_pieces + 7) // 8


# Bit positions set in each byte value, high bit first: decoding visits
# bytes, not bits, and skips the zero ones (a peer's first bitfield holds
# only its own pieces, a few bytes of a 64-peer round's 64).
_SET_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(k for k in range(8) if byte & (0x80 >> k)) for byte in range(256))


def encode_bits(have: Iterable[bool], num_pieces: int) -> bytes:
    out = bytearray(bitfield_len(num_pieces))
    # compress() walks ``have`` in C and yields only the held indices
    for i in compress(count(), have):
        out[i >> 3] |= 0x80 >> (i & 7)
    return bytes(out)


def decode_bits(bits: bytes, num_pieces: int) -> list[int]:
    """Indices set in ``bits``; checks length and spare bits strictly."""
    if len(bits) != bitfield_len(num_pieces):
        raise BadLength("bitfield", len(bits), f"expected {bitfield_len(num_pieces)} bytes "
                        f"for {num_pieces} pieces")
    spare = bitfield_len(num_pieces) * 8 - num_pieces
    if spare and bits[-1] & ((1 << spare) - 1):
        raise SpareBitsSet("bitfield", bits[-1], f"{spare} spare bits must be zero")
    # (the spare bits are zero, so every index found is < num_pieces)
    out: list[int] = []
    for j, byte in enumerate(bits):
        if byte:
            base = j << 3
            out.extend([base + k for k in _SET_BITS[byte]])
    return out
