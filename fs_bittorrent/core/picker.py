"""Which block to ask which peer for next.

Policy (BitTorrent's, tuned for federated rounds):

* finish pieces already started before starting new ones (partial pieces tie
  up memory and delay ``have`` announcements);
* new pieces by rarest first, random tie-breaks.  Every piece starts with one
  holder, its owner, so "rarest" first means "owner-only pieces first", which
  gets every piece off its owner's uplink as early as possible;
* outside end game a block is never outstanding at two peers at once;
* end game once every missing block is requested (or at most
  ``end_game_threshold`` are not): the remaining blocks are asked of every
  peer that has them, and the losers are cancelled on arrival.

The picker knows nothing of time or messages; the session drives it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .layout import SwarmLayout

BlockKey = tuple[int, int]  # (piece index, begin)


@dataclass
class PartialPiece:
    """A piece being assembled in memory.  Never stored before its hash matches.

    Received blocks survive a peer's disconnect, so the piece resumes from
    the first missing offset with another peer.
    """

    index: int
    length: int
    block_size: int
    buffer: bytearray = field(init=False)
    received: list[bool] = field(init=False)
    received_count: int = 0
    contributors: dict[int, int] = field(default_factory=dict)  # peer -> blocks given
    open_blocks: set[int] = field(init=False)  # neither received nor outstanding
    block_from: list[int] = field(init=False)  # which peer gave each block

    def __post_init__(self) -> None:
        self.buffer = bytearray(self.length)
        self.received = [False] * self.num_blocks
        self.block_from = [-1] * self.num_blocks
        self.open_blocks = set(range(self.num_blocks))

    @property
    def num_blocks(self) -> int:
        return (self.length + self.block_size - 1) // self.block_size

    @property
    def complete(self) -> bool:
        return self.received_count == self.num_blocks

    def block_length(self, block: int) -> int:
        return min(self.block_size, self.length - block * self.block_size)

    def next_offset(self) -> int:
        """Offset of the first block not yet received (resume point)."""
        for b, got in enumerate(self.received):
            if not got:
                return b * self.block_size
        return self.length


class PiecePicker:
    max_end_game_copies = 2  # a block is outstanding at two peers at most

    def __init__(self, layout: SwarmLayout, block_size: int, have: Sequence[bool],
                 seed: int = 0, end_game_threshold: int = 0) -> None:
        self.layout = layout
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
        self.partials: dict[int, PartialPiece] = {}
        self.open_partials: set[int] = set()  # partials with blocks still to request
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

    def peer_gained(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.availability[i] += 1

    def peer_lost(self, indices: Iterable[int]) -> None:
        for i in indices:
            self.availability[i] -= 1

    def _avoided(self, index: int, peer: int) -> bool:
        bad = self.avoid.get(index)
        # Avoid a peer for a piece only while someone else could serve it.
        return bool(bad) and peer in bad and self.availability[index] > len(bad)

    # ---- picking -----------------------------------------------------------
    def pick(self, peer: int, peer_has: Sequence[bool], max_blocks: int,
             max_bytes: int, end_game_ok: bool = True, now: float = 0.0,
             end_game_delay: float = 0.0) -> list[tuple[int, int, int]]:
        """Blocks (index, begin, length) to request from ``peer`` now.

        ``end_game_ok``: the caller allows duplicate requests from this peer
        (the session passes True only for a peer that is nearly idle, so
        duplicates go to spare capacity instead of queueing behind real work);
        only blocks outstanding for ``end_game_delay`` or longer are duplicated,
        so end game chases stragglers rather than racing healthy transfers.
        """
        out: list[tuple[int, int, int]] = []
        if max_blocks <= 0 or max_bytes <= 0:
            return out
        budget = [max_blocks, max_bytes]

        def take(index: int, pp: PartialPiece) -> bool:
            """Queue pp's open blocks in offset order; False once the budget is spent."""
            for b in sorted(pp.open_blocks):
                length = pp.block_length(b)
                if length > budget[1] or budget[0] <= 0:
                    return False
                begin = b * self.block_size
                out.append((index, begin, length))
                self.outstanding[(index, begin)] = {peer}
                self.requested_at[(index, begin)] = now
                pp.open_blocks.discard(b)
                budget[0] -= 1
                budget[1] -= length
            self.open_partials.discard(index)
            return True

        for index in sorted(self.open_partials):
            if peer_has[index] and not self._avoided(index, peer):
                if not take(index, self.partials[index]):
                    return out
        while budget[0] > 0:
            best: Optional[int] = None
            best_key = None
            for i in self.unstarted:
                if peer_has[i] and not self._avoided(i, peer):
                    key = (self.availability[i], self.tiebreak[i])
                    if best_key is None or key < best_key:
                        best, best_key = i, key
            if best is None:
                break
            if min(self.block_size, self.layout.piece_length(best)) > budget[1]:
                break
            self.unstarted.discard(best)
            pp = PartialPiece(best, self.layout.piece_length(best), self.block_size)
            self.partials[best] = pp
            self.open_partials.add(best)
            if not take(best, pp):
                return out
        if end_game_ok and self.in_end_game and budget[0] > 0:
            # Oldest outstanding blocks first; at most one duplicate each.
            for key, peers in self.outstanding.items():
                if self.requested_at[key] > now - end_game_delay:
                    break  # insertion order is request order: the rest are younger
                if len(peers) >= self.max_end_game_copies or peer in peers \
                        or not peer_has[key[0]]:
                    continue
                length = self.block_length(*key)
                if length > budget[1] or budget[0] <= 0:
                    break
                out.append((key[0], key[1], length))
                peers.add(peer)
                budget[0] -= 1
                budget[1] -= length
        return out

    def wants_any(self, peer_has: Sequence[bool]) -> bool:
        """Does this peer hold anything we still miss?"""
        for i in self.unstarted:
            if peer_has[i]:
                return True
        for i in self.partials:
            if peer_has[i]:
                return True
        return False

    # ---- transfer outcomes ---------------------------------------------------
    def request_dropped(self, index: int, begin: int, peer: int) -> None:
        """A request timed out, was cancelled or its peer left: free the block."""
        peers = self.outstanding.get((index, begin))
        if peers is None:
            return
        peers.discard(peer)
        if not peers:
            del self.outstanding[(index, begin)]
            del self.requested_at[(index, begin)]
            pp = self.partials.get(index)
            if pp is not None and not pp.received[begin // self.block_size]:
                pp.open_blocks.add(begin // self.block_size)
                self.open_partials.add(index)

    def block_received(self, index: int, begin: int, data, peer: int) -> Optional[set[int]]:
        """Copy a requested block in.  Returns the other peers it was also
        requested from (to cancel), or None if the block was already there."""
        pp = self.partials.get(index)
        if pp is None:
            return None
        b = begin // self.block_size
        if pp.received[b]:
            return None
        pp.buffer[begin:begin + len(data)] = data
        pp.received[b] = True
        pp.block_from[b] = peer
        pp.open_blocks.discard(b)
        if not pp.open_blocks:
            self.open_partials.discard(index)
        pp.received_count += 1
        pp.contributors[peer] = pp.contributors.get(peer, 0) + 1
        self.missing_blocks -= 1
        others = self.outstanding.pop((index, begin), set())
        self.requested_at.pop((index, begin), None)
        others.discard(peer)
        return others

    def piece_verified(self, index: int) -> None:
        self.partials.pop(index, None)
        self.open_partials.discard(index)
        self.avoid.pop(index, None)
        self.have[index] = True

    def piece_failed(self, index: int) -> PartialPiece:
        """Hash mismatch: drop the piece, avoid its contributors, start over.

        Returns the failed partial so the caller can work out who lied."""
        pp = self.partials.pop(index)
        self.open_partials.discard(index)
        for key in [k for k in self.outstanding if k[0] == index]:
            del self.outstanding[key]
            del self.requested_at[key]
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
        self.open_partials.clear()
        self.outstanding.clear()
        self.requested_at.clear()
        return n
