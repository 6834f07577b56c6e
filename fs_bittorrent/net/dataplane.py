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

Authentication and encryption (``identity``)
--------------------------------------------
With a :class:`~fs_bittorrent.net.tls.LocalIdentity` every connection is
mutual TLS 1.3 before a single protocol byte moves, and each side *pins* the
other: ``pins`` maps peer id -> SHA-256 fingerprint of the certificate the
coordinator published for it.  The dialer checks the accepting side's
certificate against the pin of the id it dialed; the accepting side checks,
once the handshake names a peer id, that the id is a member (``members``)
and that the certificate is the one pinned for it.  Without an identity
(``bittorrent.encryption: False``) bytes travel in the clear and only the
membership and the optional HMAC secret are checked.

Unauthenticated connections are capped: at most ``max_pending_per_address``
per source address, and at most ``max_pending`` in all from addresses that
are not a member's (``member_hosts``), so a flood from elsewhere cannot
lock the members out.  Each must finish TLS and the handshake within
``handshake_timeout`` of its accept.  Refusals, caps and timeouts are
counted in :class:`HostStats` and logged as rate-limited warnings
(:class:`~fs_bittorrent.net.ratelog.RateLimitedWarnings`) while they happen.

One connection per peer pair
----------------------------
:func:`connect_mesh` lets only the *lower* id dial.  Should both sides dial
anyway (or a reconnect cross a live connection), the connection **dialed by
the lower id wins** on both ends: the loser is closed, and if it had already
been introduced to the session, ``peer_lost`` resets that peer so the
handshake is replayed on the surviving connection.  Any other second
connection for a connected peer id is closed and the live one stays.  Both
cases are logged.  A handshake is checked (swarm id, membership, pinned
certificate or HMAC) *before* it may displace a live connection, so with
encryption on only the holder of the peer's key can cause either; a refused
handshake closes the connection before the session stores any state for it
and is counted in ``stats.handshakes_refused``.

Remaining limitation: on Python < 3.12 ``writelines`` joins the buffers (one
copy of each block) inside asyncio.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..core.codec import FrameDecoder, WireLimits, encode_handshake_frame, encode_parts
from ..core.layout import make_auth
from ..core.messages import Handshake, Piece
from ..core.session import Close, SwarmSession
from ..errors import BitTorrentError, HandshakeRefused
from .pacing import kernel_not_sent, low_water_mark, poll_interval
from .ratelog import RateLimitedWarnings
from .tls import LocalIdentity, fingerprint, peer_certificate
from .uplink import UplinkMeter, kernel_unsent

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
    duplicate_connections: int = 0     # a second connection for a connected peer id
    handshakes_refused: int = 0        # TLS or protocol handshake refused
    tls_failures: int = 0              # of which: the TLS handshake failed
    handshake_timeouts: int = 0
    connections_capped: int = 0        # refused at accept: too many unauthenticated
    pending_peak: int = 0              # most unauthenticated connections at once
    protocol_errors: int = 0           # BitTorrentErrors after the handshake
    closes_by_session: int = 0
    connections_lost: int = 0          # EOF / reset from the remote side
    connections_reused: int = 0        # a later round's handshake accepted on a live connection
    stale_handshakes: int = 0          # an old round's handshake on a live connection: ignored
    late_messages: int = 0             # messages of a round that is over: dropped
    pace_waits: int = 0                # paced: blocks left held, the uplink backlog at its mark
    bytes_in: int = 0
    bytes_out: int = 0
    errors: deque = field(default_factory=lambda: deque(maxlen=100))


class _Conn:
    """One TCP connection; ``pid`` is None until the handshake named it."""

    __slots__ = ("pid", "dialer", "reader", "writer", "queue", "tasks", "closed",
                 "registered", "addr", "round", "fingerprint", "src", "pending", "stranger",
                 "deadline", "opened", "queued")

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
        self.fingerprint: Optional[str] = None   # of the peer's TLS certificate
        self.pending = False                # accepted, not yet bound to a peer id
        self.stranger = False               # counted against ``max_pending``
        self.deadline = float("inf")        # monotonic time its handshake must be done by
        self.opened = False                 # our opening handshake is out: later ones are framed
        self.queued = 0                     # block bytes in ``queue`` not yet written
        try:
            self.addr = writer.get_extra_info("peername")
        except Exception:  # pragma: no cover
            self.addr = None
        self.src = self.addr[0] if self.addr else "?"

    def __repr__(self) -> str:
        return f"<conn pid={self.pid} dialer={self.dialer} addr={self.addr}>"


class PeerHost:
    """TCP mechanics shared by the data-plane hosts: a listening server, one
    connection per remote peer (lower id's dial wins), a reader and a sender
    task per connection, and clean shutdown.

    What a message *means* is left to the subclass, through five hooks:
    ``_before_tls`` (an accepted connection may wait before its TLS
    handshake), ``_accept_handshake`` (may wait, may raise), ``_limits`` (the
    decoder's limits once a connection is bound), ``_deliver`` (one decoded
    message) and ``_lost`` (a registered connection went away).

    ``identity``: TLS on every connection, peers pinned by ``pins``; None
    for plaintext.  ``members``: peer ids that may connect (None: any).
    """

    def __init__(self, peer_id: int, host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout: float = 10.0, connect_timeout: float = 5.0,
                 max_block_size: int = 128 * 1024,
                 identity: Optional[LocalIdentity] = None, max_pending: int = 64,
                 max_pending_per_address: int = 8) -> None:
        self.peer_id = peer_id
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.identity = identity
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.pins: dict[int, str] = {}               # peer id -> certificate fingerprint
        self.members: Optional[set] = None           # peer ids that may connect
        self.member_hosts: set = set()               # their published addresses
        self._pending_by_src: dict[str, int] = {}    # unauthenticated, per source address
        self._pending_strangers = 0                  # unauthenticated, from non-members
        self.alarms = RateLimitedWarnings(log, f"data plane {host}")
        self.stats = HostStats()
        self._server: Optional[asyncio.AbstractServer] = None
        self._conns: dict[int, _Conn] = {}          # peer id -> live connection
        self._all: set[_Conn] = set()               # every open connection
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._pump_handle: Optional[asyncio.TimerHandle] = None   # paced uploads' timer
        self._pump_session: Optional[SwarmSession] = None         # ... and its session
        # The uplink's measured rate (``uplink_rate``), from samples taken
        # by the subclass while it exchanges (``sample_uplink``).
        self.uplink = UplinkMeter()
        # Before the handshake the layout is unknown to the decoder: pieces
        # and bitfields are bounded by the block limit only.
        self._pre_limits = WireLimits(max_block_size=max_block_size)

    # ---- hooks --------------------------------------------------------------
    async def _before_tls(self, conn: _Conn, deadline: float) -> None:
        """Wait (until ``deadline``, monotonic) before an accepted
        connection's TLS handshake; the default does not wait."""

    async def _accept_handshake(self, conn: _Conn, hs: Handshake) -> None:
        """Raise :class:`HandshakeRefused` unless ``hs`` may bind ``conn``."""
        raise NotImplementedError

    async def _known_handshake(self, conn: _Conn, hs: Handshake) -> bool:
        """A handshake on a connection already bound to ``hs.peer_id`` (the
        dialed peer's answer, a repeat, or a later round's); False if it
        closed the connection.  The default hands it to the session."""
        self._deliver(conn, hs)
        return True

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
        self.alarms.prefix = f"data plane {self.host}:{self.port}"

    def set_peers(self, certificates: dict[int, bytes],
                  members: Optional[set] = None) -> None:
        """Pin each peer id to its certificate (DER) and admit only
        ``members`` (default: the ids of ``certificates``); the
        certificates become TLS trust anchors."""
        if self.identity is not None:
            self.identity.trust(certificates.values())
        self.pins = {pid: fingerprint(der) for pid, der in certificates.items()}
        self.members = set(certificates) if members is None else set(members)

    def check_identity(self, conn: _Conn, pid: int) -> None:
        """An accepted connection's claimed ``pid`` must be a member and,
        with TLS, present the certificate pinned for that id."""
        if self.members is not None and pid not in self.members:
            raise HandshakeRefused("peer_id", pid, "not a member of this round "
                                   "(not in the coordinator's table)")
        if self.identity is None:
            return
        pin = self.pins.get(pid)
        if pin is None:
            raise HandshakeRefused("peer_id", pid, "no certificate published for this peer id")
        if conn.fingerprint != pin:
            raise HandshakeRefused("peer_id", pid,
                                   f"certificate {str(conn.fingerprint)[:16]} is not the one "
                                   f"published for peer {pid} ({pin[:16]})")

    # ---- admission of unauthenticated connections ----------------------------
    def _admit(self, conn: _Conn) -> Optional[str]:
        """Why ``conn`` must be refused at accept, or None (and count it)."""
        src = conn.src
        per = self._pending_by_src.get(src, 0)
        if per >= self.max_pending_per_address:
            return (f"{per} unauthenticated connections from {src} already "
                    f"(max_pending_per_address)")
        stranger = src not in self.member_hosts
        if stranger and self._pending_strangers >= self.max_pending:
            return (f"{self._pending_strangers} unauthenticated connections from non-member "
                    f"addresses already (max_pending)")
        self._pending_by_src[src] = per + 1
        conn.pending, conn.stranger = True, stranger
        self._pending_strangers += stranger
        total = sum(self._pending_by_src.values())
        if total > self.stats.pending_peak:
            self.stats.pending_peak = total
        return None

    def _release(self, conn: _Conn) -> None:
        """``conn`` is bound to a peer or gone: it no longer counts as pending."""
        if not conn.pending:
            return
        conn.pending = False
        left = self._pending_by_src.get(conn.src, 1) - 1
        if left > 0:
            self._pending_by_src[conn.src] = left
        else:
            self._pending_by_src.pop(conn.src, None)
        if conn.stranger:
            self._pending_strangers -= 1

    @property
    def pending_connections(self) -> int:
        return sum(self._pending_by_src.values())

    @property
    def connected_peers(self) -> list[int]:
        return sorted(self._conns)

    async def _dial(self, peer_id: int, host: str, port: int) -> Optional[_Conn]:
        """Open a connection to ``peer_id``, register it and start its tasks;
        None if the dial failed or a live connection wins."""
        kw: dict = {}
        timeout = self.connect_timeout
        if self.identity is not None:
            if peer_id not in self.pins:
                self.stats.dial_failures += 1
                log.warning("peer %s: no certificate published for peer %s: not dialing",
                            self.peer_id, peer_id)
                return None
            # The accepting side may hold its TLS handshake until it has
            # begun the round (``_before_tls``): allow for that wait.
            timeout = self.connect_timeout + self.handshake_timeout
            kw = dict(ssl=self.identity.client_context, server_hostname="",
                      ssl_handshake_timeout=timeout)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, **kw), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.stats.dial_failures += 1
            self.stats.errors.append(f"dial {peer_id} at {host}:{port}: {exc!r}")
            log.info("peer %s: cannot dial peer %s at %s:%s: %r", self.peer_id, peer_id,
                     host, port, exc)
            return None
        if self._closed:
            writer.close()
            return None
        fp = None
        if self.identity is not None:
            fp = fingerprint(peer_certificate(writer.get_extra_info("ssl_object")) or b"")
            if fp != self.pins.get(peer_id):
                writer.close()
                self.stats.dial_failures += 1
                self.stats.handshakes_refused += 1
                self.stats.errors.append(f"dial {peer_id}: certificate {fp[:16]} not pinned")
                self.alarms.note("pin", f"{host}:{port} is not peer {peer_id}: certificate "
                                 f"{fp[:16]} is not the one published for it")
                return None
        self.stats.connections_dialed += 1
        conn = _Conn(reader, writer, peer_id, self.peer_id)
        conn.fingerprint = fp
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
        self.alarms.close()
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
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
        self._pending_by_src.clear()
        self._pending_strangers = 0
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
        _keepalive(conn.writer)
        tag = f"{self.peer_id}<->{conn.pid if conn.pid is not None else '?'}"
        conn.tasks.append(self._spawn(self._reader_loop(conn), f"read-{tag}"))
        conn.tasks.append(self._spawn(self._sender_loop(conn), f"send-{tag}"))

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        conn = _Conn(reader, writer, None, None)
        why = self._admit(conn)
        if why is not None:
            self.stats.connections_capped += 1
            self.alarms.note("cap", why)
            writer.transport.abort()
            return
        self.stats.connections_accepted += 1
        if self.identity is not None:
            # Bytes read before ``start_tls`` would land in the plaintext
            # stream and be lost to TLS: read nothing until then.
            writer.transport.pause_reading()
        self._all.add(conn)
        self._start_conn(conn)

    async def _secure(self, conn: _Conn, deadline: float) -> None:
        """TLS on an accepted connection (server side), within ``deadline``;
        remembers the fingerprint of the certificate the peer proved."""
        await self._before_tls(conn, deadline)
        left = deadline - now()
        if left <= 0:
            raise asyncio.TimeoutError
        try:
            await asyncio.wait_for(conn.writer.start_tls(
                self.identity.server_context, ssl_handshake_timeout=left), left)
        except (ssl.SSLError, ConnectionError) as exc:
            self.stats.tls_failures += 1
            raise HandshakeRefused("tls", type(exc).__name__,
                                   f"TLS handshake failed: {exc}") from None
        der = peer_certificate(conn.writer.get_extra_info("ssl_object"))
        conn.fingerprint = fingerprint(der) if der else None

    # ---- inbound ------------------------------------------------------------
    async def _reader_loop(self, conn: _Conn) -> None:
        decoder = FrameDecoder(self._pre_limits, expect_handshake=True)
        deadline = conn.deadline = now() + self.handshake_timeout
        reason = "eof"
        try:
            if conn.pending and self.identity is not None:
                await self._secure(conn, deadline)
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
            self.alarms.note("handshake timeout", f"{conn.src}: no handshake within "
                             f"{self.handshake_timeout:g}s")
            reason = "handshake timeout"
        except BitTorrentError as exc:
            self.stats.errors.append(f"{conn!r}: {type(exc).__name__}: {exc}")
            if isinstance(exc, HandshakeRefused) or not conn.registered:
                # Unauthenticated: counted, and warned about at a bounded rate.
                self.stats.handshakes_refused += 1
                log.info("peer %s: dropping %r: %s: %s", self.peer_id, conn,
                         type(exc).__name__, exc)
                self.alarms.note(f"refused ({getattr(exc, 'field', 'handshake')})",
                                 f"{conn.src}: {exc}")
            else:
                self.stats.protocol_errors += 1
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
        if conn.pid is not None:     # we dialed, or a later handshake on a bound connection
            if hs.peer_id != conn.pid:
                raise HandshakeRefused("peer_id", hs.peer_id,
                                       f"the connection is to peer {conn.pid}")
            return await self._known_handshake(conn, hs)
        # Checked before an unproven handshake may displace a live connection.
        await self._accept_handshake(conn, hs)
        if conn.closed:
            return False
        self.check_identity(conn, hs.peer_id)
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
            self.stats.duplicate_connections += 1
            if conn.dialer != winner or live.dialer == winner:
                self.alarms.note("duplicate", f"{conn.src}: second connection for peer {pid}; "
                                 f"the live one ({live.src}, dialed by {live.dialer}) stays")
                self._drop(conn, "duplicate connection", graceful=False)
                return False
            log.warning("peer %s: a connection dialed by peer %s (%s) replaces the one "
                        "dialed by %s (lower id's dial wins)", self.peer_id, conn.dialer,
                        conn.src, live.dialer)
            self._drop(live, "replaced by the lower id's connection", graceful=False)
        self._release(conn)
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
        if type(msg) is Piece:
            conn.queued += len(msg.block)
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
                    if type(item) is Handshake:
                        # The first handshake opens the connection, unprefixed;
                        # any later one (next round, repeat) is framed (id 21).
                        if conn.opened:
                            parts.append(encode_handshake_frame(item))
                        else:
                            parts.extend(encode_parts(item))
                            conn.opened = True
                    else:
                        if type(item) is Piece:
                            conn.queued -= len(item.block)
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

    def uplink_backlog(self) -> int:
        """Block bytes queued for the uplink over every connection: in the
        sender queues, the transports' buffers and the kernels' not-yet-sent
        bytes (``pacing.kernel_not_sent``; what paced uploads wait on)."""
        total = 0
        for conn in self._all:
            if not conn.closed:
                total += conn.queued + kernel_not_sent(conn.writer)
        return total

    # ---- paced uploads -------------------------------------------------------------
    def pace(self, session: SwarmSession, release: Callable[[list], None]) -> None:
        """Paced uploads (``session.paced_uploads``; module ``pacing``):
        call after handing the host a session's output.  While the session
        holds blocks, they leave -- through ``release`` (the caller's own
        route for session output) -- whenever the uplink-wide backlog
        (``uplink_backlog``) is below the low-water mark sized from our
        uplink's rate (the session's ``uplinks`` hint, else the measured
        rate); a timer looks again after about half the mark's drain time,
        and only while blocks are held (no busy loop)."""
        if not (session.paced_uploads and session.upload_waiting):
            return
        if self._pump_handle is not None:
            if self._pump_session is session:
                return                    # the timer will look
            self._pump_handle.cancel()    # a later round's session: pump it now
        self._pump(session, release)

    def _pump(self, session: SwarmSession, release: Callable[[list], None]) -> None:
        self._pump_handle = None
        if self._closed or session.closed or not session.upload_waiting:
            return
        self._pump_session = session
        rate = float((session.uplinks or {}).get(session.peer_id, 0.0)) or self.uplink_rate()
        mark = low_water_mark(rate, session.config.block_size)
        self._pump_handle = asyncio.get_running_loop().call_later(
            poll_interval(rate, mark), self._pump, session, release)
        backlog = self.uplink_backlog()
        if backlog < mark:
            release(session.upload_ready(now(), mark - backlog))
        if session.upload_waiting:
            self.stats.pace_waits += 1

    # ---- uplink measurement ----------------------------------------------------
    def sample_uplink(self) -> None:
        """One sample for the uplink meter: bytes that have left this host
        (written minus what the transports and the kernels still hold, the
        latter unacknowledged included) and the backlog: those bytes, plus
        one for every sender queue holding messages not written yet (not in
        ``bytes_out``, but the uplink has work)."""
        unsent = waiting = 0
        for conn in self._all:
            unsent += kernel_unsent(conn.writer)
            if not conn.queue.empty():
                waiting += 1
        self.uplink.sample(now(), self.stats.bytes_out - unsent, unsent + waiting)

    def uplink_rate(self) -> float:
        """Measured uplink rate in bytes/s since the last reset (0: unknown)."""
        return self.uplink.rate()

    def _drop(self, conn: _Conn, reason: str, graceful: bool) -> None:
        """Forget ``conn``; tell the subclass if it was the peer's connection.

        ``graceful``: flush what is queued before closing the socket (a
        session's ``Close``); otherwise close it now."""
        if conn.closed:
            return
        conn.closed = True
        self._release(conn)
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
                 connect_timeout: float = 5.0, identity: Optional[LocalIdentity] = None,
                 certificates: Optional[dict[int, bytes]] = None, **caps: int) -> None:
        """``identity`` + ``certificates`` (peer id -> DER certificate, every
        member's): mutual TLS with those peers pinned.  ``caps``:
        ``max_pending``, ``max_pending_per_address``."""
        super().__init__(session.peer_id, host, port, handshake_timeout, connect_timeout,
                         session.config.max_block_size, identity=identity, **caps)
        if certificates is not None:
            self.set_peers(certificates)
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
        self.pace(self.session, self._route)

    def _check_complete(self) -> None:
        if self.session.complete and not self._complete.is_set():
            self._complete.set()


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keep-alive on a data-plane socket: connections now stay open
    between rounds (idle while clients train), and a peer that vanished
    meanwhile is noticed within about two minutes; middleboxes also keep
    the flow's state."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:  # pragma: no cover - not a TCP socket
        pass


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

