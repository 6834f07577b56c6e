"""How a distributed worker's FS messages leave the process.

FS's ``gRPCCommManager._send`` opens a new gRPC channel for every message
(a TCP connection, HTTP/2's preface and settings), sends one blocking RPC
and closes the channel.  Two costs follow for the exchange, measured in
shaped namespaces (docs/design.md, "Distributed mode"):

* a client sends its ``bt_progress`` and its completion report *during*
  the exchange, from the event loop that also serves its peers: the whole
  set-up and RPC stalled its uploads;
* the server's ``bt_start`` reached the clients 60-180 ms apart, partly
  because each receiver got a fresh channel.

:class:`PersistentChannels` keeps one channel per address for the run
(same compression and options as FS's); :class:`OrderedSender` moves a
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

__all__ = ["OrderedSender", "PersistentChannels"]


class PersistentChannels:
    """Stands in for ``comm_manager._send``: one channel per address, kept.

    gRPC channels are thread-safe and reconnect on their own, so a peer that
    restarts is reached again; a failed RPC is logged and dropped, as FS's
    ``_send`` does."""

    def __init__(self, comm_manager: Any) -> None:
        self.cm = comm_manager
        self._lock = threading.Lock()
        self._stubs: dict[str, tuple[Any, Any]] = {}
        from federatedscope.core.proto import gRPC_comm_manager_pb2_grpc as pb2_grpc
        self._stub_class = pb2_grpc.gRPCComServeFuncStub

    def install(self) -> "PersistentChannels":
        self.cm._send = self
        return self

    def _stub(self, address: str) -> Any:
        with self._lock:
            entry = self._stubs.get(address)
            if entry is None:
                channel = grpc.insecure_channel(address, compression=self.cm.comp_method,
                                                options=(("grpc.enable_http_proxy", 0),))
                entry = self._stubs[address] = (self._stub_class(channel), channel)
            return entry[0]

    def __call__(self, address: str, message: Any) -> None:
        request = message.transform(to_list=True)
        try:
            self._stub(address).sendMessage(request)
        except grpc.RpcError as error:
            log.warning("message %s to %s not delivered: %s", message.msg_type, address,
                        error)

    @property
    def open_channels(self) -> int:
        return len(self._stubs)

    def close(self) -> None:
        with self._lock:
            entries, self._stubs = list(self._stubs.values()), {}
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
