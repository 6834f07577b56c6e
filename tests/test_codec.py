"""Tests of the peer wire codec: round trips, every strict check, fuzzing."""
from __future__ import annotations

import array
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_bittorrent.core.codec import (
    HANDSHAKE_LEN,
    FrameDecoder,
    WireLimits,
    decode_handshake,
    decode_message,
    encode,
    encode_parts,
)
from fs_bittorrent.core.messages import (
    AUTH_LEN,
    MESSAGE_TYPES,
    PROTOCOL_NAME,
    SWARM_ID_LEN,
    Bitfield,
    Cancel,
    Choke,
    Credit,
    Handshake,
    Have,
    Interested,
    KeepAlive,
    NotInterested,
    Piece,
    Request,
    Unchoke,
    message_size,
)
from fs_bittorrent.errors import (
    BadLength,
    BitTorrentError,
    BlockTooLarge,
    ConfigError,
    FrameTooLarge,
    HandshakeRefused,
    PieceIndexOutOfRange,
    ProtocolError,
    SpareBitsSet,
    UnknownMessageId,
)

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

U32_MAX = 2**32 - 1
u32 = st.integers(0, U32_MAX)


def frame(msg_id: int, body: bytes = b"") -> bytes:
    """A frame built by hand from the spec, independent of ``encode``."""
    return struct.pack(">IB", 1 + len(body), msg_id) + body


def handshake_bytes(proto: bytes = PROTOCOL_NAME, reserved: bytes = bytes(8),
                    swarm_id: bytes = b"S" * SWARM_ID_LEN, peer_id: int = 7,
                    credit: int = 1 << 20, auth: bytes = b"A" * AUTH_LEN) -> bytes:
    return (bytes([len(proto)]) + proto + reserved + swarm_id
            + struct.pack(">II", peer_id, credit) + auth)


HS = Handshake(swarm_id=b"S" * SWARM_ID_LEN, peer_id=7, credit=1 << 20, auth=b"A" * AUTH_LEN)


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

limits_st = st.builds(WireLimits, num_pieces=st.integers(1, 3000),
                      max_block_size=st.integers(1, 4096))


def bitfield_st(n: int) -> st.SearchStrategy[Bitfield]:
    def clear_spare(raw: bytes) -> Bitfield:
        b = bytearray(raw)
        spare = (-n) % 8
        if b:
            b[-1] &= (0xFF << spare) & 0xFF
        return Bitfield(bytes(b))
    size = (n + 7) // 8
    return st.binary(min_size=size, max_size=size).map(clear_spare)


def message_st(lim: WireLimits) -> st.SearchStrategy:
    """Any valid non-handshake message under ``lim``."""
    idx = st.integers(0, lim.num_pieces - 1)
    blen = st.integers(1, lim.max_block_size)
    return st.one_of(
        st.just(KeepAlive()), st.just(Choke()), st.just(Unchoke()),
        st.just(Interested()), st.just(NotInterested()),
        st.builds(Have, idx),
        bitfield_st(lim.num_pieces),
        st.builds(Request, idx, u32, blen),
        st.builds(Cancel, idx, u32, blen),
        st.builds(Piece, idx, u32, st.binary(min_size=1, max_size=lim.max_block_size)),
        st.builds(Credit, u32),
    )


handshake_st = st.builds(Handshake, swarm_id=st.binary(min_size=SWARM_ID_LEN, max_size=SWARM_ID_LEN),
                         peer_id=u32, credit=u32,
                         auth=st.binary(min_size=AUTH_LEN, max_size=AUTH_LEN))


@st.composite
def limits_and_messages(draw, max_msgs: int = 12):
    lim = draw(limits_st)
    msgs = draw(st.lists(message_st(lim), max_size=max_msgs))
    return lim, msgs


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def drain(dec: FrameDecoder) -> list:
    return list(dec.messages())


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------

@FAST
@given(limits_and_messages())
def test_roundtrip_encode_decode_message(lm):
    lim, msgs = lm
    for m in msgs:
        wire = encode(m)
        assert len(wire) == message_size(m)
        (n,) = struct.unpack(">I", wire[:4])
        assert n == len(wire) - 4
        if n:
            assert wire[4] == m.msg_id
        assert decode_message(wire[4:], lim) == m
        assert b"".join(encode_parts(m)) == wire


@FAST
@given(handshake_st)
def test_roundtrip_handshake(hs):
    wire = encode(hs)
    assert len(wire) == HANDSHAKE_LEN == message_size(hs)
    assert wire[0] == len(PROTOCOL_NAME) and wire[1:1 + len(PROTOCOL_NAME)] == PROTOCOL_NAME
    assert decode_handshake(wire) == hs
    assert b"".join(encode_parts(hs)) == wire


@FAST
@given(limits_and_messages(), handshake_st, st.lists(st.integers(0, 10**6), max_size=20))
def test_roundtrip_stream_random_chunks(lm, hs, cuts):
    lim, msgs = lm
    stream = encode(hs) + b"".join(encode(m) for m in msgs)
    dec = FrameDecoder(lim)
    got = []
    for chunk in split(stream, cuts):
        dec.feed(chunk)
        got.extend(dec)
    assert got == [hs] + msgs
    assert dec.handshake_done and dec.buffered == 0
    assert dec.next_message() is None


@FAST
@given(limits_and_messages(), st.lists(st.integers(0, 10**6), max_size=20))
def test_stream_without_handshake(lm, cuts):
    lim, msgs = lm
    stream = b"".join(encode(m) for m in msgs)
    dec = FrameDecoder(lim, expect_handshake=False)
    got = []
    for chunk in split(stream, cuts):
        dec.feed(memoryview(chunk))     # any buffer may be fed
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == msgs


def test_stream_byte_by_byte():
    lim = WireLimits(num_pieces=20, max_block_size=64)
    msgs = [HS, Have(3), KeepAlive(), Piece(19, 5, bytes(range(64))), Bitfield(b"\xff\xf0\xa0"),
            Request(0, 64, 64), Credit(99), Cancel(1, 2, 3), Choke()]
    stream = b"".join(encode(m) for m in msgs)
    dec = FrameDecoder(lim)
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got.extend(dec)
        assert dec.buffered == (i + 1) - sum(message_size(m) for m in got)
    assert got == msgs


def test_keepalive_is_empty_payload():
    assert decode_message(b"", WireLimits()) == KeepAlive()
    assert encode(KeepAlive()) == bytes(4)


def test_piece_block_is_view_not_copy():
    payload = encode(Piece(1, 2, b"xyz" * 10))[4:]
    p = decode_message(payload, WireLimits(num_pieces=2))
    assert isinstance(p.block, memoryview)
    assert p.block.obj is payload
    assert bytes(p.block) == b"xyz" * 10


def test_decoded_blocks_survive_compaction_and_growth():
    """Blocks handed out stay valid while the decoder's buffer moves on."""
    size = 16 * 1024
    lim = WireLimits(num_pieces=1000, max_block_size=size)
    dec = FrameDecoder(lim, expect_handshake=False)
    kept = []
    for i in range(200):       # > COMPACT_MIN of consumed bytes, many times
        block = bytes([i % 251]) * size
        wire = encode(Piece(i, i * size, block))
        dec.feed(wire[:100])
        dec.feed(wire[100:] + encode(Have(i))[:3])      # leave a partial frame behind
        p = dec.next_message()
        assert isinstance(p.block, memoryview) and isinstance(p.block.obj, bytes)
        kept.append(p)
        dec.feed(encode(Have(i))[3:])
        assert dec.next_message() == Have(i)
    for i, p in enumerate(kept):
        assert (p.index, p.begin) == (i, i * size)
        assert bytes(p.block) == bytes([i % 251]) * size
    assert dec.buffered == 0


def test_encode_parts_does_not_copy_block():
    block = bytearray(b"q" * 1000)
    parts = encode_parts(Piece(3, 4, block))
    assert len(parts) == 2
    assert isinstance(parts[1], memoryview) and parts[1].obj is block
    assert b"".join(parts) == encode(Piece(3, 4, bytes(block)))
    assert parts[0] == struct.pack(">IBII", 9 + 1000, 7, 3, 4)


def test_encode_accepts_non_byte_memoryviews():
    """A float tensor's buffer is sent as its bytes, not its element count."""
    arr = array.array("d", [1.5, -2.0, 3.25])
    wire = encode(Piece(0, 0, memoryview(arr)))
    assert len(wire) == 4 + 9 + arr.itemsize * len(arr)
    p = decode_message(wire[4:], WireLimits())
    assert bytes(p.block) == arr.tobytes()
    assert b"".join(encode_parts(Piece(0, 0, memoryview(arr)))) == wire
    with pytest.raises(ProtocolError) as e:
        encode(Piece(0, 0, memoryview(b"abcdef")[::2]))
    assert e.value.field == "block"


def test_message_ids_match_spec():
    assert {k: v.__name__ for k, v in MESSAGE_TYPES.items()} == {
        0: "Choke", 1: "Unchoke", 2: "Interested", 3: "NotInterested", 4: "Have",
        5: "Bitfield", 6: "Request", 7: "Piece", 8: "Cancel", 20: "Credit"}
    assert encode(Request(1, 2, 3)) == frame(6, struct.pack(">III", 1, 2, 3))
    assert encode(Cancel(1, 2, 3)) == frame(8, struct.pack(">III", 1, 2, 3))
    assert encode(Credit(5)) == frame(20, struct.pack(">I", 5))
    assert encode(Have(9)) == frame(4, struct.pack(">I", 9))
    assert encode(Bitfield(b"\x80")) == frame(5, b"\x80")
    assert encode(HS) == handshake_bytes()


# --------------------------------------------------------------------------
# Strict checks
# --------------------------------------------------------------------------

LIM = WireLimits(num_pieces=10, max_block_size=64)

BAD = [
    # (frame body, error type, field)
    (bytes([9]), UnknownMessageId, "msg_id"),
    (bytes([19]), UnknownMessageId, "msg_id"),
    (bytes([255, 0, 0]), UnknownMessageId, "msg_id"),
    (frame(0, b"\x00")[4:], BadLength, "frame_length"),
    (frame(1, b"\x00\x00")[4:], BadLength, "frame_length"),
    (frame(2, b"\x00")[4:], BadLength, "frame_length"),
    (frame(3, b"\x00")[4:], BadLength, "frame_length"),
    (frame(4, b"\x00\x00\x01")[4:], BadLength, "frame_length"),
    (frame(4, struct.pack(">IB", 1, 0))[4:], BadLength, "frame_length"),
    (frame(20, b"")[4:], BadLength, "frame_length"),
    (frame(6, struct.pack(">II", 1, 0))[4:], BadLength, "frame_length"),
    (frame(8, struct.pack(">IIII", 1, 0, 1, 1))[4:], BadLength, "frame_length"),
    (frame(7, struct.pack(">I", 1))[4:], BadLength, "frame_length"),
    (frame(4, struct.pack(">I", 10))[4:], PieceIndexOutOfRange, "index"),
    (frame(4, struct.pack(">I", U32_MAX))[4:], PieceIndexOutOfRange, "index"),
    (frame(6, struct.pack(">III", 10, 0, 16))[4:], PieceIndexOutOfRange, "index"),
    (frame(8, struct.pack(">III", 11, 0, 16))[4:], PieceIndexOutOfRange, "index"),
    (frame(7, struct.pack(">II", 10, 0) + b"x")[4:], PieceIndexOutOfRange, "index"),
    (frame(6, struct.pack(">III", 1, 0, 0))[4:], BadLength, "length"),
    (frame(8, struct.pack(">III", 1, 0, 0))[4:], BadLength, "length"),
    (frame(6, struct.pack(">III", 1, 0, 65))[4:], BlockTooLarge, "length"),
    (frame(8, struct.pack(">III", 1, 0, U32_MAX))[4:], BlockTooLarge, "length"),
    (frame(7, struct.pack(">II", 1, 0))[4:], BadLength, "block"),
    (frame(7, struct.pack(">II", 1, 0) + bytes(65))[4:], BlockTooLarge, "block"),
    (frame(5, b"\xff")[4:], BadLength, "bits"),
    (frame(5, b"\xff\xc0\x00")[4:], BadLength, "bits"),
    (frame(5, b"")[4:], BadLength, "bits"),
    (frame(5, b"\xff\xe0")[4:], SpareBitsSet, "bits"),
    (frame(5, b"\x00\x01")[4:], SpareBitsSet, "bits"),
]


BAD_IDS = [f"{i}-{exc.__name__}-{field}" for i, (_, exc, field) in enumerate(BAD)]


@pytest.mark.parametrize("body,exc,field", BAD, ids=BAD_IDS)
def test_decode_message_rejects(body, exc, field):
    with pytest.raises(exc) as e:
        decode_message(body, LIM)
    assert e.value.field == field
    assert isinstance(e.value, ProtocolError)


@pytest.mark.parametrize("body,exc,field", BAD, ids=BAD_IDS)
def test_frame_decoder_rejects_and_keeps_state(body, exc, field):
    if exc is BlockTooLarge and field == "block" and 4 + len(body) > LIM.max_frame:
        # In a stream, an oversized piece is already refused by its prefix
        # (unless it still fits the largest frame, a framed handshake).
        exc, field = FrameTooLarge, "frame_length"
    good = [HS, Have(9), Piece(9, 0, b"z" * 64), Bitfield(b"\xff\xc0"), KeepAlive()]
    bad = struct.pack(">I", len(body)) + body
    after = encode(Choke())
    dec = FrameDecoder(LIM)
    dec.feed(b"".join(encode(m) for m in good) + bad + after)
    got = [dec.next_message() for _ in good]
    assert got == good
    before = dec.buffered
    assert before == len(bad) + len(after)
    for _ in range(2):          # the same error again: nothing was consumed
        with pytest.raises(exc) as e:
            dec.next_message()
        assert e.value.field == field
        assert dec.buffered == before
        assert dec.handshake_done
    # Earlier blocks are untouched by the failure.
    assert bytes(got[2].block) == b"z" * 64


def test_boundary_values_accepted():
    assert decode_message(frame(4, struct.pack(">I", 9))[4:], LIM) == Have(9)
    assert decode_message(frame(6, struct.pack(">III", 9, U32_MAX, 64))[4:], LIM) == Request(9, U32_MAX, 64)
    p = decode_message(frame(7, struct.pack(">II", 9, 0) + bytes(64))[4:], LIM)
    assert p == Piece(9, 0, bytes(64))
    assert decode_message(frame(5, b"\xff\xc0")[4:], LIM) == Bitfield(b"\xff\xc0")
    eight = WireLimits(num_pieces=16)
    assert decode_message(frame(5, b"\xff\xff")[4:], eight) == Bitfield(b"\xff\xff")
    none = WireLimits(num_pieces=0)
    assert decode_message(frame(5)[4:], none) == Bitfield(b"")
    with pytest.raises(PieceIndexOutOfRange):
        decode_message(frame(4, struct.pack(">I", 0))[4:], none)


def test_unknown_layout_skips_index_and_bitfield_checks():
    lim = WireLimits()          # num_pieces=None: before the swarm is known
    assert decode_message(frame(4, struct.pack(">I", U32_MAX))[4:], lim) == Have(U32_MAX)
    assert decode_message(frame(5, b"\xff" * 7)[4:], lim) == Bitfield(b"\xff" * 7)
    too_big = frame(5, bytes(lim.max_frame - 4))[4:]
    with pytest.raises(FrameTooLarge) as e:
        decode_message(too_big, lim)
    assert e.value.field == "frame_length"
    # Block size is still bounded.
    with pytest.raises(BlockTooLarge):
        decode_message(frame(6, struct.pack(">III", 0, 0, lim.max_block_size + 1))[4:], lim)


def test_set_limits_tightens_after_handshake():
    dec = FrameDecoder(WireLimits())
    dec.feed(encode(HS) + encode(Have(500)) + encode(Have(500)))
    assert dec.next_message() == HS
    assert dec.next_message() == Have(500)
    dec.set_limits(WireLimits(num_pieces=100))
    assert dec.limits.num_pieces == 100
    with pytest.raises(PieceIndexOutOfRange) as e:
        dec.next_message()
    assert e.value.field == "index" and e.value.value == 500


# --------------------------------------------------------------------------
# Frame size limit
# --------------------------------------------------------------------------

def test_max_frame_property():
    assert WireLimits(max_block_size=1000).max_frame == 4 + 1 + 8 + 1000
    assert WireLimits().max_frame == 4 + 1 + 8 + 128 * 1024
    # Tiny blocks: a framed handshake (88 bytes) is larger than a piece frame.
    tiny = WireLimits(num_pieces=2, max_block_size=1)
    assert tiny.max_frame == 4 + 1 + HANDSHAKE_LEN > message_size(Request(0, 0, 1))
    dec = FrameDecoder(tiny, expect_handshake=False)
    dec.feed(encode(Request(1, 0, 1)) + encode(Cancel(1, 0, 1)) + encode(Piece(1, 0, b"x")))
    assert list(dec) == [Request(1, 0, 1), Cancel(1, 0, 1), Piece(1, 0, b"x")]
    # A bitfield for a huge swarm may exceed a piece frame; it must still fit.
    big = WireLimits(num_pieces=8 * 200_000, max_block_size=1024)
    assert big.max_frame == 4 + 1 + 200_000
    dec = FrameDecoder(big, expect_handshake=False)
    dec.feed(encode(Bitfield(b"\x01" * 200_000)))
    assert dec.next_message() == Bitfield(b"\x01" * 200_000)


@pytest.mark.parametrize("prefix", [U32_MAX, 2**31, 128 * 1024 + 10])
def test_frame_too_large_raised_on_prefix_alone(prefix):
    dec = FrameDecoder(WireLimits(), expect_handshake=False)
    dec.feed(struct.pack(">I", prefix)[:3])
    assert dec.next_message() is None      # prefix incomplete: nothing to judge yet
    dec.feed(struct.pack(">I", prefix)[3:])
    with pytest.raises(FrameTooLarge) as e:
        dec.next_message()
    assert e.value.field == "frame_length" and e.value.value == prefix
    assert dec.buffered == 4


def test_frame_limit_is_exact():
    lim = WireLimits(num_pieces=4, max_block_size=100)
    ok = encode(Piece(0, 0, bytes(100)))
    assert len(ok) == lim.max_frame
    dec = FrameDecoder(lim, expect_handshake=False)
    dec.feed(ok)
    assert dec.next_message() == Piece(0, 0, bytes(100))
    dec.feed(encode(Piece(0, 0, bytes(101)))[:4])
    with pytest.raises(FrameTooLarge):
        dec.next_message()


# --------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------

def test_handshake_reserved_bytes_are_ignored():
    wire = handshake_bytes(reserved=b"\x01" * 8)
    assert decode_handshake(wire) == HS


@pytest.mark.parametrize("n", [0, 1, HANDSHAKE_LEN - 1, HANDSHAKE_LEN + 1, 200])
def test_decode_handshake_wrong_size(n):
    wire = (handshake_bytes() * 3)[:n]
    with pytest.raises(BadLength) as e:
        decode_handshake(wire)
    assert e.value.field == "handshake" and e.value.value == n


@pytest.mark.parametrize("proto", [b"BitTorrent protocol", b"FSBitTorrent/2", b"fsbittorrent/1",
                                   b"FSBitTorrent/", b"X" * len(PROTOCOL_NAME)])
def test_handshake_foreign_protocol_refused(proto):
    hs = Handshake(swarm_id=HS.swarm_id, peer_id=1, credit=2, auth=HS.auth, protocol=proto)
    wire = encode(hs)       # encode writes what it is told ...
    assert wire[0] == len(proto) and wire[1:1 + len(proto)] == proto
    padded = (wire + bytes(HANDSHAKE_LEN))[:HANDSHAKE_LEN]
    with pytest.raises(HandshakeRefused) as e:      # ... decode accepts only ours
        decode_handshake(padded)
    assert e.value.field == "protocol"
    dec = FrameDecoder(WireLimits())
    dec.feed(wire)
    with pytest.raises(HandshakeRefused) as e:
        dec.next_message()
    assert e.value.field == "protocol"
    assert dec.buffered == len(wire) and not dec.handshake_done


def test_decoder_refuses_wrong_protocol_early():
    """Refused on the first wrong byte, without waiting for a full handshake."""
    dec = FrameDecoder(WireLimits())
    dec.feed(b"\x13")         # BitTorrent's pstrlen
    with pytest.raises(HandshakeRefused):
        dec.next_message()
    dec = FrameDecoder(WireLimits())
    dec.feed(bytes([len(PROTOCOL_NAME)]) + PROTOCOL_NAME[:5])
    assert dec.next_message() is None
    dec.feed(b"!")
    with pytest.raises(HandshakeRefused):
        dec.next_message()
    assert dec.buffered == 7


def test_frames_before_handshake_are_refused():
    dec = FrameDecoder(WireLimits())
    dec.feed(encode(Interested()) + encode(HS))
    with pytest.raises(HandshakeRefused):
        dec.next_message()
    assert not dec.handshake_done


def test_handshake_then_frames_in_one_chunk():
    dec = FrameDecoder(WireLimits(num_pieces=3))
    dec.feed(encode(HS) + encode(Unchoke()) + encode(Have(2))[:-1])
    assert list(dec) == [HS, Unchoke()]
    assert dec.handshake_done and dec.buffered == message_size(Have(2)) - 1


# --------------------------------------------------------------------------
# Encoding errors and config
# --------------------------------------------------------------------------

@pytest.mark.parametrize("msg,field", [
    (Have(-1), "index"), (Have(2**32), "index"), (Credit(2**40), "credit"),
    (Request(0, -5, 1), "begin"), (Cancel(0, 0, 2**32), "length"),
    (Piece(2**32, 0, b"x"), "index"), (Piece(0, -1, b"x"), "begin"),
    (Handshake(b"S" * 20, -1, 0), "peer_id"), (Handshake(b"S" * 20, 0, 2**32), "credit"),
    (Have("3"), "index"),
])
def test_encode_rejects_values_not_fitting_u32(msg, field):
    with pytest.raises(ProtocolError) as e:
        encode(msg)
    assert e.value.field == field


def test_encode_rejects_bad_handshake_fields():
    with pytest.raises(BadLength) as e:
        encode(Handshake(b"short", 1, 1))
    assert e.value.field == "swarm_id"
    with pytest.raises(BadLength) as e:
        encode(Handshake(b"S" * 20, 1, 1, auth=b"x"))
    assert e.value.field == "auth"
    with pytest.raises(HandshakeRefused) as e:
        encode(Handshake(b"S" * 20, 1, 1, protocol=b""))
    assert e.value.field == "protocol"


def test_encode_unknown_type():
    with pytest.raises(UnknownMessageId) as e:
        encode(object())
    assert e.value.field == "msg_id"


@pytest.mark.parametrize("kw,field", [
    ({"num_pieces": -1}, "num_pieces"), ({"num_pieces": 1.5}, "num_pieces"),
    ({"num_pieces": True}, "num_pieces"), ({"max_block_size": 0}, "max_block_size"),
    ({"max_block_size": 2**33}, "max_block_size"), ({"max_block_size": "1"}, "max_block_size"),
])
def test_wire_limits_validated(kw, field):
    with pytest.raises(ConfigError) as e:
        WireLimits(**kw)
    assert e.value.field == field


# --------------------------------------------------------------------------
# Fuzzing: nothing but BitTorrentError escapes
# --------------------------------------------------------------------------

fuzz_limits = st.one_of(st.just(WireLimits()), st.builds(
    WireLimits, num_pieces=st.one_of(st.none(), st.integers(0, 64)),
    max_block_size=st.integers(1, 64)))


def only_protocol_errors(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:      # noqa: BLE001 - the point of the test
        assert isinstance(exc, BitTorrentError), repr(exc)
        return exc


@FUZZ
@given(st.binary(max_size=200), fuzz_limits)
def test_fuzz_decode_message(data, lim):
    only_protocol_errors(decode_message, data, lim)


@FUZZ
@given(st.sampled_from(sorted(MESSAGE_TYPES) + [9, 21, 255]), st.binary(max_size=80), fuzz_limits)
def test_fuzz_decode_message_known_ids(msg_id, body, lim):
    """Random bodies behind real ids reach the per-message checks."""
    out = only_protocol_errors(decode_message, bytes([msg_id]) + body, lim)
    if not isinstance(out, BitTorrentError):
        assert decode_message(encode(out)[4:], lim) == out     # accepted => re-encodable


@FUZZ
@given(st.one_of(st.binary(max_size=120),
                 st.binary(min_size=HANDSHAKE_LEN - 1 - len(PROTOCOL_NAME),
                           max_size=HANDSHAKE_LEN - 1 - len(PROTOCOL_NAME)).map(
                     lambda b: bytes([len(PROTOCOL_NAME)]) + PROTOCOL_NAME + b)))
def test_fuzz_decode_handshake(data):
    out = only_protocol_errors(decode_handshake, data)
    if not isinstance(out, BitTorrentError):
        assert encode(out)[:1 + len(PROTOCOL_NAME)] == data[:1 + len(PROTOCOL_NAME)]


@FUZZ
@given(st.booleans(), st.binary(max_size=400), fuzz_limits,
       st.lists(st.integers(0, 1000), max_size=8))
def test_fuzz_frame_decoder(with_valid_handshake, data, lim, cuts):
    dec = FrameDecoder(lim)
    stream = (encode(HS) if with_valid_handshake else b"") + data
    for chunk in split(stream, cuts):
        dec.feed(chunk)
        while True:
            before = dec.buffered
            out = only_protocol_errors(dec.next_message)
            if isinstance(out, BitTorrentError):
                assert dec.buffered == before
                return
            if out is None:
                break


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_stream(data):
    """Flip bytes of a valid stream: errors are ours, and never lose state."""
    lim = data.draw(limits_st.filter(lambda lim: lim.num_pieces <= 200))
    lim = WireLimits(num_pieces=lim.num_pieces, max_block_size=min(lim.max_block_size, 256))
    msgs = data.draw(st.lists(message_st(lim), max_size=6))
    stream = bytearray(encode(HS) + b"".join(encode(m) for m in msgs))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    dec = FrameDecoder(lim, expect_handshake=data.draw(st.booleans()))
    dec.feed(bytes(stream))
    while True:
        before = dec.buffered
        out = only_protocol_errors(dec.next_message)
        if out is None:
            break
        if isinstance(out, BitTorrentError):
            assert dec.buffered == before
            break


# --------------------------------------------------------------------------
# Hostile length fields: allocation stays bounded by the bytes that arrived
# --------------------------------------------------------------------------

def _traced_peak(fn) -> tuple[object, int]:
    """(result or exception, peak bytes traced while ``fn`` ran)."""
    import tracemalloc
    tracemalloc.start()
    try:
        try:
            out = fn()
        except BitTorrentError as exc:
            out = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


@pytest.mark.parametrize("limits", [WireLimits(), WireLimits(num_pieces=8 * 4_000_000),
                                    WireLimits(num_pieces=3, max_block_size=16)],
                         ids=["default", "huge-bitfield-limit", "tight"])
@pytest.mark.parametrize("prefix", [U32_MAX, 2**31, 2**24 + 3, "max_frame", "max_frame+1"])
def test_hostile_length_prefix_never_allocates_what_it_claims(limits, prefix):
    """A peer announces a frame of up to 4 GiB, then trickles bytes.  A prefix
    over the limit is refused on its four bytes alone; one within the limit
    (up to 4 MB for a swarm with 32 million pieces) is only ever buffered as
    far as its bytes have arrived."""
    n = {"max_frame": limits.max_frame - 4,
         "max_frame+1": limits.max_frame - 3}.get(prefix, prefix)
    junk = (bytes([BITFIELD_ID]) + b"\x00" * 4095)[:min(4096, n - 1)]  # never the whole frame

    def attack():
        dec = FrameDecoder(limits, expect_handshake=False)
        dec.feed(struct.pack(">I", n))
        fed = 4
        for i in range(0, len(junk), 64):
            out = dec.next_message()
            assert out is None        # still waiting for the body it announced
            dec.feed(junk[i:i + 64])
            fed += len(junk[i:i + 64])
            assert dec.buffered == fed
        return dec.next_message()

    out, peak = _traced_peak(attack)
    if n + 4 > limits.max_frame:
        assert isinstance(out, FrameTooLarge) and out.field == "frame_length" and out.value == n
    else:
        assert out is None           # a legal length, still incomplete: no decision yet
    assert peak < 64 * 1024, peak    # a few KiB received, a few KiB used, whatever n says


BITFIELD_ID = 5


@FUZZ
@given(u32, st.binary(max_size=600), fuzz_limits, st.booleans())
def test_fuzz_length_prefixes_allocate_at_most_what_arrived(n, body, lim, handshake_first):
    def attack():
        dec = FrameDecoder(lim, expect_handshake=handshake_first)
        if handshake_first:
            dec.feed(encode(HS))
            assert dec.next_message() == HS
        dec.feed(struct.pack(">I", n) + body)
        while dec.next_message() is not None:
            pass

    out, peak = _traced_peak(attack)
    assert out is None or isinstance(out, BitTorrentError)
    assert peak < 32 * 1024 + 4 * len(body), (n, len(body), peak)


def test_hostile_handshake_prefix_is_refused_before_buffering_a_handshake():
    dec = FrameDecoder(WireLimits())
    out, peak = _traced_peak(lambda: (dec.feed(bytes([255]) + b"\xff" * 20), dec.next_message()))
    assert isinstance(out, HandshakeRefused) and peak < 16 * 1024


def test_framed_handshake_round_trips_and_keeps_the_stream_in_frame_mode():
    """A later handshake on a live connection (next round, or a repeat) is
    the 83-byte handshake in a frame of id 21, between ordinary frames."""
    from fs_bittorrent.core.codec import HANDSHAKE_FRAME, encode_handshake_frame
    framed = encode_handshake_frame(HS)
    assert framed[:5] == struct.pack(">IB", 1 + HANDSHAKE_LEN, HANDSHAKE_FRAME)
    assert framed[5:] == encode(HS)
    dec = FrameDecoder(LIM)
    dec.feed(encode(HS) + encode(Have(1)) + framed + encode(Choke()))
    assert list(dec) == [HS, Have(1), HS, Choke()]
    bad = struct.pack(">IB", HANDSHAKE_LEN, HANDSHAKE_FRAME) + encode(HS)[:-1]
    dec = FrameDecoder(LIM, expect_handshake=False)
    dec.feed(bad)
    with pytest.raises(BadLength) as e:
        dec.next_message()
    assert e.value.field == "frame_length" and dec.buffered == len(bad)
