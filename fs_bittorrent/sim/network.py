"""A deterministic in-memory network that drives swarm sessions.

Discrete-event simulation on a virtual clock.  Every peer has an uplink and a
downlink, each a FIFO serialiser at its own rate, plus a one-way latency:
a message leaves when the sender's uplink has finished everything queued
before it, reaches the receiver's downlink ``latency`` later, and is
delivered once the downlink has carried it.  Per pair, delivery order is
send order (like TCP) unless the reorder fault is on.

Seeded faults (decided by ``core/faults.py``): drop, duplicate, reorder
(extra random delay), corrupt (flip a byte of a piece block), delay (a stall
before sending), disconnect (cut the connection, redial later), and
scheduled disconnects.  With ``encode=True`` every message goes through the
real binary codec on the way.
"""
from __future__ import annotations

import gc
import heapq
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..core.faults import PASS, FaultDecider, Faults  # noqa: F401  (Faults: public here too)
from ..core.messages import FIXED_SIZES, Piece, message_size
from ..core.session import Close, SwarmSession
from ..core.topology import openings
from ..errors import BitTorrentError, ConfigError, HandshakeRequired

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkProfile:
    """One peer's access link: rates in bytes per second, latency in seconds."""

    up: float = 12.5e6
    down: float = 12.5e6
    latency: float = 0.005


@dataclass(slots=True)
class Link:
    """One peer's access link and what has crossed it."""

    profile: LinkProfile
    up_free: float = 0.0
    down_free: float = 0.0
    wire_up: int = 0
    wire_down: int = 0
    # destination -> delivery time of the last small message sent to it
    # (small messages keep their order per connection)
    last_small: dict[int, float] = field(default_factory=dict)
    # Bulk messages waiting to reach the far end of the uplink / to leave the
    # downlink, as (time, seq, (src, dst, payload, size)).  Each link is a
    # FIFO, so times only grow along a queue and only its head needs to be
    # in the event heap: the heap stays about as small as the number of
    # links instead of holding every block in flight.
    up_queue: deque = field(default_factory=deque)
    down_queue: deque = field(default_factory=deque)
    # The profile's rates and latency, read for every message sent: copied
    # into slots once (a frozen dataclass's attribute is a dict lookup on
    # each read).  The profile is fixed for the link's life.
    up: float = field(init=False)
    down: float = field(init=False)
    latency: float = field(init=False)

    def __post_init__(self) -> None:
        self.up, self.down, self.latency = self.profile.up, self.profile.down, self.profile.latency


@dataclass
class SimResult:
    virtual_time: float
    wall_time: float
    events: int
    complete: bool
    completion: dict[int, float]
    completed_at: dict[int, Optional[float]]
    wire_up: dict[int, int]
    wire_down: dict[int, int]
    faults: dict[str, int]
    protocol_errors: int

    @property
    def events_per_second(self) -> float:
        return self.events / self.wall_time if self.wall_time > 0 else float("inf")


# Event kinds.  _UPLINK / _DOWNLINK: the head of that link's bulk queue is
# due (the payload is the link's peer id); _ARRIVE: a reordered bulk message,
# queued on its own because it left its uplink's order.
_DELIVER, _ARRIVE, _ACTION, _BATCH, _UPLINK, _DOWNLINK = range(6)

_heappush = heapq.heappush  # one global lookup on the per-message path, not two


class VirtualNetwork:
    """Virtual clock, links and faults: moves opaque payloads between peers.

    ``send`` charges the sender's uplink, the latency and the receiver's
    downlink, then calls ``on_deliver(src, dst, payload)`` at the virtual
    delivery time.  Hosts (the session simulator below, the FederatedScope
    standalone runner) decide what a payload is and what delivery means.

    With ``coalesce=True``, small messages due at the same instant ride in one
    queue entry as long as nothing else was queued between them.  Entries
    with equal times run in the order they were queued, so those messages
    would have been delivered back to back anyway: delivery order, virtual
    times and results stay the same, with fewer heap operations.  Only a host
    that does nothing between two deliveries may use it (the session
    simulator; not the FederatedScope runner, which drains its own message
    queue between network events).
    """

    def __init__(self, on_deliver: Callable[[int, int, object], None], seed: int = 0,
                 faults: Faults = Faults(),
                 corrupt: Optional[Callable[[object, random.Random], object]] = None,
                 on_disconnect: Optional[Callable[[int, int, object], None]] = None,
                 coalesce: bool = False) -> None:
        self.on_deliver = on_deliver
        self.coalesce = coalesce
        # The newest coalescing entry's message list, time and the last
        # sequence number it took; None once that entry may not grow.
        self._batch: Optional[list[tuple[int, int, object]]] = None
        self._batch_at = 0.0
        self._batch_seq = 0
        self.rng = random.Random(seed)
        self.faults = faults
        self._faulty = faults.any
        # Fault decisions share this generator: runs with the faults that
        # existed before (drop, duplicate, reorder, corrupt) draw as they did.
        self.decider = FaultDecider(faults, self.rng)
        self.corrupt = corrupt
        # The disconnect fault needs the host: only it knows what a
        # connection is and who must learn that it broke.
        self.on_disconnect = on_disconnect
        if faults.disconnect and on_disconnect is None:
            raise ConfigError("faults.disconnect", faults.disconnect,
                              "this host has no way to cut a connection (on_disconnect)")
        self.links: dict[int, Link] = {}
        self.now = 0.0
        self.events = 0
        self._queue: list = []
        self._seq = 0
        self.in_flight = 0
        self._closed_pairs: set[tuple[int, int]] = set()
        self.small_message = 256  # bytes; larger messages queue on both links
        self.fault_counts = {"dropped": 0, "duplicated": 0, "reordered": 0, "corrupted": 0,
                             "delayed": 0, "disconnects": 0}

    def add_link(self, pid: int, profile: LinkProfile) -> None:
        self.links[pid] = Link(profile)

    def schedule(self, at: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``at`` (timers, fault scripts, deadlines)."""
        self._seq += 1
        heapq.heappush(self._queue, (max(at, self.now), self._seq, _ACTION, fn))

    def close_pair(self, a: int, b: int) -> bool:
        """Mark the a-b connection closed; False if it already was."""
        if (a, b) in self._closed_pairs:
            return False
        self._closed_pairs.add((a, b))
        self._closed_pairs.add((b, a))
        return True

    def open_pair(self, a: int, b: int) -> None:
        self._closed_pairs.discard((a, b))
        self._closed_pairs.discard((b, a))

    def is_closed(self, a: int, b: int) -> bool:
        return (a, b) in self._closed_pairs

    def send(self, src: int, dst: int, payload: object, size: int,
             faulty: bool = True) -> None:
        """Queue ``payload`` (``size`` bytes on the wire) from ``src`` to ``dst``.

        Called for every message of a run, so the fault-free path is written
        out here in full, with no helper calls; ``_send_faulty`` decides the
        faults and sends each surviving copy back through here.

        Small messages (``small_message`` bytes or fewer) interleave with
        bulk data at packet level on real links, so they do not wait behind
        queued blocks; their bytes still use link capacity, and per
        connection they keep their order.  Larger ones queue on the
        sender's uplink, then on the receiver's downlink (``run``)."""
        closed = self._closed_pairs
        links = self.links
        if closed and (src, dst) in closed or dst not in links:
            return
        if self._faulty:
            if faulty:
                self._send_faulty(src, dst, payload, size)
                return
            reorder = self.faults.reorder
        else:
            reorder = 0.0  # (a reorder rate makes ``faults.any`` true)
        s = links[src]
        s.wire_up += size
        self.in_flight += 1
        self._seq = seq = self._seq + 1
        now = self.now
        if size <= self.small_message:
            d = links[dst]
            up, down = size / s.up, size / d.down
            s.up_free = (s.up_free if s.up_free > now else now) + up
            if d.down_free > now:
                d.down_free += down
            at = now + up + s.latency + down
            if reorder and self.rng.random() < reorder:
                self.fault_counts["reordered"] += 1
                at += self.rng.random() * self.faults.reorder_delay
            else:
                last_small = s.last_small
                last = last_small.get(dst, 0.0)
                if last > at:
                    at = last
                last_small[dst] = at
            d.wire_down += size
            if not self.coalesce:
                _heappush(self._queue, (at, seq, _DELIVER, (src, dst, payload, 0)))
                return
            batch = self._batch
            if batch is not None and at == self._batch_at and self._batch_seq == seq - 1:
                # Nothing was queued since this entry's last message (the
                # sequence numbers are contiguous): it is delivered right
                # after it either way.
                batch.append((src, dst, payload))
                self._batch_seq = seq
                return
            self._batch = batch = [(src, dst, payload)]
            self._batch_at, self._batch_seq = at, seq
            _heappush(self._queue, (at, seq, _BATCH, batch))
            return
        s.up_free = (s.up_free if s.up_free > now else now) + size / s.up
        arrive = s.up_free + s.latency
        if reorder and self.rng.random() < reorder:
            self.fault_counts["reordered"] += 1
            arrive += self.rng.random() * self.faults.reorder_delay
            heapq.heappush(self._queue, (arrive, seq, _ARRIVE, (src, dst, payload, size)))
            return
        # Into the uplink's FIFO; an empty queue's new head goes into the
        # heap under its own (time, seq), so events run in exactly the
        # order they would if every entry were in the heap.
        up_queue = s.up_queue
        if not up_queue:
            _heappush(self._queue, (arrive, seq, _UPLINK, src))
        up_queue.append((arrive, seq, (src, dst, payload, size)))

    def _send_faulty(self, src: int, dst: int, payload: object, size: int) -> None:
        """``send`` with the per-message faults on: decide them, then send each
        surviving copy (``send`` with ``faulty=False``, which only adds the
        reorder jitter)."""
        copies = 1
        d = self.decider.decide(self.corrupt is not None)
        if d is not PASS:
            counts = self.fault_counts
            if d.disconnect:
                counts["disconnects"] += 1
                self.on_disconnect(src, dst, payload)
                return
            if d.drop:
                counts["dropped"] += 1
                return
            if d.copies > 1:
                counts["duplicated"] += 1
                copies = d.copies
            if d.corrupt:
                changed = self.corrupt(payload, self.rng)
                if changed is not None:
                    counts["corrupted"] += 1
                    payload = changed
            if d.delay:
                # A stall before the message leaves; the connection may
                # close meanwhile, and later messages may overtake it.
                counts["delayed"] += 1
                def later(n: int = copies, payload: object = payload) -> None:
                    for _ in range(n):
                        self.send(src, dst, payload, size, faulty=False)
                self.schedule(self.now + d.delay, later)
                return
        for _ in range(copies):
            self.send(src, dst, payload, size, faulty=False)

    def run(self, until: Optional[float] = None, max_events: Optional[int] = None,
            idle: Optional[Callable[[], bool]] = None) -> None:
        """Process events in time order until none is left, the next one is due
        after ``until``, ``max_events`` events have run in all, or nothing is
        in flight and ``idle()`` says the host is done.

        The whole event loop is here, with what it needs bound to locals once:
        it runs millions of times per simulated round.
        """
        queue, links, closed = self._queue, self.links, self._closed_pairs
        deliver, pop, push = self.on_deliver, heapq.heappop, heapq.heappush
        while queue:
            at = queue[0][0]
            if until is not None and at > until or \
                    max_events is not None and self.events >= max_events:
                break
            _, _, kind, payload = pop(queue)
            self._batch = None  # popped: it may not grow any more
            self.now = at
            self.events += 1
            if kind == _BATCH:
                # Handlers never look at in_flight, so the batch leaves at once.
                self.in_flight -= len(payload)
                for src, dst, msg in payload:
                    if not closed or (src, dst) not in closed:
                        deliver(src, dst, msg)
            elif kind == _UPLINK:
                # The head of a link's bulk queue is due: the next one takes
                # its place in the heap.
                fifo = links[payload].up_queue
                message = fifo.popleft()[2]
                if fifo:
                    head = fifo[0]
                    push(queue, (head[0], head[1], _UPLINK, payload))
                # It reached the receiver's downlink: ``_arrive``, written
                # out here (half of all events are these two kinds).
                dst = message[1]
                d = links[dst]
                done = d.down_free = (d.down_free if d.down_free > at else at) \
                    + message[3] / d.down
                self._seq = seq = self._seq + 1
                fifo = d.down_queue
                if not fifo:
                    push(queue, (done, seq, _DOWNLINK, dst))
                fifo.append((done, seq, message))
            elif kind == _DOWNLINK:
                link = links[payload]
                fifo = link.down_queue
                message = fifo.popleft()[2]
                if fifo:
                    head = fifo[0]
                    push(queue, (head[0], head[1], _DOWNLINK, payload))
                self.in_flight -= 1
                src, dst, msg, size = message
                if not closed or (src, dst) not in closed:
                    link.wire_down += size
                    deliver(src, dst, msg)
            elif kind == _ARRIVE:
                self._arrive(at, payload)
            elif kind == _DELIVER:
                self.in_flight -= 1
                src, dst, msg, size = payload
                if (src, dst) not in closed:
                    links[dst].wire_down += size
                    deliver(src, dst, msg)
            else:
                payload()
            if idle is not None and self.in_flight == 0 and idle():
                break

    def step(self) -> bool:
        """Process the next event; False when there is none."""
        if not self._queue:
            return False
        self.run(max_events=self.events + 1)
        return True

    def _arrive(self, at: float, message: tuple) -> None:
        """A bulk message reached its receiver's downlink: queue it there
        (a FIFO like the uplink's, see ``send``).  ``run`` has this inline
        for messages in uplink order; this is for reordered ones."""
        dst = message[1]
        d = self.links[dst]
        done = d.down_free = (d.down_free if d.down_free > at else at) + message[3] / d.down
        self._seq += 1
        down = d.down_queue
        if not down:
            heapq.heappush(self._queue, (done, self._seq, _DOWNLINK, dst))
        down.append((done, self._seq, message))


def _corrupt_piece(msg: object, rng: random.Random) -> Optional[object]:
    """Flip one byte of a piece block (other messages pass untouched)."""
    if not isinstance(msg, Piece) or not len(msg.block):
        return None
    block = bytearray(msg.block)
    block[rng.randrange(len(block))] ^= 0xFF
    return Piece(msg.index, msg.begin, bytes(block))


@dataclass(slots=True)
class PeerLink:
    session: SwarmSession
    link: Link


class SimNetwork:
    """Drives ``SwarmSession`` objects over a ``VirtualNetwork``."""

    def __init__(self, seed: int = 0, faults: Faults = Faults(), encode: bool = False,
                 tick_interval: float = 0.5) -> None:
        self.net = VirtualNetwork(self._deliver, seed=seed, faults=faults,
                                  corrupt=_corrupt_piece, on_disconnect=self._fault_disconnect,
                                  coalesce=True)
        self.faults = faults
        self.encode = encode
        self.tick_interval = tick_interval
        self.peers: dict[int, PeerLink] = {}
        self.protocol_errors = 0
        self.on_error: Optional[Callable[[int, int, Exception], None]] = None
        self._waking: set[int] = set()  # paced peers with a wake-up scheduled
        #: peer id -> virtual time its round begins (start skew: the
        #: coordinator's ``bt_start`` reaches clients at different times).
        #: Before it, the peer sends nothing, and what reaches it waits, as
        #: the TCP data plane parks a handshake for a round not begun yet.
        self.start_at: dict[int, float] = {}

    @property
    def now(self) -> float:
        return self.net.now

    @property
    def fault_counts(self) -> dict[str, int]:
        return self.net.fault_counts

    # ---- set-up ------------------------------------------------------------------
    def add_peer(self, session: SwarmSession, profile: LinkProfile = LinkProfile()) -> None:
        self.net.add_link(session.peer_id, profile)
        self.peers[session.peer_id] = PeerLink(session, self.net.links[session.peer_id])

    def connect_all(self, topology: Optional[dict[int, list[int]]] = None,
                    kept: bool = False) -> None:
        """Open connections (full mesh unless a neighbour list is given).

        ``kept``: a round on connections kept from an earlier one (FS
        distributed mode from round 1): both ends offer each to their
        session with its round trip known (``core.topology.openings``),
        which opens it from both ends where that pays."""
        ids = sorted(self.peers)
        for a in ids:
            neighbours = topology[a] if topology is not None else [b for b in ids if b != a]
            start = self.start_at.get(a, 0.0)
            if start > self.now:      # a late peer dials when its round begins
                self.schedule(start, lambda a=a, nb=neighbours: self._connect_from(
                    a, nb, topology, kept))
            else:
                self._connect_from(a, neighbours, topology, kept)

    def _connect_from(self, a: int, neighbours: list[int],
                      topology: Optional[dict[int, list[int]]], kept: bool) -> None:
        if kept:
            lat = self.peers[a].link.profile.latency
            rtts = {b: max(lat + self.peers[b].link.profile.latency, 1e-9) for b in neighbours}
            for b, rtt in openings(a, neighbours, neighbours, rtts):
                self._emit(a, self.peers[a].session.connect(b, self.now, path_rtt=rtt))
            return
        for b in neighbours:
            if a < b or (topology is not None and a not in topology.get(b, [])):
                self._emit(a, self.peers[a].session.connect(b, self.now))

    def schedule(self, at: float, fn: Callable[[], None]) -> None:
        self.net.schedule(at, fn)

    def disconnect(self, a: int, b: int, reconnect_after: Optional[float] = None,
                   count: bool = True) -> None:
        """Cut the a-b connection now; optionally reconnect later."""
        if count:
            self.net.fault_counts["disconnects"] += 1
        self.net.close_pair(a, b)
        self.peers[a].session.peer_lost(b, self.now)
        self.peers[b].session.peer_lost(a, self.now)
        if reconnect_after is not None:
            def reopen() -> None:
                self.net.open_pair(a, b)
                self._emit(a, self.peers[a].session.connect(b, self.now))
            self.schedule(self.now + reconnect_after, reopen)

    def _fault_disconnect(self, src: int, dst: int, payload: object) -> None:
        """The disconnect fault (already counted by the network): cut the
        pair once the current event is done, redial after ``reconnect_after``."""
        def cut() -> None:
            if not self.net.is_closed(src, dst):
                self.disconnect(src, dst, reconnect_after=self.faults.reconnect_after,
                                count=False)
        self.schedule(self.now, cut)

    # ---- plumbing ------------------------------------------------------------------
    def _emit(self, src: int, outgoing) -> None:
        """Send what a session returned (every message of a run passes here):
        ``message_size`` is one dict lookup for all but pieces, bitfields
        and handshakes, so that lookup is made here."""
        start_at = self.start_at
        if start_at and self.now < start_at.get(src, 0.0):
            outgoing = list(outgoing)     # its round has not begun: nothing leaves yet
            self.schedule(start_at[src], lambda: self._emit(src, outgoing))
            return
        send, encode, fixed = self.net.send, self.encode, FIXED_SIZES
        for dst, msg in outgoing:
            kind = type(msg)
            size = fixed.get(kind)
            if size is None:
                if kind is Close:
                    self._close(src, dst)
                    continue
                size = message_size(msg)
            if encode:
                from ..core.codec import encode as encode_message
                send(src, dst, encode_message(msg), size)
            else:
                send(src, dst, msg, size)

    def _close(self, src: int, dst: int) -> None:
        if not self.net.close_pair(src, dst):
            return
        link = self.peers.get(dst)
        if link is not None:
            latency = self.peers[src].link.profile.latency
            self.schedule(self.now + latency, lambda: link.session.peer_lost(src, self.now))

    def _decode(self, dst: int, payload):
        from ..core.codec import WireLimits, decode_handshake, decode_message
        session = self.peers[dst].session
        if payload[:1] == bytes([len(b"FSBitTorrent/1")]) and len(payload) > 4 and \
                payload[1:15] == b"FSBitTorrent/1":
            return decode_handshake(payload)
        limits = WireLimits(num_pieces=session.layout.num_pieces,
                            max_block_size=session.config.max_block_size)
        return decode_message(memoryview(payload)[4:], limits)

    # ---- running -----------------------------------------------------------------
    def _tick(self, pid: int) -> None:
        link = self.peers[pid]
        if not link.session.closed:
            self._emit(pid, link.session.tick(self.now))
        if not self._done():
            self.schedule(self.now + self.tick_interval, lambda: self._tick(pid))

    def run(self, until: Optional[float] = None, deadline: Optional[float] = None,
            max_events: int = 50_000_000) -> SimResult:
        """Run until every session holds every piece and the wire is quiet,
        or until virtual time ``until``.  At ``deadline`` every session that
        is not complete is closed (partial completion)."""
        wall0 = time.perf_counter()
        net = self.net
        for pid in sorted(self.peers):
            net.schedule(net.now + self.tick_interval, lambda pid=pid: self._tick(pid))
        if deadline is not None:
            net.schedule(deadline, self._deadline)
        # The loop makes and drops millions of small acyclic objects (messages,
        # keys, tuples), all freed by reference counting; the cycle collector
        # would only rescan every session's state over and over (about a
        # tenth of a 64-peer run), so it pauses until the loop is done.
        collecting = gc.isenabled()
        gc.disable()
        try:
            net.run(until, max_events, self._done)
        finally:
            if collecting:
                gc.enable()
        wall = time.perf_counter() - wall0
        sessions = {pid: l.session for pid, l in self.peers.items()}
        return SimResult(
            virtual_time=net.now, wall_time=wall, events=net.events,
            complete=all(s.complete for s in sessions.values()),
            completion={pid: s.completion() for pid, s in sessions.items()},
            completed_at={pid: s.stats.completed_at for pid, s in sessions.items()},
            wire_up={pid: l.link.wire_up for pid, l in self.peers.items()},
            wire_down={pid: l.link.wire_down for pid, l in self.peers.items()},
            faults=dict(net.fault_counts), protocol_errors=self.protocol_errors)

    def _done(self) -> bool:
        return all(l.session.complete or l.session.closed for l in self.peers.values())

    def _deadline(self) -> None:
        for pid, link in self.peers.items():
            if not link.session.complete:
                self._emit(pid, link.session.deadline(self.now))

    def _deliver(self, src: int, dst: int, payload) -> None:
        start_at = self.start_at
        if start_at and self.net.now < start_at.get(dst, 0.0):
            # parked until dst begins the round (in arrival order: equal
            # times run in the order they were scheduled)
            self.schedule(start_at[dst], lambda: self._deliver(src, dst, payload))
            return
        session = self.peers[dst].session
        try:
            msg = self._decode(dst, payload) if self.encode else payload
            out = session.handle(src, msg, self.net.now)
        except BitTorrentError as exc:
            self.protocol_errors += 1
            if self.on_error is not None:
                self.on_error(src, dst, exc)
            if not isinstance(exc, HandshakeRequired) and not self.faults.any:
                log.warning("peer %s -> %s: %s; closing", src, dst, exc)
                self._emit(dst, [(src, Close(str(exc)))])
                session.peer_lost(src, self.now)
            return
        if out:
            self._emit(dst, out)
        if session.paced_uploads and session.upload_waiting:
            self._pump(dst)

    # ---- paced uploads ---------------------------------------------------------------
    def _pump(self, pid: int) -> None:
        """A paced session (``SwarmSession.upload_ready``) has blocks waiting:
        give it the room its uplink has below the low-water mark (two
        blocks queued), and wake it when the queue drains to one block, so
        the uplink never idles and never holds more than two blocks the
        session could still reorder."""
        peer = self.peers[pid]
        session, link = peer.session, peer.link
        now, up = self.net.now, link.profile.up
        block = session.config.block_size
        backlog = (link.up_free - now) * up if link.up_free > now else 0.0
        if backlog < 2 * block:
            self._emit(pid, session.upload_ready(now, 2 * block - backlog))
        if session.upload_waiting and pid not in self._waking:
            self._waking.add(pid)
            self.net.schedule(link.up_free - block / up, lambda: self._wake(pid))

    def _wake(self, pid: int) -> None:
        self._waking.discard(pid)
        if self.peers[pid].session.upload_waiting:
            self._pump(pid)
