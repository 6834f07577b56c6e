"""Peer wire messages as plain dataclasses.

The nine BitTorrent messages (BEP 3), plus the handshake, keep-alive and one
extension, ``Credit``, by which a receiver tells a sender how many bytes of
requested blocks it is willing to have outstanding at once.  Encoding and
decoding live in :mod:`fs_bittorrent.core.codec`; this module only defines
shapes so that the session and the codec agree on one vocabulary.

Piece indices are *swarm-global*: the round's manifests, ordered by owner id,
are laid end to end (see :class:`fs_bittorrent.core.layout.SwarmLayout`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

PROTOCOL_NAME = b"FSBitTorrent/1"
SWARM_ID_LEN = 20
AUTH_LEN = 32

# BEP 3 ids; CREDIT is our extension (BEP 10 reserves 20 for extensions).
CHOKE, UNCHOKE, INTERESTED, NOT_INTERESTED, HAVE, BITFIELD, REQUEST, PIECE, CANCEL = range(9)
CREDIT = 20


@dataclass(frozen=True)
class Handshake:
    """First message of every connection.

    ``swarm_id`` binds the connection to one experiment, round and set of
    manifests; ``auth`` is an HMAC over it made with the experiment secret;
    ``credit`` is the number of bytes of requested blocks the sender of this
    handshake accepts in flight towards itself.
    """

    swarm_id: bytes
    peer_id: int
    credit: int
    auth: bytes = b"\x00" * AUTH_LEN
    protocol: bytes = PROTOCOL_NAME
    msg_id: ClassVar[int] = -1


@dataclass(frozen=True)
class KeepAlive:
    msg_id: ClassVar[int] = -2


@dataclass(frozen=True)
class Choke:
    msg_id: ClassVar[int] = CHOKE


@dataclass(frozen=True)
class Unchoke:
    msg_id: ClassVar[int] = UNCHOKE


@dataclass(frozen=True)
class Interested:
    msg_id: ClassVar[int] = INTERESTED


@dataclass(frozen=True)
class NotInterested:
    msg_id: ClassVar[int] = NOT_INTERESTED


@dataclass(frozen=True)
class Have:
    index: int
    msg_id: ClassVar[int] = HAVE


@dataclass(frozen=True)
class Bitfield:
    """Which pieces the sender holds, one bit per piece, high bit first."""

    bits: bytes
    msg_id: ClassVar[int] = BITFIELD


@dataclass(frozen=True, init=False)
class Request:
    index: int
    begin: int
    length: int
    msg_id: ClassVar[int] = REQUEST

    def __init__(self, index: int, begin: int, length: int) -> None:
        # One per block requested: the fields go into the instance dict in
        # one call, not one object.__setattr__ per field as a frozen
        # dataclass's generated __init__ does (about a quarter of the cost).
        self.__dict__.update(index=index, begin=begin, length=length)


@dataclass(frozen=True, eq=False, init=False)
class Piece:
    """One block of a piece.  ``block`` may be a memoryview (zero copy)."""

    index: int
    begin: int
    block: Union[bytes, bytearray, memoryview]
    msg_id: ClassVar[int] = PIECE

    def __init__(self, index: int, begin: int, block: Union[bytes, bytearray, memoryview]) -> None:
        self.__dict__.update(index=index, begin=begin, block=block)  # as Request's

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Piece):
            return NotImplemented
        return (self.index, self.begin, bytes(self.block)) == (
            other.index, other.begin, bytes(other.block))

    def __hash__(self) -> int:
        return hash((self.index, self.begin, memoryview(self.block).nbytes))

    def __repr__(self) -> str:
        return f"Piece(index={self.index}, begin={self.begin}, nbytes={memoryview(self.block).nbytes})"


@dataclass(frozen=True)
class Cancel:
    index: int
    begin: int
    length: int
    msg_id: ClassVar[int] = CANCEL


@dataclass(frozen=True)
class Credit:
    """Receiver-advertised credit: bytes of requested blocks it accepts in flight.

    A session accepts it (it replaces the credit the peer advertised in its
    handshake) but never sends one: this implementation's credit is fixed
    per session."""

    credit: int
    msg_id: ClassVar[int] = CREDIT


Message = Union[Handshake, KeepAlive, Choke, Unchoke, Interested, NotInterested,
                Have, Bitfield, Request, Piece, Cancel, Credit]

MESSAGE_TYPES: dict[int, type] = {
    cls.msg_id: cls for cls in (Choke, Unchoke, Interested, NotInterested, Have,
                                Bitfield, Request, Piece, Cancel, Credit)
}


#: Wire size of every message whose size does not depend on its contents
#: (the simulator looks these up inline, one dict lookup per message).
FIXED_SIZES: dict[type, int] = {
    Request: 4 + 1 + 12, Cancel: 4 + 1 + 12, Have: 4 + 1 + 4, Credit: 4 + 1 + 4,
    KeepAlive: 4, Choke: 5, Unchoke: 5, Interested: 5, NotInterested: 5,
}


def message_size(msg: Message) -> int:
    """Bytes this message takes on the wire (length prefix included).

    The simulator charges bandwidth with this, without encoding anything.
    """
    kind = type(msg)
    size = FIXED_SIZES.get(kind)
    if size is not None:
        return size
    if kind is Piece:
        block = msg.block
        return 4 + 1 + 8 + (block.nbytes if type(block) is memoryview else memoryview(block).nbytes)
    if kind is Bitfield:
        return 4 + 1 + len(msg.bits)
    if kind is Handshake:
        return 1 + len(msg.protocol) + 8 + SWARM_ID_LEN + 4 + 4 + AUTH_LEN
    raise KeyError(kind)
