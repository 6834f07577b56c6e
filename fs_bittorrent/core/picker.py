"""Which block to ask which peer for next.

Policy (BitTorrent's, tuned for federated rounds):

* **one peer per piece.** A started piece is *assigned* to one peer, which
  reserves credit for the whole piece, so the piece can always be finished
  there: no peer's credit can fill up with pieces only it could complete.
  A single giver also makes a hash failure's blame certain.  A piece is
  reassigned only when its peer leaves or stops answering; its received
  blocks stay, so the next peer resumes from the first missing offset;
* finish partial pieces before starting new ones;
* new pieces rarest first, random tie-breaks.  Every piece starts with one
  holder, its owner, so "rarest" first means "owner-only pieces first",
  which gets every piece off its owner's uplink as early as possible;
* upload-aware sources (``pick``'s ``copies_ok`` and ``own_copies_ok``,
  and the first-copy plan, see ``first_copy_plan``): an owner's uplink is
  asked for each of its pieces once, by one designated peer, before anyone
  else asks it for the same piece; a piece that already has copies elsewhere
  is not fetched from its owner unless the owner is known to be fast; a
  source too slow to finish a piece before we expect to be done is asked
  only for pieces nobody else holds;
* a source with room and no new piece to start shares the unrequested
  blocks of a piece assigned to another peer (from the back; reserved per
  block; one whole piece of credit always stays free);
* outside end game a block is never outstanding at two peers at once;
* end game once every missing block is requested (or at most
  ``end_game_threshold`` are not): a nearly idle peer may duplicate a block
  that has been outstanding for ``end_game_delay``, at most one copy per
  block, and the loser is cancelled on arrival.

The picker knows nothing of time except the ``now`` it is given, and
nothing of messages; the session drives it.
"""
from __future__ import annotations

import dataclasses
import heapq
import random
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from .config import SwarmConfig
from .layout import SwarmLayout
from .storage import Bytes

BlockKey = tuple[int, int]  # (piece index, begin)


def _kept(block: Bytes) -> Bytes:
    """``block`` itself if nothing can change its bytes (``bytes``, or a view
    of ``bytes``), else a copy: a host may reuse its receive buffer as soon
    as the session returns.  In a simulator every block is a view of a
    stored piece, so a partial piece holds no payload of its own."""
    if type(block) is bytes or type(block) is memoryview and type(block.obj) is bytes:
        return block
    return bytes(block)


@dataclass(slots=True)
class PartialPiece:
    """A piece being assembled in memory.  Never stored before its hash matches.

    Blocks are kept as they arrived (see ``_kept``) and joined once, when the
    piece is complete: no piece-sized buffer is allocated and zeroed up front.
    """

    index: int
    length: int
    block_size: int
    peer: Optional[int] = None                 # the peer it is assigned to
    blocks: list[Optional[Bytes]] = field(init=False)  # received blocks, by number
    received: list[bool] = field(init=False)
    received_count: int = 0
    contributors: dict[int, int] = field(default_factory=dict)  # peer -> blocks given
    open_blocks: set[int] = field(init=False)  # neither received nor outstanding
    block_from: list[int] = field(init=False)  # which peer gave each block
    num_blocks: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_blocks = (self.length + self.block_size - 1) // self.block_size
        self.blocks = [None] * self.num_blocks
        self.received = [False] * self.num_blocks
        self.block_from = [-1] * self.num_blocks
        self.open_blocks = set(range(self.num_blocks))

    @property
    def complete(self) -> bool:
        return self.received_count == self.num_blocks

    @property
    def buffer(self) -> bytearray:
        """The bytes received so far, zeros where blocks are missing (a copy)."""
        out = bytearray(self.length)
        for b, block in enumerate(self.blocks):
            if block is not None:
                lo = b * self.block_size
                out[lo:lo + len(block)] = block
        return out

    def data(self) -> bytes:
        """The complete piece as one ``bytes`` (its only copy of the payload)."""
        return b"".join(self.blocks)

    def block_length(self, block: int) -> int:
        return min(self.block_size, self.length - block * self.block_size)

    def next_offset(self) -> int:
        """Offset of the first block not yet received (resume point)."""
        for b, got in enumerate(self.received):
            if not got:
                return b * self.block_size
        return self.length


@dataclass(slots=True)
class Picks:
    """What ``pick`` chose: blocks to request, pieces newly assigned to the
    peer (reserve their full length), end-game duplicates (reserve per
    block), and shared blocks: unrequested blocks of a piece assigned to
    another peer (reserve per block, like duplicates, but no second copy)."""

    blocks: list[tuple[int, int, int]] = field(default_factory=list)
    assigned: list[int] = field(default_factory=list)
    duplicates: list[tuple[int, int, int]] = field(default_factory=list)
    shared: list[tuple[int, int, int]] = field(default_factory=list)

    def __iter__(self):
        return iter(self.blocks + self.shared + self.duplicates)

    def __len__(self) -> int:
        return len(self.blocks) + len(self.shared) + len(self.duplicates)


def uplinks_heterogeneous(uplinks: Iterable[float], spread: float = 2.0) -> bool:
    """Do known uplink capacities differ by more than ``spread`` (fastest /
    slowest)?  The first-copy plan pays only then: on uniform links it slows
    the start of a round (each piece leaves its owner once, so the swarm
    ramps up later; measured in docs/benchmarks.md), while a slow owner
    costs far more without it.  Unknown capacities (no value) say no."""
    ups = [u for u in uplinks if u > 0]
    return bool(ups) and max(ups) > spread * min(ups)


def plan_where_uplinks_differ(config: SwarmConfig, uplinks: Iterable[float]) -> SwarmConfig:
    """``config`` with the first-copy plan switched off (``first_copy_wait``
    0) unless the known uplinks differ (``uplinks_heterogeneous``): the
    simulator and the FS runner know the links, and uniform swarms then
    pick exactly as before issue 12."""
    if config.first_copy_wait > 0 and not uplinks_heterogeneous(uplinks):
        return dataclasses.replace(config, first_copy_wait=0.0)
    return config


def pace_uploads(config: SwarmConfig, uplinks: Iterable[float]) -> bool:
    """Should a host pace its uploads (``SwarmSession(..., paced_uploads=True)``
    with the ``uplinks`` hint)?  Where the first-copy plan is on
    (``first_copy_wait`` > 0, ``plan_where_uplinks_differ`` left it on) and
    the known uplinks differ.  The one rule for every host: the simulator's
    block level, the FS runner and the TCP data plane.  Uniform or unknown
    links answer every request at once (paced uploads on equal links cost
    more than they give: docs/benchmarks.md)."""
    return config.first_copy_wait > 0 and uplinks_heterogeneous(list(uplinks))


def first_copy_plan(layout: SwarmLayout,
                    uplinks: Optional[Mapping[int, float]] = None) -> list[int]:
    """Designated first receiver of every piece (-1: none), the same at every peer.

    Without ``uplinks``: owner o's k-th piece goes to the (k mod (N-1) +
    1)-th owner after o in id order, N owners in all.  Every peer derives it
    from the manifests alone, so it needs no message: while a piece is still
    only at its owner, only its designee asks the owner for it.  The owner's
    uplink then carries each of its pieces once, to distinct peers, before
    repeating any (the effect of BitTorrent's super-seeding), and the
    designees spread them.  Each peer is designee for about one (N-1)-th of
    every share.

    With ``uplinks`` (peer id -> uplink bytes/s, the same mapping at every
    peer: configured links, or measured ones relayed by the coordinator) the
    plan is capacity-aware, as in the fluid all-gather schedule (Kumar and
    Ross): relay j receives a share of every other owner's first copies in
    proportion to its uplink u_j, since it must pass each on to N - 2 peers.
    A slow owner's pieces then go first to fast relays, which spread them,
    instead of to a slow peer whose uplink would hold them back.  Relays are
    laid out by stride scheduling (relay j's m-th slot at (m + phase) / u_j,
    earliest slots first, a phase per owner and relay so the owners do not
    all start on the same relay); an owner's first pieces go to the fastest
    relays.  Owners without a known uplink count as the median known one.
    """
    owners = layout.owners
    n = len(owners)
    if not uplinks or n <= 2:
        plan: list[int] = []
        for pos, owner in enumerate(owners):
            for k in range(len(layout.owner_range(owner))):
                plan.append(owners[(pos + 1 + k % (n - 1)) % n] if n > 1 else -1)
        return plan
    known = sorted(u for o in owners if (u := uplinks.get(o, 0.0)) > 0)
    median = known[len(known) // 2] if known else 1.0
    weight = {o: uplinks[o] if uplinks.get(o, 0.0) > 0 else median for o in owners}
    golden = 0.6180339887498949
    plan = []
    for pos, owner in enumerate(owners):
        count = len(layout.owner_range(owner))
        # next slot per relay: (time, position, relay, slots taken)
        slots = [((0.5 + 0.5 * ((pos * n + rpos) * golden % 1.0)) / weight[relay], rpos, relay, 0)
                 for rpos, relay in enumerate(owners) if relay != owner]
        heapq.heapify(slots)
        for _ in range(count):
            at, rpos, relay, m = slots[0]
            plan.append(relay)
            phase = 0.5 + 0.5 * ((pos * n + rpos) * golden % 1.0)
            heapq.heapreplace(slots, ((m + 1 + phase) / weight[relay], rpos, relay, m + 1))
    return plan


class PiecePicker:
    max_end_game_copies = 2  # a block is outstanding at two peers at most

    def __init__(self, layout: SwarmLayout, block_size: int, have: Sequence[bool],
                 seed: int = 0, end_game_threshold: int = 0, me: int = -1,
                 plan: bool = True, uplinks: Optional[Mapping[int, float]] = None) -> None:
        self.layout = layout
        self.me = me
        # piece -> its owner, and its designated first receiver (-1: none; a
        # piece designated to us carries no restriction for us)
        self.owner_of = [layout.owner_of(i) for i in range(layout.num_pieces)]
        self.max_piece = max((layout.piece_length(i) for i in range(layout.num_pieces)),
                             default=0)
        self.designee = [-1 if d == me else d for d in first_copy_plan(layout, uplinks)]
        # owner -> its pieces we lack that no connected peer but (at most)
        # the owner holds: while any is left, the owner's uplink is asked
        # only for those first copies, never for relays.
        self.solo: dict[int, int] = {o: 0 for o in layout.owners}
        # owner -> when the last of its pieces first had another holder: how
        # long its uplink took for one copy of its share, seen by everyone
        # (a capacity measurement for owners we never downloaded from)
        self.first_done: dict[int, float] = {}
        for i in range(layout.num_pieces):
            if not have[i]:
                self.solo[self.owner_of[i]] += 1
        # The plan holds while this is True; the session drops it when it
        # has been idle too long (a designee that cannot reach the owner, or
        # was banned by it, must not hold the piece back for ever).
        self.plan = plan
        # Peers the session is connected to: a designee counts only while it
        # is here to fetch its piece (otherwise anyone may ask the owner).
        self.live: set[int] = set()
        self.block_size = block_size
        self.end_game_threshold = end_game_threshold
        n = layout.num_pieces
        self.have = list(have)
        self.availability = [0] * n
        order = list(range(n))
        random.Random(seed).shuffle(order)
        self.tiebreak = [0] * n
        for rank, i in enumerate(order):
            self.tiebreak[i] = rank
        self.by_rank = order   # tiebreak rank -> piece (the inverse of tiebreak)
        self.partials: dict[int, PartialPiece] = {}
        self.assigned: dict[int, set[int]] = {}     # peer -> its partial pieces
        self.unassigned: set[int] = set()           # partials waiting for a peer
        self.unstarted: set[int] = {i for i in range(n) if not self.have[i]}
        self.outstanding: dict[BlockKey, set[int]] = {}
        self.requested_at: dict[BlockKey, float] = {}  # first request time, for end game
        self.avoid: dict[int, set[int]] = {}
        self.missing_blocks = sum(self.blocks_in(i) for i in self.unstarted)

    # ---- bookkeeping -------------------------------------------------------
    def blocks_in(self, index: int) -> int:
        return (self.layout.piece_length(index) + self.block_size - 1) // self.block_size

    def block_length(self, index: int, begin: int) -> int:
        return min(self.block_size, self.layout.piece_length(index) - begin)

    @property
    def pieces_missing(self) -> int:
        return len(self.unstarted) + len(self.partials)

    @property
    def unrequested_blocks(self) -> int:
        return self.missing_blocks - len(self.outstanding)

    @property
    def in_end_game(self) -> bool:
        return self.pieces_missing > 0 and self.unrequested_blocks <= self.end_game_threshold

    def peer_gained(self, indices: Iterable[int], now: float = 0.0) -> None:
        for i in indices:
            self.gained_one(i, now)

    def gained_one(self, i: int, now: float = 0.0) -> None:
        """One more connected peer holds piece ``i``."""
        a = self.availability[i] = self.availability[i] + 1
        if a == 2 and not self.have[i]:
            self._first_copy_out(self.owner_of[i], now)

    def _first_copy_out(self, owner: int, now: float) -> None:
        left = self.solo[owner] = self.solo[owner] - 1
        if left == 0 and owner not in self.first_done:
            self.first_done[owner] = now

    def peer_lost(self, indices: Iterable[int]) -> None:
        for i in indices:
            a = self.availability[i] = self.availability[i] - 1
            if a == 1 and not self.have[i]:
                self.solo[self.owner_of[i]] += 1

    def _avoided(self, index: int, peer: int) -> bool:
        bad = self.avoid.get(index)
        # Avoid a peer for a piece only while someone else could serve it.
        return bool(bad) and peer in bad and self.availability[index] > len(bad)

    def pieces_of(self, peer: int) -> set[int]:
        return self.assigned.get(peer, set())

    # ---- picking -----------------------------------------------------------
    def pick(self, peer: int, peer_has: Sequence[bool], max_blocks: int, reserve_free: int,
             end_game_ok: bool = True, now: float = 0.0,
             end_game_delay: float = 0.0, copies_ok: bool = True,
             own_copies_ok: bool = True, fast: bool = False) -> Picks:
        """Blocks to request from ``peer`` now.

        ``max_blocks``: room in the peer's request pipeline.  ``reserve_free``:
        credit the peer has left for new pieces; a piece is assigned only if
        its whole length fits.  ``end_game_ok``: the caller allows duplicate
        requests from this peer (the session passes True only for a nearly
        idle peer, so duplicates use spare capacity).

        Source choice (the session judges the peer's speed; ``fast``: its
        rate to us is known and at least half our fastest source's, which
        lets it skip the owner's first-copies-first rule and share other
        peers' open blocks):
        ``copies_ok`` False starts only pieces no other connected peer holds
        (a slow source); ``own_copies_ok`` False does the same for the peer's
        own pieces only (an owner not known to be fast: its uplink is kept for
        what nobody else can give).  A piece still only at its owner is asked
        of the owner by its designated first receiver alone while that peer
        is connected (``first_copy_plan``).
        """
        picks = Picks()
        room = max_blocks
        if room <= 0:
            return picks
        mine = self.assigned.get(peer)
        if mine is None:
            mine = self.assigned[peer] = set()
        # 1. the peer's own partial pieces
        if mine:
            partials = self.partials
            for index in (sorted(mine) if len(mine) > 1 else mine):
                pp = partials[index]
                if pp.open_blocks:
                    room -= self._take(pp, peer, room, now, picks)
                    if room <= 0:
                        return picks
        # 2. orphaned partial pieces (their peer left or stopped answering)
        if self.unassigned:
            for index in sorted(self.unassigned, key=lambda i: (self.availability[i], i)):
                pp = self.partials[index]
                if not peer_has[index] or self._avoided(index, peer) or pp.length > reserve_free:
                    continue
                self.unassigned.discard(index)
                reserve_free -= pp.length
                self._assign(pp, peer, mine, picks)
                room -= self._take(pp, peer, room, now, picks)
                if room <= 0:
                    return picks
        # 3. new pieces, rarest first: (availability, tiebreak) folded into
        # one int key (tiebreak ranks are < the piece count), cheaper to compare
        n = len(self.tiebreak)
        availability, tiebreak, avoid = self.availability, self.tiebreak, self.avoid
        owner_of, designee = self.owner_of, self.designee
        planned = self.plan
        live = self.live if planned else ()
        # An owner with first copies still to give is asked for nothing else.
        first_only = planned and not fast and self.solo.get(peer, 0) > 0
        plain = not planned and copies_ok   # rarest first alone (the hot loop kept lean)
        while room > 0:
            best: Optional[int] = None
            best_key: Optional[int] = None
            if plain and not avoid:
                # The hottest scan of a uniform round (8 million pieces
                # looked at for 64 peers): the keys in one comprehension and
                # their minimum in C.  Keys are unique (the tiebreak ranks
                # are), so the piece is the same as the loop below finds,
                # and ``key % n`` is its rank.
                keys = [availability[i] * n + tiebreak[i] for i in self.unstarted if peer_has[i]]
                if keys:
                    best_key = min(keys)
                    best = self.by_rank[best_key % n]
            elif plain:
                for i in self.unstarted:
                    if peer_has[i] and not self._avoided(i, peer):
                        key = availability[i] * n + tiebreak[i]
                        if best_key is None or key < best_key:
                            best, best_key = i, key
            else:
                for i in self.unstarted:
                    if peer_has[i] and not (avoid and self._avoided(i, peer)):
                        a = availability[i]
                        if first_only and (a > 1 or owner_of[i] != peer):
                            continue
                        if a > 1:
                            if not copies_ok or planned and not own_copies_ok \
                                    and owner_of[i] == peer:
                                continue  # others hold it: spare this source
                        elif owner_of[i] == peer and designee[i] in live:
                            continue  # the owner's first copy goes to its designee
                        key = a * n + tiebreak[i]
                        if best_key is None or key < best_key:
                            best, best_key = i, key
            if best is None or self.layout.piece_length(best) > reserve_free:
                break
            self.unstarted.discard(best)
            pp = PartialPiece(best, self.layout.piece_length(best), self.block_size)
            self.partials[best] = pp
            reserve_free -= pp.length
            self._assign(pp, peer, mine, picks)
            room -= self._take(pp, peer, room, now, picks)
        # 3b. nothing new to start: a source known to be fast helps with the
        # unrequested blocks of pieces assigned to other peers (from the
        # back; their peer takes from the front), so it is not idle while a
        # slow one still has a piece's blocks to go.  No byte is asked twice.
        # (a scan only while some block is unrequested: O(1) check, it
        # skips the scan of every partial piece in the end game)
        if room > 0 and fast and self.partials and self.missing_blocks > len(self.outstanding):
            room, reserve_free = self._share(peer, peer_has, room, reserve_free, now, picks)
        # 4. end game: duplicate the oldest outstanding blocks, once each
        if end_game_ok and room > 0 and self.in_end_game:
            for key, peers in self.outstanding.items():
                if self.requested_at[key] > now - end_game_delay:
                    break  # insertion order is request order: the rest are younger
                if len(peers) >= self.max_end_game_copies or peer in peers \
                        or not peer_has[key[0]]:
                    continue
                length = self.block_length(*key)
                if length > reserve_free:
                    break
                picks.duplicates.append((key[0], key[1], length))
                peers.add(peer)
                reserve_free -= length
                room -= 1
                if room <= 0:
                    break
        return picks

    def _share(self, peer: int, peer_has: Sequence[bool], room: int, reserve_free: int,
               now: float, picks: Picks) -> tuple[int, int]:
        """Request open blocks of partial pieces assigned to other peers.

        They go to ``picks.shared`` (a reservation per block, released when
        the piece settles, as for end-game copies), and the piece stays with
        its peer.  With
        several givers a hash failure is settled by the suspects' digests,
        as after a reassignment."""
        bs, outstanding, requested_at = self.block_size, self.outstanding, self.requested_at
        for index, pp in self.partials.items():
            if pp.peer == peer or pp.peer is None or not pp.open_blocks \
                    or not peer_has[index] or index in self.avoid:
                continue  # (a piece that failed once is not split again: certain blame)
            for b in sorted(pp.open_blocks, reverse=True):
                length = pp.block_length(b)
                # Keep room for one whole piece: an orphan (this one, if its
                # peer leaves) must still fit here, or credit could deadlock.
                if length + self.max_piece > reserve_free:
                    return room, reserve_free
                begin = b * bs
                picks.shared.append((index, begin, length))
                key = (index, begin)
                outstanding[key] = {peer}
                requested_at[key] = now
                pp.open_blocks.discard(b)
                reserve_free -= length
                room -= 1
                if room <= 0:
                    return room, reserve_free
        return room, reserve_free

    def _take(self, pp: PartialPiece, peer: int, room: int, now: float, picks: Picks) -> int:
        """Request up to ``room`` of pp's open blocks, lowest offset first."""
        opened = pp.open_blocks
        if not opened:
            return 0
        chosen = [min(opened)] if room == 1 else sorted(opened)[:room]
        index, plen, bs = pp.index, pp.length, self.block_size
        blocks, outstanding, requested_at = picks.blocks, self.outstanding, self.requested_at
        for b in chosen:
            begin = b * bs
            blocks.append((index, begin, bs if plen - begin > bs else plen - begin))
            key = (index, begin)
            outstanding[key] = {peer}
            requested_at[key] = now
            opened.discard(b)
        return len(chosen)

    @staticmethod
    def _assign(pp: PartialPiece, peer: int, mine: set[int], picks: Picks) -> None:
        pp.peer = peer
        mine.add(pp.index)
        picks.assigned.append(pp.index)

    # ---- transfer outcomes ---------------------------------------------------
    def request_dropped(self, index: int, begin: int, peer: int) -> None:
        """An end-game duplicate was cancelled: forget that copy."""
        peers = self.outstanding.get((index, begin))
        if peers is None:
            return
        peers.discard(peer)
        if not peers:
            self._reopen(index, begin)

    def _reopen(self, index: int, begin: int) -> None:
        self.outstanding.pop((index, begin), None)
        self.requested_at.pop((index, begin), None)
        pp = self.partials.get(index)
        if pp is not None and not pp.received[begin // self.block_size]:
            pp.open_blocks.add(begin // self.block_size)

    def unassign(self, index: int, peer: int) -> list[tuple[int, int]]:
        """Take ``index`` away from ``peer`` (it left, or stopped answering).

        Received blocks stay; its outstanding blocks reopen for the next
        peer.  Returns the (begin, length) blocks that were outstanding at
        the peer, which the caller cancels.
        """
        pp = self.partials.get(index)
        dropped: list[tuple[int, int]] = []
        if pp is None:
            return dropped
        for b in range(pp.num_blocks):
            key = (index, b * self.block_size)
            peers = self.outstanding.get(key)
            if peers is not None and peer in peers:
                dropped.append((key[1], pp.block_length(b)))
                peers.discard(peer)
                if not peers:
                    self._reopen(index, key[1])
        if pp.peer == peer:
            pp.peer = None
            self.assigned.get(peer, set()).discard(index)
            self.unassigned.add(index)
        return dropped

    def peer_gone(self, peer: int) -> list[int]:
        """Unassign everything ``peer`` had; returns those pieces."""
        pieces = sorted(self.assigned.pop(peer, set()))
        for index in pieces:
            self.unassign(index, peer)
        # A departed peer no longer counts among the avoided holders.
        for index in [i for i, bad in self.avoid.items() if peer in bad]:
            self.avoid[index].discard(peer)
            if not self.avoid[index]:
                del self.avoid[index]
        # end-game copies at this peer for pieces assigned elsewhere
        for key in [k for k, peers in self.outstanding.items() if peer in peers]:
            self.request_dropped(key[0], key[1], peer)
        return pieces

    def block_received(self, index: int, begin: int, data, peer: int) -> Optional[set[int]]:
        """Take a requested block in.  Returns the other peers it was also
        requested from (to cancel), or None if the block was already there."""
        pp = self.partials.get(index)
        if pp is None:
            return None
        b = begin // self.block_size
        received = pp.received
        if received[b]:
            return None
        pp.blocks[b] = _kept(data)
        received[b] = True
        pp.block_from[b] = peer
        pp.open_blocks.discard(b)
        pp.received_count += 1
        contributors = pp.contributors
        contributors[peer] = contributors.get(peer, 0) + 1
        self.missing_blocks -= 1
        key = (index, begin)
        others = self.outstanding.pop(key, None)
        self.requested_at.pop(key, None)
        if others is None:
            return set()
        others.discard(peer)
        return others

    def _forget(self, index: int) -> PartialPiece:
        pp = self.partials.pop(index)
        if pp.peer is not None:
            self.assigned.get(pp.peer, set()).discard(index)
        self.unassigned.discard(index)
        for b in range(pp.num_blocks):
            key = (index, b * self.block_size)
            self.outstanding.pop(key, None)
            self.requested_at.pop(key, None)
        return pp

    def piece_verified(self, index: int, now: float = 0.0) -> None:
        if index in self.partials:
            self._forget(index)
        self.avoid.pop(index, None)
        if not self.have[index] and self.availability[index] <= 1:
            self._first_copy_out(self.owner_of[index], now)
        self.have[index] = True

    def piece_failed(self, index: int) -> PartialPiece:
        """Hash mismatch: drop the piece, avoid its givers, start over.

        Returns the failed partial so the caller can work out who lied."""
        pp = self._forget(index)
        self.avoid.setdefault(index, set()).update(pp.contributors)
        self.unstarted.add(index)
        self.missing_blocks += pp.received_count
        return pp

    def drop_partials(self) -> int:
        """Deadline: forget every unverified byte.  Returns pieces dropped."""
        n = len(self.partials)
        for index, pp in list(self.partials.items()):
            self.missing_blocks += pp.received_count
            self.unstarted.add(index)
        self.partials.clear()
        self.assigned.clear()
        self.unassigned.clear()
        self.outstanding.clear()
        self.requested_at.clear()
        return n
