"""FederatedScope message types for the exchange, and their content.

Peer messages (the nine BitTorrent messages plus handshake, keep-alive and
credit) are named ``bt_<name>``.  In standalone simulation their content is
the engine's message dataclass itself; in distributed mode piece traffic
goes over the binary data plane instead.

Control messages travel through FS's comm manager in both modes, so their
content sticks to what FS's protobuf encoding carries: dicts of str, int,
float and lists (no bytes, no None, no bool).  Manifests therefore travel as
base64 text of their binary encoding.
"""
from __future__ import annotations

import base64
import binascii
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.coordinator import CompletionReport
from ..core.manifest import Manifest
from ..core.messages import (Bitfield, Cancel, Choke, Credit, Handshake, Have, Interested,
                             KeepAlive, NotInterested, Piece, Request, Unchoke)
from ..errors import ManifestError, ProtocolError
from .start_table import StartPeer, decode_start_table, encode_start_table

log = logging.getLogger(__name__)

PEER_MESSAGE_TYPES: dict[type, str] = {
    Handshake: "bt_handshake", KeepAlive: "bt_keep_alive", Choke: "bt_choke",
    Unchoke: "bt_unchoke", Interested: "bt_interested", NotInterested: "bt_not_interested",
    Have: "bt_have", Bitfield: "bt_bitfield", Request: "bt_request", Piece: "bt_piece",
    Cancel: "bt_cancel", Credit: "bt_credit",
}
PEER_MSG_NAMES = frozenset(PEER_MESSAGE_TYPES.values())

MSG_MANIFEST = "bt_manifest"      # client -> server: my manifest for round r
MSG_START = "bt_start"            # server -> clients: swarm these manifests
MSG_REPORT = "bt_report"          # client -> server: round-tagged completion report
MSG_ROUND_END = "bt_round_end"    # server -> clients: the exchange of round r is over
MSG_STATS = "bt_stats"            # client -> server: final byte counts of round r
MSG_PROGRESS = "bt_progress"      # client -> server: pieces held so far (distributed runs)
MSG_GLOBAL_INIT = "bt_global_init"          # server -> clients not sampled in round 0: the initial model
MSG_FETCH_AGGREGATE = "bt_fetch_aggregate"  # server -> an agreeing client: send your aggregate
MSG_AGGREGATE = "bt_aggregate"              # client -> server: the aggregate (safetensors + digest)
CONTROL_MSG_NAMES = frozenset({MSG_MANIFEST, MSG_START, MSG_REPORT, MSG_ROUND_END, MSG_STATS,
                               MSG_PROGRESS, MSG_GLOBAL_INIT, MSG_FETCH_AGGREGATE,
                               MSG_AGGREGATE})

# FS's protobuf encoding has no None: in distributed runs a message whose
# weights the exchange replaced carries this text instead (clients map it
# back to None before FS's handlers see it).
NO_WEIGHTS = "bt:no-weights"


def _require(content: Any, key: str, kind: type, what: str) -> Any:
    if not isinstance(content, Mapping) or key not in content:
        raise ProtocolError(f"{what}.{key}", None, "missing")
    value = content[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{what}.{key}", value, f"must be {kind.__name__}")
    return value


def _require_count(content: Any, key: str, what: str) -> int:
    """A non-negative count that may exceed int32: sent as float (exact to
    2**53), because FS's protobuf ints are int32."""
    value = _require(content, key, float, what)
    if value < 0 or value != int(value):
        raise ProtocolError(f"{what}.{key}", value, "must be a whole number >= 0")
    return int(value)


def manifest_to_text(m: Manifest) -> str:
    return base64.b64encode(m.encode()).decode("ascii")


def manifest_from_text(text: str) -> Manifest:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise ManifestError("manifest", str(text)[:40], f"not base64: {exc}") from None
    return Manifest.decode(raw)


def pack_manifest(round_idx: int, m: Manifest, address: str = "",
                  certificate: str = "") -> dict:
    """``address``: the sender's data plane ``host:port``; ``certificate``:
    base64 of its TLS certificate (DER), public (distributed runs)."""
    out = {"round": round_idx, "manifest": manifest_to_text(m), "address": address}
    if certificate:
        out["certificate"] = certificate
    return out


def unpack_manifest(content: Any) -> tuple[int, Manifest, str, str]:
    """(round, manifest, address, certificate); the last two '' in
    standalone runs (and the certificate with encryption off)."""
    r = _require(content, "round", int, MSG_MANIFEST)
    manifest = manifest_from_text(_require(content, "manifest", str, MSG_MANIFEST))
    address = content.get("address", "")     # '' in standalone runs
    if address != "":
        parse_address(address, f"{MSG_MANIFEST}.address")
    certificate = content.get("certificate", "")
    if certificate != "":
        certificate_from_text(certificate, f"{MSG_MANIFEST}.certificate")
    return r, manifest, address, certificate


def certificate_to_text(der: bytes) -> str:
    return base64.b64encode(der).decode("ascii")


def certificate_from_text(text: Any, field: str) -> bytes:
    """Base64 text of one DER X.509 certificate -> its bytes, or a
    ``ProtocolError`` naming ``field``."""
    try:
        der = base64.b64decode(str(text).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(field, str(text)[:40], f"not a base64 DER certificate: {exc}") \
            from None
    return certificate_from_der(der, field)


def certificate_from_der(der: bytes, field: str) -> bytes:
    """One DER X.509 certificate, checked, or a ``ProtocolError`` naming
    ``field``."""
    from ..net.tls import load_certificate
    try:
        return load_certificate(der)
    except ValueError as exc:
        raise ProtocolError(field, der[:16].hex(), f"not a DER certificate: {exc}") from None


def parse_address(text: Any, field: str) -> tuple[str, int]:
    """``'host:port'`` -> ``(host, port)``, with a clear error naming ``field``."""
    if not isinstance(text, str) or ":" not in text:
        raise ProtocolError(field, text, "must be 'host:port'")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProtocolError(field, text, "must be 'host:port' with a port in 1..65535")
    return host, int(port)


def pack_start(round_idx: int, manifests: tuple[Manifest, ...], neighbours: dict[int, list[int]],
               timeout: float, addresses: Mapping[int, str] = {},
               certificates: Mapping[int, str] = {},
               uplinks: Mapping[int, float] = {}) -> dict:
    """Everything here is public: FS's gRPC is plaintext.  No secret.
    ``addresses``: peer id -> data plane ``host:port``; ``certificates``:
    peer id -> base64 DER (as the clients sent them in ``bt_manifest``);
    ``uplinks``: the participants' measured uplink rates (bytes/s) of the
    round before, as they reported them in ``bt_stats``.  The per-peer
    part travels as one binary field, ``table`` (fs/start_table.py: one
    protobuf string instead of a message per entry)."""
    by_owner = {m.owner: m for m in manifests}
    ids = set(by_owner) | set(neighbours) | set(addresses) | set(certificates) | set(uplinks)
    rows = [StartPeer(peer=int(p), manifest=by_owner.get(p), address=addresses.get(p, ""),
                      certificate=base64.b64decode(certificates[p]) if p in certificates
                      else b"",
                      uplink=float(uplinks.get(p, 0.0)),
                      neighbours=tuple(int(x) for x in neighbours.get(p, ())))
            for p in ids]
    return {"round": round_idx, "timeout": float(timeout),
            "table": base64.b64encode(encode_start_table(rows)).decode("ascii")}


@dataclass(frozen=True)
class StartMessage:
    """A decoded ``bt_start``: the round's manifests (owner order), the
    neighbour lists, the exchange timeout, and the data plane's table
    (addresses, pinned certificates, last round's measured uplinks; empty
    in standalone runs)."""
    round: int
    manifests: list[Manifest]
    neighbours: dict[int, list[int]]
    timeout: float
    addresses: dict[int, tuple[str, int]] = field(default_factory=dict)
    certificates: dict[int, bytes] = field(default_factory=dict)
    uplinks: dict[int, float] = field(default_factory=dict)


def unpack_start(content: Any) -> StartMessage:
    """Decode a ``bt_start``.  A malformed structure, manifest, address or
    certificate raises a ``ProtocolError`` naming the field (and peer id);
    a bad uplink figure is dropped with a warning (one peer's garbage must
    not stop the round)."""
    r = _require(content, "round", int, MSG_START)
    timeout = _require(content, "timeout", float, MSG_START)
    text = _require(content, "table", str, MSG_START)
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProtocolError(f"{MSG_START}.table", text[:40], f"not base64: {exc}") from None
    rows = decode_start_table(raw)
    out = StartMessage(round=r, timeout=timeout,
                       manifests=[p.manifest for p in rows if p.manifest is not None],
                       neighbours={p.peer: list(p.neighbours) for p in rows})
    for p in rows:
        if p.address:
            out.addresses[p.peer] = parse_address(p.address, f"{MSG_START}.addresses[{p.peer}]")
        if p.certificate:
            out.certificates[p.peer] = certificate_from_der(
                p.certificate, f"{MSG_START}.certificates[{p.peer}]")
        if p.uplink != 0.0:
            rate = check_uplink(p.uplink, f"{MSG_START}.uplinks[{p.peer}]")
            if rate is not None:
                out.uplinks[p.peer] = rate
    return out


#: A measured uplink above this (bytes/s; 8 Tbit/s) is taken for garbage.
MAX_UPLINK = 1e12


def check_uplink(value: Any, field: str) -> float | None:
    """A reported uplink rate in bytes/s, or None (with a warning naming
    ``field`` and the value) when it is not a finite number in
    (0, MAX_UPLINK].  A peer's bad figure is ignored, never fatal."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and 0 < value <= MAX_UPLINK
    if not ok:
        log.warning("ignoring %s = %r: an uplink rate must be a finite number of bytes/s "
                    "in (0, %g]", field, value, MAX_UPLINK)
        return None
    return float(value)


def unpack_uplink(content: Any) -> float | None:
    """The measured uplink of a ``bt_stats`` (None: not measured, or bad)."""
    if not isinstance(content, Mapping) or "uplink" not in content:
        return None
    value = content["uplink"]
    if value == 0.0 and not isinstance(value, bool):
        return None                       # the client could not tell
    return check_uplink(value, f"{MSG_STATS}.uplink")


def pack_report(report: CompletionReport) -> dict:
    return {"round": report.round, "complete": int(report.complete),
            "pieces_have": report.pieces_have, "pieces_total": report.pieces_total,
            "bytes_up": float(report.bytes_up), "bytes_down": float(report.bytes_down),
            "exchange_time": float(report.exchange_time), "reason": report.reason,
            "first_piece_time": float(report.first_piece_time),
            "timeouts": report.timeouts, "corrupt_pieces": report.corrupt_pieces,
            "duplicate_blocks": report.duplicate_blocks,
            "timeline": [[float(t), float(c)] for t, c in report.timeline]}


def _timeline(content: Any) -> tuple[tuple[float, float], ...]:
    raw = content.get("timeline", []) if isinstance(content, Mapping) else []
    try:
        return tuple((float(t), float(c)) for t, c in raw)
    except (TypeError, ValueError):
        raise ProtocolError(f"{MSG_REPORT}.timeline", raw, "must be [[seconds, completion], ...]") \
            from None


def unpack_report(content: Any) -> CompletionReport:
    return CompletionReport(
        round=_require(content, "round", int, MSG_REPORT),
        complete=bool(_require(content, "complete", int, MSG_REPORT)),
        pieces_have=_require(content, "pieces_have", int, MSG_REPORT),
        pieces_total=_require(content, "pieces_total", int, MSG_REPORT),
        bytes_up=_require_count(content, "bytes_up", MSG_REPORT),
        bytes_down=_require_count(content, "bytes_down", MSG_REPORT),
        exchange_time=_require(content, "exchange_time", float, MSG_REPORT),
        reason=_require(content, "reason", str, MSG_REPORT),
        first_piece_time=_require(content, "first_piece_time", float, MSG_REPORT),
        timeouts=_require(content, "timeouts", int, MSG_REPORT),
        corrupt_pieces=_require(content, "corrupt_pieces", int, MSG_REPORT),
        duplicate_blocks=_require(content, "duplicate_blocks", int, MSG_REPORT),
        timeline=_timeline(content))


def pack_stats(round_idx: int, bytes_up: int, bytes_down: int, pieces_have: int,
               aggregate_time: float = 0.0, digest: str = "", uplink: float = 0.0) -> dict:
    """A client's final counts of round ``round_idx``, sent at round end:
    they include what it seeded after its completion report, and equal what
    its store's ``bt_sessions`` row records; plus the seconds its aggregation
    took, the sha256 (hex) of the global model it aggregated, and its
    data plane's measured uplink rate (bytes/s; 0 = not measured)."""
    return {"round": round_idx, "bytes_up": float(bytes_up), "bytes_down": float(bytes_down),
            "pieces_have": pieces_have, "aggregate_time": float(aggregate_time),
            "digest": digest, "uplink": float(uplink)}


def _digest(content: Any, what: str) -> str:
    digest = _require(content, "digest", str, what)
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        raise ProtocolError(f"{what}.digest", digest[:80], "must be 64 lowercase hex digits")
    return digest


def unpack_stats(content: Any) -> tuple[int, int, int, int, float]:
    aggregate_time = _require(content, "aggregate_time", float, MSG_STATS)
    if not aggregate_time >= 0:
        raise ProtocolError(f"{MSG_STATS}.aggregate_time", aggregate_time, "must be >= 0")
    return (_require(content, "round", int, MSG_STATS),
            _require_count(content, "bytes_up", MSG_STATS),
            _require_count(content, "bytes_down", MSG_STATS),
            _require(content, "pieces_have", int, MSG_STATS), aggregate_time)


def unpack_stats_digest(content: Any) -> str:
    """The aggregate's digest in a ``bt_stats`` ('' when the client has none)."""
    if isinstance(content, Mapping) and "digest" not in content:
        return ""
    return _digest(content, MSG_STATS)


def pack_aggregate(round_idx: int, digest: str, state_dict: Mapping[str, Any]) -> dict:
    """A client's aggregate for the server's own evaluation: safetensors as
    base64 text (never pickle) and the digest it must match."""
    return {"round": round_idx, "digest": digest, **pack_weights(state_dict)}


def unpack_aggregate(content: Any) -> tuple[int, str, dict]:
    return (_require(content, "round", int, MSG_AGGREGATE), _digest(content, MSG_AGGREGATE),
            unpack_weights(content))


def pack_round_end(round_idx: int, order: list[int]) -> dict:
    """The exchange of round ``round_idx`` is over; ``order``: the models'
    owners in the order the server received them (FS's aggregation order)."""
    return {"round": round_idx, "order": [int(c) for c in order]}


def unpack_order(content: Any) -> list[int]:
    """The aggregation order of a ``bt_round_end`` ([] = by client id)."""
    order = content.get("order", []) if isinstance(content, Mapping) else []
    if not isinstance(order, list) or not all(isinstance(c, int) and not isinstance(c, bool)
                                              for c in order):
        raise ProtocolError(f"{MSG_ROUND_END}.order", order, "must be a list of client ids")
    return order


def pack_progress(round_idx: int, pieces_have: int, pieces_total: int) -> dict:
    return {"round": round_idx, "pieces_have": pieces_have, "pieces_total": pieces_total}


def unpack_progress(content: Any) -> tuple[int, int, int]:
    return (_require(content, "round", int, MSG_PROGRESS),
            _require(content, "pieces_have", int, MSG_PROGRESS),
            _require(content, "pieces_total", int, MSG_PROGRESS))


WEIGHTS_KEY = "safetensors"


def pack_weights(state_dict: Mapping[str, Any]) -> dict:
    """A model for FS's distributed messages (round 0's initial model): base64
    text of its safetensors encoding -- never FS's pickled tensors."""
    from ..core.pieces import serialize_state_dict
    blob = serialize_state_dict(state_dict)
    return {WEIGHTS_KEY: base64.b64encode(bytes(blob)).decode("ascii")}


def is_packed_weights(content: Any) -> bool:
    return isinstance(content, Mapping) and set(content) == {WEIGHTS_KEY}


def unpack_weights(content: Any) -> dict:
    """The state_dict of :func:`pack_weights`, with a clear error on bad input."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    text = _require(content, WEIGHTS_KEY, str, "model_para")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        return load(raw)
    except (binascii.Error, UnicodeEncodeError, SafetensorError) as exc:
        raise ProtocolError(f"model_para.{WEIGHTS_KEY}", text[:40],
                            f"not base64 safetensors: {exc}") from None
