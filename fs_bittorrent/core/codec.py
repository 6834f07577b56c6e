"""Binary encoding of the peer wire protocol (BEP 3 style, big-endian).

Wire format
-----------
A connection starts with one fixed-size, *unprefixed* handshake::

    <pstrlen u8><pstr = PROTOCOL_NAME><8 reserved bytes><swarm_id 20>
    <peer_id u32><credit u32><auth 32>

after which every message is a length-prefixed frame::

    <len u32><id u8><payload>          (len counts id + payload)
    <len u32 = 0>                      (keep-alive: no id, no payload)

=============== == ================================
message         id payload
=============== == ================================
choke            0 (none)
unchoke          1 (none)
interested       2 (none)
not_interested   3 (none)
have             4 <index u32>
bitfield         5 <bits>  (high bit of byte 0 = piece 0)
request          6 <index u32><begin u32><length u32>
piece            7 <index u32><begin u32><block>
cancel           8 <index u32><begin u32><length u32>
credit          20 <credit u32>
handshake       21 <the 83-byte handshake above, unchanged>
=============== == ================================

Framed handshake (id 21): the opening handshake is sent once per
connection, unprefixed, as its first bytes.  A connection lives on across
rounds; every later handshake on it (the next round's, or a repeat) is that
same 83-byte handshake wrapped in a frame, so the stream never leaves frame
mode.  It decodes to the same :class:`Handshake`; which round a connection
then serves is the host's business (``net/round_dataplane.py``).

Why so strict
-------------
Every byte decoded here comes from an untrusted peer.  The decoder therefore
checks everything it *can* check without knowing piece sizes (which the
session checks, see :class:`~fs_bittorrent.errors.BadBlockRange`): the id is
known, the payload length fits the id, piece indices are in range, block
lengths are within the limit, the bitfield has exactly the right length and
no spare bits.  Each failure raises one specific
:class:`~fs_bittorrent.errors.ProtocolError` subclass naming the field, so
the caller can catch one type, drop the peer, and log something useful.

A length prefix above the limit raises
:class:`~fs_bittorrent.errors.FrameTooLarge` as soon as the four prefix bytes
arrive, so a peer cannot make us buffer (or allocate) 4 GiB.

Copies
------
Blocks are the only large thing on the wire, so the hot path is about them:

* :func:`encode` makes exactly one copy of a block (header and block joined
  into one ``bytes``); :func:`encode_parts` makes none (header + memoryview,
  for ``socket.sendmsg`` / ``writelines``).
* :class:`FrameDecoder` appends received chunks to one ``bytearray`` (one
  copy), and copies each complete frame out once into an immutable ``bytes``;
  ``Piece.block`` is a memoryview into that ``bytes``.  The buffer can then be
  compacted or grown freely without invalidating blocks handed out earlier
  (a live memoryview into a ``bytearray`` would also forbid resizing it).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from ..errors import (
    BadLength,
    BlockTooLarge,
    ConfigError,
    FrameTooLarge,
    HandshakeRefused,
    PieceIndexOutOfRange,
    ProtocolError,
    SpareBitsSet,
    UnknownMessageId,
)
from .messages import (
    AUTH_LEN,
    BITFIELD,
    CANCEL,
    CHOKE,
    CREDIT,
    HAVE,
    INTERESTED,
    NOT_INTERESTED,
    PIECE,
    PROTOCOL_NAME,
    REQUEST,
    SWARM_ID_LEN,
    UNCHOKE,
    Bitfield,
    Cancel,
    Choke,
    Credit,
    Handshake,
    Have,
    Interested,
    KeepAlive,
    Message,
    NotInterested,
    Piece,
    Request,
    Unchoke,
)

__all__ = [
    "DEFAULT_MAX_BLOCK_SIZE",
    "HANDSHAKE_LEN",
    "RESERVED_LEN",
    "WireLimits",
    "FrameDecoder",
    "encode",
    "encode_parts",
    "encode_handshake_frame",
    "HANDSHAKE_FRAME",
    "decode_message",
    "decode_handshake",
]

Buffer = Union[bytes, bytearray, memoryview]

DEFAULT_MAX_BLOCK_SIZE = 128 * 1024
RESERVED_LEN = 8
_PSTRLEN = len(PROTOCOL_NAME)
#: Size in bytes of the (unprefixed) handshake that opens every connection.
HANDSHAKE_LEN = 1 + _PSTRLEN + RESERVED_LEN + SWARM_ID_LEN + 4 + 4 + AUTH_LEN
_U32_MAX = 0xFFFFFFFF

# Precompiled formats: one C call per header, no format parsing per message.
_U32 = struct.Struct(">I")
_HDR = struct.Struct(">IB")            # <len><id>
_HDR_U32 = struct.Struct(">IBI")        # have / credit
_HDR_3U32 = struct.Struct(">IBIII")     # request / cancel
_HDR_PIECE = struct.Struct(">IBII")     # piece header, block follows
_BODY_U32 = struct.Struct(">xI")        # payload after the id byte
_BODY_3U32 = struct.Struct(">xIII")
_BODY_PIECE = struct.Struct(">xII")
_HANDSHAKE = struct.Struct(f">B{_PSTRLEN}s{RESERVED_LEN}x{SWARM_ID_LEN}sII{AUTH_LEN}s")
_HANDSHAKE_TAIL = struct.Struct(f">{SWARM_ID_LEN}sII{AUTH_LEN}s")
assert _HANDSHAKE.size == HANDSHAKE_LEN

#: Message id of a handshake sent on a live connection (framed).
HANDSHAKE_FRAME = 21
_HANDSHAKE_FRAME_LEN = 4 + 1 + HANDSHAKE_LEN   # a whole framed handshake

_PIECE_OVERHEAD = 1 + 8                 # id + index + begin, inside the frame
_BLOCK_REQ_FRAME = 4 + 1 + 12           # a whole request/cancel frame
_KEEPALIVE_FRAME = _U32.pack(0)
_KEEPALIVE = KeepAlive()


# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class WireLimits:
    """What a decoder accepts from a peer.

    ``num_pieces=None`` means piece indices (and bitfield lengths) are not
    checked: that is the state before the handshake has revealed which swarm,
    hence which layout, the connection belongs to.  Tighten the limits with
    :meth:`FrameDecoder.set_limits` once the layout is known.
    """

    num_pieces: Optional[int] = None
    max_block_size: int = DEFAULT_MAX_BLOCK_SIZE

    def __post_init__(self) -> None:
        n = self.num_pieces
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError("num_pieces", n, "must be None or an int >= 0")
        b = self.max_block_size
        if isinstance(b, bool) or not isinstance(b, int) or not 0 < b <= _U32_MAX - 16:
            raise ConfigError("max_block_size", b, "must be an int in 1..2**32-17")

    @property
    def bitfield_len(self) -> Optional[int]:
        """Exact bitfield length in bytes, or None when the layout is unknown."""
        return None if self.num_pieces is None else (self.num_pieces + 7) // 8

    @property
    def max_frame(self) -> int:
        """Largest frame accepted, length prefix included.

        A piece with a full block (``4+1+8+max_block_size``), or, should
        that be smaller, the fixed-size request/cancel frame (17 bytes) or
        framed handshake (88 bytes, for tiny test block sizes), or a bitfield for a swarm so large that it
        outgrows a piece frame.
        """
        largest = max(4 + 1 + 8 + self.max_block_size, _BLOCK_REQ_FRAME, _HANDSHAKE_FRAME_LEN)
        if self.num_pieces is not None:
            largest = max(largest, 4 + 1 + (self.num_pieces + 7) // 8)
        return largest


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------

def _bad_u32(msg: object, names: tuple[str, ...]) -> ProtocolError:
    """Name the first field that does not fit a u32 (slow path after struct.error)."""
    for name in names:
        v = getattr(msg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U32_MAX:
            return ProtocolError(name, v, "must be an int in 0..2**32-1")
    return ProtocolError("msg", msg, "cannot be encoded")  # pragma: no cover


def _byte_view(field: str, data: Buffer) -> memoryview:
    """A flat, byte-format view of ``data`` (a memoryview of floats is fine)."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        if not mv.c_contiguous:
            raise ProtocolError(field, mv.shape, "buffer is not contiguous")
        mv = mv.cast("B")
    elif mv.strides[0] != 1:
        raise ProtocolError(field, mv.strides, "buffer is not contiguous")
    return mv


def _frame_len(n: int) -> int:
    if n > _U32_MAX:
        raise FrameTooLarge("frame_length", n, "does not fit a u32 length prefix")
    return n


def _enc_handshake(m: Handshake) -> bytes:
    """Handshake bytes.  Writes whatever ``protocol`` the message names (any
    1..255 bytes, as BEP 3 allows); :func:`decode_handshake` accepts only ours."""
    proto = bytes(m.protocol)
    if not 0 < len(proto) <= 255:
        raise HandshakeRefused("protocol", proto, "pstr must be 1..255 bytes")
    if len(m.swarm_id) != SWARM_ID_LEN:
        raise BadLength("swarm_id", len(m.swarm_id), f"must be {SWARM_ID_LEN} bytes")
    if len(m.auth) != AUTH_LEN:
        raise BadLength("auth", len(m.auth), f"must be {AUTH_LEN} bytes")
    try:
        tail = _HANDSHAKE_TAIL.pack(bytes(m.swarm_id), m.peer_id, m.credit, bytes(m.auth))
    except struct.error:
        raise _bad_u32(m, ("peer_id", "credit")) from None
    return b"".join((bytes((len(proto),)), proto, bytes(RESERVED_LEN), tail))


def _enc_keepalive(m: KeepAlive) -> bytes:
    return _KEEPALIVE_FRAME


def _enc_bare(m: Message) -> bytes:
    return _HDR.pack(1, m.msg_id)


def _enc_have(m: Have) -> bytes:
    try:
        return _HDR_U32.pack(5, HAVE, m.index)
    except struct.error:
        raise _bad_u32(m, ("index",)) from None


def _enc_credit(m: Credit) -> bytes:
    try:
        return _HDR_U32.pack(5, CREDIT, m.credit)
    except struct.error:
        raise _bad_u32(m, ("credit",)) from None


def _enc_block_req(m: Union[Request, Cancel]) -> bytes:
    try:
        return _HDR_3U32.pack(13, m.msg_id, m.index, m.begin, m.length)
    except struct.error:
        raise _bad_u32(m, ("index", "begin", "length")) from None


def _enc_bitfield(m: Bitfield) -> bytes:
    bits = _byte_view("bits", m.bits)
    return b"".join((_HDR.pack(_frame_len(1 + bits.nbytes), BITFIELD), bits))


def _piece_header(m: Piece) -> tuple[bytes, memoryview]:
    block = _byte_view("block", m.block)
    try:
        hdr = _HDR_PIECE.pack(_frame_len(_PIECE_OVERHEAD + block.nbytes), PIECE,
                              m.index, m.begin)
    except struct.error:
        raise _bad_u32(m, ("index", "begin")) from None
    return hdr, block


def _enc_piece(m: Piece) -> bytes:
    return b"".join(_piece_header(m))   # the one copy of the block


_ENCODERS: dict[type, Callable[[Message], bytes]] = {
    Handshake: _enc_handshake,          # type: ignore[dict-item]
    KeepAlive: _enc_keepalive,          # type: ignore[dict-item]
    Choke: _enc_bare,
    Unchoke: _enc_bare,
    Interested: _enc_bare,
    NotInterested: _enc_bare,
    Have: _enc_have,                    # type: ignore[dict-item]
    Bitfield: _enc_bitfield,            # type: ignore[dict-item]
    Request: _enc_block_req,            # type: ignore[dict-item]
    Piece: _enc_piece,                  # type: ignore[dict-item]
    Cancel: _enc_block_req,             # type: ignore[dict-item]
    Credit: _enc_credit,                # type: ignore[dict-item]
}


def encode(msg: Message) -> bytes:
    """The wire bytes of ``msg`` (length prefix included; handshake unprefixed).

    Integer fields must fit a u32, else :class:`ProtocolError` naming the field.
    Limits are *not* applied here: what is sensible to send is the session's
    business; what is acceptable to receive is :func:`decode_message`'s.
    """
    enc = _ENCODERS.get(type(msg))
    if enc is None:
        raise UnknownMessageId("msg_id", getattr(msg, "msg_id", None),
                               f"cannot encode a {type(msg).__name__}")
    return enc(msg)


def encode_handshake_frame(msg: Handshake) -> bytes:
    """``msg`` as a framed handshake (id 21): what a peer sends instead of
    the unprefixed form on a connection that already carried its opening
    handshake (a new round on a live connection, or a repeat)."""
    body = _enc_handshake(msg)
    return b"".join((_HDR.pack(1 + len(body), HANDSHAKE_FRAME), body))


def encode_parts(msg: Message) -> list[Union[bytes, memoryview]]:
    """``msg`` as a list of buffers whose concatenation is :func:`encode` ``(msg)``.

    For a piece: ``[header, memoryview(block)]`` -- the block is not copied,
    so a ``sendmsg``/``writelines`` sender can go straight from the store's
    buffer to the socket.  Every other message is small: one ``bytes``.
    The caller must not mutate the block until the parts have been sent.
    """
    if type(msg) is Piece:
        hdr, block = _piece_header(msg)
        return [hdr, block]
    return [encode(msg)]


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------

def _check_len(name: str, payload: Buffer, expected: int) -> None:
    if len(payload) != expected:
        raise BadLength("frame_length", len(payload),
                        f"a {name} frame carries {expected} bytes (id included)")


def _check_index(index: int, limits: WireLimits) -> None:
    n = limits.num_pieces
    if n is not None and index >= n:
        raise PieceIndexOutOfRange("index", index, f"swarm has {n} pieces")


def _dec_bare(name: str, cls: type) -> Callable[[Buffer, WireLimits], Message]:
    """Decoder for a message that is its id alone (choke, unchoke, ...)."""
    def decode(p: Buffer, limits: WireLimits) -> Message:
        _check_len(name, p, 1)
        return cls()
    decode.__name__ = f"_dec_{name}"
    return decode


_dec_choke = _dec_bare("choke", Choke)
_dec_unchoke = _dec_bare("unchoke", Unchoke)
_dec_interested = _dec_bare("interested", Interested)
_dec_not_interested = _dec_bare("not_interested", NotInterested)


def _dec_have(p: Buffer, limits: WireLimits) -> Message:
    _check_len("have", p, 5)
    (index,) = _BODY_U32.unpack_from(p)
    _check_index(index, limits)
    return Have(index)


def _dec_credit(p: Buffer, limits: WireLimits) -> Message:
    _check_len("credit", p, 5)
    (credit,) = _BODY_U32.unpack_from(p)
    return Credit(credit)


def _dec_bitfield(p: Buffer, limits: WireLimits) -> Message:
    nbits = len(p) - 1
    expected = limits.bitfield_len
    if expected is None:
        # Layout unknown: only the frame limit bounds it.
        if 4 + len(p) > limits.max_frame:
            raise FrameTooLarge("frame_length", len(p), f"limit is {limits.max_frame - 4}")
    elif nbits != expected:
        raise BadLength("bits", nbits, f"{limits.num_pieces} pieces need {expected} bytes")
    bits = bytes(p[1:])
    if expected:
        spare = (-limits.num_pieces) % 8    # type: ignore[operator]
        if bits[-1] & ((1 << spare) - 1):
            raise SpareBitsSet("bits", bits[-1],
                               f"bits past piece {limits.num_pieces - 1} must be 0")  # type: ignore[operator]
    return Bitfield(bits)


def _dec_handshake_frame(p: Buffer, limits: WireLimits) -> Message:
    _check_len("handshake", p, 1 + HANDSHAKE_LEN)
    return decode_handshake(bytes(p[1:]))


def _dec_block_req(p: Buffer, limits: WireLimits, cls: type, name: str) -> Message:
    _check_len(name, p, 13)
    index, begin, length = _BODY_3U32.unpack_from(p)
    _check_index(index, limits)
    if length == 0:
        raise BadLength("length", 0, f"a {name} for an empty block")
    if length > limits.max_block_size:
        raise BlockTooLarge("length", length, f"limit is {limits.max_block_size}")
    return cls(index, begin, length)


def _dec_request(p: Buffer, limits: WireLimits) -> Message:
    return _dec_block_req(p, limits, Request, "request")


def _dec_cancel(p: Buffer, limits: WireLimits) -> Message:
    return _dec_block_req(p, limits, Cancel, "cancel")


def _dec_piece(p: Buffer, limits: WireLimits) -> Message:
    n = len(p)
    if n < _PIECE_OVERHEAD:
        raise BadLength("frame_length", n, f"a piece frame carries at least {_PIECE_OVERHEAD + 1} bytes")
    size = n - _PIECE_OVERHEAD
    if size == 0:
        raise BadLength("block", 0, "empty block")
    if size > limits.max_block_size:
        raise BlockTooLarge("block", size, f"limit is {limits.max_block_size}")
    index, begin = _BODY_PIECE.unpack_from(p)
    _check_index(index, limits)
    mv = p if isinstance(p, memoryview) else memoryview(p)
    return Piece(index, begin, mv[_PIECE_OVERHEAD:])


_Decoder = Callable[[Buffer, WireLimits], Message]
_DECODERS: list[Optional[_Decoder]] = [None] * 256
for _id, _fn in ((CHOKE, _dec_choke), (UNCHOKE, _dec_unchoke),
                 (INTERESTED, _dec_interested), (NOT_INTERESTED, _dec_not_interested),
                 (HAVE, _dec_have), (BITFIELD, _dec_bitfield), (REQUEST, _dec_request),
                 (PIECE, _dec_piece), (CANCEL, _dec_cancel), (CREDIT, _dec_credit),
                 (HANDSHAKE_FRAME, _dec_handshake_frame)):
    _DECODERS[_id] = _fn
del _id, _fn


def decode_message(payload: Buffer, limits: WireLimits) -> Message:
    """Decode one frame body (everything after the 4-byte length prefix).

    An empty payload is a keep-alive.  ``Piece.block`` is a memoryview into
    ``payload`` (no copy), so ``payload`` must stay unmodified while the block
    is in use -- pass ``bytes`` to be safe.  Raises a
    :class:`~fs_bittorrent.errors.ProtocolError` subclass naming the field:
    ``UnknownMessageId("msg_id")``, ``BadLength("frame_length"|"length"|"block"|"bits")``,
    ``PieceIndexOutOfRange("index")``, ``BlockTooLarge("length"|"block")``,
    ``SpareBitsSet("bits")``, ``FrameTooLarge("frame_length")``.
    """
    if not payload:
        return _KEEPALIVE
    msg_id = payload[0]
    dec = _DECODERS[msg_id]
    if dec is None:
        raise UnknownMessageId("msg_id", msg_id, "not a message id of this protocol")
    return dec(payload, limits)


def decode_handshake(buf: Buffer) -> Handshake:
    """Decode the :data:`HANDSHAKE_LEN`-byte handshake that opens a connection.

    Wrong size -> ``BadLength("handshake")``; another protocol ->
    ``HandshakeRefused("protocol")``.  Reserved bytes are ignored (BEP 3:
    they are for extensions a peer may not know).  Swarm id, peer id and
    auth are only *parsed* here; whether they are acceptable is for the
    session to judge.
    """
    if len(buf) != HANDSHAKE_LEN:
        raise BadLength("handshake", len(buf), f"a handshake is {HANDSHAKE_LEN} bytes")
    _check_protocol_prefix(buf)
    _, pstr, swarm_id, peer_id, credit, auth = _HANDSHAKE.unpack_from(buf)
    return Handshake(swarm_id=swarm_id, peer_id=peer_id, credit=credit, auth=auth,
                     protocol=pstr)


def _check_protocol_prefix(buf: Buffer) -> None:
    """Refuse as soon as the bytes seen so far cannot start our handshake.

    Works on a partial handshake so a stream decoder can drop a peer speaking
    another protocol without waiting for (or buffering) more of its bytes.
    """
    if len(buf) >= 1 and buf[0] != _PSTRLEN:
        raise HandshakeRefused("protocol", buf[0], f"pstrlen must be {_PSTRLEN}")
    seen = bytes(buf[1:1 + _PSTRLEN])
    if seen != PROTOCOL_NAME[:len(seen)]:
        raise HandshakeRefused("protocol", seen, f"expected {PROTOCOL_NAME!r}")


# --------------------------------------------------------------------------
# Stream decoding
# --------------------------------------------------------------------------

class FrameDecoder:
    """Turn a byte stream (chunks as a socket delivers them) into messages.

    Sans-IO: :meth:`feed` what was received, then take :meth:`next_message`
    (or iterate) until it returns None.  A bad frame raises and leaves the
    decoder exactly as it was before the call (same buffered bytes, same
    handshake state); the caller is expected to drop the connection, but may
    inspect :attr:`buffered` first.

    The buffer is one ``bytearray`` plus a read offset; consumed bytes are
    dropped in :meth:`feed` (never in :meth:`next_message`, so an error there
    cannot have moved anything), cheaply, when they are the larger part.
    """

    #: Compact once at least this many consumed bytes sit at the front.
    COMPACT_MIN = 64 * 1024

    def __init__(self, limits: WireLimits, expect_handshake: bool = True) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._pos = 0
        self._handshake_done = not expect_handshake

    # -- state -------------------------------------------------------------
    @property
    def limits(self) -> WireLimits:
        return self._limits

    def set_limits(self, limits: WireLimits) -> None:
        """Replace the limits, e.g. once the handshake has revealed the swarm.

        Applies to every frame not yet returned, including buffered ones.
        """
        self._limits = limits

    @property
    def handshake_done(self) -> bool:
        """True once the handshake was decoded (or none was expected)."""
        return self._handshake_done

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) - self._pos

    # -- input -------------------------------------------------------------
    def feed(self, data: Buffer) -> None:
        """Append received bytes (copied; ``data`` may be reused afterwards)."""
        pos = self._pos
        if pos:
            buf = self._buf
            if pos == len(buf):
                buf.clear()
                self._pos = 0
            elif pos >= self.COMPACT_MIN and 2 * pos >= len(buf):
                del buf[:pos]
                self._pos = 0
        self._buf += data

    # -- output ------------------------------------------------------------
    def next_message(self) -> Optional[Message]:
        """The next complete message, or None if more bytes are needed.

        Raises a :class:`~fs_bittorrent.errors.ProtocolError` subclass on a
        bad frame, without consuming anything.
        """
        if not self._handshake_done:
            return self._next_handshake()
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            return None
        (n,) = _U32.unpack_from(buf, pos)
        if n + 4 > self._limits.max_frame:
            raise FrameTooLarge("frame_length", n, f"limit is {self._limits.max_frame - 4}")
        end = pos + 4 + n
        if avail < 4 + n:
            return None
        if n == 0:
            self._pos = end
            return _KEEPALIVE
        # One copy out of the buffer, into immutable bytes that Piece.block
        # may view for as long as it likes.
        with memoryview(buf) as mv:
            payload = bytes(mv[pos + 4:end])
        msg = decode_message(payload, self._limits)
        self._pos = end
        return msg

    def _next_handshake(self) -> Optional[Handshake]:
        pos = self._pos
        avail = len(self._buf) - pos
        head = bytes(self._buf[pos:pos + min(avail, HANDSHAKE_LEN)])
        _check_protocol_prefix(head)
        if avail < HANDSHAKE_LEN:
            return None
        hs = decode_handshake(head)
        self._pos = pos + HANDSHAKE_LEN
        self._handshake_done = True
        return hs

    def messages(self) -> Iterator[Message]:
        """Yield complete messages until more bytes are needed."""
        while True:
            msg = self.next_message()
            if msg is None:
                return
            yield msg

    def __iter__(self) -> Iterator[Message]:
        return self.messages()
