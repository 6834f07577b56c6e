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
from typing import Any, Mapping

from ..core.coordinator import CompletionReport
from ..core.manifest import Manifest
from ..core.messages import (Bitfield, Cancel, Choke, Credit, Handshake, Have, Interested,
                             KeepAlive, NotInterested, Piece, Request, Unchoke)
from ..errors import ManifestError, ProtocolError

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
CONTROL_MSG_NAMES = frozenset({MSG_MANIFEST, MSG_START, MSG_REPORT, MSG_ROUND_END})


def _require(content: Any, key: str, kind: type, what: str) -> Any:
    if not isinstance(content, Mapping) or key not in content:
        raise ProtocolError(f"{what}.{key}", None, "missing")
    value = content[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{what}.{key}", value, f"must be {kind.__name__}")
    return value


def manifest_to_text(m: Manifest) -> str:
    return base64.b64encode(m.encode()).decode("ascii")


def manifest_from_text(text: str) -> Manifest:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise ManifestError("manifest", str(text)[:40], f"not base64: {exc}") from None
    return Manifest.decode(raw)


def pack_manifest(round_idx: int, m: Manifest) -> dict:
    return {"round": round_idx, "manifest": manifest_to_text(m)}


def unpack_manifest(content: Any) -> tuple[int, Manifest]:
    r = _require(content, "round", int, MSG_MANIFEST)
    return r, manifest_from_text(_require(content, "manifest", str, MSG_MANIFEST))


def pack_start(round_idx: int, manifests: tuple[Manifest, ...], neighbours: dict[int, list[int]],
               timeout: float, secret: str) -> dict:
    return {"round": round_idx, "manifests": [manifest_to_text(m) for m in manifests],
            "neighbours": {str(k): list(v) for k, v in neighbours.items()},
            "timeout": float(timeout), "secret": secret}


def unpack_start(content: Any) -> tuple[int, list[Manifest], dict[int, list[int]], float, str]:
    r = _require(content, "round", int, MSG_START)
    texts = _require(content, "manifests", list, MSG_START)
    manifests = [manifest_from_text(t) for t in texts]
    raw_nb = _require(content, "neighbours", Mapping, MSG_START)
    try:
        neighbours = {int(k): [int(x) for x in v] for k, v in raw_nb.items()}
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{MSG_START}.neighbours", raw_nb, str(exc)) from None
    timeout = _require(content, "timeout", float, MSG_START)
    secret = _require(content, "secret", str, MSG_START)
    return r, manifests, neighbours, timeout, secret


def pack_report(report: CompletionReport) -> dict:
    return {"round": report.round, "complete": int(report.complete),
            "pieces_have": report.pieces_have, "pieces_total": report.pieces_total,
            "bytes_up": report.bytes_up, "bytes_down": report.bytes_down,
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
        bytes_up=_require(content, "bytes_up", int, MSG_REPORT),
        bytes_down=_require(content, "bytes_down", int, MSG_REPORT),
        exchange_time=_require(content, "exchange_time", float, MSG_REPORT),
        reason=_require(content, "reason", str, MSG_REPORT),
        first_piece_time=_require(content, "first_piece_time", float, MSG_REPORT),
        timeouts=_require(content, "timeouts", int, MSG_REPORT),
        corrupt_pieces=_require(content, "corrupt_pieces", int, MSG_REPORT),
        duplicate_blocks=_require(content, "duplicate_blocks", int, MSG_REPORT),
        timeline=_timeline(content))
