"""asyncio host for one :class:`~fs_bittorrent.core.session.SwarmSession` over TCP.

This is the *host side* of the sans-IO design.  The session decides what
to say; this module only moves bytes and time:

* **time** -- ``now()`` is :func:`time.monotonic`; a tick task calls
  ``session.tick(now)`` every ``tick_interval`` seconds (``asyncio.sleep``,
  no busy loop) until the peer is closed;
* **inbound** -- one reader task per connection feeds a
  :class:`~fs_bittorrent.core.codec.FrameDecoder` (handshake first) and hands
  each message to ``session.handle`` synchronously.  The connection's peer id
  is the one in the handshake; after it, the decoder's limits are tightened
  to the swarm's layout.  Any :class:`~fs_bittorrent.errors.BitTorrentError`
  (from decoding or from the session) is logged and counted, the connection
  is dropped and ``session.peer_lost`` called: a peer never crashes because
  of what another one sent;
* **outbound** -- every ``(peer, message)`` the session returns is put on
  that connection's :class:`asyncio.Queue`; a sender task per connection
  encodes with :func:`~fs_bittorrent.core.codec.encode_parts` (block bytes are
  not copied by the encoder), writes with ``writer.writelines`` and awaits
  ``drain()`` for backpressure.  ``handle`` and ``tick`` therefore stay
  synchronous.  The queue is not bounded by the host, but what a session
  queues is: blocks only go out in answer to requests, and a peer may only
  have ``credit`` bytes of requests outstanding.  A ``Close`` action is queued
  behind the messages before it (they are flushed, then the socket closed);
  the session is told ``peer_lost`` at once.

One connection per peer pair
----------------------------
:func:`connect_mesh` lets only the *lower* id dial.  Should both sides dial
anyway (or a reconnect cross a live connection), the connection **dialed by
the lower id wins** on both ends: the loser is closed, and if it had already
been introduced to the session, ``peer_lost`` resets that peer so the
handshake is replayed on the surviving connection.  Because a handshake can
claim any peer id, it is checked (swarm id and HMAC) *before* it may displace
a live connection, so a peer without the secret cannot knock an honest one
off.  A refused handshake closes the connection before the session stores
any state for it; it is counted in ``stats.handshakes_refused``.

What remains for FederatedScope distributed mode
------------------------------------------------
* control (round start, manifests, secret, deadline, "done" reports) must go
  through FS's comm manager (gRPC) rather than being wired up by the caller;
* address exchange: each client should report ``(peer_id, host, port)`` of
  its :class:`DataPlanePeer` to the server, which broadcasts the table so
  that clients can call :func:`connect_mesh` (today tests pass ports by hand);
* a round deadline (``session.deadline``) driven by the server, reconnect
  with back-off after a dropped connection, TLS or at least binding to a
  non-loopback interface, and a ``sendmsg``-based writer: on Python < 3.12
  ``writelines`` joins the buffers (one copy of each block) inside asyncio.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..core.codec import FrameDecoder, WireLimits, encode_parts
from ..core.layout import make_auth
from ..core.messages import Handshake
from ..core.session import Close, SwarmSession
from ..errors import BitTorrentError, HandshakeRefused

log = logging.getLogger(__name__)

__all__ = ["DataPlanePeer", "HostStats", "PeerHost", "check_handshake", "connect_mesh", "run_swarm"]

_READ_CHUNK = 256 * 1024
_CLOSE = object()          # sender-queue sentinel: flush, then close the socket


def now() -> float:
    return time.monotonic()


@dataclass
class HostStats:
    """What the host saw (the session keeps its own ``stats``)."""

    connections_accepted: int = 0
    connections_dialed: int = 0
    dial_failures: int = 0
    duplicate_connections: int = 0     # closed by the lower-id-dials rule
    handshakes_refused: int = 0
    handshake_timeouts: int = 0
    protocol_errors: int = 0           # BitTorrentErrors after the handshake
    closes_by_session: int = 0
    connections_lost: int = 0          # EOF / reset from the remote side
    bytes_in: int = 0
    bytes_out: int = 0
    errors: deque = field(default_factory=lambda: deque(maxlen=100))


class _Conn:
    """One TCP connection; ``pid`` is None until the handshake named it."""

    __slots__ = ("pid", "dialer", "reader", "writer", "queue", "tasks", "closed",
                 "registered", "addr", "round")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 pid: Optional[int], dialer: Optional[int]) -> None:
        self.pid = pid
        self.dialer = dialer          # peer id of the side that opened it
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.closed = False
        self.registered = False
        self.round: Optional[int] = None    # the swarm round it belongs to, if any
        try:
            self.addr = writer.get_extra_info("peername")
        except Exception:  # pragma: no cover
            self.addr = None

    def __repr__(self) -> str:
        return f"<conn pid={self.pid} dialer={self.dialer} addr={self.addr}>"


class PeerHost:
    """TCP mechanics shared by the data-plane hosts: a listening server, one
    connection per remote peer (lower id's dial wins), a reader and a sender
    task per connection, and clean shutdown.

    What a message *means* is left to the subclass, through four hooks:
    ``_accept_handshake`` (may wait, may raise), ``_limits`` (the decoder's
    limits once a connection is bound), ``_deliver`` (one decoded message)
    and ``_lost`` (a registered connection went away).
    """

    def __init__(self, peer_id: int, host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout: float = 10.0, connect_timeout: float = 5.0,
                 max_block_size: int = 128 * 1024) -> None:
        self.peer_id = peer_id
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.stats = HostStats()
        self._server: Optional[asyncio.AbstractServer] = None
        self._conns: dict[int, _Conn] = {}          # peer id -> live connection
        self._all: set[_Conn] = set()               # every open connection
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        # Before the handshake the layout is unknown to the decoder: pieces
        # and bitfields are bounded by the block limit only.
        self._pre_limits = WireLimits(max_block_size=max_block_size)

    # ---- hooks --------------------------------------------------------------
    async def _accept_handshake(self, conn: _Conn, hs: Handshake) -> None:
        """Raise :class:`HandshakeRefused` unless ``hs`` may bind ``conn``."""
        raise NotImplementedError

    def _limits(self, conn: _Conn) -> WireLimits:
        raise NotImplementedError

    def _deliver(self, conn: _Conn, msg: object) -> None:
        raise NotImplementedError

    def _lost(self, conn: _Conn) -> None:
        raise NotImplementedError

    # ---- life cycle ---------------------------------------------------------
    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one)."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._on_accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def connected_peers(self) -> list[int]:
        return sorted(self._conns)

    async def _dial(self, peer_id: int, host: str, port: int) -> Optional[_Conn]:
        """Open a connection to ``peer_id``, register it and start its tasks;
        None if the dial failed or a live connection wins."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.stats.dial_failures += 1
            self.stats.errors.append(f"dial {peer_id} at {host}:{port}: {exc!r}")
            log.info("peer %s: cannot dial peer %s at %s:%s: %r", self.peer_id, peer_id,
                     host, port, exc)
            return None
        if self._closed:
            writer.close()
            return None
        self.stats.connections_dialed += 1
        conn = _Conn(reader, writer, peer_id, self.peer_id)
        self._all.add(conn)
        if not self._register(conn):
            return None
        self._start_conn(conn)
        return conn

    async def close(self) -> None:
        """Close every connection and the server; cancel and await every
        task this host started."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._all):
            conn.closed = True
            if conn.writer is not None:
                conn.writer.close()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._all):
            if conn.writer is None:
                continue
            try:
                await asyncio.wait_for(conn.writer.wait_closed(), 1.0)
            except (Exception, asyncio.CancelledError):  # reset, timeout: closed anyway
                pass
        self._all.clear()
        self._conns.clear()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:  # pragma: no cover
                pass

    # ---- tasks --------------------------------------------------------------
    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_conn(self, conn: _Conn) -> None:
        tag = f"{self.peer_id}<->{conn.pid if conn.pid is not None else '?'}"
        conn.tasks.append(self._spawn(self._reader_loop(conn), f"read-{tag}"))
        conn.tasks.append(self._spawn(self._sender_loop(conn), f"send-{tag}"))

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        self.stats.connections_accepted += 1
        conn = _Conn(reader, writer, None, None)
        self._all.add(conn)
        self._start_conn(conn)

    # ---- inbound ------------------------------------------------------------
    async def _reader_loop(self, conn: _Conn) -> None:
        decoder = FrameDecoder(self._pre_limits, expect_handshake=True)
        deadline = now() + self.handshake_timeout
        reason = "eof"
        try:
            while not conn.closed:
                if decoder.handshake_done:
                    data = await conn.reader.read(_READ_CHUNK)
                else:
                    left = deadline - now()
                    if left <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(conn.reader.read(_READ_CHUNK), left)
                if not data:
                    break
                self.stats.bytes_in += len(data)
                decoder.feed(data)
                while not conn.closed:
                    msg = decoder.next_message()
                    if msg is None:
                        break
                    if type(msg) is Handshake:
                        if not await self._on_handshake(conn, msg):
                            return
                        decoder.set_limits(self._limits(conn))
                        continue
                    self._deliver(conn, msg)
        except asyncio.TimeoutError:
            self.stats.handshake_timeouts += 1
            reason = "handshake timeout"
        except BitTorrentError as exc:
            if isinstance(exc, HandshakeRefused) or not conn.registered:
                self.stats.handshakes_refused += 1
            else:
                self.stats.protocol_errors += 1
            self.stats.errors.append(f"{conn!r}: {type(exc).__name__}: {exc}")
            log.warning("peer %s: dropping %r: %s: %s", self.peer_id, conn,
                        type(exc).__name__, exc)
            reason = f"{type(exc).__name__}: {exc}"
        except (ConnectionError, OSError) as exc:
            reason = repr(exc)
        if not conn.closed:
            if reason == "eof" or reason.startswith(("Connection", "OSError")):
                self.stats.connections_lost += 1
            self._drop(conn, reason, graceful=False)

    async def _on_handshake(self, conn: _Conn, hs: Handshake) -> bool:
        """Bind ``conn`` to the handshake's peer id; False if it was closed
        as the losing side of a crossed pair.  Raises on a bad handshake."""
        if conn.pid is not None:                       # we dialed: must be who we called
            if hs.peer_id != conn.pid:
                raise HandshakeRefused("peer_id", hs.peer_id, f"we dialed peer {conn.pid}")
            self._deliver(conn, hs)
            return True
        # Checked before an unproven handshake may displace a live connection.
        await self._accept_handshake(conn, hs)
        if conn.closed:
            return False
        conn.pid = hs.peer_id
        conn.dialer = hs.peer_id
        if not self._register(conn):
            return False
        self._deliver(conn, hs)
        return True

    def _register(self, conn: _Conn) -> bool:
        """Make ``conn`` the connection to ``conn.pid`` unless a live one wins
        (the one dialed by the lower id); False if ``conn`` was closed."""
        pid = conn.pid
        live = self._conns.get(pid)
        if live is not None and live is not conn:
            winner = min(self.peer_id, pid)
            if conn.dialer != winner or live.dialer == winner:
                self.stats.duplicate_connections += 1
                log.debug("peer %s: duplicate connection %r closed", self.peer_id, conn)
                self._drop(conn, "duplicate connection", graceful=False)
                return False
            self.stats.duplicate_connections += 1
            log.debug("peer %s: %r replaces %r", self.peer_id, conn, live)
            self._drop(live, "replaced by the lower id's connection", graceful=False)
        self._conns[pid] = conn
        conn.registered = True
        return True

    # ---- outbound -----------------------------------------------------------
    def _enqueue(self, pid: int, msg: object) -> None:
        """Queue one message (or a session's ``Close``) for peer ``pid``."""
        conn = self._conns.get(pid)
        if type(msg) is Close:
            self.stats.closes_by_session += 1
            log.info("peer %s: session closes peer %s: %s", self.peer_id, pid, msg.reason)
            if conn is not None:
                self._drop(conn, msg.reason, graceful=True)
            return
        if conn is None or conn.closed:
            log.debug("peer %s: no connection to %s; %s dropped", self.peer_id, pid,
                      type(msg).__name__)
            return
        conn.queue.put_nowait(msg)

    async def _sender_loop(self, conn: _Conn) -> None:
        writer, queue = conn.writer, conn.queue
        try:
            while True:
                item = await queue.get()
                parts: list = []
                done = False
                while True:
                    if item is _CLOSE:
                        done = True
                        break
                    parts.extend(encode_parts(item))
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if parts:
                    writer.writelines(parts)
                    self.stats.bytes_out += sum(len(p) if type(p) is bytes else p.nbytes
                                                for p in parts)
                    await writer.drain()
                if done:
                    writer.close()
                    return
        except (ConnectionError, OSError) as exc:
            if not conn.closed:
                self.stats.connections_lost += 1
                self._drop(conn, repr(exc), graceful=False)

    def _drop(self, conn: _Conn, reason: str, graceful: bool) -> None:
        """Forget ``conn``; tell the subclass if it was the peer's connection.

        ``graceful``: flush what is queued before closing the socket (a
        session's ``Close``); otherwise close it now."""
        if conn.closed:
            return
        conn.closed = True
        was_live = conn.registered and self._conns.get(conn.pid) is conn
        if was_live:
            del self._conns[conn.pid]
        conn.registered = False
        self._all.discard(conn)
        current = asyncio.current_task()
        if graceful:
            conn.queue.put_nowait(_CLOSE)
            for t in conn.tasks[:1]:          # the reader: nothing more to read
                if t is not current:
                    t.cancel()
        else:
            for t in conn.tasks:
                if t is not current:
                    t.cancel()
            conn.writer.close()
        # Closing the socket is enough for the remote side; the task that
        # owns the stream finishes on its own (or was cancelled above).
        if was_live:
            self._lost(conn)


class DataPlanePeer(PeerHost):
    """Owns one session, a listening server on ``host`` and one TCP
    connection per remote peer.

    >>> peer = DataPlanePeer(session)            # doctest: +SKIP
    >>> await peer.start(); print(peer.port)     # doctest: +SKIP
    >>> await peer.connect_to(1, "127.0.0.1", port_of_1)
    >>> ok = await peer.run_until_complete(timeout=30)
    >>> await peer.close()
    """

    def __init__(self, session: SwarmSession, host: str = "127.0.0.1", port: int = 0,
                 tick_interval: float = 0.1, handshake_timeout: float = 10.0,
                 connect_timeout: float = 5.0) -> None:
        super().__init__(session.peer_id, host, port, handshake_timeout, connect_timeout,
                         session.config.max_block_size)
        self.session = session
        self.tick_interval = tick_interval
        self._complete = asyncio.Event()
        self._layout_limits = WireLimits(num_pieces=session.layout.num_pieces,
                                         max_block_size=session.config.max_block_size)

    async def start(self) -> None:
        """Listen and start ticking."""
        if self._server is not None:
            return
        await super().start()
        self._spawn(self._tick_loop(), f"tick-{self.peer_id}")
        self._check_complete()

    @property
    def complete(self) -> bool:
        return self.session.complete

    async def connect_to(self, peer_id: int, host: str, port: int) -> bool:
        """Dial ``peer_id`` and send our handshake; False if the dial failed.

        Dials even when ``peer_id`` is lower than ours (see the module
        docstring for how a crossed pair is resolved); :func:`connect_mesh`
        is the helper that dials only upward.
        """
        if self._closed or peer_id == self.peer_id:
            return False
        live = self._conns.get(peer_id)
        if live is not None and live.dialer == min(self.peer_id, peer_id):
            return True                  # already on the connection that would win
        if await self._dial(peer_id, host, port) is None:
            return False
        self._route(self.session.connect(peer_id, now()))
        return True

    async def run_until_complete(self, timeout: float) -> bool:
        """Wait (serving others meanwhile) until the session holds every
        piece; False on timeout.  The peer keeps serving until :meth:`close`."""
        self._check_complete()
        try:
            await asyncio.wait_for(self._complete.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close the session (releasing every per-transfer record), then the
        connections, the server and every task."""
        if not self._closed:
            self.session.close(now())
        await super().close()

    async def _tick_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.tick_interval)
            if self._closed:
                return
            self._route(self.session.tick(now()))
            self._check_complete()

    # ---- hooks --------------------------------------------------------------
    async def _accept_handshake(self, conn: _Conn, hs: Handshake) -> None:
        check_handshake(self.session, hs)

    def _limits(self, conn: _Conn) -> WireLimits:
        return self._layout_limits

    def _deliver(self, conn: _Conn, msg: object) -> None:
        self._route(self.session.handle(conn.pid, msg, now()))
        self._check_complete()

    def _lost(self, conn: _Conn) -> None:
        self.session.peer_lost(conn.pid, now())

    def _route(self, out) -> None:
        for pid, msg in out:
            if type(msg) is Close and pid not in self._conns:
                self.stats.closes_by_session += 1
                self.session.peer_lost(pid, now())
                continue
            self._enqueue(pid, msg)

    def _check_complete(self) -> None:
        if self.session.complete and not self._complete.is_set():
            self._complete.set()


def check_handshake(session: SwarmSession, hs: Handshake) -> None:
    """The session's own handshake checks (swarm id, not ourselves, the
    experiment secret's HMAC, bans), run by a host before an unproven
    handshake may take over a connection; the session repeats them."""
    if hs.swarm_id != session.layout.swarm_id:
        raise HandshakeRefused("swarm_id", hs.swarm_id.hex(),
                               "another experiment, round or set of manifests")
    if hs.peer_id == session.peer_id:
        raise HandshakeRefused("peer_id", hs.peer_id, "that is our own id")
    if session.secret and not hmac.compare_digest(
            hs.auth, make_auth(session.secret, session.layout.swarm_id, hs.peer_id)):
        raise HandshakeRefused("auth", hs.auth.hex()[:16], "bad experiment secret")
    if hs.peer_id in session.banned:
        raise HandshakeRefused("peer_id", hs.peer_id, "banned this round")


async def connect_mesh(peers: Sequence[DataPlanePeer], host: str = "127.0.0.1") -> None:
    """Full mesh among started peers: each pair dialed once, by the lower id."""
    dials = []
    for a in peers:
        for b in peers:
            if a.peer_id < b.peer_id:
                dials.append(a.connect_to(b.peer_id, host, b.port))
    await asyncio.gather(*dials)


async def run_swarm(peers: Sequence[DataPlanePeer], timeout: float) -> bool:
    """Start ``peers``, mesh them, wait for every one to complete (bounded)."""
    for p in peers:
        await p.start()
    await connect_mesh(peers)
    results = await asyncio.gather(*(p.run_until_complete(timeout) for p in peers))
    return all(results)

