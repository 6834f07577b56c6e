"""Bitfields: one bit per piece, high bit of byte 0 is piece 0 (BEP 3)."""
from __future__ import annotations

from typing import Iterable

from ..errors import BadLength, SpareBitsSet


def bitfield_len(num_pieces: int) -> int:
    return (num_pieces + 7) // 8


def encode_bits(have: Iterable[bool], num_pieces: int) -> bytes:
    out = bytearray(bitfield_len(num_pieces))
    for i, h in enumerate(have):
        if h:
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
    return [i for i in range(num_pieces) if bits[i >> 3] & (0x80 >> (i & 7))]
