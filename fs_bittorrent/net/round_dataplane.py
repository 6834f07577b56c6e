"""The data plane of one FederatedScope client in distributed mode.

Unlike :class:`~fs_bittorrent.net.dataplane.DataPlanePeer`, which owns one
session, this host lives for the whole experiment and serves one swarm round
after another.  The ``ClientManager`` stays in charge of the session: the
host is its ``PeerTransport`` (``send_peer``/``close_peer``) and hands every
decoded message to ``handler.handle_peer(peer, round, msg)``.

Rounds
------
``begin_round(r, session, addresses, certificates)`` makes ``r`` current.
The round's table (the coordinator's ``bt_start``) is its membership: only
the ids in ``addresses`` may connect, and with an ``identity`` (TLS) each
only with the certificate published for it.

Connections outlive rounds (TCP, the TLS session and its pinned identity,
and the congestion window stay).  ``end_round`` only forgets the round;
``begin_round`` closes the live connections of peers that are not in the
new table or whose published certificate changed, and keeps the others.
A kept connection serves round ``r`` once a handshake for ``r`` crossed it
(framed, message id 21: the lower id sends it, as it would dial), checked
like a new connection's (swarm id, membership, pinned certificate or the
HMAC over the new swarm id, bans).  Until then whatever arrives on it
belongs to the round before and is dropped (``stats.late_messages``).  A
handshake for an old round on a live connection is ignored, not obeyed:
the connection stays, bound to nothing current (``stats.stale_handshakes``);
one for a round not begun yet is parked as below, and refused with the
connection after ``handshake_timeout``.  A Close from a session that has
itself closed (round end, deadline) releases the connection instead of
closing it; a Close for one peer (ban, protocol error, timeout) closes it.
Every connection belongs to the round its last handshake named:

* an accepted connection that arrives between rounds (this client has not
  begun the round its peer already has) waits for ``begin_round`` before
  its TLS handshake, within ``handshake_timeout``;
* a handshake for the **current** round is checked (swarm id, membership,
  pinned certificate or HMAC, bans) before it can take over a connection;
* one for an **old** round is refused at once and logged;
* one for a swarm id not known yet -- a faster peer that already started the
  **next** round -- is *parked*: the connection waits (the kernel buffers
  what follows, so the sender is throttled by TCP) until ``begin_round``
  installs that round, or is refused after ``handshake_timeout``.

Dialing
-------
The manager's session only connects upwards (lower id dials).  The first
message to a peer without a connection starts a dial to the address the
server published for it; messages queue until the connection is up.  A dial
is retried with back-off (``dial_attempts``); when it finally fails the
handler hears ``peer_closed`` and the session moves that peer's pieces on.
A connection lost for any reason but the session's own ``Close`` is redialed
by the lower id after ``reconnect_after`` seconds (``handler.reconnect``),
at most ``max_redials`` times per peer and round.

Fault injection
---------------
With ``faults`` (``bittorrent.faults``, decided by
:class:`~fs_bittorrent.core.faults.FaultDecider`, seeded per peer and round),
every outgoing peer message may be dropped, duplicated, corrupted (a piece
block gets a flipped byte), delayed or reordered, or its connection cut.  A
client listed in ``crash_clients`` kills its own process with SIGKILL
``crash_at`` seconds into round ``crash_round``'s exchange: a real crash, no
goodbye, no report (in standalone simulation the same knob only simulates it).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Optional, Protocol

from ..core.codec import WireLimits
from ..core.faults import FaultDecider, Faults, flip_byte
from ..core.messages import Handshake, Piece
from ..core.session import Close, SwarmSession
from ..errors import HandshakeRefused
from .dataplane import PeerHost, now, _Conn, check_handshake
from .tls import LocalIdentity

log = logging.getLogger(__name__)

__all__ = ["RoundDataPlane", "RoundHandler"]

_PAST_ROUNDS_KEPT = 64        # swarm ids of old rounds remembered for refusals
UPLINK_SAMPLE = 0.05          # s between uplink meter samples during a round


class RoundHandler(Protocol):
    def handle_peer(self, peer: int, round_idx: int, msg: object) -> None: ...
    def peer_closed(self, peer: int, round_idx: int) -> None: ...
    def reconnect(self, peer: int, round_idx: int) -> None: ...


class RoundDataPlane(PeerHost):
    """Persistent listener + per-round connections for one FS client."""

    def __init__(self, handler: RoundHandler, host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout: float = 10.0, connect_timeout: float = 5.0,
                 dial_attempts: int = 4, max_block_size: int = 128 * 1024,
                 faults: Faults = Faults(), fault_seed: object = 0,
                 max_redials: int = 3, identity: Optional[LocalIdentity] = None,
                 max_pending: int = 64, max_pending_per_address: int = 8) -> None:
        super().__init__(-1, host, port, handshake_timeout, connect_timeout, max_block_size,
                         identity=identity, max_pending=max_pending,
                         max_pending_per_address=max_pending_per_address)
        self.handler = handler
        self.dial_attempts = dial_attempts
        self.faults = faults
        self.fault_seed = fault_seed
        self.max_redials = max_redials
        self.fault_counts = {"dropped": 0, "duplicated": 0, "corrupted": 0, "delayed": 0,
                             "reordered": 0, "disconnects": 0}
        self._decider: Optional[FaultDecider] = None
        self._redials: dict[int, int] = {}            # peer -> redials this round
        self._closing: set = set()                    # connections the session closed
        self.round: Optional[int] = None
        self.session: Optional[SwarmSession] = None
        self.addresses: dict[int, tuple[str, int]] = {}
        self.parked = 0                               # handshakes that waited for a round
        self._past_swarms: dict[bytes, int] = {}      # swarm id -> round, for refusals
        self._pending: dict[int, list] = {}           # peer -> messages queued while dialing
        self._round_changed = asyncio.Event()
        self._limits_now = self._pre_limits
        self.reuse = True                             # keep connections across rounds
        self._sampler: Optional[asyncio.Task] = None  # uplink samples while a round runs

    @property
    def address(self) -> str:
        """``host:port`` as published to the server (after :meth:`start`)."""
        return f"{self.host}:{self.port}"

    # ---- rounds -------------------------------------------------------------
    def begin_round(self, round_idx: int, session: SwarmSession,
                    addresses: dict[int, tuple[str, int]],
                    certificates: Optional[dict[int, bytes]] = None) -> None:
        """Make ``round_idx`` current; close what is left of older rounds.

        ``addresses`` (peer id -> (host, port)) is the round's membership;
        ``certificates`` (peer id -> DER) pins them when TLS is on: a member
        without a certificate cannot connect then."""
        self.end_round()
        self.peer_id = session.peer_id
        self.round, self.session = round_idx, session
        self.addresses = dict(addresses)
        self.set_peers(dict(certificates or {}), set(self.addresses) | {self.peer_id})
        self._keep_members()
        self.uplink.reset()                           # the uplink is measured per round
        if self._sampler is None or self._sampler.done():
            self._sampler = self._spawn(self._sample_uplink(), f"uplink-{self.peer_id}")
        self.member_hosts = {host for host, _ in self.addresses.values()}
        self._limits_now = WireLimits(num_pieces=session.layout.num_pieces,
                                      max_block_size=session.config.max_block_size)
        self._redials = {}
        if self.faults.any:
            self._decider = FaultDecider(self.faults,
                                         f"{self.fault_seed}:{self.peer_id}:{round_idx}")
        if self.peer_id in self.faults.crashes_in(round_idx):
            asyncio.get_running_loop().call_later(self.faults.crash_at, self._crash, round_idx)
        # Wake parked handshakes: theirs may be this round.
        self._round_changed.set()
        self._round_changed = asyncio.Event()

    def end_round(self) -> None:
        """Forget the current round and remember its swarm id, so late
        handshakes for it are refused as old rather than parked.  Live
        connections stay open for the next round (closed here only with
        ``reuse`` off, flushing what is queued)."""
        if self.session is not None:
            self._past_swarms[self.session.layout.swarm_id] = self.round
            while len(self._past_swarms) > _PAST_ROUNDS_KEPT:
                self._past_swarms.pop(next(iter(self._past_swarms)))
        if not self.reuse:
            for conn in list(self._conns.values()):
                self._closing.add(conn)
                self._drop(conn, "round over", graceful=True)
        self._closing.clear()
        self._pending.clear()
        self.round, self.session = None, None

    def kept_peers(self) -> set[int]:
        """Peers with a live connection kept from an earlier round (after
        ``begin_round``: members whose pinned certificate still holds).
        On long paths both ends may send the round's handshake on these at
        once (``core.topology.openings``)."""
        return {pid for pid, conn in self._conns.items() if not conn.closed}

    def _keep_members(self) -> None:
        """At a round's start: close live connections to peers outside the
        new table, or whose published certificate is not the one their
        connection proved; the others wait for the round's handshake."""
        for pid, conn in list(self._conns.items()):
            why = None
            if pid not in self.addresses:
                why = f"peer {pid} is not in round {self.round}'s table"
            elif self.identity is not None and self.pins.get(pid) != conn.fingerprint:
                why = f"peer {pid}'s published certificate changed"
            if why is not None:
                log.info("peer %s: closing the connection to %s: %s", self.peer_id, pid, why)
                self._closing.add(conn)
                self._drop(conn, why, graceful=False)
        self._closing.clear()

    async def _sample_uplink(self) -> None:
        """Sample the uplink meter every ``UPLINK_SAMPLE`` s while a round
        runs (none between rounds: an idle client wakes for nothing)."""
        while not self._closed and self.session is not None:
            self.sample_uplink()
            await asyncio.sleep(UPLINK_SAMPLE)

    # ---- PeerTransport --------------------------------------------------------
    def send_peer(self, src: int, dst: int, round_idx: int, msg: object) -> None:
        if self._closed or round_idx != self.round:
            return
        if self._decider is not None:
            self._send_faulty(dst, round_idx, msg)
            return
        self._send_now(dst, round_idx, msg)

    def _send_now(self, dst: int, round_idx: int, msg: object) -> None:
        if self._closed or round_idx != self.round:
            return
        if dst in self._pending:
            self._pending[dst].append(msg)
            return
        conn = self._conns.get(dst)
        if conn is None and type(msg) is Handshake and dst in self.addresses \
                and dst > self.peer_id:
            # Only the lower id dials (a higher one opens kept connections
            # only); without a connection the message is dropped below.
            self._pending[dst] = [msg]
            self._spawn(self._dial_round(dst, round_idx), f"dial-{self.peer_id}->{dst}")
            return
        self._enqueue(dst, msg)

    def close_peer(self, src: int, dst: int, round_idx: int) -> None:
        if round_idx != self.round:
            return
        if self.reuse and self.session is not None and self.session.closed:
            # The session ended (round end, deadline, finish): the connection
            # is released, not closed; the next round's handshake reuses it.
            return
        self._pending.pop(dst, None)
        conn = self._conns.get(dst)
        if conn is not None:
            self._closing.add(conn)
            self._enqueue(dst, Close("closed by the session"))

    # ---- faults ---------------------------------------------------------------
    def _send_faulty(self, dst: int, round_idx: int, msg: object) -> None:
        d = self._decider.decide(corruptible=type(msg) is Piece)
        counts = self.fault_counts
        if d.disconnect:
            counts["disconnects"] += 1
            conn = self._conns.get(dst)
            if conn is not None:
                log.info("fault: peer %s cuts its connection to %s", self.peer_id, dst)
                self._drop(conn, "fault: disconnect", graceful=False)
            return
        if d.drop:
            counts["dropped"] += 1
            return
        if d.corrupt:
            counts["corrupted"] += 1
            msg = Piece(msg.index, msg.begin, flip_byte(msg.block, self._decider.rng))
        if d.copies > 1:
            counts["duplicated"] += 1
        loop = asyncio.get_running_loop()
        for _ in range(d.copies):
            jitter = self._decider.reorder_jitter()
            counts["reordered"] += jitter > 0
            counts["delayed"] += d.delay > 0
            if d.delay + jitter > 0:
                loop.call_later(d.delay + jitter, self._send_now, dst, round_idx, msg)
            else:
                self._send_now(dst, round_idx, msg)

    def _crash(self, round_idx: int) -> None:
        if self._closed or self.round != round_idx:
            return
        log.warning("fault: client %s crashes (SIGKILL) in round %s", self.peer_id, round_idx)
        for handler in logging.getLogger().handlers + logging.getLogger("fs_bittorrent").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    async def _dial_round(self, dst: int, round_idx: int) -> None:
        host, port = self.addresses[dst]
        delay = 0.2
        conn = None
        for attempt in range(self.dial_attempts):
            if self._closed or self.round != round_idx or dst not in self._pending:
                return
            conn = await self._dial(dst, host, port)
            if conn is not None or dst in self._conns:
                break
            await asyncio.sleep(delay)
            delay *= 2
        queued = self._pending.pop(dst, [])
        if self.round != round_idx:
            if conn is not None:
                self._drop(conn, "round over while dialing", graceful=False)
            return
        if conn is None and dst not in self._conns:
            log.warning("peer %s: giving up on peer %s at %s:%s after %d dials",
                        self.peer_id, dst, host, port, self.dial_attempts)
            self.handler.peer_closed(dst, round_idx)
            return
        if conn is not None:
            conn.round = round_idx
        for msg in queued:
            self._enqueue(dst, msg)

    # ---- hooks --------------------------------------------------------------
    async def _before_tls(self, conn: _Conn, deadline: float) -> None:
        """Between rounds our trust anchors may lack the dialer's certificate
        (it began the round first): hold the TLS handshake until we begin
        one.  Ended by ``handshake_timeout`` like any silent connection."""
        while self.session is None and not self._closed:
            left = deadline - now()
            if left <= 0:
                raise asyncio.TimeoutError
            try:
                await asyncio.wait_for(self._round_changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _accept_handshake(self, conn: _Conn, hs: Handshake,
                                deadline: Optional[float] = None) -> None:
        if deadline is None:
            deadline = conn.deadline        # from its accept: TLS, handshake and parking
        waited = False
        while self.session is None or hs.swarm_id != self.session.layout.swarm_id:
            old = self._past_swarms.get(hs.swarm_id)
            if old is not None:
                raise HandshakeRefused("swarm_id", hs.swarm_id.hex(),
                                       f"round {old} is over")
            left = deadline - now()
            if left <= 0:
                raise HandshakeRefused("swarm_id", hs.swarm_id.hex(),
                                       f"no such swarm here after waiting "
                                       f"{self.handshake_timeout:g}s (current round "
                                       f"{self.round})")
            if not waited:
                waited = True
                self.parked += 1
                log.debug("peer %s: parking a handshake from %s for a round not begun",
                          self.peer_id, hs.peer_id)
            try:
                await asyncio.wait_for(self._round_changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        check_handshake(self.session, hs)
        conn.round = self.round

    async def _known_handshake(self, conn: _Conn, hs: Handshake) -> bool:
        """A handshake on a bound connection: the dialed peer's answer, a
        repeat, or the first of a later round on a kept connection."""
        session = self.session
        kept = conn.round is not None and conn.round != self.round   # served an older round
        if session is not None and hs.swarm_id == session.layout.swarm_id:
            if conn.round != self.round:
                check_handshake(session, hs)
                self.check_identity(conn, hs.peer_id)
                conn.round = self.round
                self.stats.connections_reused += kept
            self._deliver(conn, hs)
            return True
        old = self._past_swarms.get(hs.swarm_id)
        if old is not None:
            # A late repeat from a peer still in an old round: not obeyed,
            # not fatal.  What follows on the connection is that round's and
            # is dropped, until the peer's handshake for a current round.
            self.stats.stale_handshakes += 1
            log.info("peer %s: ignoring peer %s's handshake for round %s (over)",
                     self.peer_id, hs.peer_id, old)
            conn.round = old
            return True
        # A round not begun here yet: park (or refuse after the timeout).
        await self._accept_handshake(conn, hs, now() + self.handshake_timeout)
        if conn.closed:
            return False
        self.check_identity(conn, hs.peer_id)
        self.stats.connections_reused += kept
        self._deliver(conn, hs)
        return True

    def _limits(self, conn: _Conn) -> WireLimits:
        # An old round's frames still decode (then are dropped): its layout
        # is not ours, so only the block limit applies to them.
        return self._limits_now if conn.round == self.round else self._pre_limits

    def _deliver(self, conn: _Conn, msg: object) -> None:
        if conn.round is None:
            conn.round = self.round
        if conn.round != self.round or self.session is None:
            self.stats.late_messages += 1
            return                      # a message of a round that is over
        self.handler.handle_peer(conn.pid, conn.round, msg)

    def _lost(self, conn: _Conn) -> None:
        # A connection kept from an earlier round counts as the current
        # round's once the round's table has the peer: its loss is reported
        # (and redialed) like any other.
        if self.session is None or conn.pid not in self.addresses:
            return
        conn.round = self.round
        self.handler.peer_closed(conn.pid, conn.round)
        if conn in self._closing:
            self._closing.discard(conn)
            return                        # the session closed it: no redial
        pid, rnd = conn.pid, conn.round
        if self.peer_id < pid and self._redials.get(pid, 0) < self.max_redials:
            self._redials[pid] = self._redials.get(pid, 0) + 1
            asyncio.get_running_loop().call_later(self.faults.reconnect_after,
                                                  self._redial, pid, rnd)

    def _redial(self, pid: int, rnd: int) -> None:
        if self._closed or self.round != rnd or pid in self._conns or pid in self._pending:
            return
        log.info("peer %s: redialing peer %s (round %s)", self.peer_id, pid, rnd)
        self.handler.reconnect(pid, rnd)
