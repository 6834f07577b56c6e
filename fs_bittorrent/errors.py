"""The project's own error types.

Every error raised on bad input (a malformed frame, a wrong hash, a bad
manifest field, a bad config key, an unknown round) is a ``BitTorrentError``
that names the offending *field* and *value*, so a user reading a log knows
exactly what was wrong, and a caller can catch one type for everything that
came from an untrusted peer.
"""
from __future__ import annotations

from typing import Any


class BitTorrentError(ValueError):
    """Base class: bad input from a peer, a file, a database or a config."""

    def __init__(self, field: str, value: Any, reason: str = "") -> None:
        self.field = field
        self.value = value
        self.reason = reason
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = f"{field}={shown}"
        if reason:
            msg += f": {reason}"
        super().__init__(msg)


class ProtocolError(BitTorrentError):
    """A frame or message that breaks the wire protocol."""


class FrameTooLarge(ProtocolError):
    """A length prefix above the negotiated limit (never allocate it)."""


class UnknownMessageId(ProtocolError):
    """A message id outside the ones this protocol defines."""


class BadLength(ProtocolError):
    """A payload whose length does not fit its message id."""


class PieceIndexOutOfRange(ProtocolError):
    """A have/request/piece/cancel naming a piece the swarm does not have."""


class BlockTooLarge(ProtocolError):
    """A request or piece block larger than the block limit."""


class BadBlockRange(ProtocolError):
    """A block whose begin/length fall outside its piece or off the block grid."""


class SpareBitsSet(ProtocolError):
    """A bitfield with bits set past the last piece."""


class HandshakeRequired(ProtocolError):
    """Any message before the handshake was accepted."""


class HandshakeRefused(ProtocolError):
    """A handshake with the wrong protocol, swarm id, peer id or secret."""


class CreditExceeded(ProtocolError):
    """A peer asked for more outstanding bytes than it advertised it can take."""


class ManifestError(BitTorrentError):
    """A manifest field that is missing, malformed or inconsistent."""


class HashMismatch(BitTorrentError):
    """Bytes whose sha256 differs from the owner's manifest."""


class StoreError(BitTorrentError):
    """The piece store refused an operation (bad key, unknown round, ...)."""


class ConfigError(BitTorrentError):
    """A configuration key or value that is not valid."""
