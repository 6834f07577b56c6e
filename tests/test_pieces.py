"""Serialization, pieces, bit-exact reconstruction, partial coverage."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load as st_load

from fs_bittorrent.core.manifest import DTYPE_SIZES, Manifest, TensorSpec
from fs_bittorrent.core.pieces import (
    TORCH_DTYPES,
    assemble_blob,
    build_manifest,
    covered_byte_ranges,
    make_model_manifest,
    partial_state_dict,
    reconstruct_state_dict,
    serialize_state_dict,
    split_pieces,
    tensor_layout,
    verify_piece,
)
from fs_bittorrent.errors import HashMismatch, ManifestError


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

def cnn_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, bias=False), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10))
    net(torch.randn(2, 3, 8, 8))  # updates BN running stats and num_batches_tracked
    return net.state_dict()


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    f = torch.randn(5, 3, generator=g)
    f[0, 0], f[0, 1], f[0, 2], f[1, 0] = float("nan"), float("inf"), -0.0, -float("inf")
    sd = {
        "f32": f,
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.randint(-2**62, 2**62, (4,), generator=g, dtype=torch.int64),
        "i32": torch.randint(-2**31, 2**31 - 1, (3, 1), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2**15, 2**15 - 1, (5,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 5), generator=g, dtype=torch.uint8),
        "bool": torch.rand(6, generator=g) > 0.5,
        "scalar_f32": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-7, dtype=torch.int64),
        "scalar_bool": torch.tensor(True),
        "empty_f32": torch.zeros(0),
        "empty_2d_i16": torch.zeros(3, 0, dtype=torch.int16),
        "empty_bool": torch.zeros(0, 4, dtype=torch.bool),
        "nan_f16": torch.tensor([float("nan"), -0.0, 65504.0], dtype=torch.float16),
    }
    sd["f32_nan_payload"] = torch.tensor([0x7FC00001, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    return sd


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([[1.5, -2.0], [0.25, 8.0]]), "b": torch.tensor([1, 2, 3], dtype=torch.int16),
            "s": torch.tensor(2.0, dtype=torch.float64), "m": torch.tensor([True, False, True])}


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert raw_bytes(g) == raw_bytes(w), k
        if not (w.is_floating_point() and torch.isnan(w).any()):
            assert torch.equal(g, w), k


def pieces_dict(pieces) -> dict[int, bytes]:
    return dict(enumerate(pieces))


MODELS = {"cnn": cnn_state_dict, "mixed": mixed_state_dict, "tiny": tiny_state_dict}


# ---------------------------------------------------------------------------
# serialization and layout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", sorted(MODELS))
def test_layout_matches_safetensors(model):
    sd = MODELS[model]()
    blob = serialize_state_dict(sd, metadata={"round": "3"})
    layout = tensor_layout(blob)
    assert [t.start for t in layout] == sorted(t.start for t in layout)
    assert {t.name for t in layout} == set(sd)
    header_len = struct.unpack("<Q", blob[:8])[0]
    loaded = st_load(blob)
    for t in layout:
        assert t.start >= 8 + header_len and t.end <= len(blob)
        assert t.dtype in DTYPE_SIZES and TORCH_DTYPES[t.dtype] == sd[t.name].dtype
        assert t.shape == tuple(sd[t.name].shape)
        assert blob[t.start:t.end] == raw_bytes(loaded[t.name]) == raw_bytes(sd[t.name])


def test_serialize_metadata_and_odd_tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {
        "param": torch.nn.Parameter(torch.ones(2, 2)),   # requires grad
        "transposed": base.t(),                          # non-contiguous
        "tied_a": base,
        "tied_b": base,                                  # shares storage (tied weights)
        "slice": base[1],                                # view into the same storage
    }
    blob = serialize_state_dict(sd, metadata={"owner": "4", "note": "hi"})
    with safe_open_bytes(blob) as f:
        assert f.metadata() == {"owner": "4", "note": "hi"}
    m, pieces = build_manifest(blob, owner=4, round=1, sample_count=10, piece_size=13)
    out = reconstruct_state_dict(m, pieces_dict(pieces))
    assert_bit_exact(out, {k: v.detach().contiguous() for k, v in sd.items()})
    assert out["tied_a"].data_ptr() != out["tied_b"].data_ptr()
    assert not out["param"].requires_grad


class safe_open_bytes:
    """safe_open needs a file; write the blob to a temp file."""

    def __init__(self, blob: bytes) -> None:
        import tempfile
        self.tmp = tempfile.NamedTemporaryFile(suffix=".safetensors")
        self.tmp.write(blob)
        self.tmp.flush()

    def __enter__(self):
        self.f = safe_open(self.tmp.name, framework="pt")
        return self.f.__enter__()

    def __exit__(self, *exc):
        self.f.__exit__(*exc)
        self.tmp.close()


@pytest.mark.parametrize("sd, metadata, field", [
    ({1: torch.zeros(1)}, None, "name"),
    ({"__metadata__": torch.zeros(1)}, None, "name"),
    ({"a": [1.0]}, None, "state_dict"),
    ({"a": torch.zeros(2, dtype=torch.complex64)}, None, "dtype"),
    ({"a": torch.zeros(2).to_sparse()}, None, "state_dict"),
    ({"a": torch.zeros(2)}, {"k": 1}, "metadata"),
])
def test_serialize_rejects(sd, metadata, field):
    with pytest.raises(ManifestError) as ei:
        serialize_state_dict(sd, metadata)
    assert ei.value.field == field


def _blob(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if header_len is None else header_len) + h + data


@pytest.mark.parametrize("blob, field", [
    (b"", "header_len"),
    (b"\x00" * 7, "header_len"),
    (_blob(b"{}", header_len=3), "header_len"),
    (_blob(b"{}", header_len=2**64 - 1), "header_len"),
    (_blob(b"{not json"), "safetensors_header"),
    (_blob(b"\xff\xfe"), "safetensors_header"),
    (_blob(b"[1, 2]"), "safetensors_header"),
    (_blob(b"[" * 100000), "safetensors_header"),
    (_blob(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
           b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\x00" * 8), "safetensors_header"),
    (_blob({"a": 5}), "safetensors_header"),
    (_blob({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\x00" * 8), "dtype"),
    (_blob({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4), "dtype"),
    (_blob({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\x00" * 4), "shape"),
    (_blob({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\x00" * 4), "shape"),
    (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\x00" * 4), "data_offsets"),
    (_blob({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\x00" * 4), "data_offsets"),
    (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 4), "end"),
    (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\x00" * 4), "end"),
    (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8), "start"),
])
def test_tensor_layout_rejects(blob, field):
    with pytest.raises(ManifestError) as ei:
        tensor_layout(blob)
    assert ei.value.field == field


def test_tensor_layout_skips_metadata_and_orders_by_start():
    blob = _blob({"__metadata__": {"x": "y"},
                  "z": {"dtype": "I8", "shape": [2], "data_offsets": [0, 2]},
                  "a": {"dtype": "F16", "shape": [], "data_offsets": [2, 4]}}, b"\x01\x02\x03\x04")
    base = len(blob) - 4
    assert tensor_layout(blob) == (TensorSpec("z", "I8", (2,), base, base + 2),
                                   TensorSpec("a", "F16", (), base + 2, base + 4))


# ---------------------------------------------------------------------------
# pieces and bit-exact reconstruction
# ---------------------------------------------------------------------------

def _piece_sizes(total: int) -> dict[str, int]:
    divisor = next(d for d in range(2, total) if total % d == 0)  # blob length is a multiple of 8
    non_divisor = next(d for d in range(97, total) if total % d)
    return {"divides": total // divisor, "small_divides": divisor, "not_divides": non_divisor,
            "equal": total, "larger": total + 1, "huge": 64 * 1024 * 1024}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("kind", ["divides", "small_divides", "not_divides", "equal", "larger", "huge"])
def test_reconstruct_bit_exact(model, kind):
    sd = MODELS[model]()
    blob = serialize_state_dict(sd)
    piece_size = _piece_sizes(len(blob))[kind]
    m, pieces = build_manifest(blob, owner=2, round=5, sample_count=17, piece_size=piece_size)
    assert m.total_size == len(blob) and m.piece_size == piece_size
    assert m.num_pieces == -(-len(blob) // piece_size) == len(pieces)
    assert b"".join(pieces) == blob
    for i, p in enumerate(pieces):
        assert len(p) == m.piece_length(i)
        assert hashlib.sha256(p).digest() == m.piece_hashes[i]
        verify_piece(m, i, p)
    if kind in ("divides", "small_divides", "equal"):
        assert len(pieces[-1]) == piece_size
    if kind == "not_divides":
        assert 0 < len(pieces[-1]) < piece_size
    if kind in ("larger", "huge", "equal"):
        assert len(pieces) == 1
    assert Manifest.decode(m.encode()) == m
    d = pieces_dict(pieces)
    assert assemble_blob(m, d) == blob
    assert_bit_exact(reconstruct_state_dict(m, d), sd)
    # the manifest layout is what reconstruct uses, and it matches safetensors' own loader
    assert_bit_exact(reconstruct_state_dict(m, d), st_load(blob))


def test_one_byte_pieces_tiny_model():
    sd = tiny_state_dict()
    m, pieces = make_model_manifest(sd, owner=0, round=0, sample_count=1, piece_size=1)
    assert m.num_pieces == m.total_size == len(pieces)
    assert all(len(p) == 1 for p in pieces)
    # pieces given as memoryviews / bytearrays work too
    d = {i: (memoryview(p) if i % 2 else bytearray(p)) for i, p in enumerate(pieces)}
    assert_bit_exact(reconstruct_state_dict(m, d), sd)
    values = partial_state_dict(m, d)
    for k, (v, mask) in values.items():
        assert mask.all() and raw_bytes(v) == raw_bytes(sd[k])


def test_empty_state_dict():
    m, pieces = make_model_manifest({}, owner=1, round=1, sample_count=0, piece_size=4)
    assert m.tensors == () and m.num_pieces == len(pieces) >= 1
    assert reconstruct_state_dict(m, pieces_dict(pieces)) == {}
    assert partial_state_dict(m, {}) == {}
    assert covered_byte_ranges(m, []) == {}


def test_zero_byte_manifest():
    m = Manifest(owner=1, round=1, total_size=0, piece_size=4, piece_hashes=(), sample_count=0,
                 tensors=(TensorSpec("e", "F32", (0, 2), 0, 0),))
    out = reconstruct_state_dict(m, {})
    assert out["e"].shape == (0, 2) and out["e"].dtype == torch.float32
    assert assemble_blob(m, {}) == b""


def test_reconstructed_tensors_own_memory():
    sd = tiny_state_dict()
    m, pieces = make_model_manifest(sd, 0, 0, 1, piece_size=5)
    out = reconstruct_state_dict(m, pieces_dict(pieces))
    out["w"].add_(1)   # writable, and independent of the other tensors
    assert_bit_exact({k: v for k, v in out.items() if k != "w"}, {k: v for k, v in sd.items() if k != "w"})


def test_split_pieces():
    assert split_pieces(b"abcdefg", 3) == [b"abc", b"def", b"g"]
    assert split_pieces(b"abcdef", 3) == [b"abc", b"def"]
    assert split_pieces(b"ab", 3) == [b"ab"]
    assert split_pieces(b"", 3) == []
    assert split_pieces(memoryview(b"abcd"), 2) == [b"ab", b"cd"]
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ManifestError):
            split_pieces(b"abc", bad)


def test_build_manifest_rejects_bad_piece_size():
    blob = serialize_state_dict(tiny_state_dict())
    with pytest.raises(ManifestError) as ei:
        build_manifest(blob, 0, 0, 1, piece_size=64 * 1024 * 1024 + 1)
    assert ei.value.field == "piece_size"
    with pytest.raises(ManifestError):
        build_manifest(blob, -1, 0, 1, piece_size=8)


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn():
    sd = cnn_state_dict()
    m, pieces = make_model_manifest(sd, owner=6, round=9, sample_count=50, piece_size=1000)
    return sd, m, pieces


def test_wrong_hash_piece(cnn):
    sd, m, pieces = cnn
    bad = bytearray(pieces[2])
    bad[17] ^= 0x40
    with pytest.raises(HashMismatch) as ei:
        verify_piece(m, 2, bytes(bad))
    assert ei.value.field == "sha256"
    assert "owner 6" in ei.value.reason and "round 9" in ei.value.reason and "piece 2" in ei.value.reason
    d = pieces_dict(pieces)
    d[2] = bytes(bad)
    for fn in (assemble_blob, reconstruct_state_dict, partial_state_dict):
        with pytest.raises(HashMismatch):
            fn(m, d)
    # a piece from another index, or of the wrong length, is rejected too
    with pytest.raises(HashMismatch):
        verify_piece(m, 1, pieces[0])
    with pytest.raises(HashMismatch) as ei:
        verify_piece(m, 0, pieces[0] + b"\x00")
    assert "bytes" in ei.value.reason
    with pytest.raises(HashMismatch):
        verify_piece(m, m.num_pieces - 1, pieces[-1][:-1])


def test_missing_and_out_of_range_pieces(cnn):
    sd, m, pieces = cnn
    d = pieces_dict(pieces)
    del d[1], d[3]
    for fn in (assemble_blob, reconstruct_state_dict):
        with pytest.raises(ManifestError) as ei:
            fn(m, d)
        assert ei.value.field == "missing_pieces" and ei.value.value == [1, 3]
    d = pieces_dict(pieces)
    d[m.num_pieces] = b"x"
    for fn in (assemble_blob, reconstruct_state_dict, partial_state_dict):
        with pytest.raises(ManifestError) as ei:
            fn(m, d)
        assert ei.value.field == "piece_index"
    for bad in ([-1], [m.num_pieces], [0, 10**9]):
        with pytest.raises(ManifestError):
            covered_byte_ranges(m, bad)
    with pytest.raises(ManifestError):
        verify_piece(m, -1, pieces[0])


def test_unsupported_dtype_in_manifest_raises_cleanly(monkeypatch):
    # a manifest may name a dtype this torch build cannot hold: fail with ManifestError
    import fs_bittorrent.core.pieces as P
    monkeypatch.delitem(P.TORCH_DTYPES, "U16")
    blob = _blob({"a": {"dtype": "U16", "shape": [1], "data_offsets": [0, 2]}}, b"\x00" * 2)
    m, pieces = build_manifest(blob, 0, 0, 1, piece_size=4)
    for fn in (reconstruct_state_dict, partial_state_dict):
        with pytest.raises(ManifestError) as ei:
            fn(m, pieces_dict(pieces))
        assert ei.value.field == "dtype"


def test_bool_bytes_are_canonicalised():
    # a hash-valid blob (the owner made it) with a BOOL byte of 2 still decodes to True/False
    blob = _blob({"m": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x00\x02\x01")
    m, pieces = build_manifest(blob, 0, 0, 1, piece_size=3)
    out = reconstruct_state_dict(m, pieces_dict(pieces))["m"]
    assert out.tolist() == [False, True, True] and raw_bytes(out) == b"\x00\x01\x01"


# ---------------------------------------------------------------------------
# coverage and partial decoding
# ---------------------------------------------------------------------------

def reference_partial(blob: bytes, m: Manifest, present: set[int]):
    """Byte-by-byte, element-by-element reference for covered ranges and masks."""
    have = [False] * m.total_size
    for i in present:
        s, e = m.piece_range(i)
        for b in range(s, e):
            have[b] = True
    ranges, masks, values = {}, {}, {}
    for t in m.tensors:
        rs: list[tuple[int, int]] = []
        for b in range(t.start, t.end):
            if have[b]:
                rel = b - t.start
                if rs and rs[-1][1] == rel:
                    rs[-1] = (rs[-1][0], rel + 1)
                else:
                    rs.append((rel, rel + 1))
        ranges[t.name] = rs
        isz = t.itemsize
        mask, val = [], bytearray()
        for e in range(t.numel):
            lo = t.start + e * isz
            full = all(have[lo + j] for j in range(isz))
            mask.append(full)
            val += blob[lo:lo + isz] if full else bytes(isz)
        masks[t.name], values[t.name] = mask, bytes(val)
    return ranges, masks, values


_PARTIAL_CASES = {}


def _partial_case(model: str, piece_size: int):
    key = (model, piece_size)
    if key not in _PARTIAL_CASES:
        sd = MODELS[model]()
        blob = serialize_state_dict(sd)
        m, pieces = build_manifest(blob, 1, 1, 1, piece_size=piece_size)
        _PARTIAL_CASES[key] = (sd, blob, m, pieces)
    return _PARTIAL_CASES[key]


@settings(max_examples=120, deadline=None)
@given(model=st.sampled_from(["mixed", "tiny", "cnn"]),
       piece_size=st.sampled_from([1, 3, 7, 8, 13, 64, 100, 1000]),
       data=st.data())
def test_partial_matches_reference(model, piece_size, data):
    if model == "cnn" and piece_size < 64:
        piece_size *= 64
    sd, blob, m, pieces = _partial_case(model, piece_size)
    present = data.draw(st.sets(st.integers(0, m.num_pieces - 1), max_size=m.num_pieces))
    ranges, masks, values = reference_partial(blob, m, present)

    got_ranges = covered_byte_ranges(m, sorted(present, reverse=True))
    assert got_ranges == ranges
    for name, rs in got_ranges.items():   # merged: sorted, disjoint, non-adjacent
        assert all(a < b for a, b in rs)
        assert all(rs[k][1] < rs[k + 1][0] for k in range(len(rs) - 1))

    part = partial_state_dict(m, {i: pieces[i] for i in present})
    assert list(part) == [t.name for t in m.tensors]
    for t in m.tensors:
        v, mask = part[t.name]
        assert v.dtype == sd[t.name].dtype and v.shape == sd[t.name].shape
        assert mask.dtype == torch.bool and mask.shape == sd[t.name].shape
        assert mask.reshape(-1).tolist() == masks[t.name]
        assert raw_bytes(v) == values[t.name]
        # covered elements are bit-exact copies of the original
        flat_mask = mask.reshape(-1)
        orig = sd[t.name].reshape(-1)
        if flat_mask.any():
            assert raw_bytes(v.reshape(-1)[flat_mask]) == raw_bytes(orig[flat_mask])
    if len(present) == m.num_pieces:
        for t in m.tensors:
            assert part[t.name][1].all()


def test_partial_nothing_present(cnn):
    sd, m, pieces = cnn
    part = partial_state_dict(m, {})
    for name, (v, mask) in part.items():
        assert not mask.any() and not v.any() and v.shape == sd[name].shape
    assert all(r == [] for r in covered_byte_ranges(m, []).values())


def test_covered_ranges_straddling_element():
    # one F32 element split across two pieces is not covered until both are there
    sd = {"x": torch.tensor([1.0, 2.0, 3.0])}
    blob = serialize_state_dict(sd)
    t = tensor_layout(blob)[0]
    piece_size = t.start + 6              # piece 0 ends in the middle of element 1
    m, pieces = build_manifest(blob, 0, 0, 1, piece_size=piece_size)
    assert covered_byte_ranges(m, [0]) == {"x": [(0, 6)]}
    v, mask = partial_state_dict(m, {0: pieces[0]})["x"]
    assert mask.tolist() == [True, False, False] and v.tolist() == [1.0, 0.0, 0.0]
    v, mask = partial_state_dict(m, {1: pieces[1]})["x"]
    assert mask.tolist() == [False, False, True] and v.tolist() == [0.0, 0.0, 3.0]
    assert covered_byte_ranges(m, [0, 1]) == {"x": [(0, 12)]}


def test_large_model_round_trip_fast():
    # ~8 MB: split/hash/reconstruct/partial without per-element work
    sd = {"big": torch.randn(2 * 1024 * 1024), "small": torch.arange(10)}
    m, pieces = make_model_manifest(sd, 0, 0, 1, piece_size=256 * 1024)
    d = pieces_dict(pieces)
    assert_bit_exact(reconstruct_state_dict(m, d), sd)
    half = {i: p for i, p in d.items() if i % 2 == 0}
    v, mask = partial_state_dict(m, half)["big"]
    assert 0.45 < mask.float().mean().item() < 0.55
    assert torch.equal(v[mask], sd["big"][mask]) and not v[~mask].any()
