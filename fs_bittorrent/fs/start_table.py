"""The round's table in a ``bt_start``, as one binary field.

Why one field: FS's gRPC encodes a message's content as nested protobuf
messages, one per dict entry, list item and value, and protobuf is pure
Python under FS's pinned 3.20.x.  A ``bt_start`` of 8 clients as nested
dicts (manifests, addresses, certificates, uplinks, and 56 neighbour ids
each their own message) took 10-17 ms to serialize at the server and
2.5 ms to parse at *every* client, all clients at the same moment: on a
small host they queue for the cores, so the last one starts its exchange
tens of ms after the first, and the first waits for its pieces
(docs/design.md "Where a round's time goes").  The same table as one
base64 string costs 0.4 ms to serialize and 0.2 ms to parse
(``scripts/bench_start.py``).

Layout (big-endian)::

    magic "FSBS" | version u8 | n_peers u16 | body

Version 2 (what this peer writes): ``body`` is one zlib stream (RFC 1950,
``zlib.compress``) that inflates to the n_peers records below, with
nothing after the stream; at most ``MAX_INFLATED`` (64 MiB) once inflated.
Why: every client gets every manifest and certificate, so the server's
uplink carries n x n rows at each round's start; the rows repeat most of
their bytes (tensor names and shapes, certificate fields, addresses), and
an 8-client convnet2 ``bt_start`` shrinks from 12.4 KB to 3.3 KB as sent
(``scripts/bench_start.py``).  Version 1: ``body`` is the records
themselves.  A reader accepts both.

The records, ids ascending::

      peer u32
      manifest_len u32   | manifest (the "FSBM" encoding of core/manifest_codec;
                           empty: the peer owns nothing this round)
      address_len u16    | address, utf-8 "host:port" (empty: standalone run)
      certificate_len u16 | certificate, DER (empty: plaintext data plane)
      uplink f64          | bytes/s the peer measured last round (0: none)
      n_neighbours u16    | n_neighbours x u32 peer ids
    nothing after the last record.

Decoding checks the structure (magic, version, lengths, ascending unique
ids, a manifest's owner equal to its record's id, nothing trailing) and
decodes each manifest, which validates every field of it.  Addresses,
certificates and uplinks are checked by their users (``fs/wire.py``), with
errors naming ``bt_start.<field>[<id>]`` as before.  Every failure here is a
:class:`~fs_bittorrent.errors.ProtocolError` whose field starts with
``bt_start.table``.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

from ..core.manifest import Manifest
from ..errors import BitTorrentError, ProtocolError

__all__ = ["StartPeer", "encode_start_table", "decode_start_table", "TABLE_MAGIC",
           "TABLE_VERSION", "TABLE_VERSIONS", "MAX_INFLATED"]

TABLE_MAGIC = b"FSBS"
TABLE_VERSION = 2                 # written
TABLE_VERSIONS = (1, 2)           # read
MAX_INFLATED = 64 * 1024 * 1024   # a version-2 body inflates to at most this
FIELD = "bt_start.table"

_HEAD = struct.Struct(">4sBH")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_F64 = struct.Struct(">d")
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class StartPeer:
    """One participant's row of the round's table."""
    peer: int
    manifest: Optional[Manifest] = None   # None: owns nothing this round
    address: str = ""                     # data plane "host:port"; '' standalone
    certificate: bytes = b""              # TLS certificate (DER); b'' plaintext
    uplink: float = 0.0                   # measured last round, bytes/s; 0 none
    neighbours: tuple[int, ...] = ()


def _field(peer: Optional[int], name: str) -> str:
    return f"{FIELD}.{name}" if peer is None else f"{FIELD}.{name}[{peer}]"


def encode_start_table(peers: Iterable[StartPeer], version: int = TABLE_VERSION) -> bytes:
    """The encoding of ``peers`` (sorted by id here); ``version`` 2
    (deflated records, the default) or 1."""
    if version not in TABLE_VERSIONS:
        raise ProtocolError(_field(None, "version"), version, f"one of {TABLE_VERSIONS}")
    rows = sorted(peers, key=lambda p: p.peer)
    if len(rows) > _U16_MAX:
        raise ProtocolError(_field(None, "n_peers"), len(rows), f"at most {_U16_MAX}")
    head = _HEAD.pack(TABLE_MAGIC, version, len(rows))
    out: list[bytes] = []
    seen: set[int] = set()
    for p in rows:
        if not isinstance(p.peer, int) or not 0 <= p.peer <= _U32_MAX or p.peer in seen:
            raise ProtocolError(_field(None, "peer"), p.peer, "ids must be distinct u32")
        seen.add(p.peer)
        manifest = b"" if p.manifest is None else p.manifest.encode()
        if p.manifest is not None and p.manifest.owner != p.peer:
            raise ProtocolError(_field(p.peer, "manifest"), p.manifest.owner,
                                "the manifest's owner must be the row's peer")
        address = p.address.encode("utf-8")
        for name, value in (("address", address), ("certificate", p.certificate)):
            if len(value) > _U16_MAX:
                raise ProtocolError(_field(p.peer, name), len(value), f"longer than {_U16_MAX}")
        if len(p.neighbours) > _U16_MAX:
            raise ProtocolError(_field(p.peer, "neighbours"), len(p.neighbours), "too many")
        out += [_U32.pack(p.peer), _U32.pack(len(manifest)), manifest,
                _U16.pack(len(address)), address,
                _U16.pack(len(p.certificate)), bytes(p.certificate),
                _F64.pack(float(p.uplink)), _U16.pack(len(p.neighbours)),
                struct.pack(f">{len(p.neighbours)}I", *p.neighbours)]
    body = b"".join(out)
    if len(body) > MAX_INFLATED:
        raise ProtocolError(_field(None, "inflated"), len(body), f"more than {MAX_INFLATED} bytes")
    return head + (zlib.compress(body) if version == 2 else body)


def _inflate(body: bytes) -> bytes:
    """A version-2 body: the zlib stream inflated, at most ``MAX_INFLATED``
    bytes, nothing after the stream."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(body, MAX_INFLATED)
    except zlib.error as exc:
        raise ProtocolError(_field(None, "body"), len(body), f"not a zlib stream: {exc}") from None
    if inflater.unconsumed_tail:
        raise ProtocolError(_field(None, "inflated"), f">{MAX_INFLATED}",
                            f"inflates to more than {MAX_INFLATED} bytes")
    if not inflater.eof:
        raise ProtocolError(_field(None, "body"), len(body), "truncated zlib stream")
    if inflater.unused_data:
        raise ProtocolError(_field(None, "trailing_bytes"), len(inflater.unused_data),
                            "data after the zlib stream")
    return out


class _Reader:
    __slots__ = ("data", "pos", "peer")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.peer: Optional[int] = None     # the record being read, for errors

    def take(self, n: int, name: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise ProtocolError(_field(self.peer, name), len(self.data) - self.pos,
                                f"truncated: need {n} bytes at offset {self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, st: struct.Struct, name: str) -> tuple:
        return st.unpack(self.take(st.size, name))


def decode_start_table(data: bytes) -> list[StartPeer]:
    """Parse a version-1 or version-2 table; a :class:`ProtocolError`
    naming the field (``bt_start.table.<field>[<peer>]``) for anything
    malformed."""
    r = _Reader(bytes(data))
    magic, version, n = r.unpack(_HEAD, "magic")
    if magic != TABLE_MAGIC:
        raise ProtocolError(_field(None, "magic"), magic, f"expected {TABLE_MAGIC!r}")
    if version not in TABLE_VERSIONS:
        raise ProtocolError(_field(None, "version"), version,
                            f"this peer speaks versions {TABLE_VERSIONS}")
    if version == 2:
        r = _Reader(_inflate(r.data[r.pos:]))
    rows: list[StartPeer] = []
    last = -1
    for _ in range(n):
        r.peer = None
        (peer,) = r.unpack(_U32, "peer")
        if peer <= last:
            raise ProtocolError(_field(None, "peer"), peer,
                                f"ids must be ascending and distinct (after {last})")
        last = r.peer = peer
        (length,) = r.unpack(_U32, "manifest_len")
        raw = r.take(length, "manifest")
        manifest = None
        if raw:
            try:
                manifest = Manifest.decode(raw)
            except BitTorrentError as exc:
                raise ProtocolError(_field(peer, "manifest"), raw[:16], str(exc)) from None
            if manifest.owner != peer:
                raise ProtocolError(_field(peer, "manifest"), manifest.owner,
                                    "the manifest's owner must be the row's peer")
        (length,) = r.unpack(_U16, "address_len")
        try:
            address = r.take(length, "address").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(_field(peer, "address"), None, f"not utf-8: {exc}") from None
        (length,) = r.unpack(_U16, "certificate_len")
        certificate = r.take(length, "certificate")
        (uplink,) = r.unpack(_F64, "uplink")
        (count,) = r.unpack(_U16, "n_neighbours")
        neighbours = struct.unpack(f">{count}I", r.take(4 * count, "neighbours"))
        rows.append(StartPeer(peer, manifest, address, certificate, uplink, neighbours))
    r.peer = None
    if r.pos != len(r.data):
        raise ProtocolError(_field(None, "trailing_bytes"), len(r.data) - r.pos,
                            "data after the last record")
    return rows
