"""``SwarmSession``: one peer's view of one round's exchange (sans-IO).

The host feeds it events -- ``connect``, ``handle(peer, message, now)``,
``peer_lost``, ``tick(now)``, ``deadline(now)`` -- and sends whatever
``(peer, message)`` pairs they return.  The session owns the protocol state
per peer, the piece picker and every per-transfer record; it keeps verified
pieces in the ``PieceStorage`` it was given and nowhere else.

No sockets, threads, sleeps or clocks inside: the same object runs under the
deterministic simulator, the FederatedScope standalone runner and the
distributed data plane.

Error contract: a message that breaks the protocol raises a
:class:`~fs_bittorrent.errors.ProtocolError` *before* any state changes, so
the host can log it, drop the connection (``peer_lost``) and carry on.  Bad
behaviour that is not malformed (unrequested blocks, wrong hashes, requests
past credit) is refused, counted per peer and, past a threshold, answered by
a ban (a ``Close`` action).
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Union

from ..errors import (BadBlockRange, BlockTooLarge, ConfigError, CreditExceeded,
                      HandshakeRefused,
                      HandshakeRequired, ProtocolError)
from .bitfield import decode_bits, encode_bits
from .config import SwarmConfig
from .layout import SwarmLayout, make_auth
from .messages import (PROTOCOL_NAME, Bitfield, Cancel, Choke, Credit, Handshake, Have,
                       Interested, KeepAlive, Message, NotInterested, Piece, Request,
                       Unchoke)
from .peer import PeerState
from .picker import PiecePicker, Picks
from .storage import Bytes, PieceStorage

log = logging.getLogger(__name__)

#: ``check(digest, data)``: does a completed piece match its manifest digest?
PieceCheck = Callable[[bytes, Bytes], bool]


def sha256_matches(digest: bytes, data: Bytes) -> bool:
    """The default piece check: hash the bytes."""
    return hashlib.sha256(data).digest() == digest


@dataclass(frozen=True)
class Close:
    """Not a wire message: tells the host to close the connection to a peer."""

    reason: str


Action = Union[Message, Close]
Outgoing = tuple[int, Action]


@dataclass(slots=True)
class SessionStats:
    pieces_received: int = 0
    bytes_down: int = 0          # block payload received (incl. wasted)
    bytes_up: int = 0            # block payload sent
    corrupt_pieces: int = 0
    duplicate_blocks: int = 0
    unrequested_blocks: int = 0
    timeouts: int = 0
    cancels_sent: int = 0
    credit_violations: int = 0
    protocol_errors: int = 0
    bans: int = 0
    first_piece_at: Optional[float] = None
    completed_at: Optional[float] = None


def _checked_uplinks(uplinks: Optional[Mapping[int, float]],
                     layout: SwarmLayout) -> Optional[dict[int, float]]:
    """Validate the ``uplinks`` hint (peer id -> uplink bytes/s): ids must be
    owners of this round's layout and rates finite and > 0.  Raises
    ``ConfigError`` naming the entry; None or empty means no hint."""
    if not uplinks:
        return None
    owners = set(layout.owners)
    out: dict[int, float] = {}
    for pid, rate in uplinks.items():
        if isinstance(pid, bool) or not isinstance(pid, int) or pid not in owners:
            raise ConfigError("uplinks", pid, "not a peer id of this round's owners")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not math.isfinite(rate) or rate <= 0:
            raise ConfigError(f"uplinks[{pid}]", rate, "must be a finite rate > 0 (bytes/s)")
        out[pid] = float(rate)
    return out


class SwarmSession:
    """One peer in one round's swarm.

    ``storage`` must already hold the peer's own pieces (the host puts them
    there when it builds the manifest); pieces held from an earlier run of
    the same round (a restart) are picked up too.

    ``check`` verifies each completed piece against its digest.  Any
    replacement must give exactly SHA-256's verdict; it exists so that a
    host holding verified copies (the simulator runs every peer in one
    process) can compare bytes instead of hashing one piece once per peer.
    Such a check may also offer ``matching_copy(digest, blocks)``: its
    verified copy if the blocks joined equal it, else None (see
    ``sim.swarm.VerifiedCopies``), so a matching piece is never joined.
    """

    def __init__(self, peer_id: int, layout: SwarmLayout, storage: PieceStorage,
                 config: SwarmConfig = SwarmConfig(), secret: bytes = b"",
                 now: float = 0.0, check: PieceCheck = sha256_matches,
                 uplinks: Optional[Mapping[int, float]] = None,
                 paced_uploads: bool = False) -> None:
        self.peer_id = peer_id
        self.check = check
        self._matching_copy = getattr(check, "matching_copy", None)   # see the docstring
        self.layout = layout
        self.storage = storage
        self.config = config
        self.secret = secret
        max_piece = max(layout.piece_length(i) for i in range(layout.num_pieces)) \
            if layout.num_pieces else 0
        if config.credit_bytes < max_piece:
            raise ConfigError("credit_bytes", config.credit_bytes,
                              f"must hold a whole piece ({max_piece} bytes)")
        if config.block_size > config.max_block_size:
            raise ConfigError("block_size", config.block_size, "exceeds max_block_size")
        self.uplinks = _checked_uplinks(uplinks, layout)
        n = layout.num_pieces
        have = []
        for i in range(n):
            owner, local = layout.to_local(i)
            have.append(storage.has(owner, local))
        if peer_id in layout.owners:
            missing_own = [i for i in layout.owner_range(peer_id) if not have[i]]
            if missing_own:
                raise ConfigError("storage", missing_own,
                                  f"peer {peer_id} owns these pieces but storage lacks them")
        self.picker = PiecePicker(layout, config.block_size, have,
                                  seed=(config.seed * 1_000_003 + peer_id) & 0xFFFFFFFF,
                                  end_game_threshold=config.end_game_threshold,
                                  me=peer_id, plan=config.first_copy_wait > 0,
                                  uplinks=self.uplinks)
        # Upload-aware source choice (first-copy plan, slow and fast sources):
        # all of it off with first_copy_wait 0 (build_swarm and the FS runner
        # set that where the known uplinks are uniform).
        self._upload_aware = config.first_copy_wait > 0
        # Latency rules (issue 12 item 2, docs/design.md "Long paths"): the
        # dialer's bitfield and unchoke behind its handshake; on long paths
        # a first request window of half the credit over the other members
        # and a standing queue of min_requests_per_peer blocks at each
        # source; rates measured from the first block; fast sources share
        # open blocks; no choke on not-interested; end-game copies only of
        # blocks older than two of the copier's round trips.  All of them
        # where the first-copy plan is off.  Where it is on, the window
        # rules (only at sources at least half as fast as the fastest
        # hinted uplink), the kept unchoke and the end game apply per
        # source on long paths only (``_long_path``); the opening and the
        # rates from the first block stay off there (measured: docs/design.md).
        self._latency_rules = not self._upload_aware
        self._fastest_uplink = max(self.uplinks.values()) if self.uplinks else 0.0
        others = max(1, len(layout.owners) - 1)
        self._initial_window = float(max(config.min_requests_per_peer, min(
            config.max_requests_per_peer, config.credit_bytes // config.block_size // 2 // others)))
        self._idle_since: Optional[float] = None  # nothing in flight anywhere since
        # Our total download rate (EWMA, like PeerState's), which says how
        # long we still expect to download: a source that cannot finish a
        # piece in that time is asked only for what nobody else holds.
        self._rate_in = 0.0
        self._best_rate = 0.0   # the fastest source's rate, refreshed every tick
        self._slow_owners: frozenset[int] = frozenset()  # see _judge_owners
        self._rate_bytes = 0
        self._rate_since = now
        self.peers: dict[int, PeerState] = {}
        self._path_rtts: dict[int, float] = {}   # see path_rtts
        self.stats = SessionStats()
        self.started_at = now
        self.closed = False
        self.close_reason = ""
        self.banned: set[int] = set()
        self._cache: "OrderedDict[int, memoryview]" = OrderedDict()
        self._cache_size = 8
        self._last_unchoke_rotation = now
        # piece -> [(peer, offset, length, sha256 of the block it gave)] after a
        # multi-peer hash failure; settled when the piece verifies.
        self._suspects: dict[int, list[tuple[int, int, int, bytes]]] = {}
        self.corrupt_by_peer: dict[int, int] = {}
        # Read on every request and block: looked up once here, not through
        # the layout and the (frozen) config per message.
        self._num_pieces = n
        self._lengths = [layout.piece_length(i) for i in range(n)]
        self._block_size = config.block_size
        self._max_block = config.max_block_size
        self._max_piece = max_piece
        self._min_requests = config.min_requests_per_peer
        self._max_requests = config.max_requests_per_peer
        self._queue_time = config.request_queue_time
        self._lead_pieces = config.lead_pieces
        self._lead_requests = config.lead_requests
        # Upload pacing (see ``upload_ready``): with ``paced_uploads`` the
        # host tells us when its uplink has room, and served requests wait
        # here until then, so we choose what leaves next instead of a FIFO.
        self.paced_uploads = paced_uploads
        self._held: dict[tuple[int, int, int], tuple] = {}  # (peer, index, begin) -> heap entry
        self._held_heap: list[tuple] = []
        # the same entries in arrival order, with their arrival time: the
        # oldest is served first once it has waited ``_held_patience``
        self._held_fifo: deque[tuple[float, tuple]] = deque()
        self._held_patience = self.config.request_timeout / 2
        self._held_seq = 0
        self._held_started: dict[tuple[int, int], int] = {}  # (peer, index) -> first request's number
        self._build_dispatch()
        if self.complete:
            self.stats.completed_at = now

    # ---- queries -------------------------------------------------------------
    @property
    def have(self) -> list[bool]:
        return self.picker.have

    @property
    def pieces_have(self) -> int:
        # A piece is missing (unstarted or partial in the picker) until it
        # verifies, so this equals ``sum(self.have)`` without the scan:
        # leaders yield (``_ahead_of_peers``) asks on every request top-up.
        return self._num_pieces - self.picker.pieces_missing

    @property
    def complete(self) -> bool:
        return self.picker.pieces_missing == 0

    def completion(self) -> float:
        n = self.layout.num_pieces
        return self.pieces_have / n if n else 1.0

    def held_by_owner(self) -> dict[int, set[int]]:
        """Local piece indices held, per owner (what aggregation can use)."""
        out: dict[int, set[int]] = {o: set() for o in self.layout.owners}
        for i, h in enumerate(self.picker.have):
            if h:
                owner, local = self.layout.to_local(i)
                out[owner].add(local)
        return out

    def record_counts(self) -> dict[str, int]:
        """Sizes of every per-transfer map; all drain to zero when a swarm is done."""
        return {
            "partials": len(self.picker.partials),
            "outstanding_blocks": len(self.picker.outstanding),
            "request_times": len(self.picker.requested_at),
            "inflight_requests": sum(len(p.inflight) for p in self.peers.values()),
            "reservations": sum(len(p.reserved) for p in self.peers.values()),
            "assigned_pieces": sum(len(v) for v in self.picker.assigned.values()),
            "unassigned_pieces": len(self.picker.unassigned),
            "served_blocks": sum(len(p.served) for p in self.peers.values()),
            "avoid_lists": len(self.picker.avoid),
            "suspect_pieces": len(self._suspects),
            "held_uploads": len(self._held),
            "held_pieces": len(self._held_started),
        }

    def path_rtts(self) -> dict[int, float]:
        """Peer id -> path round trip, for every peer whose was known this
        session, also after ``close``: what the next round's session carries
        over on a connection the host kept (``connect``).  The smaller of
        the handshake's round trip and the quickest request-to-block time:
        a fresh dial's handshake waited for TCP and TLS set-up and for busy
        peers, which a kept connection's next round does not (carried
        as measured, round 0's dial made LAN paths look long).  A block's
        own transfer time only adds to the quickest request, so it still
        bounds the path from above."""
        out = dict(self._path_rtts)
        for p in self.peers.values():
            self._remember_rtt(p, out)
        return out

    def _remember_rtt(self, p: PeerState, into: dict[int, float]) -> None:
        rtt = into.get(p.peer_id, 0.0)
        if p.min_rtt > 0.0 and (rtt == 0.0 or p.min_rtt < rtt):
            into[p.peer_id] = p.min_rtt

    def progress(self, now: float) -> dict:
        elapsed = max(now - self.started_at, 1e-9)
        return {
            "peer": self.peer_id,
            "pieces": self.pieces_have,
            "pieces_total": self.layout.num_pieces,
            "completion": self.completion(),
            "bytes_down": self.stats.bytes_down,
            "bytes_up": self.stats.bytes_up,
            "rate_down": self.stats.bytes_down / elapsed,
            "rate_up": self.stats.bytes_up / elapsed,
            "per_peer": {pid: {"bytes_in": p.counters.bytes_in, "bytes_out": p.counters.bytes_out,
                               "rate_in": p.counters.bytes_in / elapsed,
                               "rate_out": p.counters.bytes_out / elapsed}
                         for pid, p in self.peers.items()},
        }

    # ---- connection life cycle ------------------------------------------------
    def _handshake(self) -> Handshake:
        auth = make_auth(self.secret, self.layout.swarm_id, self.peer_id) if self.secret \
            else b"\x00" * 32
        return Handshake(swarm_id=self.layout.swarm_id, peer_id=self.peer_id,
                         credit=self.config.credit_bytes, auth=auth)

    def _peer(self, peer: int, now: float) -> PeerState:
        p = self.peers.get(peer)
        if p is None:
            p = PeerState(peer, self.layout.num_pieces, connected_at=now,
                          last_recv=now, last_sent=now,
                          rate_since=-1.0 if self._latency_rules else now)
            self.peers[peer] = p
        return p

    def connect(self, peer: int, now: float, path_rtt: float = 0.0) -> list[Outgoing]:
        """Open a connection to ``peer``: send our handshake.

        ``path_rtt`` > 0 says the host keeps a connection to ``peer`` from
        an earlier round whose path round trip that session knew.  On a
        long path (``_long_path``) in a cooperative swarm without the
        first-copy plan, both ends open such a *kept* connection at once
        (neither waits a crossing for the other's handshake), so no
        handshake answers another and none is timed: the round trip carries
        over, with the window rules it implies, and the requests for
        ``peer``'s own pieces go out right behind our handshake
        (``_opening``).  Anywhere else a kept connection opens like a new
        one -- the lower id sends, the round trip is measured again -- since
        there the extra crossing is short and measured, opening from both
        ends changed the simulated rounds by -0.06 to +0.01 in η
        (docs/design.md, "Kept connections")."""
        if self.closed or peer == self.peer_id or peer in self.banned:
            return []
        if path_rtt > 0.0 and not self._opens_kept(path_rtt):
            if peer < self.peer_id:
                return []                  # the lower id opens it, as a new one
            path_rtt = 0.0
        p = self._peer(peer, now)
        if p.handshake_sent_at is not None:
            return []
        p.handshake_sent_at = now
        if path_rtt > 0.0 and p.path_rtt == 0.0:
            self._path_known(p, path_rtt)
        return self._opening(p, now)

    def _opens_kept(self, path_rtt: float) -> bool:
        """Do both ends open a kept connection with this round trip (see
        ``connect``)?"""
        return self._latency_rules and self.config.max_upload_slots == 0 \
            and path_rtt >= self.config.request_queue_time

    def _opening(self, p: PeerState, now: float) -> list[Outgoing]:
        """What the dialing side sends first: its handshake and, in a
        cooperative swarm (``max_upload_slots`` 0), its bitfield and unchoke
        right behind it.  The other side then may request as soon as our
        handshake arrives, one latency after the dial, instead of after a
        second crossing (its handshake out, our unchoke back).  They follow
        the handshake on the same connection, so the receiver reads them
        after it (a receiver refuses anything before a handshake)."""
        out = [self._send(p, self._handshake(), now)]
        if self.config.max_upload_slots == 0 and self._latency_rules:
            p.opened = True
            out.append(self._send(p, Bitfield(encode_bits(self.have, self.layout.num_pieces)), now))
            out.extend(self._unchoke(p, now))
            if p.path_rtt > 0.0 and self._opens_kept(p.path_rtt) \
                    and p.peer_id in self.layout.owners:
                # A kept connection (``connect``'s path_rtt): a cooperative
                # member unchokes every member on its handshake, before it
                # reads what follows, and an owner holds its own pieces, so
                # our requests for them may follow our handshake instead of
                # waiting a crossing for its unchoke and bitfield.
                p.asked_ahead = True
                p.peer_choking = False
                out.extend(self._on_have(p, self.layout.owner_range(p.peer_id), now))
        return out

    def peer_lost(self, peer: int, now: float) -> None:
        """The host lost the connection (or we closed it): release its records.

        Received blocks of partial pieces stay, so those pieces resume from
        their offset with other peers.
        """
        p = self.peers.pop(peer, None)
        if p is None:
            return
        self._remember_rtt(p, self._path_rtts)
        self.picker.live.discard(peer)
        self.picker.peer_gone(peer)
        if self._held_started:
            for key in [k for k in self._held if k[0] == peer]:
                del self._held[key]
            for key in [k for k in self._held_started if k[0] == peer]:
                del self._held_started[key]
            if not self._held:
                self._forget_held_order()
        p.inflight.clear()
        if p.handshaken or p.asked_ahead:
            self.picker.peer_lost(i for i in range(self.layout.num_pieces) if p.has[i])

    def _send(self, p: PeerState, msg: Action, now: float) -> Outgoing:
        p.last_sent = now
        return (p.peer_id, msg)

    # ---- inbound ---------------------------------------------------------------
    def handle(self, peer: int, msg: Message, now: float) -> list[Outgoing]:
        """Process one message from ``peer``; returns what to send.

        Every message is validated in full before any state changes."""
        if self.closed:
            return []
        if peer in self.banned:
            return [(peer, Close("banned"))]
        kind = type(msg)
        if kind is Handshake:
            return self._on_handshake(peer, msg, now)
        entry = self._dispatch.get(kind)
        if entry is None:
            raise ProtocolError("message", kind.__name__, "not a peer wire message")
        p = self.peers.get(peer)
        if p is None or not p.handshaken:
            raise HandshakeRequired("message", kind.__name__,
                                    f"peer {peer} sent it before a valid handshake")
        check, act = entry
        if check is not None:
            check(msg)
        p.last_recv = now
        if p.path_rtt == 0.0 and self._upload_aware:
            # We accepted p's dial.  Without the dialer's opening (off where
            # the plan is on) p's first message after its handshake -- its
            # bitfield -- answers our handshake: one path round trip.  (Its
            # first request, which measures it under the latency rules, may
            # come much later here: the plan holds requests back.)
            self._path_measured(p, now)
        return act(p, msg, now)

    def _build_dispatch(self) -> None:
        """Message type -> (validator or None, handler): one lookup per message."""
        nothing: list[Outgoing] = []

        def on_cancel(p: PeerState, m: Cancel, now: float) -> list[Outgoing]:
            p.clear_served(m.index, m.begin)
            if self._held:
                self._drop_held(p.peer_id, m.index, (m.begin,))
            if self._held_started and m.index not in p.served_by_piece:
                self._held_started.pop((p.peer_id, m.index), None)  # nothing left for p
            return []

        def on_not_interested(p: PeerState, m: NotInterested, now: float) -> list[Outgoing]:
            p.peer_interested = False
            if self.config.max_upload_slots == 0 and (self._latency_rules or self._long_path(p)):
                # Cooperative swarm: no slot to free, so the peer stays
                # unchoked; when it wants a piece again its requests go out
                # with its interested (no interested -> unchoke round trip).
                return []
            return self._choke(p, now) if not p.am_choking else []

        def on_unchoke(p: PeerState, m: Unchoke, now: float) -> list[Outgoing]:
            p.peer_choking = False
            return self._fill(p, now)

        def on_choke(p: PeerState, m: Choke, now: float) -> list[Outgoing]:
            # Requests already sent stay on the books until they arrive or
            # time out: the peer may have served them before choking.
            p.peer_choking = True
            return []

        def on_credit(p: PeerState, m: Credit, now: float) -> list[Outgoing]:
            p.their_credit = m.credit
            return []

        self._dispatch = {
            Piece: (self._check_piece, self._on_piece),
            Request: (self._check_request, self._on_request),
            Have: (self._check_index, self._on_have_one),
            Bitfield: (self._check_bitfield, lambda p, m, now: self._on_have(
                p, decode_bits(m.bits, self.layout.num_pieces), now)),
            Cancel: (self._check_request, on_cancel),
            Interested: (None, lambda p, m, now: self._on_interested(p, now)),
            NotInterested: (None, on_not_interested),
            Unchoke: (None, on_unchoke),
            Choke: (None, on_choke),
            Credit: (self._check_credit, on_credit),
            KeepAlive: (None, lambda p, m, now: nothing),
        }

    def _check_index(self, msg) -> None:
        if not 0 <= msg.index < self._num_pieces:
            self.layout.check_index(msg.index)  # raises

    def _check_request(self, msg) -> None:
        index, length = msg.index, msg.length
        if not 0 <= index < self._num_pieces:
            self.layout.check_index(index)  # raises
        if length <= 0 or length > self._max_block:
            raise BlockTooLarge("length", length, f"limit is {self._max_block} bytes")
        self._check_asked_block(index, msg.begin, length)

    def _check_piece(self, msg: Piece) -> None:
        index = msg.index
        if not 0 <= index < self._num_pieces:
            self.layout.check_index(index)  # raises
        n = len(msg.block)
        if n > self._max_block:
            raise BlockTooLarge("block", n, f"limit is {self._max_block} bytes")
        self._check_block(index, msg.begin, n)

    def _check_bitfield(self, msg: Bitfield) -> None:
        decode_bits(msg.bits, self.layout.num_pieces)

    def _check_credit(self, msg: Credit) -> None:
        if msg.credit < self.config.block_size:
            raise CreditExceeded("credit", msg.credit,
                                 f"must allow one block of {self.config.block_size} bytes")

    def _check_block(self, index: int, begin: int, length: int) -> None:
        plen = self._lengths[index]
        bs = self._block_size
        rest = plen - begin
        if begin < 0 or begin % bs or rest <= 0 or length != (bs if rest > bs else rest):
            raise BadBlockRange("begin", (index, begin, length),
                                f"piece {index} has {plen} bytes in blocks of {bs}")

    def _check_asked_block(self, index: int, begin: int, length: int) -> None:
        """A block another peer asks of us (request, cancel).  Each requester
        picks its own block size (a distributed client sizes its blocks from
        what it measured), so the grid is the requester's: the block lies in
        the piece and starts at a multiple of its length, unless it is the
        piece's last (shorter) block."""
        plen = self._lengths[index]
        if begin < 0 or begin + length > plen or (begin % length and begin + length != plen):
            raise BadBlockRange("begin", (index, begin, length),
                                f"piece {index} has {plen} bytes; a block starts at a multiple "
                                "of its length unless it ends the piece")

    def _on_handshake(self, peer: int, hs: Handshake, now: float) -> list[Outgoing]:
        if hs.protocol != PROTOCOL_NAME:
            raise HandshakeRefused("protocol", hs.protocol, f"expected {PROTOCOL_NAME!r}")
        if hs.swarm_id != self.layout.swarm_id:
            raise HandshakeRefused("swarm_id", hs.swarm_id.hex(),
                                   "another experiment, round or set of manifests")
        if hs.peer_id != peer or peer == self.peer_id:
            raise HandshakeRefused("peer_id", hs.peer_id, f"connection is to peer {peer}")
        if self.secret and not hmac.compare_digest(
                hs.auth, make_auth(self.secret, self.layout.swarm_id, peer)):
            raise HandshakeRefused("auth", hs.auth.hex()[:16], "bad experiment secret")
        if hs.credit < self.config.block_size:
            raise HandshakeRefused("credit", hs.credit,
                                   f"must allow one block of {self.config.block_size} bytes")
        if peer in self.banned:
            return [(peer, Close("banned"))]
        p = self._peer(peer, now)
        p.last_recv = now
        p.their_credit = hs.credit
        out: list[Outgoing] = []
        if p.handshaken:
            # A repeat: the peer may have missed ours.  Answer at most once per
            # retry period so two peers never echo handshakes forever.
            if p.handshake_sent_at is None or now - p.handshake_sent_at >= self.config.handshake_retry:
                p.handshake_sent_at = now
                out.append(self._send(p, self._handshake(), now))
                out.append(self._send(p, Bitfield(encode_bits(self.have, self.layout.num_pieces)), now))
            return out
        p.handshaken = True
        if p.handshake_sent_at is not None and p.path_rtt == 0.0:
            self._path_measured(p, now)  # we dialed: our handshake's round trip
        self.picker.live.add(peer)
        if p.handshake_sent_at is None:
            p.handshake_sent_at = now
            out.append(self._send(p, self._handshake(), now))
        # (A dialer's bitfield and unchoke went out behind its handshake.)
        if not p.opened:
            out.append(self._send(p, Bitfield(encode_bits(self.have, self.layout.num_pieces)), now))
        if self.config.max_upload_slots == 0 and not p.opened:
            # Cooperative swarm: every peer is unchoked, so do not make the
            # peer wait a round trip (interested -> unchoke) before it may
            # request.
            out.extend(self._unchoke(p, now))
        # An owner always holds its own pieces: known even if its bitfield is lost.
        implicit = list(self.layout.owner_range(peer)) if peer in self.layout.owners else []
        out.extend(self._on_have(p, implicit, now))
        return out

    def _path_measured(self, p: PeerState, now: float) -> bool:
        """``p``'s path round trip, from our handshake to its answer (its
        handshake if we dialed, else its first message after its handshake
        where the plan is on, its first request elsewhere), is known.  Small
        messages do not queue behind blocks, so this is the path's latency,
        not a queue.  On a long path (``_long_path``) the latency rules
        start its window at half the credit over the other members and
        keep a standing queue at it (``PeerState.on_block``), unless the
        ``uplinks`` hint says p's uplink is below half the fastest: there
        our blocks would wait behind the other requesters' and hold our
        pieces at a slow source (fast quarter at 50 ms, n = 8: η 0.72 with
        deep windows at every source, 0.80 with them at fast ones only).
        True if that deepened the window."""
        return self._path_known(p, max(now - p.handshake_sent_at, 1e-9))

    def _path_known(self, p: PeerState, rtt: float) -> bool:
        """``p``'s path round trip is ``rtt`` (measured now, or by an
        earlier round's session on the same connection): the window rules
        of ``_path_measured``."""
        p.path_rtt = self._path_rtts[p.peer_id] = rtt
        if not self._long_path(p):
            return False
        up = self.uplinks.get(p.peer_id) if self.uplinks else None
        if up is not None and 2 * up < self._fastest_uplink:
            return False
        p.standing_queue = True
        if p.window < self._initial_window:
            p.window = self._initial_window
            return True
        return False

    def _long_path(self, p: PeerState) -> bool:
        """Is ``p``'s measured path round trip at least the
        ``request_queue_time`` the request window allows for queueing?
        Only there do the latency rules act where the first-copy plan is
        on, so swarms on short paths pick exactly as before them."""
        return p.path_rtt >= self.config.request_queue_time

    def _on_have_one(self, p: PeerState, m: Have, now: float) -> list[Outgoing]:
        """One ``have`` (the hot path in large swarms): same effect as
        ``_on_have(p, [index])`` without building lists."""
        i = m.index
        if i in p.served_by_piece:
            if self._held_started:
                self._settle_held(p, i)
            p.clear_served_piece(i)  # their have settles what we served them
        # (``p.set_has(i)`` inline: about a million haves in a 64-peer round)
        has = p.has
        if has[i]:
            return []
        has[i] = 1
        p.has_count += 1
        picker = self.picker
        if self._upload_aware:
            picker.gained_one(i, now)
        else:
            picker.availability[i] += 1
        if picker.have[i]:
            return []
        p.wanted += 1
        if p.am_interested:
            if p.window != 0.0 and len(p.inflight) >= p.pipeline_depth(self._min_requests,
                                                                        self._max_requests):
                # Most haves find p's request pipeline full, where ``_fill``
                # returns nothing: checked here first, without ``_fill``'s
                # other checks.  (With the window set, ``pipeline_depth``
                # changes nothing; a window still 0 is ``_fill``'s to set.)
                return []
            return self._fill(p, now)
        out = self._set_interest(p, True, now)
        out.extend(self._fill(p, now))
        return out

    def _on_have(self, p: PeerState, indices: Iterable[int], now: float) -> list[Outgoing]:
        news = [i for i in indices if p.set_has(i)]
        if self._upload_aware:
            self.picker.peer_gained(news, now)
        else:
            availability = self.picker.availability
            for i in news:
                availability[i] += 1
        for i in indices:
            # Their have settles what we served them for the piece.
            if self._held_started:
                self._settle_held(p, i)
            p.clear_served_piece(i)
        out: list[Outgoing] = []
        have = self.picker.have
        wanted = sum(1 for i in news if not have[i])
        p.wanted += wanted
        if wanted and not p.am_interested:
            out.extend(self._set_interest(p, True, now))
        if wanted:  # only news we lack can give this peer new work
            out.extend(self._fill(p, now))
        return out

    def _on_interested(self, p: PeerState, now: float) -> list[Outgoing]:
        p.peer_interested = True
        if p.interested_since == 0.0:
            p.interested_since = now
        if not p.am_choking:
            # They think they are choked (our unchoke may be lost): say it again.
            return [self._send(p, Unchoke(), now)]
        if self._slots_free():
            return self._unchoke(p, now)
        return []

    def _slots_free(self) -> bool:
        slots = self.config.max_upload_slots
        return slots == 0 or sum(1 for q in self.peers.values() if not q.am_choking) < slots

    def _unchoke(self, p: PeerState, now: float) -> list[Outgoing]:
        p.am_choking = False
        p.unchoked_at = now
        return [self._send(p, Unchoke(), now)]

    def _choke(self, p: PeerState, now: float) -> list[Outgoing]:
        p.am_choking = True
        p.interested_since = 0.0
        out = [self._send(p, Choke(), now)]
        waiting = [q for q in self.peers.values()
                   if q.peer_interested and q.am_choking and q is not p and q.handshaken]
        if waiting and self._slots_free():
            nxt = min(waiting, key=lambda q: (q.interested_since, q.peer_id))
            out.extend(self._unchoke(nxt, now))
        return out

    def _on_request(self, p: PeerState, msg: Request, now: float) -> list[Outgoing]:
        index, begin, length = msg.index, msg.begin, msg.length
        if p.path_rtt == 0.0 and p.handshake_sent_at is not None:
            # They dialed: our handshake to their first request.  A deeper
            # window sends more of our requests at once.
            if self._path_measured(p, now):
                more = self._fill(p, now)
                if more:
                    return more + self._on_request(p, msg, now)
        if p.am_choking or not self.picker.have[index]:
            p.counters.requests_refused += 1
            return []
        if p.served_bytes + length > p.their_credit and (index, begin) not in p.served:
            # Serving this would exceed what the peer said it can hold.
            p.counters.credit_violations += 1
            self.stats.credit_violations += 1
            log.debug("peer %s: request %s past its credit %s", p.peer_id, (index, begin),
                      p.their_credit)
            return []
        if self.paced_uploads:
            return self._hold(p, index, begin, length, now)
        # (``_serve``'s body inline: this is the hot path of every uniform run)
        view = self._piece_view(index)
        p.add_served(index, begin, length, now)
        counters = p.counters
        counters.blocks_out += 1
        counters.bytes_out += length
        self.stats.bytes_up += length
        p.last_sent = now
        return [(p.peer_id, Piece(index, begin, view[begin:begin + length]))]

    def _serve(self, p: PeerState, index: int, begin: int, length: int,
               now: float) -> Outgoing:
        """Send one accepted block (a paced session's release)."""
        view = self._piece_view(index)
        counters = p.counters
        counters.blocks_out += 1
        counters.bytes_out += length
        self.stats.bytes_up += length
        p.last_sent = now
        return (p.peer_id, Piece(index, begin, view[begin:begin + length]))

    # ---- paced uploads -------------------------------------------------------------
    @property
    def upload_waiting(self) -> bool:
        """Served requests are waiting for room on the uplink (paced only)."""
        return bool(self._held)

    def _hold(self, p: PeerState, index: int, begin: int, length: int,
              now: float) -> list[Outgoing]:
        """Accept a request (it counts against the peer's credit now) and keep
        it until ``upload_ready`` says the uplink has room.

        Serving order, most urgent first (measured in docs/design.md):
        first copies -- pieces no connected peer but us holds, which only
        our uplink can give -- before relays; first copies to requesters
        with faster known uplinks (``uplinks``; they pass a piece on
        soonest), short pieces last; relays to the requester holding the
        fewest pieces (no downlink falls behind); then the piece whose first
        request came first, so pieces complete one after another instead of
        all late together (a piece can be relayed only once whole); lowest
        offset."""
        pid = p.peer_id
        key = (pid, index, begin)
        if not p.add_served(index, begin, length, now) and key in self._held:
            return []  # a repeated request: already waiting
        self._held_seq += 1
        started = self._held_started.setdefault((pid, index), self._held_seq)
        ups = self.uplinks
        if self.picker.availability[index]:
            # a relay: the requester furthest behind first, so no downlink
            # falls behind the round's bound
            rank: tuple = (1, p.has_count, 0.0)
        else:
            # a first copy: to the fastest known uplink first (it passes the
            # piece on soonest); a short piece last, so the tail after our
            # final byte is as short as it can be
            rank = (0, -ups.get(pid, 0.0) if ups else 0.0, -self._lengths[index])
        entry = (rank, started, begin, self._held_seq, length, key)
        self._held[key] = entry
        heapq.heappush(self._held_heap, entry)
        self._held_fifo.append((now, entry))
        return []

    def _drop_held(self, pid: int, index: int, begins: Iterable[int]) -> None:
        """Requests of ``pid`` for ``index`` settled (its have, or a cancel)."""
        held = self._held
        for begin in begins:
            held.pop((pid, index, begin), None)
        if not held:
            self._forget_held_order()

    def _forget_held_order(self) -> None:
        """Nothing is held any more: the heap and the FIFO keep only stale
        entries (both are cleaned lazily, by identity with ``_held``)."""
        self._held_heap.clear()
        self._held_fifo.clear()

    def _settle_held(self, p: PeerState, index: int) -> None:
        """``p`` holds ``index`` now (its have): nothing of it is left to send."""
        self._drop_held(p.peer_id, index, p.served_by_piece.get(index, ()))
        self._held_started.pop((p.peer_id, index), None)

    def upload_ready(self, now: float, room: int) -> list[Outgoing]:
        """The host's uplink can take ``room`` more bytes now: the held blocks
        to send, most urgent first (see ``_hold``), at least one if any.

        Only for a session built with ``paced_uploads=True``; the host calls
        it whenever ``upload_waiting`` is true and its send buffer is below
        its low-water mark (the simulator: its uplink queue; a TCP host: the
        transport's write buffer).  A host that never paces leaves
        ``paced_uploads`` off and every request is answered at once."""
        out: list[Outgoing] = []
        heap, held, peers, fifo = self._held_heap, self._held, self.peers, self._held_fifo
        waited_since = now - self._held_patience
        while room > 0 and heap:
            # No request starves: one that has waited half the requester's
            # timeout goes first, oldest first.  Without this, a slow uplink
            # whose order always found someone more urgent let a requester's
            # requests time out until it dropped us (and with us the pieces
            # only we held: a stalled round, fast quarter n = 32, 20 MB).
            while fifo and held.get(fifo[0][1][-1]) is not fifo[0][1]:
                fifo.popleft()   # settled, served or re-queued since
            if fifo and fifo[0][0] <= waited_since:
                entry = fifo.popleft()[1]
            else:
                entry = heapq.heappop(heap)
            key = entry[-1]
            if held.get(key) is not entry:
                continue  # settled or re-queued since
            del held[key]
            pid, index, begin = key
            p = peers.get(pid)
            if p is None or p.am_choking or (index, begin) not in p.served:
                continue
            length = entry[-2]
            out.append(self._serve(p, index, begin, length, now))
            room -= length
        if not held:
            self._forget_held_order()
        return out

    def _piece_view(self, index: int) -> memoryview:
        """A held piece's bytes, from a small LRU cache of views: a piece is
        served block by block, so each block is a zero-copy slice of one view."""
        cache = self._cache
        view = cache.get(index)
        if view is not None:
            cache.move_to_end(index)
            return view
        owner, local = self.layout.to_local(index)
        data = self.storage.get(owner, local)
        if data is None:
            raise ConfigError("storage", (owner, local), "piece marked held but storage lost it")
        view = cache[index] = memoryview(data)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return view

    def _on_piece(self, p: PeerState, msg: Piece, now: float) -> list[Outgoing]:
        index, begin, block = msg.index, msg.begin, msg.block
        length = len(block)
        counters, stats, picker = p.counters, self.stats, self.picker
        counters.bytes_in += length
        stats.bytes_down += length
        sent_at = p.request_done(index, begin, length)
        if sent_at is None:
            # Never asked (or already cancelled): refuse it, whatever it holds.
            if picker.have[index] or index in picker.partials and \
                    picker.partials[index].received[begin // self._block_size]:
                counters.duplicate_blocks += 1
                stats.duplicate_blocks += 1
            else:
                counters.unrequested_blocks += 1
                stats.unrequested_blocks += 1
            return []
        counters.blocks_in += 1
        p.timeout_streak = 0
        p.note_received(length, now)
        if self._upload_aware:
            self._rate_bytes += length
            dt = now - self._rate_since
            if dt >= 0.1:
                sample = self._rate_bytes / dt
                self._rate_in = sample if self._rate_in == 0.0 else 0.5 * (self._rate_in + sample)
                self._rate_bytes = 0
                self._rate_since = now
        p.on_block(now - sent_at, self._block_size, self._queue_time,
                   self._min_requests, self._max_requests)
        pp = picker.partials.get(index)
        others = picker.block_received(index, begin, block, p.peer_id)
        out: list[Outgoing] = []
        if p.duplicates:
            # A winning end-game copy keeps its bytes reserved until the piece
            # settles: the sender counts them until our have.
            p.duplicates.discard((index, begin))
        if others is None:
            counters.duplicate_blocks += 1
            stats.duplicate_blocks += 1
        else:
            for other in others:  # end game: the losers are cancelled
                q = self.peers.get(other)
                if q is not None and q.request_done(index, begin, length) is not None:
                    if (index, begin) in q.duplicates:
                        q.duplicates.discard((index, begin))
                        q.release(index, length)
                    self.stats.cancels_sent += 1
                    out.append(self._send(q, Cancel(index, begin, length), now))
            if pp.received_count == pp.num_blocks:   # (``pp.complete``, inline)
                out.extend(self._piece_complete(index, now))
        if self.peers.get(p.peer_id) is p:  # not banned on the way
            out.extend(self._fill(p, now))
        return out

    def _piece_complete(self, index: int, now: float) -> list[Outgoing]:
        picker = self.picker
        pp = picker.partials[index]
        digest = self.layout.piece_hash(index)
        # A check that keeps verified copies (the simulator's) may compare
        # the blocks with its copy in place and hand that copy back: equal
        # bytes, the same verdict, and no 256 KiB join per piece.  Anything
        # else, or no match, is joined and checked as always.
        matching_copy = self._matching_copy
        data = matching_copy(digest, pp.blocks) if matching_copy is not None else None
        if data is None:
            data = pp.data()
            if not self.check(digest, data):
                return self._piece_failed(index, now)
        owner, local = self.layout.to_local(index)
        self.storage.put(owner, local, digest, data)
        picker.piece_verified(index, now)
        out = self._settle_suspects(index, data, now) if index in self._suspects else []
        stats = self.stats
        stats.pieces_received += 1
        if stats.first_piece_at is None:
            stats.first_piece_at = now
        if picker.pieces_missing == 0 and stats.completed_at is None:
            stats.completed_at = now
        givers = pp.contributors
        have = Have(index)  # immutable: one object serves every peer
        send = out.append
        for q in self.peers.values():  # (nothing below adds or drops a peer)
            if index in q.reserved or q.duplicates:
                q.release_piece(index)
            if not q.handshaken:
                continue
            if q.has[index]:
                q.wanted -= 1
                # Have suppression: a peer that holds the piece gains nothing
                # from our have, unless it served us (the have clears its ledger).
                if q.peer_id in givers:
                    q.last_sent = now
                    send((q.peer_id, have))
                # Only a peer holding this piece can have just lost our interest.
                if q.am_interested and not q.wanted:
                    out.extend(self._set_interest(q, False, now))
            else:
                q.last_sent = now
                send((q.peer_id, have))
        for pid in pp.contributors:
            q = self.peers.get(pid)
            if q is not None:
                out.extend(self._fill(q, now))
        return out

    def _piece_failed(self, index: int, now: float) -> list[Outgoing]:
        """A piece failed its hash: refetch it and find out who lied.

        With one contributor the blame is certain.  With several, each one's
        blocks are remembered by digest; when the piece later verifies, the
        peers whose blocks differ from the good bytes are the liars, and
        honest peers who merely shared the piece are never blamed.
        """
        pp = self.picker.piece_failed(index)
        self.stats.corrupt_pieces += 1
        owner, local = self.layout.to_local(index)
        givers = set(pp.block_from)
        log.warning("peer %s: piece %s/%s failed its hash (blocks from peers %s); refetching",
                    self.peer_id, owner, local, sorted(givers))
        out: list[Outgoing] = []
        for pid in givers:
            q = self.peers.get(pid)
            if q is None:
                continue
            # Let them release what they served us for this piece.
            for b in range(pp.num_blocks):
                if pp.block_from[b] == pid:
                    out.append(self._send(q, Cancel(index, b * pp.block_size, pp.block_length(b)), now))
        for q in self.peers.values():
            q.release_piece(index)
        if len(givers) == 1:
            out.extend(self._blame(givers.pop(), now))
        else:
            # Only the latest failure is kept: bounded, and enough to settle.
            suspects = self._suspects[index] = []
            for b, block in enumerate(pp.blocks):
                digest = hashlib.sha256(block).digest()
                suspects.append((pp.block_from[b], b * pp.block_size, pp.block_length(b), digest))
        return out

    def _settle_suspects(self, index: int, good: bytes, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        liars = {pid for pid, lo, n, digest in self._suspects.pop(index, ())
                 if hashlib.sha256(good[lo:lo + n]).digest() != digest}
        for pid in sorted(liars):
            out.extend(self._blame(pid, now))
        return out

    def _blame(self, pid: int, now: float) -> list[Outgoing]:
        """Count a corrupt piece against ``pid``; the count survives
        reconnects, so a liar cannot reset it by dropping the connection."""
        self.corrupt_by_peer[pid] = self.corrupt_by_peer.get(pid, 0) + 1
        q = self.peers.get(pid)
        if q is not None:
            q.counters.corrupt_pieces += 1
        if self.corrupt_by_peer[pid] >= self.config.max_corrupt_pieces and pid not in self.banned:
            if q is None:
                self.banned.add(pid)
                self.stats.bans += 1
                return []
            return self.ban(pid, now, "served corrupt pieces")
        return []

    # ---- requesting --------------------------------------------------------------
    def _set_interest(self, p: PeerState, interested: bool, now: float) -> list[Outgoing]:
        if p.am_interested == interested:
            return []
        p.am_interested = interested
        p.interest_sent_at = now
        return [self._send(p, Interested() if interested else NotInterested(), now)]

    def _fill(self, p: PeerState, now: float) -> list[Outgoing]:
        """Top up ``p``'s request pipeline within its depth and our credit."""
        if self.closed or not (p.handshaken or p.asked_ahead) or p.peer_choking \
                or not p.am_interested:
            return []
        cfg = self.config
        inflight = len(p.inflight)
        room = p.pipeline_depth(self._min_requests, self._max_requests) - inflight
        if room <= 0:
            return []  # the common case on a busy link: nothing to pick
        pid = p.peer_id
        # Source speed: could p finish one piece before we expect to hold
        # everything (missing bytes / our download rate)?  If not, it is
        # asked only for pieces nobody else holds.  Unknown rates count as
        # fast for relays but not for an owner's own pieces, whose uplink is
        # kept for what only it can give.
        picker = self.picker
        if not self._upload_aware:
            if self._lead_pieces \
                    and self._lead_requests * self._block_size >= p.rate_in * p.path_rtt \
                    and self._ahead_of_peers() > self._lead_pieces:
                # Leaders yield (docs/design.md): we are ahead, so we keep only
                # a short queue at each source and leave its uplink to the
                # peers furthest behind -- where that queue still covers the
                # path's round trip at our rate from p (not on long paths).
                room = min(room, self._lead_requests - inflight)
                if room <= 0:
                    return []
            # first_copy_wait 0: BitTorrent's picking as before issue 12,
            # with the latency rules: a source at least half as fast as our
            # fastest shares the open blocks of pieces assigned elsewhere
            # (upload-aware rule 4), so a piece's last blocks do not wait in
            # one source's queue
            rate = p.rate_in
            delay = cfg.end_game_delay
            if 2 * p.srtt > delay:
                # An end-game copy from p takes about p's round trip (queue
                # included); a block outstanding for less than two of those
                # is most likely queued at its source and arrives sooner
                # from there than a copy would.
                delay = 2 * p.srtt
            picks = picker.pick(pid, p.has, room, cfg.credit_bytes - p.reserved_total,
                                inflight <= 1, now, delay,
                                fast=rate > 0.0 and 2 * rate >= self._best_rate)
            return self._send_picks(p, picks, now)
        rate = p.rate_in
        if inflight == 0 and rate > 0.0 and self.paced_uploads \
                and now - p.rate_since > self._stale_after():
            # Nothing asked of p for a while: its old rate says little (it
            # may have been serving others first), so it counts as unknown.
            rate = 0.0
        if not picker.outstanding:
            slow, known = False, True  # nothing in flight anywhere: take what there is
            if self._idle_since is None:
                self._idle_since = now
            elif picker.plan and now - self._idle_since >= cfg.first_copy_wait:
                log.info("peer %s: idle %.1fs; dropping the first-copy plan", self.peer_id,
                         now - self._idle_since)
                picker.plan = False
        else:
            self._idle_since = None
            slow = self._slow(rate) if rate > 0.0 else pid in self._slow_owners
            known = rate > 0.0
        delay = cfg.end_game_delay
        if 2 * p.srtt > delay and self._long_path(p):
            delay = 2 * p.srtt  # the RTT-aware end game (see the plain branch)
        picks = picker.pick(pid, p.has, room, cfg.credit_bytes - p.reserved_total,
                            inflight <= 1, now, delay, not slow, known and not slow,
                            rate > 0.0 and 2 * rate >= self._best_rate)
        return self._send_picks(p, picks, now)

    def _ahead_of_peers(self) -> float:
        """Pieces we hold beyond the mean of what our connected peers hold
        (by their bitfields and haves; negative: behind).

        Why (docs/design.md "Leaders yield"): on equal links a source serves
        its requesters first come, first served, so a requester with more
        requests queued there gets more of its uplink, downloads faster and
        can ask for more -- download progress drifts apart over a round,
        and once the leaders are done the stragglers can take only their own
        downlink's worth of everybody's idle uplinks (measured in shaped
        namespaces: the last client finished a median 61-64 ms after the
        first).  A peer that is ahead asks for less and the uplinks it
        leaves serve the others."""
        peers = self.peers
        if not peers:
            return 0.0
        return self.pieces_have - sum(q.has_count for q in peers.values()) / len(peers)

    def _send_picks(self, p: PeerState, picks: Picks, now: float) -> list[Outgoing]:
        """Reserve credit for ``picks`` and send their requests to ``p``."""
        pid = p.peer_id
        blocks, duplicates = picks.blocks, picks.duplicates
        if picks.shared:
            # per-block reservations with the same life cycle as end-game copies
            duplicates = picks.shared + duplicates
        lengths = self._lengths
        for index in picks.assigned:
            p.reserve(index, lengths[index])
        if duplicates:
            for index, begin, length in duplicates:
                p.reserve(index, length)
                p.duplicates.add((index, begin))
            blocks = blocks + duplicates
        out: list[Outgoing] = []
        for index, begin, length in blocks:
            p.add_request(index, begin, length, now)
            out.append((pid, Request(index, begin, length)))
        if out:
            p.last_sent = now
        return out

    def _judge_owners(self, now: float) -> frozenset[int]:
        """Owners whose uplink looks slow from how long their first copies
        took (``picker.first_done``), for sources we have no rate for: an
        owner that needed more than twice the median owner's time, or is
        still not done at twice that, once half the owners are done."""
        done = self.picker.first_done
        owners = self.layout.owners
        if not self.picker.plan or 2 * len(done) < len(owners):
            return frozenset()
        took = sorted(t - self.started_at for t in done.values())
        limit = 2 * took[len(took) // 2]
        return frozenset(o for o in owners
                         if (done[o] if o in done else now) - self.started_at > limit)

    def _stale_after(self) -> float:
        """How long a source's rate stays telling once nothing is asked of
        it: four piece-times at our fastest source's rate (measured: two
        and eight each left one 2 MB cell of bench_hetero below 0.9)."""
        best = self._best_rate
        return 4 * self._max_piece / best if best > 0.0 else float("inf")

    def _slow(self, rate: float) -> bool:
        """Is a source delivering ``rate`` to us too slow to finish a piece
        before we expect to hold everything?  We expect that after missing
        bytes / our total rate, and no sooner than the fastest source needs
        for two pieces."""
        if rate <= 0.0:
            return False
        left = self.picker.missing_blocks * self._block_size / self._rate_in \
            if self._rate_in > 0.0 else float("inf")
        if self._best_rate > 0.0 and left < 2 * self._max_piece / self._best_rate:
            left = 2 * self._max_piece / self._best_rate
        return rate * left < self._max_piece

    # ---- time -------------------------------------------------------------------
    def tick(self, now: float) -> list[Outgoing]:
        """Timers: request timeouts, handshake and interest retries, keep-alive,
        dead peers, unchoke rotation, and idle pipelines."""
        if self.closed:
            return []
        out: list[Outgoing] = []
        cfg = self.config
        # the fastest source's rate: who may share open blocks (rule 4)
        self._best_rate = max((p.rate_in for p in self.peers.values()), default=0.0)
        if self._upload_aware:
            self._slow_owners = self._judge_owners(now)
        for p in list(self.peers.values()):
            if now - p.last_recv > cfg.peer_timeout:
                log.info("peer %s: peer %s silent for %.1fs; dropping", self.peer_id,
                         p.peer_id, now - p.last_recv)
                out.append((p.peer_id, Close("peer timeout")))
                self.peer_lost(p.peer_id, now)
                continue
            if not p.handshaken:
                if p.handshake_sent_at is not None and now - p.handshake_sent_at >= cfg.handshake_retry:
                    p.handshake_sent_at = now
                    out.extend(self._opening(p, now))
                if p.inflight:   # asked ahead of its handshake: those expire too
                    out.extend(self._expire_requests(p, now))
                continue
            out.extend(self._expire_requests(p, now))
            if p.timeout_streak > self.config.max_retries:
                log.info("peer %s: peer %s timed out %d times in a row; dropping", self.peer_id,
                         p.peer_id, p.timeout_streak)
                out.append((p.peer_id, Close("unresponsive")))
                self.peer_lost(p.peer_id, now)
                for q in self.peers.values():
                    out.extend(self._fill(q, now))
                continue
            p.expire_served(now - 2 * cfg.request_timeout)
            if p.am_interested and p.peer_choking and now - p.interest_sent_at >= cfg.interest_retry:
                p.interest_sent_at = now
                out.append(self._send(p, Interested(), now))
            if not p.inflight:
                out.extend(self._fill(p, now))
            if now - p.last_sent >= cfg.keepalive_interval:
                out.append(self._send(p, KeepAlive(), now))
        out.extend(self._rotate_unchokes(now))
        return out

    def _expire_requests(self, p: PeerState, now: float) -> list[Outgoing]:
        """Requests unanswered for ``request_timeout``: take the piece away
        from ``p`` (its received blocks stay) and let other peers finish it."""
        out: list[Outgoing] = []
        limit = now - self.config.request_timeout
        while p.inflight:
            (index, begin), sent_at = next(iter(p.inflight.items()))
            if sent_at > limit:
                break
            p.counters.timeouts += 1
            self.stats.timeouts += 1
            if (index, begin) in p.duplicates:   # an end-game copy: just drop it
                length = self.picker.block_length(index, begin)
                p.request_done(index, begin, length)
                p.duplicates.discard((index, begin))
                p.release(index, length)
                self.picker.request_dropped(index, begin, p.peer_id)
                out.append(self._send(p, Cancel(index, begin, length), now))
                continue
            out.extend(self._take_away(p, index, now))
        if out:
            p.timeout_streak += 1
            p.on_timeout(self.config.min_requests_per_peer)
            # The freed pieces go to whichever peers have room now.
            for q in self.peers.values():
                if q is not p:
                    out.extend(self._fill(q, now))
        return out

    def _take_away(self, p: PeerState, index: int, now: float) -> list[Outgoing]:
        """Unassign ``index`` from ``p``: cancel everything it was asked for
        or gave (so its send ledger clears), free our reservation, and avoid
        it for this piece while another holder exists."""
        out: list[Outgoing] = []
        pp = self.picker.partials.get(index)
        dropped = self.picker.unassign(index, p.peer_id)
        for begin, length in dropped:
            p.request_done(index, begin, length)
            out.append(self._send(p, Cancel(index, begin, length), now))
        if pp is not None:
            for b in range(pp.num_blocks):
                if pp.block_from[b] == p.peer_id:
                    out.append(self._send(p, Cancel(index, b * pp.block_size,
                                                    pp.block_length(b)), now))
        p.release_piece(index)
        self.picker.avoid.setdefault(index, set()).add(p.peer_id)
        return out

    def _rotate_unchokes(self, now: float) -> list[Outgoing]:
        cfg = self.config
        if cfg.max_upload_slots == 0 or now - self._last_unchoke_rotation < cfg.unchoke_interval:
            return []
        self._last_unchoke_rotation = now
        waiting = [q for q in self.peers.values() if q.peer_interested and q.am_choking and q.handshaken]
        unchoked = [q for q in self.peers.values() if not q.am_choking]
        out: list[Outgoing] = []
        if waiting and unchoked and not self._slots_free():
            oldest = min(unchoked, key=lambda q: (q.unchoked_at, q.peer_id))
            out.extend(self._choke(oldest, now))
            oldest.interested_since = now if oldest.peer_interested else 0.0
        return out

    def ban(self, peer: int, now: float, reason: str) -> list[Outgoing]:
        """Disconnect and refuse a misbehaving peer for the rest of the round."""
        log.warning("peer %s: banning peer %s: %s", self.peer_id, peer, reason)
        self.banned.add(peer)
        self.stats.bans += 1
        self.peer_lost(peer, now)
        return [(peer, Close(reason))]

    def deadline(self, now: float) -> list[Outgoing]:
        """The round's deadline passed: stop, forget unverified bytes, release
        every per-transfer record, and close all connections."""
        return self.close(now, "deadline")

    def close(self, now: float, reason: str = "closed") -> list[Outgoing]:
        if self.closed:
            return []
        out: list[Outgoing] = [(pid, Close(reason)) for pid in self.peers]
        for pid in list(self.peers):
            self.peer_lost(pid, now)
        self.picker.drop_partials()
        self.picker.avoid.clear()
        self._suspects.clear()
        self._cache.clear()
        self._held.clear()
        self._forget_held_order()
        self._held_started.clear()
        self.closed = True
        self.close_reason = reason
        return out
