"""How a distributed worker's FS messages leave the process.

FS's ``gRPCCommManager._send`` opens a new gRPC channel for every message
(a TCP connection, HTTP/2's preface and settings), sends one blocking RPC
and closes the channel.  Two costs follow for the exchange, measured in
shaped namespaces (docs/design.md, "Distributed mode"):

* a client sends its ``bt_progress`` and its completion report *during*
  the exchange, from the event loop that also serves its peers: the whole
  set-up and RPC stalled its uploads;
* the server's ``bt_start`` reached the clients 60-180 ms apart, about
  30 ms per receiver: the gRPC stub serializes the request for each
  receiver, in pure-Python protobuf, holding the GIL (the parallel fan-out
  could not overlap that), plus a fresh channel each.

:class:`PersistentChannels` keeps one channel per address for the run
(same compression and options as FS's) and sends requests serialized once
(:meth:`PersistentChannels.send_bytes`); :class:`OrderedSender` moves a
client's sends off the event loop into one thread, which keeps their order.
Neither changes what is sent.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable

import grpc

log = logging.getLogger(__name__)

__all__ = ["OrderedSender", "PersistentChannels", "SEND_METHOD"]

SEND_METHOD = "/gRPCComServeFunc/sendMessage"     # FS's one RPC (gRPC_comm_manager.proto)


class PersistentChannels:
    """Stands in for ``comm_manager._send``: one channel per address, kept.

    gRPC channels are thread-safe and reconnect on their own, so a peer that
    restarts is reached again; a failed RPC is logged and dropped, as FS's
    ``_send`` does."""

    def __init__(self, comm_manager: Any) -> None:
        self.cm = comm_manager
        self._lock = threading.Lock()
        self._calls: dict[str, tuple[Any, Any]] = {}
        from federatedscope.core.proto import gRPC_comm_manager_pb2 as pb2
        self._response = pb2.MessageResponse.FromString

    def install(self) -> "PersistentChannels":
        self.cm._send = self
        return self

    def _call(self, address: str) -> Any:
        """The ``sendMessage`` method on the kept channel to ``address``,
        taking the request already serialized (FS's service, FS's path)."""
        with self._lock:
            entry = self._calls.get(address)
            if entry is None:
                channel = grpc.insecure_channel(address, compression=self.cm.comp_method,
                                                options=(("grpc.enable_http_proxy", 0),))
                call = channel.unary_unary(SEND_METHOD, request_serializer=None,
                                           response_deserializer=self._response)
                entry = self._calls[address] = (call, channel)
            return entry[0]

    @staticmethod
    def serialize(message: Any) -> bytes:
        """FS's request for ``message``, as bytes: pure-Python protobuf
        here (a message per dict entry and list item: 10-30 ms for a
        ``bt_start`` of 8 clients in nested dicts, under 1 ms since its
        table is one field), so a message for several receivers is
        serialized once (``send_bytes``)."""
        return message.transform(to_list=True).SerializeToString()

    def __call__(self, address: str, message: Any) -> None:
        self.send_bytes(address, self.serialize(message), message.msg_type)

    def send_bytes(self, address: str, payload: bytes, what: str = "message") -> None:
        try:
            self._call(address)(payload)
        except grpc.RpcError as error:
            log.warning("%s to %s not delivered: %s", what, address, error)

    def send_to_all(self, addresses: list[str], payload: bytes, what: str = "message") -> int:
        """``payload`` to every address, all RPCs in flight at once; returns
        when every one has finished, with how many were delivered (a failed
        one is logged and dropped, as in :meth:`send_bytes`).

        Why not a thread per receiver: a pool caps how many RPCs are in
        flight, so with more receivers than threads the later ones wait
        whole round trips for a free thread (64 receivers answering after
        100 ms: the last ``bt_start`` arrived 0.80 s after the send began
        with 8 threads, 0.16 s with this; ``scripts/bench_fanout.py``).
        gRPC's futures put every call on the wire from this thread, and the
        channels carry them concurrently.  (gRPC serves a channel's futures
        from a thread it starts again whenever the channel was idle, i.e.
        once per channel and round; under the round start's load those
        starts held this thread 0.1-30 ms each.  Keeping them alive takes
        gRPC's private API, and putting all eight RPCs in flight within 3 ms
        that way did not change when the clients begin: docs/benchmarks.md,
        twelfth session.)"""
        pending = [(address, self._call(address).future(payload)) for address in addresses]
        delivered = 0
        for address, future in pending:
            try:
                future.result()
                delivered += 1
            except grpc.RpcError as error:
                log.warning("%s to %s not delivered: %s", what, address, error)
        return delivered

    @property
    def open_channels(self) -> int:
        return len(self._calls)

    def close(self) -> None:
        with self._lock:
            entries, self._calls = list(self._calls.values()), {}
        for _, channel in entries:
            channel.close()


class OrderedSender:
    """``send(message)`` returns at once; one thread sends, in call order.

    ``close`` waits for everything queued.  An exception in a send is
    logged; the ones after it are still sent."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self._send = send
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fs-send")
        self.sent = 0

    def _run(self, message: Any) -> None:
        try:
            self._send(message)
            self.sent += 1
        except Exception:
            log.exception("sending %s failed", getattr(message, "msg_type", message))

    def __call__(self, message: Any) -> None:
        self._pool.submit(self._run, message)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
