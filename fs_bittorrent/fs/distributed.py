"""FederatedScope distributed mode with the exchange: one process per participant.

Control stays on FS's messages (gRPC, one endpoint per participant); piece
bytes go over each client's :class:`~fs_bittorrent.net.round_dataplane.RoundDataPlane`.

FS's own ``receive()`` spins on an empty deque while idle.  This host
replaces it: the gRPC servicer's queue becomes an :class:`Inbox` that wakes
an asyncio loop in the main thread, which runs FS's handlers, the manager's
timers (ticks, deadlines) and the data plane's sockets.  An idle worker
sleeps in ``epoll``.

Local training and evaluation (FS's ``model_para`` and ``evaluate``
handlers: seconds to minutes of CPU) run in one worker thread
(:data:`OFFLOADED`), so the data plane keeps accepting, refusing and timing
out connections meanwhile.  FS messages are still handled one at a time, in
order: the loop awaits the handler before it takes the next message, and
whatever the handler sends is handed back to the loop's thread (the
manager, its store and the data plane are only ever touched there).

Server loop: wait for every client to join, then handle messages until FS
moves past the last round (as ``Server.run``).  Client loop: handle
messages (dropping an old round's, as ``Client.run``) until ``finish``;
then close the session, the data plane, the store and the gRPC server, so
nothing outlives the run: no thread, socket or task.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections import deque
from typing import Any, Callable, Optional

from federatedscope.core.fed_runner import DistributedRunner
from federatedscope.core.message import Message

from ..net.round_dataplane import RoundDataPlane
from ..net.tls import LocalIdentity
from ..store.sqlite_store import SQLitePieceStore
from . import wire
from .control_send import OrderedSender, PersistentChannels
from .progress import SwarmProgress

log = logging.getLogger(__name__)

SERVER_WAIT = 300.0          # s a client waits for the server's endpoint before joining
_WEIGHTLESS = ("model_para", "evaluate", "finish")
#: FS client messages whose handlers train or evaluate: run off the loop.
OFFLOADED = ("model_para", "evaluate")


class Inbox:
    """Stands in for ``gRPCComServeFunc.msg_queue`` (a deque FS spins on).

    gRPC's threads ``append``; the event loop awaits :meth:`get`.  Until a
    loop is attached, items wait in a plain deque, so nothing that arrives
    between the worker's construction and its loop is lost or reordered.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._early: deque = deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._queue: Optional[asyncio.Queue] = None

    def append(self, item: Any) -> None:           # called from gRPC threads
        with self._lock:
            if self._loop is None:
                self._early.append(item)
                return
            loop, queue = self._loop, self._queue
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:                       # loop closed: the run is over
            log.debug("message after shutdown dropped")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loop = loop
            self._queue = asyncio.Queue()
            while self._early:
                self._queue.put_nowait(self._early.popleft())

    async def get(self) -> Any:
        """The next request, or None after :meth:`wake`."""
        return await self._queue.get()

    def wake(self) -> None:
        """Make a waiting :meth:`get` return None (from the loop's thread):
        a timer changed state the loop must re-check."""
        self._queue.put_nowait(None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._early) + (self._queue.qsize() if self._queue else 0)


def install_inbox(worker: Any) -> Inbox:
    """Swap FS's spinning queue for an :class:`Inbox` (keeping what arrived)."""
    funcs = worker.comm_manager.server_funcs
    inbox = Inbox()
    old = funcs.msg_queue
    funcs.msg_queue = inbox
    while old:
        inbox.append(old.popleft())
    return inbox


class LoopScheduler:
    """The manager's clock and timers on the event loop (monotonic seconds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 after: Optional[Callable[[], None]] = None) -> None:
        self.loop = loop
        self.after = after      # run after every timer (the server's loop re-checks)

    def now(self) -> float:
        return self.loop.time()

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except Exception:        # a timer's failure is logged, the worker goes on
                log.exception("timer callback failed")
            if self.after is not None:
                self.after()
        self.loop.call_at(at, run)


def parse(request: Any) -> Message:
    msg = Message()
    msg.parse(request.msg)
    if msg.msg_type in _WEIGHTLESS and msg.content == wire.NO_WEIGHTS:
        msg.content = None       # what the worker would see in standalone mode
    return msg


def dispatch(worker: Any, msg: Message) -> None:
    handler = worker.msg_handlers.get(msg.msg_type)
    if handler is None:
        log.error("%s %s: no handler for message type %r from %s; dropped",
                  type(worker).__name__, worker.ID, msg.msg_type, msg.sender)
        return
    handler(msg)


async def wait_for_listener(host: str, port: int, timeout: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; raise
    ``TimeoutError`` naming it after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    delay = 0.05
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
        except (OSError, asyncio.TimeoutError):
            if loop.time() + delay > end:
                raise TimeoutError(f"distribute.server_host:server_port {host}:{port} did not "
                                   f"accept connections within {timeout:g}s") from None
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        writer.close()
        return


class ClientFailed(RuntimeError):
    """A client cannot go on (one of its sends failed off the handler's
    path, or its store failed during an exchange): its process stops with
    this error, and the launcher stops the run, instead of every
    participant waiting for a message that will never come."""

    def __init__(self, client: Any, cause: BaseException) -> None:
        super().__init__(f"client {client}: {type(cause).__name__}: {cause}")
        self.client, self.cause = client, cause


class LoopSends:
    """Route a worker's sends made off the loop's thread back onto it.

    A handler running in :func:`run_offloaded`'s thread ends with FS's
    ``comm_manager.send`` (the trained ``model_para``, evaluation metrics);
    the manager's hook behind it writes the store and the manifest, which
    belong to the loop's thread.  ``call_soon_threadsafe`` queues the send
    ahead of the handler's completion, so order is kept.

    A send that fails there has no caller left to raise into (asyncio would
    only log it, and the client would carry on without, say, its manifest
    ever reaching the server: the federation would wait for it forever).
    The failure goes to ``on_failure`` (the manager's ``fail``); the
    client's loop then stops with it (:func:`serve_client`)."""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop,
                 on_failure: Optional[Callable[[BaseException], None]] = None) -> None:
        self._send = worker.comm_manager.send
        self._loop = loop
        self._thread = threading.get_ident()
        self.on_failure = on_failure
        worker.comm_manager.send = self

    def __call__(self, message: Any) -> None:
        if threading.get_ident() == self._thread:
            self._send(message)
        else:
            self._loop.call_soon_threadsafe(self._send_here, message)

    def _send_here(self, message: Any) -> None:
        try:
            self._send(message)
        except Exception as exc:
            log.error("sending %s failed: %s", getattr(message, "msg_type", message), exc)
            if self.on_failure is None:
                raise
            self.on_failure(exc)


async def run_offloaded(pool: concurrent.futures.Executor, worker: Any, msg: Message) -> None:
    """Dispatch ``msg`` in ``pool``'s thread and wait for it (the loop serves
    sockets and timers meanwhile)."""
    await asyncio.get_running_loop().run_in_executor(pool, dispatch, worker, msg)


async def serve_client(worker: Any, inbox: Inbox) -> None:
    """A client's whole run: data plane up, join, handle messages until
    ``finish``, then shut everything down."""
    bt = worker.bt
    settings = bt.settings
    loop = asyncio.get_running_loop()
    inbox.attach(loop)
    host = settings.dataplane_host or str(worker._cfg.distribute.client_host)
    # A fresh key per run; only its certificate (public) leaves the process.
    identity = LocalIdentity.generate() if settings.encryption else None
    plane = RoundDataPlane(bt, host=host, port=settings.dataplane_port,
                           handshake_timeout=settings.handshake_timeout,
                           max_block_size=settings.swarm_config().max_block_size,
                           faults=settings.faults, fault_seed=settings.seed,
                           identity=identity, max_pending=settings.max_pending_connections,
                           max_pending_per_address=settings.max_pending_per_address)
    await plane.start()
    bt.address = plane.address
    if identity is not None:
        bt.certificate = wire.certificate_to_text(identity.cert_der)
    else:
        log.warning("client data plane without encryption (bittorrent.encryption False): "
                    "model updates travel in the clear and peers are not authenticated")
    os.makedirs(settings.db_dir, exist_ok=True)
    bt.attach(LoopScheduler(loop), plane, store_factory=lambda: SQLitePieceStore(
        os.path.join(settings.db_dir, f"client_{worker.ID}.db")))
    log.info("client data plane listening on %s (%s)", plane.address,
             f"TLS 1.3, certificate sha256 {identity.fingerprint}" if identity else "plaintext")
    bt.on_failure = inbox.wake           # bt.fail: the loop below stops with the cause
    LoopSends(worker, loop, on_failure=bt.fail)
    # Messages to the server (manifest, progress, report, stats) leave from
    # a thread on a kept channel: a blocking RPC on the loop stalled the
    # uploads to every peer still fetching from this client.
    channels = PersistentChannels(worker.comm_manager).install()
    sender = OrderedSender(bt._send)
    bt._send = sender
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fs-train")
    try:
        # FS's send swallows a refused RPC: a join sent before the server
        # listens is lost and the run hangs.  Wait until it accepts.
        await wait_for_listener(str(worker._cfg.distribute.server_host),
                                int(worker._cfg.distribute.server_port), SERVER_WAIT)
        worker.join_in()
        while True:
            request = await inbox.get()
            if bt.failure is not None:
                raise ClientFailed(worker.ID, bt.failure) from bt.failure
            if request is None:
                continue
            msg = parse(request)
            if worker.state <= msg.state or msg.msg_type == "finish":
                if msg.msg_type in OFFLOADED:
                    await run_offloaded(pool, worker, msg)
                else:
                    dispatch(worker, msg)
            else:
                bt.stale_messages += 1
                log.info("client %s: dropping %s of old round %s (now %s)", worker.ID,
                         msg.msg_type, msg.state, worker.state)
            if msg.msg_type == "finish":
                break
    finally:
        pool.shutdown(wait=True)
        bt.shutdown()
        sender.close()
        channels.close()
        plane.end_round()
        await plane.close()
        log.info("client %s: data plane closed (%s)", worker.ID, plane.stats)


class FanOut:
    """The server's sends to several clients at once, in parallel.

    FS's gRPC ``send`` handles a multi-receiver message one receiver after
    the other, each with a new channel, its own protobuf encoding and a
    blocking RPC: 25-45 ms a receiver on 2 shared cores, so the eighth
    client got ``bt_start`` 0.2-0.36 s after the first, and every client's
    exchange waited for the last one's pieces.  Most of it is the protobuf
    encoding (pure Python here: about 20 ms for a ``bt_start`` of 8 clients,
    the same bytes for every receiver).  Here the request is built and
    serialized once and every receiver's RPC is put in flight at once, as a
    gRPC future on the channel :class:`~fs_bittorrent.fs.control_send.PersistentChannels`
    keeps for that client (``send_to_all``); the call returns when all are
    done, so FS's per-receiver order of messages is kept.  (Caching only
    the request object, as before, left the serialization to the stub, once
    per receiver under the GIL: ``bt_start`` still reached the clients about
    30 ms apart.  A pool of 8 threads, one blocking RPC each, as before
    this, sent to receivers 9-16 only when the first RPCs had returned: a
    round trip per 8 clients.)  Single receivers go straight through; a comm
    manager without kept channels (not what ``serve_server`` installs) sends
    from the pool."""

    def __init__(self, comm_manager: Any, send: Callable[[Any], None],
                 threads: int = 8) -> None:
        """``send``: FS's own ``comm_manager.send`` (the manager has put its
        hook in the comm manager's place)."""
        self.cm = comm_manager
        self.send = send
        self.pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                          thread_name_prefix="fs-fanout")

    def __call__(self, message: Any) -> None:
        receivers = message.receiver
        neighbors = self.cm.neighbors
        if not isinstance(receivers, list):
            receivers = [receivers] if receivers is not None else list(neighbors)
        addresses = [neighbors[r] for r in receivers if r in neighbors]
        if len(addresses) <= 1:
            self.send(message)
            return
        if isinstance(self.cm._send, PersistentChannels):
            # serialized once (pure-Python protobuf, per receiver otherwise)
            self.cm._send.send_to_all(addresses, self.cm._send.serialize(message),
                                      message.msg_type)
            return
        request = message.transform(to_list=True)
        message.transform = lambda to_list=True: request     # one encoding for all
        for f in [self.pool.submit(self.cm._send, a, message) for a in addresses]:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


async def serve_server(worker: Any, inbox: Inbox) -> None:
    """The server's run: wait for the clients to join, then handle messages
    until FS moves past the last round.  Timers (round deadlines) fire in
    between; nothing spins."""
    loop = asyncio.get_running_loop()
    inbox.attach(loop)
    channels = PersistentChannels(worker.comm_manager).install()
    fanout = FanOut(worker.comm_manager, worker.bt.raw_send)
    worker.bt.raw_send = fanout
    progress = SwarmProgress()
    # A deadline may end the run (the evaluation deadline of the last
    # round): every timer wakes the loop to re-check its condition.
    worker.bt.attach(LoopScheduler(loop, after=inbox.wake), progress=progress)
    async def serve_while(condition: Callable[[], bool]) -> None:
        while condition():
            request = await inbox.get()
            if request is not None:          # None: a timer woke us to re-check
                dispatch(worker, parse(request))

    try:
        await serve_while(lambda: worker.join_in_client_num < worker.client_num)
        await serve_while(lambda: worker.state <= worker.total_round_num)
        if not getattr(worker, "is_finish", False):
            worker.terminate(msg_type="finish")
    finally:
        worker.bt.flush_stats()
        progress.close()
        fanout.close()
        channels.close()


def stop_grpc(worker: Any) -> None:
    """Stop the worker's gRPC endpoint and wait for its threads.

    ``grpc.Server.stop`` leaves the thread pool FS gave it running; it is
    only reachable through gRPC's private state, so that part is guarded."""
    server = getattr(worker.comm_manager, "grpc_server", None)
    if server is None:
        return
    # No grace: the run is over (``finish`` handled), and a grace period
    # leaves a gRPC thread behind for its length.
    server.stop(None).wait()
    pool = getattr(getattr(server, "_state", None), "thread_pool", None)
    if pool is not None:
        pool.shutdown(wait=True)


class BitTorrentDistributedRunner(DistributedRunner):
    """FS's distributed runner with the exchange host loops in place of
    ``Server.run`` / ``Client.join_in`` + ``Client.run``."""

    def _set_up(self) -> None:
        super()._set_up()
        worker = self.server if self.cfg.distribute.role == "server" else self.client
        self.inbox = install_inbox(worker)

    def run(self) -> Any:
        if self.cfg.distribute.role == "server":
            try:
                asyncio.run(serve_server(self.server, self.inbox))
            finally:
                stop_grpc(self.server)
            return self.server.best_results
        try:
            asyncio.run(serve_client(self.client, self.inbox))
        finally:
            stop_grpc(self.client)
            log.info("client %s: shut down; threads left: %s", self.client.ID,
                     sorted(t.name for t in threading.enumerate()))
        return None
