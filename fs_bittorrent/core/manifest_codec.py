"""Binary encoding of :class:`~fs_bittorrent.core.manifest.Manifest` (version 1).

Layout (big-endian), as specified in :mod:`fs_bittorrent.core.manifest`::

    magic "FSBM" | version u8 | owner u32 | round u32 | total_size u64 |
    piece_size u32 | sample_count u64 | n_pieces u32 | n_pieces x sha256[32] |
    n_tensors u32 | per tensor: name_len u16, name utf-8, dtype_len u8,
    dtype ascii, ndim u8, ndim x u64 dims, start u64, end u64

One set of rules, :func:`validate_manifest`, is enforced by both the encoder
(a ``Manifest`` built in memory with inconsistent fields cannot be encoded)
and the decoder (which applies the same per-field checks as it reads, so the
error names the first bad field, and never allocates more than the bytes
actually present).  Every failure is a :class:`ManifestError` whose
``field`` is one of:

``magic``, ``version``, ``owner``, ``round``, ``total_size``, ``piece_size``,
``sample_count``, ``n_pieces``, ``piece_hashes``, ``n_tensors``,
``tensors`` (not a sequence of TensorSpec), ``name_len``, ``name`` (bad
utf-8, too long, duplicate), ``dtype_len``, ``dtype`` (not ascii, unknown),
``ndim``, ``shape``, ``start`` (start > end, or overlapping a previous
tensor), ``end`` (past total_size, or byte length != numel * itemsize),
``trailing_bytes`` (data after the last tensor).

A truncated encoding raises with the field that was being read when the
data ran out.

Rules and design choices
------------------------
* ``piece_size`` is in ``1..MAX_PIECE_SIZE``; ``total_size >= 0`` and
  ``n_pieces == ceil(total_size / piece_size)`` exactly.
* Empty model: a safetensors blob is never empty (even an empty state dict
  serializes to a 16-byte header), so a real empty model is one piece and no
  tensors.  The degenerate ``total_size == 0`` is nevertheless accepted with
  ``n_pieces == 0`` (that is what ``ceil`` gives); its only possible tensors
  are zero-byte ones at offset 0.  Such a manifest contributes no pieces to
  the swarm.
* Tensor names are non-strict in content (any string, including ``""``) but
  must encode to valid utf-8 of at most ``MAX_TENSOR_NAME`` bytes and be
  unique within a manifest.
* Tensor ranges: ``0 <= start <= end <= total_size``,
  ``end - start == numel * itemsize``, and no two tensors share a byte
  (zero-byte tensors never overlap anything).  Tensors may be listed in any
  order; the order is preserved (it is part of the digest).
* The encoding is canonical: ``encode_manifest(decode_manifest(b)) == b`` for
  every ``b`` that decodes.
"""
from __future__ import annotations

import operator
import struct
from typing import Any, Iterable

from ..errors import ManifestError
from .manifest import (
    DTYPE_SIZES,
    HASH_LEN,
    MANIFEST_MAGIC,
    MANIFEST_VERSION,
    MAX_NDIM,
    MAX_PIECE_SIZE,
    MAX_TENSOR_NAME,
    Manifest,
    TensorSpec,
)

__all__ = [
    "encode_manifest",
    "decode_manifest",
    "validate_manifest",
    "validate_tensor",
    "check_tensor_overlaps",
    "expected_num_pieces",
]

U8_MAX = 0xFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF

_HEAD = struct.Struct(">4sBIIQIQI")   # magic .. n_pieces
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U8 = struct.Struct(">B")
_U64 = struct.Struct(">Q")
_RANGE = struct.Struct(">QQ")
# smallest possible encoded tensor: name_len, 1-char dtype, ndim, start, end
_MIN_TENSOR_LEN = 2 + 1 + 1 + 1 + 16


# ---------------------------------------------------------------------------
# shared field checks
# ---------------------------------------------------------------------------

def _as_int(field: str, value: Any) -> int:
    """``value`` as a plain int (numpy ints accepted; bool and floats not)."""
    if isinstance(value, bool):
        raise ManifestError(field, value, "must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ManifestError(field, value, "must be an integer") from None


def _check_uint(field: str, value: Any, maximum: int) -> int:
    v = _as_int(field, value)
    if not 0 <= v <= maximum:
        raise ManifestError(field, v, f"must be in 0..{maximum}")
    return v


def _check_version(version: Any) -> None:
    v = _as_int("version", version)
    if v != MANIFEST_VERSION:
        raise ManifestError("version", v, f"unsupported manifest version (this build speaks {MANIFEST_VERSION})")


def expected_num_pieces(total_size: int, piece_size: int) -> int:
    """``ceil(total_size / piece_size)``: the piece count a manifest must have."""
    return -(-total_size // piece_size)


def _check_geometry(total_size: Any, piece_size: Any, n_pieces: int) -> tuple[int, int]:
    total = _check_uint("total_size", total_size, U64_MAX)
    ps = _as_int("piece_size", piece_size)
    if not 1 <= ps <= MAX_PIECE_SIZE:
        raise ManifestError("piece_size", ps, f"must be in 1..{MAX_PIECE_SIZE}")
    want = expected_num_pieces(total, ps)
    if n_pieces != want:
        raise ManifestError(
            "n_pieces", n_pieces,
            f"total_size {total} with piece_size {ps} needs ceil({total}/{ps}) = {want} pieces")
    return total, ps


def validate_tensor(t: Any, total_size: int) -> bytes:
    """Check one :class:`TensorSpec` against a blob of ``total_size`` bytes.

    Returns the utf-8 encoded name (what the encoder writes).
    """
    if not isinstance(t, TensorSpec):
        raise ManifestError("tensors", t, "must be a TensorSpec")
    if not isinstance(t.name, str):
        raise ManifestError("name", t.name, "tensor name must be a str")
    try:
        raw = t.name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ManifestError("name", t.name, f"not encodable as utf-8: {e.reason}") from None
    if len(raw) > MAX_TENSOR_NAME:
        raise ManifestError("name", t.name, f"name is {len(raw)} bytes, limit {MAX_TENSOR_NAME}")
    if not isinstance(t.dtype, str) or not t.dtype.isascii():
        raise ManifestError("dtype", t.dtype, f"tensor {t.name!r}: dtype must be an ascii str")
    if t.dtype not in DTYPE_SIZES:
        raise ManifestError("dtype", t.dtype, f"tensor {t.name!r}: unknown dtype (known: {sorted(DTYPE_SIZES)})")
    if not isinstance(t.shape, tuple):
        raise ManifestError("shape", t.shape, f"tensor {t.name!r}: shape must be a tuple")
    if len(t.shape) > MAX_NDIM:
        raise ManifestError("ndim", len(t.shape), f"tensor {t.name!r}: more than {MAX_NDIM} dimensions")
    numel = 1
    for d in t.shape:
        numel *= _check_uint("shape", d, U64_MAX)
    start = _check_uint("start", t.start, U64_MAX)
    end = _check_uint("end", t.end, U64_MAX)
    if start > end:
        raise ManifestError("start", start, f"tensor {t.name!r}: start after end {end}")
    if end > total_size:
        raise ManifestError("end", end, f"tensor {t.name!r}: past total_size {total_size}")
    want = numel * DTYPE_SIZES[t.dtype]
    if end - start != want:
        raise ManifestError(
            "end", end,
            f"tensor {t.name!r}: [{start}, {end}) is {end - start} bytes but "
            f"{t.dtype}{list(t.shape)} needs {want}")
    return raw


def check_tensor_overlaps(tensors: Iterable[TensorSpec]) -> None:
    """Raise if two tensors share a byte or a name (zero-byte ones never overlap)."""
    names: set[str] = set()
    nonempty = []
    for t in tensors:
        if t.name in names:
            raise ManifestError("name", t.name, "duplicate tensor name")
        names.add(t.name)
        if t.end > t.start:
            nonempty.append(t)
    nonempty.sort(key=lambda t: t.start)
    for prev, cur in zip(nonempty, nonempty[1:]):
        if cur.start < prev.end:
            raise ManifestError(
                "start", cur.start,
                f"tensor {cur.name!r} [{cur.start}, {cur.end}) overlaps "
                f"tensor {prev.name!r} [{prev.start}, {prev.end})")


def validate_manifest(m: Manifest) -> None:
    """Every rule of the format; raises :class:`ManifestError` naming the field."""
    if not isinstance(m, Manifest):
        raise ManifestError("manifest", m, "not a Manifest")
    _check_version(m.version)
    _check_uint("owner", m.owner, U32_MAX)
    _check_uint("round", m.round, U32_MAX)
    _check_uint("sample_count", m.sample_count, U64_MAX)
    hashes = m.piece_hashes
    if not isinstance(hashes, (tuple, list)):
        raise ManifestError("piece_hashes", type(hashes).__name__, "must be a tuple of bytes")
    n = len(hashes)
    if n > U32_MAX:
        raise ManifestError("n_pieces", n, f"must be in 0..{U32_MAX}")
    total, _ = _check_geometry(m.total_size, m.piece_size, n)
    for i, h in enumerate(hashes):
        if not isinstance(h, bytes) or len(h) != HASH_LEN:
            raise ManifestError("piece_hashes", h, f"piece {i}: a hash must be {HASH_LEN} bytes")
    tensors = m.tensors
    if not isinstance(tensors, (tuple, list)):
        raise ManifestError("tensors", type(tensors).__name__, "must be a tuple of TensorSpec")
    if len(tensors) > U32_MAX:
        raise ManifestError("n_tensors", len(tensors), f"must be in 0..{U32_MAX}")
    for t in tensors:
        validate_tensor(t, total)
    check_tensor_overlaps(tensors)


# ---------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------

def encode_manifest(m: Manifest) -> bytes:
    """The version-1 encoding of ``m`` (validated first)."""
    validate_manifest(m)
    out = [
        _HEAD.pack(MANIFEST_MAGIC, MANIFEST_VERSION, int(m.owner), int(m.round),
                   int(m.total_size), int(m.piece_size), int(m.sample_count),
                   len(m.piece_hashes)),
        b"".join(m.piece_hashes),
        _U32.pack(len(m.tensors)),
    ]
    for t in m.tensors:
        name = t.name.encode("utf-8")
        dtype = t.dtype.encode("ascii")
        out.append(_U16.pack(len(name)))
        out.append(name)
        out.append(_U8.pack(len(dtype)))
        out.append(dtype)
        out.append(_U8.pack(len(t.shape)))
        out.append(struct.pack(f">{len(t.shape)}Q", *(int(d) for d in t.shape)))
        out.append(_RANGE.pack(int(t.start), int(t.end)))
    return b"".join(out)


# ---------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------

class _Reader:
    __slots__ = ("mv", "pos")

    def __init__(self, data: bytes) -> None:
        self.mv = memoryview(data).cast("B")
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.mv) - self.pos

    def need(self, n: int, field: str) -> None:
        if n > self.remaining:
            raise ManifestError(field, self.remaining,
                                f"truncated: need {n} bytes at offset {self.pos}, have {self.remaining}")

    def take(self, n: int, field: str) -> memoryview:
        self.need(n, field)
        b = self.mv[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, st: struct.Struct, field: str) -> tuple:
        self.need(st.size, field)
        v = st.unpack_from(self.mv, self.pos)
        self.pos += st.size
        return v


def decode_manifest(data: bytes) -> Manifest:
    """Parse and fully validate a version-1 manifest encoding."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ManifestError("data", type(data).__name__, "manifest must be bytes")
    r = _Reader(data)
    magic = bytes(r.take(4, "magic"))
    if magic != MANIFEST_MAGIC:
        raise ManifestError("magic", magic, f"not a manifest (expected {MANIFEST_MAGIC!r})")
    (version,) = r.unpack(_U8, "version")
    _check_version(version)
    (owner,) = r.unpack(_U32, "owner")
    (rnd,) = r.unpack(_U32, "round")
    (total_size,) = r.unpack(_U64, "total_size")
    (piece_size,) = r.unpack(_U32, "piece_size")
    (sample_count,) = r.unpack(_U64, "sample_count")
    (n_pieces,) = r.unpack(_U32, "n_pieces")
    _check_geometry(total_size, piece_size, n_pieces)
    # bound before allocating: n_pieces is only trusted once the bytes exist
    raw_hashes = r.take(n_pieces * HASH_LEN, "piece_hashes")
    hashes = tuple(bytes(raw_hashes[i:i + HASH_LEN]) for i in range(0, len(raw_hashes), HASH_LEN))
    (n_tensors,) = r.unpack(_U32, "n_tensors")
    if n_tensors * _MIN_TENSOR_LEN > r.remaining:
        raise ManifestError("n_tensors", n_tensors,
                            f"truncated: {n_tensors} tensors need at least "
                            f"{n_tensors * _MIN_TENSOR_LEN} bytes, have {r.remaining}")
    tensors: list[TensorSpec] = []
    for _ in range(n_tensors):
        (name_len,) = r.unpack(_U16, "name_len")
        if name_len > MAX_TENSOR_NAME:
            raise ManifestError("name_len", name_len, f"tensor name longer than {MAX_TENSOR_NAME} bytes")
        raw_name = r.take(name_len, "name")
        try:
            name = str(raw_name, "utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError("name", bytes(raw_name), f"tensor name is not valid utf-8: {e.reason}") from None
        (dtype_len,) = r.unpack(_U8, "dtype_len")
        raw_dtype = bytes(r.take(dtype_len, "dtype"))
        try:
            dtype = raw_dtype.decode("ascii")
        except UnicodeDecodeError:
            raise ManifestError("dtype", raw_dtype, f"tensor {name!r}: dtype is not ascii") from None
        if dtype not in DTYPE_SIZES:
            raise ManifestError("dtype", dtype, f"tensor {name!r}: unknown dtype (known: {sorted(DTYPE_SIZES)})")
        (ndim,) = r.unpack(_U8, "ndim")
        if ndim > MAX_NDIM:
            raise ManifestError("ndim", ndim, f"tensor {name!r}: more than {MAX_NDIM} dimensions")
        r.need(8 * ndim, "shape")
        shape = struct.unpack_from(f">{ndim}Q", r.mv, r.pos)
        r.pos += 8 * ndim
        (start,) = r.unpack(_U64, "start")
        (end,) = r.unpack(_U64, "end")
        t = TensorSpec(name=name, dtype=dtype, shape=shape, start=start, end=end)
        validate_tensor(t, total_size)
        tensors.append(t)
    if r.remaining:
        raise ManifestError("trailing_bytes", r.remaining, "data after the last tensor")
    check_tensor_overlaps(tensors)
    return Manifest(owner=owner, round=rnd, total_size=total_size, piece_size=piece_size,
                    piece_hashes=hashes, sample_count=sample_count, tensors=tuple(tensors),
                    version=version)
