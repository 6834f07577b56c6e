"""A distributed worker's FS messages: kept gRPC channels, sends off the loop.

Real gRPC endpoints (FS's own servicer) on 127.0.0.1.  Skipped without
FederatedScope.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent import futures

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: control-send tests skipped")

import grpc  # noqa: E402
from federatedscope.core.gRPC_server import gRPCComServeFunc  # noqa: E402
from federatedscope.core.message import Message  # noqa: E402
from federatedscope.core.proto import gRPC_comm_manager_pb2_grpc  # noqa: E402

from fs_bittorrent.fs.control_send import OrderedSender, PersistentChannels  # noqa: E402

pytestmark = pytest.mark.fs


class _CommManager:
    """What PersistentChannels reads from FS's gRPCCommManager."""
    comp_method = grpc.Compression.NoCompression
    _send = None


@pytest.fixture
def endpoint():
    funcs = gRPCComServeFunc()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gRPC_comm_manager_pb2_grpc.add_gRPCComServeFuncServicer_to_server(funcs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", funcs
    server.stop(None).wait()


@contextlib.contextmanager
def _captured(caplog):
    """The module's records, whatever other tests did to propagation."""
    logger = logging.getLogger("fs_bittorrent.fs.control_send")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def _msg(i: int) -> Message:
    return Message(msg_type="bt_progress", sender=1, receiver=[0], state=i,
                   content={"round": i, "have": 3 * i})


def _received(funcs: gRPCComServeFunc) -> list[Message]:
    out = []
    for request in list(funcs.msg_queue):
        m = Message()
        m.parse(request.msg)
        out.append(m)
    return out


def test_messages_arrive_in_order_over_one_kept_channel(endpoint):
    address, funcs = endpoint
    cm = _CommManager()
    channels = PersistentChannels(cm).install()
    assert cm._send is channels
    for i in range(5):
        cm._send(address, _msg(i))
    assert channels.open_channels == 1          # one channel for all five
    got = _received(funcs)
    assert [m.state for m in got] == list(range(5))
    assert [m.content["have"] for m in got] == [0, 3, 6, 9, 12]
    channels.close()
    assert channels.open_channels == 0


def test_an_unreachable_address_is_logged_not_raised(endpoint, caplog):
    address, _ = endpoint
    with socket_closed_port() as dead, _captured(caplog):
        channels = PersistentChannels(_CommManager())
        channels(dead, _msg(1))                  # no exception, like FS's _send
        channels(address, _msg(2))               # the others still work
        channels.close()
    assert any("not delivered" in r.getMessage() for r in caplog.records)


class socket_closed_port:
    """An address where nothing listens."""

    def __enter__(self) -> str:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        return None


def test_ordered_sender_returns_at_once_keeps_order_and_close_drains():
    gate = threading.Event()
    sent: list[int] = []

    def slow_send(message: int) -> None:
        gate.wait(5)
        sent.append(message)

    sender = OrderedSender(slow_send)
    t0 = time.monotonic()
    for i in range(10):
        sender(i)
    assert time.monotonic() - t0 < 0.5         # the caller (the event loop) never waits
    assert sent == []
    gate.set()
    sender.close()                              # waits for every queued send
    assert sent == list(range(10)) and sender.sent == 10


def test_ordered_sender_goes_on_after_a_failing_send(caplog):
    sent: list[int] = []

    def send(message: int) -> None:
        if message == 1:
            raise RuntimeError("boom")
        sent.append(message)

    with _captured(caplog):
        sender = OrderedSender(send)
        for i in range(3):
            sender(i)
        sender.close()
    assert sent == [0, 2] and sender.sent == 2
    assert any("sending 1 failed" in r.getMessage() for r in caplog.records)


def _fan_out_to(servicers: list) -> tuple:
    """A gRPC endpoint on 127.0.0.1 per servicer (ids 1..n), and a FanOut
    on kept channels to them: (servers, servicers, channels, fan)."""
    from fs_bittorrent.fs.distributed import FanOut
    servers = []
    for f in servicers:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        gRPC_comm_manager_pb2_grpc.add_gRPCComServeFuncServicer_to_server(f, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, port))
    cm = _CommManager()
    cm.neighbors = {i + 1: f"127.0.0.1:{port}" for i, (_, port) in enumerate(servers)}
    channels = PersistentChannels(cm).install()
    fan = FanOut(cm, send=lambda m: pytest.fail("a multi-receiver message went one by one"))
    return servers, servicers, channels, fan


def test_fan_out_serializes_once_and_reaches_every_endpoint():
    servers, funcs, channels, fan = _fan_out_to([gRPCComServeFunc() for _ in range(3)])
    msg = Message(msg_type="bt_start", sender=0, receiver=[1, 2, 3], state=4,
                  content={"round": 4, "manifests": ["x" * 100] * 8})
    built = []
    transform = msg.transform
    msg.transform = lambda to_list=False: built.append(1) or transform(to_list)
    try:
        fan(msg)
        assert len(built) == 1                      # one request, one serialization
        for f in funcs:
            (got,) = _received(f)
            assert (got.msg_type, got.state, got.content["round"]) == ("bt_start", 4, 4)
        assert channels.open_channels == 3
    finally:
        fan.close()
        channels.close()
        for server, _ in servers:
            server.stop(None).wait()


class _WaitForAll(gRPCComServeFunc):
    """FS's servicer that answers only once every receiver holds the
    message: the sender must have all its RPCs in flight at once."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def sendMessage(self, request, context):
        self.barrier.wait()
        return super().sendMessage(request, context)


def test_fan_out_has_every_rpc_in_flight_at_once():
    """More receivers than the 8 threads the fan-out used to send from:
    each receiver holds its answer until all 12 have the message.  With a
    pool the last 4 never left (the first 8 RPCs waited for them), and the
    barrier broke after its timeout."""
    n = 12
    barrier = threading.Barrier(n, timeout=10)
    servers, funcs, channels, fan = _fan_out_to([_WaitForAll(barrier) for _ in range(n)])
    msg = Message(msg_type="bt_start", sender=0, receiver=list(range(1, n + 1)), state=2,
                  content={"round": 2})
    try:
        fan(msg)
        assert not barrier.broken
        for f in funcs:
            (got,) = _received(f)
            assert (got.msg_type, got.state) == ("bt_start", 2)
    finally:
        barrier.abort()
        fan.close()
        channels.close()
        for server, _ in servers:
            server.stop(None).wait()


def test_send_to_all_counts_what_was_delivered_and_logs_the_rest(endpoint, caplog):
    address, funcs = endpoint
    cm = _CommManager()
    channels = PersistentChannels(cm).install()
    dead = "127.0.0.1:1"                         # nothing listens there
    payload = PersistentChannels.serialize(_msg(7))
    with _captured(caplog):
        assert channels.send_to_all([address, dead], payload, "bt_progress") == 1
    assert [m.state for m in _received(funcs)] == [7]
    assert any(dead in r.getMessage() and "not delivered" in r.getMessage()
               for r in caplog.records)
    channels.close()
