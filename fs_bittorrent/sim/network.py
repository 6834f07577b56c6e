"""A deterministic in-memory network that drives swarm sessions.

Discrete-event simulation on a virtual clock.  Every peer has an uplink and a
downlink, each a FIFO serialiser at its own rate, plus a one-way latency:
a message leaves when the sender's uplink has finished everything queued
before it, reaches the receiver's downlink ``latency`` later, and is
delivered once the downlink has carried it.  Per pair, delivery order is
send order (like TCP) unless the reorder fault is on.

Seeded faults: drop, duplicate, reorder (extra random delay), corrupt (flip
a byte of a piece block), and scheduled disconnects.  With ``encode=True``
every message goes through the real binary codec on the way.
"""
from __future__ import annotations

import heapq
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..core.messages import Piece, message_size
from ..core.session import Close, SwarmSession
from ..errors import BitTorrentError, HandshakeRequired

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkProfile:
    """One peer's access link: rates in bytes per second, latency in seconds."""

    up: float = 12.5e6
    down: float = 12.5e6
    latency: float = 0.005


@dataclass(frozen=True)
class Faults:
    """Per-message probabilities of each fault (0 = off)."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.05
    corrupt: float = 0.0

    @property
    def any(self) -> bool:
        return bool(self.drop or self.duplicate or self.reorder or self.corrupt)


@dataclass
class Link:
    """One peer's access link and what has crossed it."""

    profile: LinkProfile
    up_free: float = 0.0
    down_free: float = 0.0
    wire_up: int = 0
    wire_down: int = 0


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


_DELIVER, _ARRIVE, _ACTION = 0, 1, 2


class VirtualNetwork:
    """Virtual clock, links and faults: moves opaque payloads between peers.

    ``send`` charges the sender's uplink, the latency and the receiver's
    downlink, then calls ``on_deliver(src, dst, payload)`` at the virtual
    delivery time.  Hosts (the session simulator below, the FederatedScope
    standalone runner) decide what a payload is and what delivery means.
    """

    def __init__(self, on_deliver: Callable[[int, int, object], None], seed: int = 0,
                 faults: Faults = Faults(),
                 corrupt: Optional[Callable[[object, random.Random], object]] = None) -> None:
        self.on_deliver = on_deliver
        self.rng = random.Random(seed)
        self.faults = faults
        self._faulty = faults.any
        self.corrupt = corrupt
        self.links: dict[int, Link] = {}
        self.now = 0.0
        self.events = 0
        self._queue: list = []
        self._seq = 0
        self.in_flight = 0
        self._closed_pairs: set[tuple[int, int]] = set()
        self._last_small: dict[tuple[int, int], float] = {}
        self.small_message = 256  # bytes; larger messages queue on both links
        self.fault_counts = {"dropped": 0, "duplicated": 0, "reordered": 0, "corrupted": 0,
                             "disconnects": 0}

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

    def send(self, src: int, dst: int, payload: object, size: int) -> None:
        if (src, dst) in self._closed_pairs or dst not in self.links:
            return
        f = self.faults
        copies = 1
        if self._faulty:
            if f.drop and self.rng.random() < f.drop:
                self.fault_counts["dropped"] += 1
                return
            if f.duplicate and self.rng.random() < f.duplicate:
                self.fault_counts["duplicated"] += 1
                copies = 2
            if f.corrupt and self.corrupt is not None and self.rng.random() < f.corrupt:
                changed = self.corrupt(payload, self.rng)
                if changed is not None:
                    self.fault_counts["corrupted"] += 1
                    payload = changed
        s = self.links[src]
        for _ in range(copies):
            s.wire_up += size
            self.in_flight += 1
            self._seq += 1
            if size <= self.small_message:
                self._send_small(src, dst, payload, size, s)
                continue
            s.up_free = max(self.now, s.up_free) + size / s.profile.up
            arrive = s.up_free + s.profile.latency
            if f.reorder and self.rng.random() < f.reorder:
                self.fault_counts["reordered"] += 1
                arrive += self.rng.random() * f.reorder_delay
            heapq.heappush(self._queue, (arrive, self._seq, _ARRIVE, (src, dst, payload, size)))

    def _send_small(self, src: int, dst: int, payload: object, size: int, s: Link) -> None:
        """Control messages interleave with bulk data at packet level on real
        links, so they do not wait behind queued blocks; their bytes still
        use link capacity, and per connection they keep their order."""
        d = self.links[dst]
        up, down = size / s.profile.up, size / d.profile.down
        s.up_free = max(self.now, s.up_free) + up
        if d.down_free > self.now:
            d.down_free += down
        at = self.now + up + s.profile.latency + down
        if self.faults.reorder and self.rng.random() < self.faults.reorder:
            self.fault_counts["reordered"] += 1
            at += self.rng.random() * self.faults.reorder_delay
        else:
            at = max(at, self._last_small.get((src, dst), 0.0))
            self._last_small[(src, dst)] = at
        d.wire_down += size
        heapq.heappush(self._queue, (at, self._seq, _DELIVER, (src, dst, payload, 0)))

    def next_time(self) -> Optional[float]:
        return self._queue[0][0] if self._queue else None

    def step(self) -> bool:
        """Process the next event; False when there is none."""
        if not self._queue:
            return False
        at, _, kind, payload = heapq.heappop(self._queue)
        self.now = at
        self.events += 1
        if kind == _ARRIVE:
            d = self.links[payload[1]]
            d.down_free = max(at, d.down_free) + payload[3] / d.profile.down
            self._seq += 1
            heapq.heappush(self._queue, (d.down_free, self._seq, _DELIVER, payload))
        elif kind == _DELIVER:
            self.in_flight -= 1
            src, dst, msg, size = payload
            if (src, dst) not in self._closed_pairs:
                self.links[dst].wire_down += size
                self.on_deliver(src, dst, msg)
        else:
            payload()
        return True


def _corrupt_piece(msg: object, rng: random.Random) -> Optional[object]:
    """Flip one byte of a piece block (other messages pass untouched)."""
    if not isinstance(msg, Piece) or not len(msg.block):
        return None
    block = bytearray(msg.block)
    block[rng.randrange(len(block))] ^= 0xFF
    return Piece(msg.index, msg.begin, bytes(block))


@dataclass
class PeerLink:
    session: SwarmSession
    link: Link


class SimNetwork:
    """Drives ``SwarmSession`` objects over a ``VirtualNetwork``."""

    def __init__(self, seed: int = 0, faults: Faults = Faults(), encode: bool = False,
                 tick_interval: float = 0.5) -> None:
        self.net = VirtualNetwork(self._deliver, seed=seed, faults=faults,
                                  corrupt=_corrupt_piece)
        self.faults = faults
        self.encode = encode
        self.tick_interval = tick_interval
        self.peers: dict[int, PeerLink] = {}
        self.protocol_errors = 0
        self.on_error: Optional[Callable[[int, int, Exception], None]] = None

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

    def connect_all(self, topology: Optional[dict[int, list[int]]] = None) -> None:
        """Open connections (full mesh unless a neighbour list is given)."""
        ids = sorted(self.peers)
        for a in ids:
            neighbours = topology[a] if topology is not None else [b for b in ids if b != a]
            for b in neighbours:
                if a < b or (topology is not None and a not in topology.get(b, [])):
                    self._emit(a, self.peers[a].session.connect(b, self.now))

    def schedule(self, at: float, fn: Callable[[], None]) -> None:
        self.net.schedule(at, fn)

    def disconnect(self, a: int, b: int, reconnect_after: Optional[float] = None) -> None:
        """Cut the a-b connection now; optionally reconnect later."""
        self.net.fault_counts["disconnects"] += 1
        self.net.close_pair(a, b)
        self.peers[a].session.peer_lost(b, self.now)
        self.peers[b].session.peer_lost(a, self.now)
        if reconnect_after is not None:
            def reopen() -> None:
                self.net.open_pair(a, b)
                self._emit(a, self.peers[a].session.connect(b, self.now))
            self.schedule(self.now + reconnect_after, reopen)

    # ---- plumbing ------------------------------------------------------------------
    def _emit(self, src: int, outgoing) -> None:
        send = self.net.send
        for dst, msg in outgoing:
            if type(msg) is Close:
                self._close(src, dst)
            elif self.encode:
                from ..core.codec import encode
                send(src, dst, encode(msg), message_size(msg))
            else:
                send(src, dst, msg, message_size(msg))

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
        while net.events < max_events:
            nxt = net.next_time()
            if nxt is None or (until is not None and nxt > until):
                break
            net.step()
            if net.in_flight == 0 and self._done():
                break
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
        d = self.peers[dst]
        try:
            msg = self._decode(dst, payload) if self.encode else payload
            out = d.session.handle(src, msg, self.now)
        except BitTorrentError as exc:
            self.protocol_errors += 1
            if self.on_error is not None:
                self.on_error(src, dst, exc)
            if not isinstance(exc, HandshakeRequired) and not self.faults.any:
                log.warning("peer %s -> %s: %s; closing", src, dst, exc)
                self._emit(dst, [(src, Close(str(exc)))])
                d.session.peer_lost(src, self.now)
            return
        self._emit(dst, out)
