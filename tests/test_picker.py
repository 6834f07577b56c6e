"""The piece picker: one peer per partial piece (whole-piece reservation),
the peer's own partials first, then orphans, then new pieces rarest first,
one copy per block outside end game, gated end game; plus a randomized
invariant check."""
from __future__ import annotations


from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fs_bittorrent.core.layout import SwarmLayout
from fs_bittorrent.core.picker import PartialPiece, PiecePicker, Picks

from swarm_helpers import random_owner

BS = 16
BIG = 10 ** 9


def make(owner, n_pieces, piece_size, rnd=0, seed=0, short_last=True):
    """(manifest, pieces) of an owner whose 'model' is random bytes."""
    m, pieces, _ = random_owner(owner, n_pieces, piece_size, rnd=rnd, seed=seed,
                                short_last=short_last)
    return m, pieces


def layout_of(*specs, short_last=True):
    """specs: (owner, n_pieces, piece_size)."""
    made = {o: make(o, n, ps, short_last=short_last) for o, n, ps in specs}
    return SwarmLayout(tuple(m for m, _ in made.values())), made


def picker(layout, seed=0, threshold=0, have=None):
    return PiecePicker(layout, BS, have or [False] * layout.num_pieces, seed=seed,
                       end_game_threshold=threshold)


def everything(layout):
    return [True] * layout.num_pieces


def only(n, *indices):
    return [i in indices for i in range(n)]


def piece_order(picks):
    """Pieces in the order their first block was picked."""
    seen = []
    for index, _, _ in picks:
        if index not in seen:
            seen.append(index)
    return seen


def keys(picks):
    return [(i, b) for i, b, _ in picks]


# ---------------------------------------------------------------------------
# the Picks object
# ---------------------------------------------------------------------------

def test_picks_iterates_blocks_then_duplicates():
    p = Picks(blocks=[(0, 0, BS), (0, BS, BS)], assigned=[0], duplicates=[(1, 0, BS)])
    assert list(p) == [(0, 0, BS), (0, BS, BS), (1, 0, BS)]
    assert len(p) == 3
    assert list(Picks()) == [] and len(Picks()) == 0


# ---------------------------------------------------------------------------
# rarest first
# ---------------------------------------------------------------------------

def test_owner_only_pieces_first_then_rarest_first():
    lay, _ = layout_of((0, 4, 32), (1, 4, 32), (2, 4, 32))
    pk = picker(lay, seed=3)
    for o in lay.owners:  # every owner holds its own pieces
        pk.peer_gained(lay.owner_range(o))
    relayed = {0: 1, 1: 2, 4: 1, 5: 3, 8: 2}  # extra holders of some pieces
    for i, extra in relayed.items():
        pk.peer_gained([i] * extra)
    picks = pk.pick(99, everything(lay), BIG, BIG)
    order = piece_order(picks)
    assert sorted(order) == list(range(lay.num_pieces))
    owner_only = [i for i in range(lay.num_pieces) if i not in relayed]
    assert set(order[:len(owner_only)]) == set(owner_only)  # all owner-only pieces first
    keys_ = [(pk.availability[i], pk.tiebreak[i]) for i in order]
    assert keys_ == sorted(keys_)  # then rarest first, ties by the seeded tie-break
    # whole pieces, in offset order, each assigned to the peer as it starts
    for i in order:
        begins = [b for j, b, _ in picks if j == i]
        assert begins == [k * BS for k in range(pk.blocks_in(i))]
    assert picks.assigned == order and not picks.duplicates
    assert pk.assigned[99] == set(order) and not pk.unassigned
    assert all(pk.partials[i].peer == 99 for i in order)


def test_pieces_the_peer_lacks_or_we_hold_are_never_picked():
    lay, _ = layout_of((0, 6, 32))
    have = [False, True, False, True, False, False]
    pk = picker(lay, have=have)
    pk.peer_gained(range(6))
    peer_has = [True, True, True, True, False, True]
    picks = pk.pick(5, peer_has, BIG, BIG)
    assert set(piece_order(picks)) == {0, 2, 5} == set(picks.assigned)
    # everything the second peer could serve is assigned to the first
    assert list(pk.pick(6, peer_has, BIG, BIG)) == []
    assert pk.pieces_of(6) == set() and pk.pieces_of(5) == {0, 2, 5}
    assert pk.missing_blocks == 4 * 2


def tie_order(seed, n=24):
    lay, _ = layout_of((0, n, 16), short_last=False)
    pk = picker(lay, seed=seed)
    pk.peer_gained(range(n))
    return piece_order(pk.pick(1, everything(lay), BIG, BIG))


def test_tie_breaks_are_random_but_seeded():
    assert tie_order(0) == tie_order(0)
    assert tie_order(7) == tie_order(7)
    orders = {tuple(tie_order(seed)) for seed in range(6)}
    assert len(orders) == 6  # every seed shuffles differently
    assert tuple(range(24)) not in orders
    for o in orders:
        assert sorted(o) == list(range(24))


def test_availability_changes_reorder_the_picks():
    lay, _ = layout_of((0, 3, 16), short_last=False)
    pk = picker(lay, seed=0)
    pk.peer_gained([0, 1, 2])
    pk.peer_gained([0, 1])
    assert piece_order(pk.pick(1, everything(lay), 1, BIG)) == [2]
    pk.peer_lost([0])
    assert piece_order(pk.pick(1, everything(lay), 1, BIG)) == [0]


# ---------------------------------------------------------------------------
# assignment: the peer's own partials, then orphans, then new pieces
# ---------------------------------------------------------------------------

def test_own_partial_pieces_are_finished_before_new_ones_start():
    lay, made = layout_of((0, 4, 64), short_last=False)  # 4 blocks per piece
    pk = picker(lay, seed=1)
    pk.peer_gained(range(4))
    pk.peer_gained([0, 1, 2, 3])
    first = pk.pick(1, everything(lay), 2, BIG)
    (p,) = set(piece_order(first))
    assert keys(first) == [(p, 0), (p, BS)] and first.assigned == [p]
    assert pk.partials[p].peer == 1 and pk.assigned[1] == {p}
    assert pk.partials[p].open_blocks == {2, 3}
    # make every other piece rarer: still, the peer's started piece comes first
    pk.peer_gained([p, p])
    second = pk.pick(1, everything(lay), 4, BIG)
    assert keys(second)[:2] == [(p, 2 * BS), (p, 3 * BS)]
    assert not pk.partials[p].open_blocks
    assert len(set(piece_order(second))) == 2
    (q,) = set(piece_order(second)) - {p}
    assert keys(second)[2:] == [(q, 0), (q, BS)] and second.assigned == [q]  # p was already ours
    assert pk.assigned[1] == {p, q}
    # the peer's own partial continues without new credit: it is reserved already
    mine = pk.pick(1, everything(lay), 100, 0)
    assert keys(mine) == [(q, 2 * BS), (q, 3 * BS)] and not mine.assigned
    # another peer never gets blocks of pieces assigned to peer 1 that are
    # outstanding there (nothing of p and q is open now)
    other = pk.pick(2, everything(lay), 100, BIG, end_game_ok=False)
    assert not {p, q} & set(piece_order(other))
    assert set(other.assigned) == {0, 1, 2, 3} - {p, q} and not other.duplicates
    assert list(pk.pick(2, only(4, p, q), 100, BIG, end_game_ok=False)) == []


def test_idle_peer_shares_open_blocks_of_a_piece_assigned_elsewhere():
    """With nothing new to start, a source known to be fast takes the
    unrequested blocks of a piece assigned to another peer, from the back
    (the assigned peer goes from the front): reserved per block, never a
    block asked twice, and the piece stays assigned."""
    lay, made = layout_of((0, 1, 128), short_last=False)  # one piece, 8 blocks
    pk = picker(lay)
    pk.peer_gained([0, 0])
    first = pk.pick(1, everything(lay), 2, BIG)
    assert keys(first) == [(0, 0), (0, BS)] and first.assigned == [0]
    # only a source known to be fast shares
    assert list(pk.pick(2, everything(lay), 3, BIG)) == []
    shared = pk.pick(2, everything(lay), 3, BIG, fast=True)
    assert not shared.blocks and not shared.assigned and not shared.duplicates
    assert keys(shared.shared) == [(0, 7 * BS), (0, 6 * BS), (0, 5 * BS)]
    assert pk.partials[0].peer == 1 and pk.assigned[1] == {0}
    assert pk.partials[0].open_blocks == {2, 3, 4}
    assert all(len(peers) == 1 for peers in pk.outstanding.values())
    more = pk.pick(1, everything(lay), 10, BIG, end_game_ok=False)
    assert keys(more) == [(0, 2 * BS), (0, 3 * BS), (0, 4 * BS)]
    # sharing leaves room for one whole piece in the peer's credit
    pk.request_dropped(0, 7 * BS, 2)  # the block is open again
    assert list(pk.pick(3, everything(lay), 10, 128 + BS - 1, end_game_ok=False,
                        fast=True)) == []
    assert keys(pk.pick(3, everything(lay), 10, 128 + BS, end_game_ok=False,
                        fast=True)) == [(0, 7 * BS)]


def test_orphaned_partial_resumes_at_first_missing_offset_before_new_pieces():
    lay, made = layout_of((0, 4, 64), short_last=False)
    pk = picker(lay, seed=1)
    pk.peer_gained(range(4))
    got = pk.pick(1, everything(lay), 4, BIG)
    (p,) = got.assigned
    pk.block_received(p, 0, made[0][1][p][:BS], 1)
    pk.block_received(p, 2 * BS, made[0][1][p][2 * BS:3 * BS], 1)
    # peer 1 stops answering: the piece is taken away, received blocks stay
    dropped = pk.unassign(p, 1)
    assert dropped == [(BS, BS), (3 * BS, BS)]
    pp = pk.partials[p]
    assert pp.peer is None and p in pk.unassigned and p not in pk.pieces_of(1)
    assert pp.received == [True, False, True, False] and pp.open_blocks == {1, 3}
    assert pp.next_offset() == BS
    assert not any(1 in v for v in pk.outstanding.values())
    assert pk.unassign(p, 1) == []  # idempotent
    # a peer lacking it cannot take it; a peer with too little credit neither
    assert p not in piece_order(pk.pick(2, [i != p for i in range(4)], 1, BIG))
    assert p in pk.unassigned
    assert list(pk.pick(3, only(4, p), 10, 63)) == []
    assert p in pk.unassigned
    # the next holder gets the orphan first (whole length reserved), from
    # the first missing offset
    again = pk.pick(3, everything(lay), 1, 64)
    assert keys(again) == [(p, BS)] and again.assigned == [p]
    assert pk.partials[p].peer == 3 and p not in pk.unassigned
    rest = pk.pick(3, everything(lay), 10, 0)  # nothing more fits the credit
    assert keys(rest) == [(p, 3 * BS)] and not rest.assigned


def test_orphans_go_rarest_first_and_only_whole_pieces_fit_the_reserve():
    lay, made = layout_of((0, 3, 64))  # pieces 64, 64, 43 bytes
    pk = picker(lay, seed=0)
    pk.peer_gained(range(3))
    pk.peer_gained([0, 1])
    pk.peer_gained([0])              # availability 3, 2, 1
    got = pk.pick(1, everything(lay), 3, BIG)
    assert list(got) == [(2, 0, BS), (2, BS, BS), (2, 2 * BS, 11)]  # the rarest, whole
    assert got.assigned == [2]
    got = pk.pick(1, everything(lay), 2, BIG)   # half of the next rarest
    assert keys(got) == [(1, 0), (1, BS)] and got.assigned == [1]
    assert pk.pieces_of(1) == {1, 2}
    assert pk.peer_gone(1) == [1, 2]
    assert pk.unassigned == {1, 2} and not pk.outstanding and not pk.assigned.get(1)
    # orphans in availability order: 2 (rarest) then 1; 0 is still unstarted
    order = pk.pick(2, everything(lay), 100, BIG)
    assert order.assigned[:2] == [2, 1] and order.assigned == [2, 1, 0]
    # a budget that fits the short piece only
    pk2 = picker(lay, seed=0)
    pk2.peer_gained(range(3))
    assert list(pk2.pick(3, only(3, 2), 10, 42)) == []
    assert keys(pk2.pick(3, only(3, 2), 10, 43)) == [(2, 0), (2, BS), (2, 2 * BS)]
    assert list(pk2.pick(4, only(3, 0, 1), 10, 63)) == []
    assert pk2.pick(4, only(3, 0, 1), 10, 64).assigned != []
    assert list(pk2.pick(4, everything(lay), 0, BIG)) == []


def test_reserve_stops_new_pieces_but_not_the_peers_own():
    lay, _ = layout_of((0, 3, 64))
    pk = picker(lay, seed=0)
    pk.peer_gained(range(3))
    got = pk.pick(1, only(3, 0), 1, BIG)
    assert list(got) == [(0, 0, BS)] and got.assigned == [0]
    got = pk.pick(2, only(3, 2), 10, BIG)
    assert list(got) == [(2, 0, BS), (2, BS, BS), (2, 2 * BS, 11)]
    # a reserve that stops before the next whole piece (copies_ok False: no
    # sharing of peer 1's open blocks, only whole new pieces)
    assert list(pk.pick(3, only(3, 0, 1), 10, 64 - 1, copies_ok=False)) == []
    got = pk.pick(3, only(3, 0, 1), 10, 64 + 43, copies_ok=False)
    assert got.assigned == [1] and len(got) == 4
    # two pieces fit only if both whole lengths fit
    pk2 = picker(lay, seed=0)
    pk2.peer_gained(range(3))
    assert len(pk2.pick(1, only(3, 0, 1), 100, 2 * 64 - 1).assigned) == 1
    pk2 = picker(lay, seed=0)
    pk2.peer_gained(range(3))
    assert len(pk2.pick(1, only(3, 0, 1), 100, 2 * 64).assigned) == 2
    assert list(pk.pick(3, everything(lay), 0, BIG)) == []


def test_partial_piece_resume_point():
    pp = PartialPiece(0, 43, BS)
    assert pp.num_blocks == 3 and pp.block_length(2) == 11 and pp.next_offset() == 0
    assert pp.peer is None
    pp.received[0] = True
    assert pp.next_offset() == BS
    pp.received[2] = True
    assert pp.next_offset() == BS
    pp.received[1] = True
    assert pp.next_offset() == 43


# ---------------------------------------------------------------------------
# end game
# ---------------------------------------------------------------------------

def eg_picker(threshold=0):
    lay, _ = layout_of((0, 2, 32), short_last=False)  # 2 pieces x 2 blocks
    pk = picker(lay, threshold=threshold)
    for _ in range(4):
        pk.peer_gained([0, 1])
    return lay, pk


def test_end_game_needs_every_missing_block_outstanding():
    lay, pk = eg_picker()
    got = pk.pick(1, everything(lay), 3, BIG, now=0.0)
    assert len(got) == 3 and pk.unrequested_blocks == 1 and not pk.in_end_game
    (last_piece,) = {i for i, _, _ in got if sum(1 for j, _, _ in got if j == i) == 1}
    other = 1 - last_piece
    has_other = [i == other for i in range(2)]
    # peer 2 could duplicate the old blocks of `other`, but one block is unrequested
    assert list(pk.pick(2, has_other, 10, BIG, end_game_ok=True, now=100.0,
                        end_game_delay=0.5)) == []
    # it may share the open block of `last_piece` (not a duplicate: the piece
    # stays peer 1's); only then is every block requested
    shared = pk.pick(2, everything(lay), 1, BIG, end_game_ok=True, now=100.0,
                     end_game_delay=0.5, fast=True)
    assert keys(shared.shared) == [(last_piece, BS)] and not shared.blocks
    assert pk.partials[last_piece].peer == 1 and pk.in_end_game
    assert all(len(v) == 1 for v in pk.outstanding.values())


def test_end_game_threshold_allows_earlier_end_game():
    lay, pk = eg_picker(threshold=1)
    got = pk.pick(1, everything(lay), 3, BIG, now=0.0)
    (last_piece,) = {i for i, _, _ in got if sum(1 for j, _, _ in got if j == i) == 1}
    other = 1 - last_piece
    assert pk.in_end_game
    dup = pk.pick(2, [i == other for i in range(2)], 10, BIG, now=1.0, end_game_delay=0.5)
    assert sorted(dup) == [(other, 0, BS), (other, BS, BS)]
    assert sorted(dup.duplicates) == sorted(dup) and not dup.blocks and not dup.assigned
    assert pk.outstanding[(other, 0)] == {1, 2}
    assert pk.partials[other].peer == 1  # a duplicate does not reassign the piece
    assert not pk.pieces_of(2)


def test_end_game_only_duplicates_blocks_older_than_the_delay():
    lay, pk = eg_picker()
    pk.pick(1, everything(lay), 2, BIG, now=0.0)
    pk.pick(1, everything(lay), 2, BIG, now=1.0)
    assert pk.in_end_game
    assert list(pk.pick(2, everything(lay), 10, BIG, now=0.49, end_game_delay=0.5)) == []
    early = pk.pick(2, everything(lay), 10, BIG, now=1.2, end_game_delay=0.5)
    assert len(early) == 2 == len(early.duplicates)
    assert {(i, b) for i, b, _ in early} == {k for k, t in pk.requested_at.items() if t == 0.0}
    late = pk.pick(2, everything(lay), 10, BIG, now=1.6, end_game_delay=0.5)
    assert {(i, b) for i, b, _ in late} == {k for k, t in pk.requested_at.items() if t == 1.0}
    assert all(v == {1, 2} for v in pk.outstanding.values())


def test_end_game_copies_are_capped_need_end_game_ok_and_reserve_per_block():
    lay, pk = eg_picker()
    pk.pick(1, everything(lay), 10, BIG, now=0.0)
    assert list(pk.pick(2, everything(lay), 10, BIG, end_game_ok=False, now=5.0,
                        end_game_delay=0.5)) == []
    # each copy needs one block of credit
    assert list(pk.pick(2, everything(lay), 10, BS - 1, now=5.0, end_game_delay=0.5)) == []
    assert len(pk.pick(2, everything(lay), 10, 2 * BS + 1, now=5.0, end_game_delay=0.5)) == 2
    assert len(pk.pick(2, everything(lay), 10, BIG, now=5.0, end_game_delay=0.5)) == 2
    assert list(pk.pick(3, everything(lay), 10, BIG, now=5.0, end_game_delay=0.5)) == []
    assert list(pk.pick(1, everything(lay), 10, BIG, now=5.0, end_game_delay=0.5)) == []
    assert all(len(v) == PiecePicker.max_end_game_copies for v in pk.outstanding.values())
    # one copy dropped: a third peer may take that block only
    pk.request_dropped(0, BS, 2)
    assert pk.outstanding[(0, BS)] == {1}
    assert pk.pick(3, everything(lay), 10, BIG, now=5.0, end_game_delay=0.5).duplicates \
        == [(0, BS, BS)]
    # a budget of one block gives at most one duplicate
    pk.request_dropped(1, 0, 2)
    pk.request_dropped(1, BS, 2)
    assert len(pk.pick(4, everything(lay), 1, BIG, now=5.0, end_game_delay=0.5)) == 1
    # dropping a copy the peer does not hold changes nothing
    before = {k: set(v) for k, v in pk.outstanding.items()}
    pk.request_dropped(0, 0, 9)
    pk.request_dropped(1, 0, 9)
    assert {k: set(v) for k, v in pk.outstanding.items()} == before


def test_end_game_winner_returns_the_losers_to_cancel():
    lay, pk = eg_picker()
    pk.pick(1, everything(lay), 10, BIG, now=0.0)
    pk.pick(2, everything(lay), 10, BIG, now=1.0, end_game_delay=0.5)
    assert pk.block_received(0, 0, bytes(BS), 2) == {1}
    assert (0, 0) not in pk.outstanding and (0, 0) not in pk.requested_at
    assert pk.block_received(0, 0, bytes(BS), 1) is None  # the loser's late copy
    assert pk.missing_blocks == 3
    assert pk.partials[0].block_from[0] == 2 and pk.partials[0].contributors == {2: 1}


def test_unassign_and_peer_gone_keep_other_peers_end_game_copies():
    lay, pk = eg_picker()
    pk.pick(1, everything(lay), 10, BIG, now=0.0)
    assert len(pk.pick(2, everything(lay), 10, BIG, now=5.0, end_game_delay=0.5).duplicates) == 4
    # the copy holder unassigns nothing: only its copies go
    assert pk.unassign(1, 2) == [(0, BS), (BS, BS)]
    assert pk.partials[1].peer == 1 and pk.outstanding[(1, 0)] == {1}
    assert not pk.unassigned
    # the assigned peer stops answering piece 0: peer 2's copies stay outstanding
    assert pk.unassign(0, 1) == [(0, BS), (BS, BS)]
    assert pk.unassigned == {0} and pk.partials[0].peer is None
    assert pk.outstanding[(0, 0)] == {2} and pk.outstanding[(0, BS)] == {2}
    assert not pk.partials[0].open_blocks
    # a new holder takes the orphan (reserving it) but has nothing to ask yet
    got = pk.pick(3, everything(lay), 10, BIG, end_game_ok=False, now=6.0)
    assert got.assigned == [0] and not got.blocks and pk.partials[0].peer == 3
    # the copy is dropped: its block reopens for the piece's new peer
    pk.request_dropped(0, 0, 2)
    assert (0, 0) not in pk.outstanding and pk.partials[0].open_blocks == {0}
    assert list(pk.pick(3, everything(lay), 10, 0, end_game_ok=False, now=7.0)) == [(0, 0, BS)]
    # peer 2 leaves: no pieces of its own, its last copy reopens
    assert pk.peer_gone(2) == []
    assert (0, BS) not in pk.outstanding and pk.partials[0].open_blocks == {1}
    assert not any(2 in v for v in pk.outstanding.values())
    # peer 3 leaves: its piece is an orphan again, with its request reopened
    assert pk.peer_gone(3) == [0]
    assert pk.unassigned == {0} and pk.partials[0].open_blocks == {0, 1}
    assert 3 not in pk.assigned


# ---------------------------------------------------------------------------
# hash failures and avoidance
# ---------------------------------------------------------------------------

def test_piece_failed_returns_the_partial_and_refetch_avoids_the_giver():
    lay, made = layout_of((0, 2, 32), short_last=False)
    pk = picker(lay)
    pk.peer_gained([0, 1])
    pk.peer_gained([0, 1])
    got = pk.pick(1, only(2, 0), 10, BIG)
    assert got.assigned == [0]
    for _, b, n in got:
        pk.block_received(0, b, bytes(n), 1)
    pp = pk.partials[0]
    assert pp.complete
    failed = pk.piece_failed(0)
    assert failed is pp and failed.contributors == {1: 2} and failed.block_from == [1, 1]
    assert 0 in pk.unstarted and 0 not in pk.partials and 0 not in pk.pieces_of(1)
    assert pk.avoid[0] == {1} and pk.missing_blocks == 4
    # another holder exists: peer 1 is avoided for this piece, peer 2 gets it whole
    assert list(pk.pick(1, only(2, 0), 10, BIG)) == []
    got = pk.pick(2, only(2, 0), 10, BIG)
    assert got.assigned == [0] and keys(got) == [(0, 0), (0, BS)]
    pk.piece_verified(0)
    assert 0 not in pk.avoid and pk.have[0] and not pk.pieces_of(2)


def test_avoided_only_while_another_holder_exists():
    lay, _ = layout_of((0, 1, 32), short_last=False)
    pk = picker(lay)
    pk.peer_gained([0])
    pk.avoid[0] = {1}
    assert not pk._avoided(0, 1)  # the only holder
    assert pk.pick(1, [True], 10, BIG).assigned == [0]
    pk2 = picker(lay)
    pk2.peer_gained([0])
    pk2.peer_gained([0])
    pk2.avoid[0] = {1}
    assert pk2._avoided(0, 1) and not pk2._avoided(0, 2)
    assert list(pk2.pick(1, [True], 10, BIG)) == []
    # both holders avoided (a multi-peer failure): neither is, so a single
    # peer takes the whole refetch
    pk2.avoid[0] = {1, 2}
    got = pk2.pick(1, [True], 10, BIG)
    assert got.assigned == [0] and len(got) == 2
    assert list(pk2.pick(2, [True], 10, BIG, end_game_ok=False)) == []


def test_departed_avoided_peer_does_not_lift_avoidance_of_the_others():
    lay, _ = layout_of((0, 1, 32), short_last=False)
    pk = picker(lay)
    for _ in range(3):          # peers 1, 2 and 3 hold the piece
        pk.peer_gained([0])
    pk.avoid[0] = {1, 2}        # 1 and 2 timed out on it (or gave a failed copy)
    assert pk._avoided(0, 1) and pk._avoided(0, 2) and not pk._avoided(0, 3)
    assert pk.peer_gone(1) == []
    pk.peer_lost([0])           # peer 1 leaves; peer 3 can still serve the piece
    assert pk._avoided(0, 2)
    assert list(pk.pick(2, [True], 10, BIG)) == []
    assert pk.pick(3, [True], 10, BIG).assigned == [0]


def test_drop_partials_forgets_unverified_bytes():
    lay, made = layout_of((0, 3, 48))
    pk = picker(lay)
    pk.peer_gained(range(3))
    got = pk.pick(1, everything(lay), 4, BIG)
    i, b, length = list(got)[0]
    pk.block_received(i, b, made[0][1][i][b:b + length], 1)
    pk.unassign(i, 1)
    total = pk.missing_blocks + 1
    assert pk.drop_partials() == len({j for j, _, _ in got})
    assert not pk.partials and not pk.outstanding and not pk.requested_at
    assert not pk.unassigned and not any(pk.assigned.values())
    assert pk.missing_blocks == total == sum(pk.blocks_in(j) for j in range(3))
    assert pk.unstarted == {0, 1, 2}


# ---------------------------------------------------------------------------
# property test: random operations keep every record consistent
# ---------------------------------------------------------------------------

class Model:
    """What the test knows independently of the picker."""

    def __init__(self, lay, made, has):
        self.lay = lay
        self.made = made
        self.has = has                    # peer -> set of pieces
        self.connected: set[int] = set()
        self.dups: set = set()            # ((index, begin), peer): end-game copies picked

    def data(self, index, begin, length):
        owner, local = self.lay.to_local(index)
        return self.made[owner][1][local][begin:begin + length]

    def forget_key(self, key):
        self.dups = {(k, q) for k, q in self.dups if k != key}

    def forget_piece(self, index):
        self.dups = {(k, q) for k, q in self.dups if k[0] != index}


def check_invariants(pk: PiecePicker, model: Model) -> None:
    n = model.lay.num_pieces
    assert set(pk.partials).isdisjoint(pk.unstarted)
    for i in range(n):
        assert bool(pk.have[i]) + (i in pk.unstarted) + (i in pk.partials) == 1, i
    expected_missing = sum(pk.blocks_in(i) for i in pk.unstarted) + \
        sum(pp.num_blocks - pp.received_count for pp in pk.partials.values())
    assert pk.missing_blocks == expected_missing
    # assignment: each partial is either at exactly one peer or an orphan
    seen: set[int] = set()
    for q, pieces in pk.assigned.items():
        assert q in model.connected, q  # a departed peer keeps nothing
        assert pieces <= set(pk.partials)
        assert not pieces & seen, "a piece assigned to two peers"
        seen |= pieces
        for i in pieces:
            assert pk.partials[i].peer == q and i in model.has[q]
    assert not seen & pk.unassigned
    assert seen | pk.unassigned == set(pk.partials)
    for i, pp in pk.partials.items():
        assert (pp.peer is None) == (i in pk.unassigned)
    # outstanding blocks
    assert set(pk.requested_at) == set(pk.outstanding)
    assert list(pk.requested_at) == list(pk.outstanding)  # same (request) order
    times = list(pk.requested_at.values())
    assert times == sorted(times)
    assert {(k, q) for k, q in model.dups if k in pk.outstanding} == model.dups
    for (i, b), peers in pk.outstanding.items():
        assert peers and len(peers) <= PiecePicker.max_end_game_copies
        assert i in pk.partials and b % BS == 0
        assert not pk.partials[i].received[b // BS]
        normal = {q for q in peers if ((i, b), q) not in model.dups}
        # outside end game a block is asked of one peer: the piece's own
        assert len(normal) <= 1
        assert normal <= {pk.partials[i].peer}, ((i, b), peers, pk.partials[i].peer)
        for q in peers:
            assert q in model.connected and i in model.has[q]
    for i, pp in pk.partials.items():
        assert pp.received_count == sum(pp.received)
        assert pp.open_blocks == {k for k in range(pp.num_blocks)
                                  if not pp.received[k] and (i, k * BS) not in pk.outstanding}
        assert sum(pp.contributors.values()) == pp.received_count
        for k in range(pp.num_blocks):
            assert (pp.block_from[k] >= 0) == pp.received[k]
            if pp.received[k]:
                lo = k * BS
                assert bytes(pp.buffer[lo:lo + pp.block_length(k)]) == \
                    model.data(i, lo, pp.block_length(k))
    assert pk.availability == [sum(1 for q in model.connected if i in model.has[q])
                               for i in range(n)]
    assert 0 <= pk.unrequested_blocks <= pk.missing_blocks


def checked_pick(pk, model, peer, max_blocks, reserve, eg_ok, now, delay):
    n = model.lay.num_pieces
    before = {k: set(v) for k, v in pk.outstanding.items()}
    mine_before = set(pk.pieces_of(peer))
    orphans_before = set(pk.unassigned)
    unstarted_before = set(pk.unstarted)
    peer_has = [i in model.has[peer] for i in range(n)]
    got = pk.pick(peer, peer_has, max_blocks, reserve, end_game_ok=eg_ok, now=now,
                  end_game_delay=delay)
    assert list(got) == got.blocks + got.shared + got.duplicates
    assert len(got) <= max(max_blocks, 0)
    assert len({(i, b) for i, b, _ in got}) == len(got)
    # credit: whole pieces for new assignments, one block per end-game copy
    assigned_len = sum(pk.layout.piece_length(i) for i in got.assigned)
    dup_len = sum(length for _, _, length in got.duplicates + got.shared)
    assert assigned_len + dup_len <= max(reserve, 0)
    assert len(set(got.assigned)) == len(got.assigned)
    for i in got.assigned:
        assert i in orphans_before | unstarted_before and peer_has[i]
        assert pk.partials[i].peer == peer and i in pk.pieces_of(peer)
        if i in orphans_before:
            event("orphan reassigned")
    assert pk.pieces_of(peer) == mine_before | set(got.assigned)
    for i, b, length in got.blocks:
        assert peer_has[i] and length == pk.block_length(i, b)
        assert (i, b) not in before  # never a second copy outside end game
        assert pk.outstanding[(i, b)] == {peer}
        assert pk.partials[i].peer == peer
    for i, b, length in got.shared:
        event("shared block")
        # an open block of a piece assigned to another peer: asked once
        assert peer_has[i] and length == pk.block_length(i, b) and (i, b) not in before
        assert pk.partials[i].peer not in (peer, None)
        assert pk.outstanding[(i, b)] == {peer}
        model.dups.add(((i, b), peer))
    for i, b, length in got.duplicates:
        event("end-game duplicate")
        assert peer_has[i] and length == pk.block_length(i, b)
        # a second copy: only in end game, for an old enough block, when allowed
        assert eg_ok and pk.in_end_game
        assert (i, b) in before and peer not in before[(i, b)]
        assert pk.requested_at[(i, b)] <= now - delay
        assert pk.outstanding[(i, b)] == before[(i, b)] | {peer}
        model.dups.add(((i, b), peer))
    # order: the peer's own partials first ...
    if got.assigned or got.duplicates:
        for i in mine_before:
            assert not pk.partials[i].open_blocks
    # ... then orphans that fit, then new pieces rarest first
    new = [i for i in got.assigned if i in unstarted_before]
    orphan_len = sum(pk.layout.piece_length(i) for i in got.assigned if i in orphans_before)
    room_left = max_blocks - len(got.blocks)
    if new or room_left > 0:
        for j in pk.unassigned:
            if peer_has[j] and not pk._avoided(j, peer):
                event("orphan skipped: too long for the reserve")
                assert pk.partials[j].length > reserve - orphan_len
    if new and any(pk._avoided(j, peer) for j in range(n)):
        event("pick with an avoided piece")
    candidates = [j for j in pk.unstarted if peer_has[j] and not pk._avoided(j, peer)]
    for s in new:
        for j in candidates:
            assert (pk.availability[s], pk.tiebreak[s]) < (pk.availability[j], pk.tiebreak[j])
    if room_left > 0 and candidates:
        best = min(candidates, key=lambda j: (pk.availability[j], pk.tiebreak[j]))
        assert pk.layout.piece_length(best) > reserve - assigned_len
    return got


def complete_piece(pk, model, index, ok=True):
    pp = pk.partials[index]
    model.forget_piece(index)
    if ok:
        pk.piece_verified(index)
        assert pk.have[index] and index not in pk.partials and index not in pk.avoid
    else:
        event("piece failed")
        contributors = set(pp.contributors)
        failed = pk.piece_failed(index)
        assert failed is pp and set(failed.contributors) == contributors
        assert index in pk.unstarted and pk.avoid[index] >= contributors
    assert index not in pk.unassigned
    assert not any(index in v for v in pk.assigned.values())


def receive(pk, model, i, b, q):
    length = pk.block_length(i, b)
    expected_others = pk.outstanding[(i, b)] - {q}
    others = pk.block_received(i, b, model.data(i, b, length), q)
    assert others == expected_others
    assert (i, b) not in pk.outstanding and (i, b) not in pk.requested_at
    assert pk.partials[i].block_from[b // BS] == q
    model.forget_key((i, b))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_operations_keep_picker_consistent(data):
    specs = data.draw(st.lists(st.tuples(st.integers(1, 4), st.sampled_from([16, 32, 40, 48])),
                               min_size=1, max_size=3), label="owners")
    lay, made = layout_of(*[(o, n, ps) for o, (n, ps) in enumerate(specs)])
    n = lay.num_pieces
    have = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="have")
    threshold = data.draw(st.integers(0, 4), label="threshold")
    pk = PiecePicker(lay, BS, have, seed=data.draw(st.integers(0, 3)), end_game_threshold=threshold)
    peers = list(range(10, 10 + data.draw(st.integers(2, 4), label="n_peers")))
    has = {q: {i for i, h in enumerate(data.draw(st.lists(st.booleans(), min_size=n, max_size=n),
                                                  label=f"has{q}")) if h}
           for q in peers}
    if data.draw(st.sampled_from([True, True, False]), label="a full holder"):
        has[peers[0]] = set(range(n))
    model = Model(lay, made, has)
    for q in peers:
        if data.draw(st.booleans(), label=f"join{q}"):
            model.connected.add(q)
            pk.peer_gained(sorted(has[q]))
    check_invariants(pk, model)
    now = 0.0
    for _ in range(data.draw(st.integers(5, 60), label="steps")):
        op = data.draw(st.sampled_from(["pick", "pick", "pick", "flood", "recv", "recv", "recv",
                                        "drop", "unassign", "gain", "lose", "join"]))
        pairs = sorted((k, q) for k, ps in pk.outstanding.items() for q in ps)
        if op == "pick" and model.connected:
            q = data.draw(st.sampled_from(sorted(model.connected)))
            now += data.draw(st.sampled_from([0.0, 0.1, 0.3, 1.0]))
            checked_pick(pk, model, q, data.draw(st.sampled_from([0, 1, 2, 3, 6, 100])),
                         data.draw(st.sampled_from([0, BS - 1, BS, 40, 48, 3 * BS, 100, BIG, BIG])),
                         data.draw(st.booleans()), now, data.draw(st.sampled_from([0.0, 0.5])))
        elif op == "flood" and model.connected:
            # every peer asks for all it can: the swarm heads into end game
            now += 0.5
            for q in sorted(model.connected):
                checked_pick(pk, model, q, 100, BIG, True, now, 0.5)
        elif op == "recv" and pairs:
            (i, b), q = data.draw(st.sampled_from(pairs))
            receive(pk, model, i, b, q)
            if pk.partials[i].complete:
                # one piece in five fails its hash (a corrupt contributor)
                complete_piece(pk, model, i, ok=data.draw(st.integers(0, 4), label="hash") != 0)
        elif op == "drop" and model.dups:
            # an end-game copy cancelled (it timed out, or the other copy won)
            (i, b), q = data.draw(st.sampled_from(sorted(model.dups)))
            others = pk.outstanding[(i, b)] - {q}
            pk.request_dropped(i, b, q)
            model.dups.discard(((i, b), q))
            assert pk.outstanding.get((i, b), set()) == others
            if not others:
                assert (b // BS) in pk.partials[i].open_blocks
        elif op == "unassign" and any(pk.assigned.values()):
            # the session's timeout: take the piece away, avoid the slow peer
            q, i = data.draw(st.sampled_from(sorted((q, i) for q, v in pk.assigned.items()
                                                    for i in v)))
            at_q = sorted(b for (j, b), ps in pk.outstanding.items() if j == i and q in ps)
            received = list(pk.partials[i].received)
            dropped = pk.unassign(i, q)
            assert dropped == [(b, pk.block_length(i, b)) for b in at_q]
            assert pk.partials[i].received == received
            assert i in pk.unassigned and pk.partials[i].peer is None
            model.dups = {(k, p) for k, p in model.dups if not (k[0] == i and p == q)}
            pk.avoid.setdefault(i, set()).add(q)
        elif op == "gain" and model.connected:
            q = data.draw(st.sampled_from(sorted(model.connected)))
            new = sorted(set(range(n)) - model.has[q])
            if new:
                i = data.draw(st.sampled_from(new))
                model.has[q].add(i)
                pk.peer_gained([i])
        elif op == "lose" and model.connected:
            q = data.draw(st.sampled_from(sorted(model.connected)))
            mine = sorted(pk.pieces_of(q))
            assert pk.peer_gone(q) == mine
            assert all(i in pk.unassigned for i in mine)
            assert not any(q in ps for ps in pk.outstanding.values())
            model.dups = {(k, p) for k, p in model.dups if p != q}
            model.connected.discard(q)
            pk.peer_lost(sorted(model.has[q]))
        elif op == "join":
            out = sorted(set(peers) - model.connected)
            if out:
                q = data.draw(st.sampled_from(out))
                model.connected.add(q)
                pk.peer_gained(sorted(model.has[q]))
        check_invariants(pk, model)

    # drain: a seed holding everything joins; everything outstanding arrives;
    # every peer finishes the pieces assigned to it without new credit
    model.has[99] = set(range(n))
    model.connected.add(99)
    pk.peer_gained(range(n))
    for _ in range(4 * n + 4):
        for (i, b), ps in list(pk.outstanding.items()):
            receive(pk, model, i, b, min(ps))
            if pk.partials[i].complete:
                complete_piece(pk, model, i)
        check_invariants(pk, model)
        if pk.pieces_missing == 0:
            break
        for q in sorted(model.connected):
            checked_pick(pk, model, q, BIG, 0, False, now, 0.0)
            for i in pk.pieces_of(q):
                # any piece assigned to a peer can be finished by that peer
                assert not pk.partials[i].open_blocks
        got = checked_pick(pk, model, 99, BIG, BIG, False, now, 0.0)
        assert got or pk.outstanding, "a seed holding everything must get work while pieces are missing"
    assert pk.pieces_missing == 0 and all(pk.have)
    assert not pk.partials and not pk.unstarted and not pk.unassigned
    assert not any(pk.assigned.values())
    assert not pk.outstanding and not pk.requested_at and not pk.avoid
    assert pk.missing_blocks == 0 and pk.unrequested_blocks == 0 and not pk.in_end_game
    assert list(pk.pick(99, everything(lay), BIG, BIG, now=now + 100)) == []
