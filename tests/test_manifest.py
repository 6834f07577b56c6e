"""Manifest encoding: round trips, every decoder error, fuzzing."""
from __future__ import annotations

import hashlib
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_bittorrent.core.manifest import (
    DTYPE_SIZES,
    MANIFEST_MAGIC,
    MAX_NDIM,
    MAX_PIECE_SIZE,
    MAX_TENSOR_NAME,
    Manifest,
    TensorSpec,
)
from fs_bittorrent.core.manifest_codec import decode_manifest, encode_manifest, validate_manifest
from fs_bittorrent.errors import BitTorrentError, ManifestError

U32 = 2**32 - 1
U64 = 2**64 - 1


def fake_hashes(n: int, seed: int = 0) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(b"%d/%d" % (seed, i)).digest() for i in range(n))


def make_manifest(tensors=(), total_size=None, piece_size=16, **kw) -> Manifest:
    tensors = tuple(tensors)
    if total_size is None:
        total_size = max([t.end for t in tensors], default=0) + 5
    n = -(-total_size // piece_size)
    fields = dict(owner=3, round=7, total_size=total_size, piece_size=piece_size,
                  piece_hashes=fake_hashes(n), sample_count=100, tensors=tensors)
    fields.update(kw)
    return Manifest(**fields)


def spec(name, dtype, shape, start):
    n = 1
    for d in shape:
        n *= d
    return TensorSpec(name, dtype, tuple(shape), start, start + n * DTYPE_SIZES[dtype])


def raw_encode(*, magic=MANIFEST_MAGIC, version=1, owner=1, round=2, total_size=40,
               piece_size=16, sample_count=9, n_pieces=None, hashes=None, n_tensors=None,
               tensors=((b"w", b"F32", (2, 3), 8, 32),), trailing=b"") -> bytes:
    """An encoding with no validation at all, to craft bad inputs."""
    if n_pieces is None:
        n_pieces = -(-total_size // piece_size) if piece_size else 0
    if hashes is None:
        hashes = b"".join(fake_hashes(n_pieces))
    out = [magic, struct.pack(">BIIQIQI", version, owner, round, total_size, piece_size,
                              sample_count, n_pieces), hashes,
           struct.pack(">I", len(tensors) if n_tensors is None else n_tensors)]
    for name, dtype, dims, start, end in tensors:
        out += [struct.pack(">H", len(name)), name, struct.pack(">B", len(dtype)), dtype,
                struct.pack(">B", len(dims)), struct.pack(f">{len(dims)}Q", *dims),
                struct.pack(">QQ", start, end)]
    out.append(trailing)
    return b"".join(out)


def field_of(data: bytes) -> str:
    with pytest.raises(ManifestError) as ei:
        decode_manifest(data)
    return ei.value.field


# ---------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------

@st.composite
def manifests(draw) -> Manifest:
    names = draw(st.lists(st.text(max_size=12), max_size=6, unique=True))
    specs = []
    pos = draw(st.integers(0, 40))
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))  # () = 0-dim
        specs.append(spec(name, dtype, shape, pos))
        pos = specs[-1].end + draw(st.integers(0, 9))
    specs = draw(st.permutations(specs))
    total = pos + draw(st.integers(0, 50))
    piece_size = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 2**18, MAX_PIECE_SIZE])))
    n = -(-total // piece_size)
    return Manifest(owner=draw(st.integers(0, U32)), round=draw(st.integers(0, U32)),
                    total_size=total, piece_size=piece_size,
                    piece_hashes=fake_hashes(n, draw(st.integers(0, 9))),
                    sample_count=draw(st.integers(0, U64)), tensors=tuple(specs))


@settings(max_examples=150, deadline=None)
@given(manifests())
def test_round_trip(m):
    data = encode_manifest(m)
    assert data[:4] == MANIFEST_MAGIC and data[4] == 1
    back = decode_manifest(data)
    assert back == m
    assert Manifest.decode(m.encode()) == m
    assert encode_manifest(back) == data          # canonical
    assert back.digest == m.digest == hashlib.sha256(data).digest()


def test_round_trip_edge_tensors():
    ts = (spec("scalar", "F32", (), 10), spec("empty", "I64", (0, 3), 14), spec("empty2", "BOOL", (0,), 14),
          spec("ünï/çødé", "BF16", (2, 1), 14), spec("", "U8", (1,), 18))
    m = make_manifest(ts, total_size=19, piece_size=4)
    assert decode_manifest(m.encode()) == m


def test_empty_model_zero_bytes():
    m = make_manifest((), total_size=0, piece_size=7)
    assert m.num_pieces == 0
    assert decode_manifest(m.encode()) == m
    assert decode_manifest(raw_encode(total_size=0, tensors=())).num_pieces == 0
    # zero-byte tensors fit in a zero-byte blob, nothing else does
    m2 = make_manifest((spec("e", "F32", (0,), 0),), total_size=0)
    assert decode_manifest(m2.encode()) == m2
    assert field_of(raw_encode(total_size=0, n_pieces=1)) == "n_pieces"
    assert field_of(raw_encode(total_size=0, tensors=((b"w", b"F32", (1,), 0, 4),))) == "end"


def test_max_values_round_trip():
    name = "n" * MAX_TENSOR_NAME
    ts = (TensorSpec(name, "U8", (1,) * MAX_NDIM, 0, 1),)
    m = make_manifest(ts, owner=U32, round=U32, sample_count=U64, piece_size=MAX_PIECE_SIZE,
                      total_size=2 * MAX_PIECE_SIZE + 1)
    assert decode_manifest(m.encode()) == m


def test_accepts_bytearray_and_memoryview():
    data = make_manifest((spec("a", "F16", (3,), 0),)).encode()
    assert decode_manifest(bytearray(data)) == decode_manifest(memoryview(data)) == decode_manifest(data)


# ---------------------------------------------------------------------------
# decoder errors, one per field
# ---------------------------------------------------------------------------

def test_valid_raw_encode_decodes():
    m = decode_manifest(raw_encode())
    assert m.tensors == (TensorSpec("w", "F32", (2, 3), 8, 32),)
    assert m.num_pieces == 3


@pytest.mark.parametrize("data, field", [
    (raw_encode(magic=b"FSBX"), "magic"),
    (raw_encode(magic=b"\x00\x00\x00\x00"), "magic"),
    (b"", "magic"),
    (b"FSB", "magic"),
    (raw_encode(version=0), "version"),
    (raw_encode(version=2), "version"),
    (raw_encode(version=255), "version"),
    (raw_encode(piece_size=0, n_pieces=0), "piece_size"),
    (raw_encode(piece_size=MAX_PIECE_SIZE + 1, n_pieces=1), "piece_size"),
    (raw_encode(n_pieces=2), "n_pieces"),                    # needs 3
    (raw_encode(n_pieces=4), "n_pieces"),
    (raw_encode(total_size=48, n_pieces=4), "n_pieces"),     # exactly 3 when it divides
    (raw_encode(hashes=b"\x00" * (3 * 32 - 1)), "n_tensors"),  # hash bytes shifted: layout breaks
    (raw_encode(n_tensors=2), "n_tensors"),
    (raw_encode(n_tensors=U32), "n_tensors"),
    (raw_encode(tensors=((b"\xff", b"F32", (1,), 0, 4),)), "name"),
    (raw_encode(tensors=((b"\xed\xa0\x80", b"F32", (1,), 0, 4),)), "name"),   # utf-8 surrogate
    (raw_encode(tensors=((b"\xc0\xaf", b"F32", (1,), 0, 4),)), "name"),       # overlong
    (raw_encode(tensors=((b"a" * (MAX_TENSOR_NAME + 1), b"F32", (1,), 0, 4),)), "name_len"),
    (raw_encode(tensors=((b"a", b"F32", (1,), 0, 4), (b"a", b"F32", (1,), 4, 8))), "name"),
    (raw_encode(tensors=((b"a", b"F128", (1,), 0, 4),)), "dtype"),
    (raw_encode(tensors=((b"a", b"f32", (1,), 0, 4),)), "dtype"),
    (raw_encode(tensors=((b"a", b"", (1,), 0, 4),)), "dtype"),
    (raw_encode(tensors=((b"a", b"F3\xff", (1,), 0, 4),)), "dtype"),
    (raw_encode(tensors=((b"a", b"U8", (1,) * (MAX_NDIM + 1), 0, 1),)), "ndim"),
    (raw_encode(tensors=((b"a", b"F32", (1,), 8, 4),)), "start"),            # start > end
    (raw_encode(tensors=((b"a", b"F32", (3,), 32, 44),)), "end"),            # end > total_size
    (raw_encode(tensors=((b"a", b"F32", (3,), 0, 8),)), "end"),              # 8 != 3*4
    (raw_encode(tensors=((b"a", b"F32", (0,), 0, 4),)), "end"),
    (raw_encode(tensors=((b"a", b"F32", (), 0, 8),)), "end"),                # scalar is 4 bytes
    (raw_encode(tensors=((b"a", b"F32", (U64, 2), 0, 8),)), "end"),          # huge numel
    (raw_encode(tensors=((b"a", b"F32", (4,), 0, 16), (b"b", b"F32", (1,), 12, 16))), "start"),
    (raw_encode(tensors=((b"b", b"F32", (1,), 12, 16), (b"a", b"F32", (4,), 0, 16))), "start"),
    (raw_encode(tensors=((b"a", b"F32", (2,), 4, 12), (b"b", b"F32", (4,), 0, 16))), "start"),
    (raw_encode(trailing=b"\x00"), "trailing_bytes"),
    (raw_encode(trailing=b"x" * 100), "trailing_bytes"),
])
def test_decode_errors(data, field):
    assert field_of(data) == field


def test_errors_are_bittorrent_errors_with_value_and_reason():
    with pytest.raises(BitTorrentError) as ei:
        decode_manifest(raw_encode(version=9))
    e = ei.value
    assert isinstance(e, ManifestError) and isinstance(e, ValueError)
    assert e.field == "version" and e.value == 9 and "unsupported" in e.reason


def test_zero_byte_tensors_do_not_overlap():
    ts = ((b"a", b"F32", (4,), 0, 16), (b"e", b"F32", (0,), 8, 8), (b"f", b"I8", (0, 9), 16, 16),
          (b"g", b"I8", (0,), 16, 16))
    m = decode_manifest(raw_encode(tensors=ts))
    assert [t.name for t in m.tensors] == ["a", "e", "f", "g"]
    # adjacent (touching) ranges are fine
    decode_manifest(raw_encode(tensors=((b"a", b"F32", (2,), 0, 8), (b"b", b"F32", (2,), 8, 16))))


def _two_tensor_encoding():
    """Offsets of every tensor field in an encoding with two long-named tensors."""
    t1 = (b"first-" + b"x" * 60, b"F32", (2, 3), 8, 32)
    t2 = (b"second-" + b"y" * 60, b"F8_E4M3", (4,), 32, 36)
    data = raw_encode(tensors=(t1, t2))
    base = len(raw_encode(tensors=(t1,)))  # where t2 starts
    offs = {}
    p = base
    for field, size in [("name_len", 2), ("name", len(t2[0])), ("dtype_len", 1), ("dtype", len(t2[1])),
                        ("ndim", 1), ("shape", 8), ("start", 8), ("end", 8)]:
        offs[field] = (p, size)
        p += size
    assert p == len(data)
    return data, offs


def test_truncation_names_the_field_being_read():
    data = raw_encode()
    header = [("magic", 4), ("version", 1), ("owner", 4), ("round", 4), ("total_size", 8),
              ("piece_size", 4), ("sample_count", 8), ("n_pieces", 4), ("piece_hashes", 3 * 32),
              ("n_tensors", 4)]
    off = 0
    for field, size in header:
        for cut in range(off, off + size):
            assert field_of(data[:cut]) == field, (field, cut)
        off += size
    data, offs = _two_tensor_encoding()
    decode_manifest(data)
    for field, (off, size) in offs.items():
        for cut in range(off, off + size):
            assert field_of(data[:cut]) == field, (field, cut)


def test_every_truncation_raises():
    data = make_manifest((spec("a", "F32", (2,), 0), spec("b", "I64", (), 8))).encode()
    for cut in range(len(data)):
        with pytest.raises(ManifestError):
            decode_manifest(data[:cut])


def test_huge_counts_do_not_allocate():
    # n_pieces consistent with total_size/piece_size, yet only a few bytes present
    data = raw_encode(total_size=U32, piece_size=1, n_pieces=U32, hashes=b"\x00" * 64, tensors=())
    tracemalloc.start()
    try:
        assert field_of(data) == "piece_hashes"
        data2 = raw_encode(n_tensors=U32, tensors=())
        assert field_of(data2) == "n_tensors"
        data3 = raw_encode(tensors=())[:-4] + struct.pack(">IH", 1, MAX_TENSOR_NAME) + b"x" * 30
        assert field_of(data3) == "name"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    # a huge total_size is decoded lazily too: n_pieces is checked against it first
    assert field_of(raw_encode(total_size=U64, piece_size=1, n_pieces=U32, hashes=b"")) == "n_pieces"


def test_rejects_non_bytes():
    with pytest.raises(ManifestError):
        decode_manifest("FSBM")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# encoder validation
# ---------------------------------------------------------------------------

GOOD = (spec("a", "F32", (4,), 0), spec("b", "I8", (3,), 16))


@pytest.mark.parametrize("kw, field", [
    (dict(owner=-1), "owner"),
    (dict(owner=U32 + 1), "owner"),
    (dict(owner=True), "owner"),
    (dict(owner=1.0), "owner"),
    (dict(round=-1), "round"),
    (dict(round=U32 + 1), "round"),
    (dict(sample_count=-5), "sample_count"),
    (dict(sample_count=U64 + 1), "sample_count"),
    (dict(version=2), "version"),
    (dict(total_size=-1, piece_hashes=()), "total_size"),
    (dict(total_size=U64 + 1, piece_hashes=()), "total_size"),
    (dict(piece_size=0), "piece_size"),
    (dict(piece_size=MAX_PIECE_SIZE + 1), "piece_size"),
    (dict(piece_hashes=fake_hashes(1)), "n_pieces"),
    (dict(piece_hashes=fake_hashes(2)[:1] + (b"\x00" * 31,)), "piece_hashes"),
    (dict(piece_hashes=fake_hashes(1) + ("x" * 32,)), "piece_hashes"),
    (dict(piece_hashes=b"\x00" * 64), "piece_hashes"),
    (dict(tensors=GOOD + (spec("a", "I8", (1,), 19),)), "name"),
    (dict(tensors=(spec("a", "F32", (4,), 0), spec("b", "F32", (1,), 12))), "start"),
    (dict(tensors=(TensorSpec("a", "F33", (1,), 0, 4),)), "dtype"),
    (dict(tensors=(TensorSpec("a", 32, (1,), 0, 4),)), "dtype"),
    (dict(tensors=(TensorSpec("a", "F32", (1,), 0, 8),)), "end"),
    (dict(tensors=(TensorSpec("a", "F32", (1,), 30, 34),)), "end"),
    (dict(tensors=(TensorSpec("a", "F32", (1,), 4, 0),)), "start"),
    (dict(tensors=(TensorSpec("a", "F32", (1,), -4, 0),)), "start"),
    (dict(tensors=(TensorSpec("a", "F32", (-1, -1), 0, 4),)), "shape"),
    (dict(tensors=(TensorSpec("a", "F32", [1], 0, 4),)), "shape"),
    (dict(tensors=(TensorSpec("a", "U8", (1,) * (MAX_NDIM + 1), 0, 1),)), "ndim"),
    (dict(tensors=(TensorSpec("\udc80", "F32", (1,), 0, 4),)), "name"),
    (dict(tensors=(TensorSpec("é" * (MAX_TENSOR_NAME // 2 + 1), "F32", (1,), 0, 4),)), "name"),
    (dict(tensors=(TensorSpec(5, "F32", (1,), 0, 4),)), "name"),
    (dict(tensors=("a",)), "tensors"),
])
def test_encode_validates(kw, field):
    fields = dict(owner=3, round=7, total_size=20, piece_size=16, piece_hashes=fake_hashes(2),
                  sample_count=100, tensors=GOOD)
    fields.update(kw)
    m = Manifest(**fields)
    with pytest.raises(ManifestError) as ei:
        encode_manifest(m)
    assert ei.value.field == field
    with pytest.raises(ManifestError):
        validate_manifest(m)


def test_encode_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    m = make_manifest(GOOD, sample_count=np.int64(12), owner=np.uint32(4))
    back = decode_manifest(m.encode())
    assert back.sample_count == 12 and back.owner == 4 and type(back.sample_count) is int


# ---------------------------------------------------------------------------
# fuzzing
# ---------------------------------------------------------------------------

def _decode_or_error(data: bytes) -> None:
    """Decoding either raises ManifestError or yields a valid, canonical manifest."""
    try:
        m = decode_manifest(data)
    except ManifestError:
        return
    validate_manifest(m)
    assert encode_manifest(m) == bytes(data)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    _decode_or_error(data)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_after_magic(data):
    _decode_or_error(MANIFEST_MAGIC + b"\x01" + data)


_SEED = make_manifest((spec("conv.weight", "F32", (2, 3), 0), spec("bn.n", "I64", (), 24),
                       spec("e", "BF16", (0, 2), 32), spec("flag", "BOOL", (3,), 32)),
                      total_size=40, piece_size=8).encode()


@st.composite
def mutations(draw) -> bytes:
    data = bytearray(_SEED)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=600, deadline=None)
@given(mutations())
def test_fuzz_mutations(data):
    _decode_or_error(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(_SEED) * 8 - 1))
def test_fuzz_every_single_bit_flip(bit):
    data = bytearray(_SEED)
    data[bit // 8] ^= 1 << (bit % 8)
    _decode_or_error(bytes(data))


def test_some_mutations_still_decode():
    # flipping a hash bit or the owner yields another valid manifest
    data = bytearray(_SEED)
    data[40] ^= 1
    m = decode_manifest(bytes(data))
    assert m.piece_hashes != decode_manifest(_SEED).piece_hashes


@st.composite
def hostile_counts(draw) -> bytes:
    """A manifest whose length and count fields claim anything (up to their
    maximum) while the bytes behind them are few."""
    tensors = tuple(
        (draw(st.binary(max_size=8)), draw(st.sampled_from([b"F32", b"U8", b"x" * 255])),
         tuple(draw(st.lists(st.integers(0, U64), max_size=4))),
         draw(st.integers(0, U64)), draw(st.integers(0, U64)))
        for _ in range(draw(st.integers(0, 2))))
    data = raw_encode(total_size=draw(st.integers(0, U64)), piece_size=draw(st.integers(0, U32)),
                      n_pieces=draw(st.integers(0, U32)),
                      hashes=draw(st.binary(max_size=100)),
                      n_tensors=draw(st.integers(0, U32)), tensors=tensors)
    # and cut anywhere, or raise a length field inside the tensor table
    cut = draw(st.integers(0, len(data)))
    data = data[:cut]
    if data and draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + b"\xff" + data[i + 1:]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_counts())
def test_fuzz_hostile_counts_allocate_only_what_is_present(data):
    """n_pieces, n_tensors, name_len, dtype_len, ndim, dims and offsets at
    any value: only ManifestError escapes, and the decoder's allocations stay
    within a small multiple of the bytes given (tracemalloc)."""
    tracemalloc.start()
    try:
        try:
            m = decode_manifest(data)
        except ManifestError:
            m = None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 + 8 * len(data), (len(data), peak)
    if m is not None:
        assert encode_manifest(m) == data
