"""The per-round figures an operator watches, beyond the exchange's own.

For each round the server's ``bittorrent_rounds.jsonl`` / ``.csv`` and FS's
``eval_results.log`` line get:

* ``store_bytes`` (per client) and ``store_bytes_total``: the piece
  store's size on disk (database + WAL) when the client finished the round,
  before its ``keep_rounds`` cleanup, i.e. the round's peak; one shared
  store in standalone is counted once.  ``store_growth``: the change of
  the total since the previous round (None for the first one);
* ``star_bytes`` (per client) and ``star_bytes_total``: what plain FS's
  star would move for the same round: the server sends the global model
  (size G) to every client asked to train and receives each owner's
  update S_i; all of it crosses the server's link;
* ``bytes_total``: what the exchange moved (the sum of bytes received),
  and ``traffic_ratio`` = bytes_total / star_bytes_total;
* ``server_bytes``: what the server itself sent and received this round
  (control messages; round 0 also carries the initial model).  Counted
  as on the wire: strings and bytes by length, tensors by ``nbytes``,
  numbers 8 bytes, times the receivers;
* the completion rate is ``completion_ratio`` (clients complete / asked).

FS's own monitor only sees FS messages, so an exchange run's
``system_metrics.log`` said 0 bytes uploaded.  :func:`feed_fs_monitor`
adds each client's exchange bytes to FS's counters at the round's end.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Optional

NUMBER_BYTES = 8


def wire_bytes(content: Any) -> int:
    """Bytes ``content`` takes on the wire (an estimate that is exact for
    strings, bytes and tensors, which is where the bytes are)."""
    if content is None or isinstance(content, bool):
        return 1
    if isinstance(content, (int, float)):
        return NUMBER_BYTES
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    if isinstance(content, (bytes, bytearray, memoryview)):
        return len(content)
    nbytes = getattr(content, "nbytes", None)
    if isinstance(nbytes, int):                       # numpy arrays, torch tensors
        return nbytes
    if isinstance(content, Mapping):
        return sum(wire_bytes(k) + wire_bytes(v) for k, v in content.items())
    if isinstance(content, (list, tuple, set, frozenset)):
        return sum(wire_bytes(v) for v in content)
    fields = getattr(content, "__dataclass_fields__", None)
    if fields:
        return sum(wire_bytes(getattr(content, f)) for f in fields)
    return len(repr(content))


def _receivers(message: Any) -> int:
    r = message.receiver
    return len(r) if isinstance(r, (list, tuple)) else 1


class ServerTraffic:
    """Control bytes through the server since the last :meth:`take`."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def on_send(self, message: Any) -> None:
        self.sent += wire_bytes(message.content) * _receivers(message)

    def on_receive(self, message: Any) -> None:
        self.received += wire_bytes(message.content)

    def take(self) -> int:
        total, self.sent, self.received = self.sent + self.received, 0, 0
        return total

    def count_incoming(self, worker: Any) -> None:
        """Wrap every handler the worker has, so each message it handles is counted."""
        for msg_type, handler in list(worker.msg_handlers.items()):
            worker.msg_handlers[msg_type] = self._counted(handler)

    def _counted(self, handler: Any) -> Any:
        def counted(message: Any) -> Any:
            self.on_receive(message)
            return handler(message)
        return counted


def store_size(store: Any) -> tuple[str, int]:
    """(path, bytes on disk incl. the WAL) of a SQLite piece store; ('', 0) otherwise."""
    path = getattr(store, "path", "")
    if not path:
        return "", 0
    return path, sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def star_figures(model_sizes: Mapping[int, int], asked: Iterable[int],
                 owners: Iterable[int]) -> dict[str, Any]:
    """What plain FS's star moves in a round: the global model to every
    client asked to train, each owner's update back."""
    g = max(model_sizes.values(), default=0)
    asked, owners = set(asked), set(owners)
    per = {c: (g if c in asked else 0) + (model_sizes.get(c, 0) if c in owners else 0)
           for c in sorted(asked | owners)}
    return {"star_bytes": {str(c): b for c, b in per.items()},
            "star_bytes_total": sum(per.values())}


class RoundFigures:
    """Fills the operator's figures into a round's stats when it is written."""

    def __init__(self) -> None:
        self._last_store_total: Optional[int] = None

    @staticmethod
    def note_client_store(stats: dict, client: int, content: Any) -> None:
        """A client's ``bt_stats`` may carry its store's path and size."""
        if not isinstance(content, Mapping):
            return
        size, path = content.get("store_bytes"), content.get("store_path")
        if isinstance(size, (int, float)) and not isinstance(size, bool) and size >= 0 \
                and isinstance(path, str):
            stats.setdefault("store_bytes", {})[str(client)] = int(size)
            stats.setdefault("_store_paths", {})[str(client)] = path

    def complete(self, stats: dict) -> dict:
        """Totals, growth and the star comparison; returns ``stats``."""
        paths = stats.pop("_store_paths", {})
        sizes = stats.setdefault("store_bytes", {})
        # in-process clients share one store: count each file once
        per_file: dict[str, int] = {}
        for c, b in sizes.items():
            key = paths.get(c, c)
            per_file[key] = max(b, per_file.get(key, 0))
        total = sum(per_file.values()) if sizes else None
        stats["store_bytes_total"] = total
        stats["store_growth"] = (total - self._last_store_total
                                 if total is not None and self._last_store_total is not None
                                 else None)
        if total is not None:
            self._last_store_total = total
        stats["bytes_total"] = sum(stats.get("bytes_down", {}).values())
        star = stats.get("star_bytes_total") or 0
        stats["traffic_ratio"] = stats["bytes_total"] / star if star else None
        return stats


HEADLINE_KEYS = ("bytes_total", "star_bytes_total", "traffic_ratio", "server_bytes",
                 "store_bytes_total", "store_growth")


def feed_fs_monitor(worker: Any, bytes_up: int, bytes_down: int) -> None:
    """Count a round's exchange bytes in FS's monitor of ``worker``, so
    FS's ``system_metrics.log`` includes the peer-to-peer traffic."""
    monitor = getattr(worker, "_monitor", None)
    if monitor is None:
        return
    monitor.track_upload_bytes(int(bytes_up))
    monitor.track_download_bytes(int(bytes_down))
