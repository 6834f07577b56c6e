"""Everything one session knows about one remote peer.

Two ledgers per peer, kept in step by the protocol itself (no acks needed):

* receive side (``inflight``, ``reserved``): a piece assigned to this peer
  reserves its whole length against the credit we advertised to it, from
  assignment until the piece is verified (``have``) or taken away (we then
  ``cancel`` what it served); an end-game duplicate reserves one block until
  it arrives or is cancelled.  Until then those bytes occupy our memory.
* send side (``served``/``served_by_piece``): blocks this peer asked us for,
  cleared by its ``have`` for the piece or its ``cancel``; a request that
  would push this past the credit the peer advertised is refused, so we
  never send past it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

BlockKey = tuple[int, int]


@dataclass(slots=True)
class PeerCounters:
    """Per-peer event counters (exposed for tests, metrics and bans)."""

    blocks_in: int = 0
    blocks_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    corrupt_pieces: int = 0
    duplicate_blocks: int = 0
    unrequested_blocks: int = 0
    timeouts: int = 0
    credit_violations: int = 0
    requests_refused: int = 0


@dataclass(slots=True)
class PeerState:
    peer_id: int
    num_pieces: int
    connected_at: float = 0.0
    # handshake
    handshake_sent_at: Optional[float] = None
    handshaken: bool = False
    opened: bool = False             # we dialed and sent bitfield + unchoke behind our handshake
    asked_ahead: bool = False        # ... and requests for its own pieces (a kept connection)
    # BEP 3 flags
    am_choking: bool = True
    am_interested: bool = False
    peer_choking: bool = True
    peer_interested: bool = False
    # what they hold
    has: bytearray = field(init=False)
    has_count: int = 0
    # pieces it holds that we lack (kept by the session): tells when we lose
    # interest without scanning every missing piece
    wanted: int = 0
    # flow control
    their_credit: int = 0            # what they told us they accept in flight
    # our requests -> sent_at, oldest first (dicts keep insertion order)
    inflight: dict[BlockKey, float] = field(default_factory=dict)
    inflight_bytes: int = 0
    reserved: dict[int, int] = field(default_factory=dict)  # piece -> bytes reserved
    reserved_total: int = 0
    duplicates: set[BlockKey] = field(default_factory=set)   # end-game copies asked here
    served: dict[BlockKey, tuple[float, int]] = field(default_factory=dict)  # oldest first
    served_by_piece: dict[int, set[int]] = field(default_factory=dict)
    served_bytes: int = 0
    # liveness
    last_recv: float = 0.0
    last_sent: float = 0.0
    interest_sent_at: float = 0.0
    unchoked_at: float = 0.0
    interested_since: float = 0.0
    # download rate from this peer (EWMA), which sizes the request pipeline
    min_rtt: float = 0.0              # smallest request-to-block time seen
    srtt: float = 0.0                 # smoothed request-to-block time (TCP's 1/8 gain)
    path_rtt: float = 0.0             # handshake round trip (0: not measured yet)
    window: float = 0.0               # request window, in blocks (0: not started)
    slow_start: bool = True
    standing_queue: bool = False      # keep >= lo blocks queued at the sender (see on_block)
    timeout_streak: int = 0          # ticks in a row with timeouts and no block received
    rate_in: float = 0.0
    rate_bytes: int = 0
    rate_since: float = 0.0           # start of the current rate sample (< 0: at the first block)
    counters: PeerCounters = field(default_factory=PeerCounters)

    def __post_init__(self) -> None:
        self.has = bytearray(self.num_pieces)

    def set_has(self, index: int) -> bool:
        """Mark a piece held; True if it was news."""
        if self.has[index]:
            return False
        self.has[index] = 1
        self.has_count += 1
        return True

    def held(self) -> list[int]:
        return [i for i in range(self.num_pieces) if self.has[i]]

    def note_received(self, nbytes: int, now: float, window: float = 0.1) -> None:
        """Fold received bytes into the rate estimate every ``window`` seconds.

        With ``rate_since`` < 0 (the session's latency rules) the first
        sample starts at the first block: the time before it (the
        handshake and the request's round trip) says nothing of the rate,
        and counting it made the first estimates, and the request window
        sized from them, several times too small on long paths."""
        if self.rate_since < 0.0:
            self.rate_since = now
            return
        self.rate_bytes += nbytes
        dt = now - self.rate_since
        if dt >= window:
            sample = self.rate_bytes / dt
            self.rate_in = sample if self.rate_in == 0.0 else 0.5 * self.rate_in + 0.5 * sample
            self.rate_bytes = 0
            self.rate_since = now

    def on_block(self, rtt: float, block_size: int, queue_time: float, lo: int, hi: int) -> None:
        """Adjust the request window after a block arrived ``rtt`` after its
        request (TCP-style, delay based).

        Slow start: while blocks come back at about the path RTT the pipe,
        not the link, is the bottleneck, so grow by one block per block
        (doubling each RTT).  The first time the delay says a queue is
        building, leave slow start for good.

        Then the window covers the measured rate times the path's minimum
        RTT (the bandwidth-delay product) plus ``queue_time`` worth of the
        rate queued at the sender; with ``standing_queue`` (the session's
        latency rules) that queue is at least ``lo`` blocks, so the
        sender's uplink always holds our next blocks.  (A
        window of rate x (RTT + ``queue_time``) alone shrank to the floor on
        long paths: other peers' blocks queued at the same sender stretch
        our RTT, the window-limited rate falls with it, and every round
        trip drained the sender's uplink.  With ``lo`` blocks always queued
        per requester the fixed point is the sender busy, not idle.)
        """
        self.srtt = rtt if self.srtt == 0.0 else self.srtt + (rtt - self.srtt) / 8
        min_rtt = self.min_rtt
        if rtt > 0 and (min_rtt == 0.0 or rtt < min_rtt):
            self.min_rtt = min_rtt = rtt
        if self.slow_start:
            # HyStart's delay threshold: leave slow start once the RTT rises by
            # min_rtt/8, clamped to [4 ms, 16 ms], before a deep queue builds.
            slack = min_rtt / 8
            slack = 0.004 if slack < 0.004 else 0.016 if slack > 0.016 else slack
            if rtt <= min_rtt + slack:
                window = self.window + 1.0
                self.window = window if window < hi else hi
                return
            self.slow_start = False  # a queue is building: leave slow start for good
        if self.rate_in > 0:
            if self.standing_queue:
                queued = self.rate_in * queue_time / block_size
                window = self.rate_in * min_rtt / block_size + (queued if queued > lo else lo)
            else:
                window = self.rate_in * (min_rtt + queue_time) / block_size
            window = window if window < hi else hi
            self.window = window if window > lo else lo

    def on_timeout(self, lo: int) -> None:
        """Loss-like signal: halve the window, leave slow start."""
        self.window = max(float(lo), self.window / 2)
        self.slow_start = False

    def pipeline_depth(self, lo: int, hi: int) -> int:
        """Requests to keep in flight now."""
        if self.window == 0.0:
            self.window = float(lo)
        depth = int(self.window)
        return lo if depth < lo else hi if depth > hi else depth

    # ---- receive-side ledger ----------------------------------------------
    def add_request(self, index: int, begin: int, length: int, now: float) -> None:
        self.inflight[(index, begin)] = now
        self.inflight_bytes += length

    def request_done(self, index: int, begin: int, length: int) -> Optional[float]:
        """The block arrived or was cancelled: no longer in flight.  Returns
        when it was requested, or None if it was not in flight."""
        sent_at = self.inflight.pop((index, begin), None)
        if sent_at is not None:
            self.inflight_bytes -= length
        return sent_at

    def reserve(self, index: int, nbytes: int) -> None:
        self.reserved[index] = self.reserved.get(index, 0) + nbytes
        self.reserved_total += nbytes

    def release(self, index: int, nbytes: int) -> None:
        left = self.reserved.get(index, 0) - nbytes
        if left > 0:
            self.reserved[index] = left
        else:
            self.reserved.pop(index, None)
        self.reserved_total -= nbytes

    def release_piece(self, index: int) -> None:
        """Piece verified, failed or taken away: free everything it held."""
        self.reserved_total -= self.reserved.pop(index, 0)
        duplicates = self.duplicates
        if duplicates:
            # in place: usually none or a few of them are this piece's, so
            # no new set per settled piece and peer
            for key in [k for k in duplicates if k[0] == index]:
                duplicates.discard(key)

    # ---- send-side ledger --------------------------------------------------
    def add_served(self, index: int, begin: int, length: int, now: float) -> bool:
        key = (index, begin)
        if key in self.served:
            return False  # idempotent: a repeated request is not counted twice
        self.served[key] = (now, length)
        begins = self.served_by_piece.get(index)
        if begins is None:
            self.served_by_piece[index] = {begin}
        else:
            begins.add(begin)
        self.served_bytes += length
        return True

    def clear_served(self, index: int, begin: int) -> None:
        rec = self.served.pop((index, begin), None)
        if rec is None:
            return
        self.served_bytes -= rec[1]
        begins = self.served_by_piece.get(index)
        if begins is not None:
            begins.discard(begin)
            if not begins:
                del self.served_by_piece[index]

    def clear_served_piece(self, index: int) -> None:
        begins = self.served_by_piece.pop(index, None)
        if begins is None:
            return
        served = self.served
        for begin in begins:
            rec = served.pop((index, begin), None)
            if rec is not None:
                self.served_bytes -= rec[1]

    def expire_served(self, older_than: float) -> int:
        n = 0
        while self.served:
            key, (t, _) = next(iter(self.served.items()))
            if t >= older_than:
                break
            self.clear_served(*key)
            n += 1
        return n
