"""A model as pieces: safetensors serialization, cutting, verification, decoding.

An owner serializes its ``state_dict`` with safetensors (never pickle: the
bytes come from untrusted peers), cuts the blob into fixed-size pieces (the
last one shorter), and publishes a :class:`Manifest` with every piece's
sha256 and every tensor's absolute byte range in the blob.

A receiver never needs the safetensors header to decode: tensors are built
straight from the manifest layout and the verified pieces, so

* :func:`reconstruct_state_dict` needs every piece and is bit-exact;
* :func:`partial_state_dict` works from any subset of pieces, returning per
  tensor the values it can decode plus a mask of the elements whose bytes are
  all present (for partial FedAvg);
* :func:`covered_byte_ranges` says which bytes of each tensor a set of pieces
  covers, without touching any data.

Byte order: safetensors is little-endian and so are the hosts this runs on
(x86-64, aarch64); a big-endian host is refused at decode time.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import struct
import sys
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import torch

from ..errors import HashMismatch, ManifestError
from .manifest import DTYPE_SIZES, Manifest, TensorSpec
from .manifest_codec import check_tensor_overlaps, validate_manifest, validate_tensor

__all__ = [
    "DEFAULT_PIECE_SIZE",
    "TORCH_DTYPES",
    "serialize_state_dict",
    "tensor_layout",
    "split_pieces",
    "piece_hashes",
    "build_manifest",
    "make_model_manifest",
    "verify_piece",
    "assemble_blob",
    "reconstruct_state_dict",
    "covered_byte_ranges",
    "partial_state_dict",
]

Bytes = Union[bytes, bytearray, memoryview]

DEFAULT_PIECE_SIZE = 256 * 1024


def _torch_dtypes() -> dict[str, torch.dtype]:
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2", "I16": "int16", "U16": "uint16", "F16": "float16",
        "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
        "I64": "int64", "U64": "uint64", "F64": "float64",
    }
    out = {}
    for st, attr in names.items():
        dt = getattr(torch, attr, None)
        if isinstance(dt, torch.dtype) and st in DTYPE_SIZES:
            out[st] = dt
    return out


#: safetensors dtype name -> torch dtype, for every DTYPE_SIZES entry torch has.
TORCH_DTYPES: dict[str, torch.dtype] = _torch_dtypes()
_ST_OF_TORCH: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


# ---------------------------------------------------------------------------
# owner side
# ---------------------------------------------------------------------------

def serialize_state_dict(state_dict: Mapping[str, torch.Tensor],
                         metadata: Optional[dict[str, str]] = None) -> bytes:
    """The safetensors blob of ``state_dict`` (detached, on cpu, contiguous).

    Tensors that share storage (tied weights) are copied so each key is
    serialized on its own.  Raises :class:`ManifestError` for a non-str key,
    a non-tensor value, a dtype the manifest cannot describe, or bad metadata.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise ManifestError("name", name, "state_dict keys must be str")
        if name == "__metadata__":
            raise ManifestError("name", name, "reserved by safetensors")
        if not isinstance(value, torch.Tensor):
            raise ManifestError("state_dict", name, f"value is {type(value).__name__}, not a torch.Tensor")
        if value.layout != torch.strided:
            raise ManifestError("state_dict", name, f"{value.layout} tensors are not supported; use .to_dense()")
        if value.dtype not in _ST_OF_TORCH:
            raise ManifestError("dtype", str(value.dtype), f"tensor {name!r}: dtype not supported by the manifest")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        tensors[name] = t
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ManifestError("metadata", metadata, "must be a dict[str, str]")
    return save(tensors, metadata=metadata)


def _no_duplicate_keys(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ManifestError("safetensors_header", k, "duplicate key in header")
        out[k] = v
    return out


def tensor_layout(blob: Bytes) -> tuple[TensorSpec, ...]:
    """Tensor specs with absolute byte offsets in ``blob``, ordered by start.

    Parses the safetensors header: u64 little-endian length, then JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets
    relative to the end of the header), skipping ``__metadata__``.
    """
    mv = memoryview(blob).cast("B")
    total = len(mv)
    if total < 8:
        raise ManifestError("header_len", total, "blob shorter than the 8-byte safetensors length prefix")
    (header_len,) = struct.unpack_from("<Q", mv, 0)
    if header_len > total - 8:
        raise ManifestError("header_len", header_len, f"header runs past the {total}-byte blob")
    base = 8 + header_len
    try:
        header = json.loads(str(mv[8:base], "utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError("safetensors_header", bytes(mv[8:min(base, 72)]), f"not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ManifestError("safetensors_header", type(header).__name__, "header must be a JSON object")
    specs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ManifestError("safetensors_header", name, "tensor entry must be an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(dtype, str):
            raise ManifestError("dtype", dtype, f"tensor {name!r}: missing or non-string dtype")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise ManifestError("shape", shape, f"tensor {name!r}: shape must be a list of ints")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise ManifestError("data_offsets", offsets, f"tensor {name!r}: must be [begin, end] ints")
        if offsets[0] < 0 or offsets[1] < 0:
            raise ManifestError("data_offsets", offsets, f"tensor {name!r}: negative offset")
        spec = TensorSpec(name=name, dtype=dtype, shape=tuple(shape),
                          start=base + offsets[0], end=base + offsets[1])
        validate_tensor(spec, total)
        specs.append(spec)
    specs.sort(key=lambda s: (s.start, s.end, s.name))
    check_tensor_overlaps(specs)
    return tuple(specs)


def split_pieces(blob: Bytes, piece_size: int) -> list[bytes]:
    """``blob`` cut into ``piece_size`` pieces; the last one may be shorter."""
    if isinstance(piece_size, bool) or not isinstance(piece_size, int) or piece_size < 1:
        raise ManifestError("piece_size", piece_size, "must be a positive int")
    mv = memoryview(blob).cast("B")
    return [bytes(mv[i:i + piece_size]) for i in range(0, len(mv), piece_size)]


def piece_hashes(pieces: Iterable[Bytes]) -> tuple[bytes, ...]:
    """sha256 of every piece."""
    sha = hashlib.sha256
    return tuple(sha(p).digest() for p in pieces)


def build_manifest(blob: Bytes, owner: int, round: int, sample_count: int,
                   piece_size: int = DEFAULT_PIECE_SIZE) -> tuple[Manifest, list[bytes]]:
    """The manifest of a safetensors ``blob`` and its pieces."""
    layout = tensor_layout(blob)
    pieces = split_pieces(blob, piece_size)
    m = Manifest(owner=owner, round=round, total_size=len(memoryview(blob).cast("B")),
                 piece_size=piece_size, piece_hashes=piece_hashes(pieces),
                 sample_count=sample_count, tensors=layout)
    validate_manifest(m)
    return m, pieces


def make_model_manifest(state_dict: Mapping[str, torch.Tensor], owner: int, round: int,
                        sample_count: int, piece_size: int = DEFAULT_PIECE_SIZE,
                        ) -> tuple[Manifest, list[bytes]]:
    """Serialize ``state_dict`` and build its manifest and pieces."""
    return build_manifest(serialize_state_dict(state_dict), owner, round, sample_count, piece_size)


# ---------------------------------------------------------------------------
# receiver side
# ---------------------------------------------------------------------------

def verify_piece(manifest: Manifest, index: int, data: Bytes) -> None:
    """Raise :class:`HashMismatch` unless ``data`` is piece ``index`` of ``manifest``.

    An index outside the manifest raises :class:`ManifestError` (``piece_index``).
    """
    want_len = manifest.piece_length(index)
    expected = manifest.piece_hashes[index]
    where = f"owner {manifest.owner} round {manifest.round} piece {index}"
    n = memoryview(data).nbytes
    if n != want_len:
        raise HashMismatch("sha256", expected.hex(), f"{where}: got {n} bytes, expected {want_len}")
    got = hashlib.sha256(data).digest()
    if got != expected:
        raise HashMismatch("sha256", got.hex(), f"{where}: does not match manifest hash {expected.hex()}")


def _check_indices(manifest: Manifest, indices: Iterable[int]) -> list[int]:
    out = []
    n = manifest.num_pieces
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise ManifestError("piece_index", i,
                                f"owner {manifest.owner} round {manifest.round} has {n} pieces")
        out.append(int(i))
    return out


def _verify_all(manifest: Manifest, pieces: Mapping[int, Bytes]) -> None:
    for i in _check_indices(manifest, pieces.keys()):
        verify_piece(manifest, i, pieces[i])


def _require_all(manifest: Manifest, pieces: Mapping[int, Bytes]) -> None:
    missing = [i for i in range(manifest.num_pieces) if i not in pieces]
    if missing:
        shown = missing if len(missing) <= 20 else missing[:20] + ["..."]
        raise ManifestError("missing_pieces", missing,
                            f"owner {manifest.owner} round {manifest.round}: "
                            f"{len(missing)} of {manifest.num_pieces} pieces missing: {shown}")


def assemble_blob(manifest: Manifest, pieces: Mapping[int, Bytes]) -> bytes:
    """The full blob from every piece (each verified against the manifest)."""
    _require_all(manifest, pieces)
    _verify_all(manifest, pieces)
    return b"".join(pieces[i] for i in range(manifest.num_pieces))


def _torch_dtype(spec: TensorSpec) -> torch.dtype:
    dt = TORCH_DTYPES.get(spec.dtype)
    if dt is None:
        raise ManifestError("dtype", spec.dtype, f"tensor {spec.name!r}: not supported by this torch build")
    return dt


def _copy_bytes(manifest: Manifest, pieces: Mapping[int, Bytes],
                abs_start: int, abs_end: int, out: np.ndarray, out_off: int) -> None:
    """Copy blob bytes [abs_start, abs_end) from ``pieces`` into ``out[out_off:]``."""
    ps = manifest.piece_size
    pos = abs_start
    while pos < abs_end:
        idx = pos // ps
        piece_start = idx * ps
        off = pos - piece_start
        n = min(abs_end, piece_start + ps) - pos
        src = np.frombuffer(pieces[idx], dtype=np.uint8, count=n, offset=off)
        dst = out_off + (pos - abs_start)
        out[dst:dst + n] = src
        pos += n


def _bytes_to_tensor(raw: torch.Tensor, spec: TensorSpec, dt: torch.dtype) -> torch.Tensor:
    """A uint8 tensor of ``spec.nbytes`` bytes viewed as the tensor itself."""
    if spec.nbytes == 0:
        return torch.empty(spec.shape, dtype=dt)
    if dt == torch.bool:
        # canonical booleans even if a (hash-valid but hostile) blob holds 2..255
        return (raw != 0).reshape(spec.shape)
    return raw.view(dt).reshape(spec.shape)


def _check_byteorder() -> None:
    if sys.byteorder != "little":  # pragma: no cover
        raise ManifestError("byteorder", sys.byteorder, "safetensors decoding needs a little-endian host")


def reconstruct_state_dict(manifest: Manifest, pieces: Mapping[int, Bytes]) -> dict[str, torch.Tensor]:
    """Every tensor of the manifest, bit-exact, from all of its verified pieces.

    Tensors are built from the manifest layout (the safetensors header is not
    re-parsed); each one owns its memory.  Order follows the manifest.
    """
    _check_byteorder()
    _require_all(manifest, pieces)
    _verify_all(manifest, pieces)
    out: dict[str, torch.Tensor] = {}
    for spec in manifest.tensors:
        dt = _torch_dtype(spec)
        raw = torch.empty(spec.nbytes, dtype=torch.uint8)
        _copy_bytes(manifest, pieces, spec.start, spec.end, raw.numpy(), 0)
        out[spec.name] = _bytes_to_tensor(raw, spec, dt)
    return out


def _present_runs(manifest: Manifest, present: Iterable[int]) -> list[tuple[int, int]]:
    """Absolute byte ranges of maximal runs of consecutive present pieces."""
    idx = sorted(set(_check_indices(manifest, present)))
    runs: list[tuple[int, int]] = []
    ps, total = manifest.piece_size, manifest.total_size
    for i in idx:
        s, e = i * ps, min((i + 1) * ps, total)
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs


def covered_byte_ranges(manifest: Manifest, present: Iterable[int]) -> dict[str, list[tuple[int, int]]]:
    """Per tensor, the merged [start, end) byte ranges the present pieces cover.

    Ranges are relative to the tensor's first byte, sorted and disjoint
    (adjacent pieces merge into one range).  Every tensor has an entry; a
    zero-byte tensor's is always empty.
    """
    runs = _present_runs(manifest, present)
    run_ends = [e for _, e in runs]
    out: dict[str, list[tuple[int, int]]] = {}
    for spec in manifest.tensors:
        ranges: list[tuple[int, int]] = []
        if spec.end > spec.start:
            k = bisect.bisect_right(run_ends, spec.start)
            while k < len(runs) and runs[k][0] < spec.end:
                s, e = max(runs[k][0], spec.start), min(runs[k][1], spec.end)
                if s < e:
                    ranges.append((s - spec.start, e - spec.start))
                k += 1
        out[spec.name] = ranges
    return out


def partial_state_dict(manifest: Manifest, pieces: Mapping[int, Bytes], verify: bool = True,
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor, ``(values, mask)`` decodable from the given pieces.

    ``mask`` is a bool tensor shaped like the tensor, True exactly where all
    of the element's bytes are present; ``values`` holds those elements
    (bit-exact) and zeros elsewhere, including elements only partly covered.
    Every given piece is verified first.  Work is one slice copy per covered
    range and piece, never per element.
    """
    _check_byteorder()
    if verify:  # False only for pieces a verifying store already checked
        _verify_all(manifest, pieces)
    else:
        _check_indices(manifest, pieces.keys())
    ranges = covered_byte_ranges(manifest, pieces.keys())
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in manifest.tensors:
        dt = _torch_dtype(spec)
        isz = spec.itemsize
        # np.zeros is calloc: pages of uncovered regions are never touched
        raw_np = np.zeros(spec.nbytes, dtype=np.uint8)
        mask_np = np.zeros(spec.numel, dtype=np.bool_)
        raw, mask = torch.from_numpy(raw_np), torch.from_numpy(mask_np)
        for a, b in ranges[spec.name]:
            first = -(-a // isz)       # first element starting inside the range
            last = b // isz            # one past the last element ending inside it
            if first < last:
                mask_np[first:last] = True
                _copy_bytes(manifest, pieces, spec.start + first * isz, spec.start + last * isz,
                            raw_np, first * isz)
        out[spec.name] = (_bytes_to_tensor(raw, spec, dt), mask.reshape(spec.shape))
    return out
