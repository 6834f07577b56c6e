"""Heterogeneous networks (issue 12): upload-aware swarming as behaviour,
not timings.  A slow owner's uplink carries about one copy of its share; no
piece of it is fetched from it by more than a few peers; faster peers carry
the rest.  Plus the first-copy plan itself and the latency-aware bound."""
from __future__ import annotations

import pytest

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.layout import SwarmLayout
from fs_bittorrent.core.picker import (first_copy_plan, plan_where_uplinks_differ,
                                       uplinks_heterogeneous)
from fs_bittorrent.core.session import SwarmSession
from fs_bittorrent.sim.network import LinkProfile
from fs_bittorrent.sim.swarm import build_swarm, lower_bound, lower_bound_latency

from swarm_helpers import random_owners

PIECE = 16 * 1024
CFG = SwarmConfig(piece_size=PIECE, block_size=4 * 1024)
FAST = LinkProfile(up=2e6, down=2e6, latency=0.002)


def sent_blocks(swarm, peer: int) -> list[tuple[int, int]]:
    """Watch what ``peer``'s session hands the simulated network to send
    (paced or not): (piece index, receiver) per block, in order."""
    from fs_bittorrent.core.messages import Piece
    sent: list[tuple[int, int]] = []
    net = swarm.network
    emit = net._emit

    def watching(src, outgoing):
        if src == peer:
            outgoing = list(outgoing)
            sent.extend((m.index, dst) for dst, m in outgoing if type(m) is Piece)
        return emit(src, outgoing)
    net._emit = watching
    return sent


def by_piece(sent: list[tuple[int, int]]) -> dict[int, set[int]]:
    """piece index -> the peers blocks of it were sent to."""
    served: dict[int, set[int]] = {}
    for index, dst in sent:
        served.setdefault(index, set()).add(dst)
    return served


@pytest.mark.parametrize("n,pieces", [(8, 8), (6, 12)])
def test_slow_owner_uploads_about_one_copy_and_each_piece_to_few_peers(n, pieces):
    owners, _ = random_owners({i: pieces for i in range(1, n + 1)}, PIECE, seed=n,
                              )
    slow = 1 + n // 2
    profiles = {i: FAST for i in owners}
    profiles[slow] = LinkProfile(up=FAST.up / 20, down=FAST.down, latency=FAST.latency)
    swarm = build_swarm(owners, CFG, profiles, seed=n)
    sent = sent_blocks(swarm, slow)
    result = swarm.run(until=600)
    assert result.complete
    served = by_piece(sent)
    share = owners[slow][0].total_size
    up = swarm.sessions[slow].stats.bytes_up
    # about one copy of its share (without the plan: 3.5 copies, below)
    assert share <= up <= 1.5 * share, (up / share)
    first, last = swarm.layout.owner_range(slow)[0], swarm.layout.owner_range(slow)[-1]
    own = {i: peers for i, peers in served.items() if first <= i <= last}
    assert set(own) == set(range(first, last + 1))
    assert max(len(peers) for peers in own.values()) <= 2, own
    # and its scarce uplink relayed few other pieces
    assert len(set(served) - set(own)) <= 3


def test_slow_owner_gives_first_copies_to_their_designees():
    owners, _ = random_owners({i: 7 for i in range(1, 9)}, PIECE, seed=3)
    slow = 4
    profiles = {i: FAST for i in owners}
    profiles[slow] = LinkProfile(up=FAST.up / 20, down=FAST.down, latency=FAST.latency)
    swarm = build_swarm(owners, CFG, profiles, seed=3)
    sent = sent_blocks(swarm, slow)
    assert swarm.run(until=600).complete
    served = by_piece(sent)
    plan = first_copy_plan(swarm.layout, {i: profiles[i].up for i in owners})
    for i in swarm.layout.owner_range(slow):
        assert plan[i] in served[i]  # its designee got it from the owner


def test_without_the_plan_the_slow_owner_uploads_many_copies():
    """The same swarm with ``first_copy_wait=0`` (no plan): what the plan fixes."""
    owners, _ = random_owners({i: 8 for i in range(1, 9)}, PIECE, seed=8)
    profiles = {i: FAST for i in owners}
    profiles[5] = LinkProfile(up=FAST.up / 20, down=FAST.down, latency=FAST.latency)
    up = {}
    for wait in (0.0, CFG.first_copy_wait):
        cfg = SwarmConfig(piece_size=PIECE, block_size=4 * 1024, first_copy_wait=wait)
        swarm = build_swarm(owners, cfg, profiles, seed=8)
        assert swarm.run(until=600).complete
        up[wait] = swarm.sessions[5].stats.bytes_up / owners[5][0].total_size
    assert up[0.0] > 2.5 and up[CFG.first_copy_wait] < 1.5, up


def test_fast_peers_carry_most_of_the_upload_when_half_are_slow():
    owners, _ = random_owners({i: 8 for i in range(1, 9)}, PIECE, seed=9)
    slow = {i for i in owners if i % 2 == 0}
    profiles = {i: LinkProfile(up=FAST.up / 10, down=FAST.down, latency=FAST.latency)
                if i in slow else FAST for i in owners}
    swarm = build_swarm(owners, CFG, profiles, seed=9)
    assert swarm.run(until=600).complete
    up = {i: s.stats.bytes_up for i, s in swarm.sessions.items()}
    share = owners[1][0].total_size
    assert all(up[i] >= share for i in owners)  # every owner gives its share once
    assert min(up[i] for i in owners if i not in slow) > 2 * max(up[i] for i in slow)


def test_first_copy_plan_spreads_each_share_over_distinct_other_owners():
    owners, _ = random_owners({1: 3, 4: 9, 7: 1, 9: 5}, PIECE, seed=1)
    layout = SwarmLayout(tuple(m for m, _ in owners.values()))
    plan = first_copy_plan(layout)
    assert plan == first_copy_plan(SwarmLayout(tuple(m for m, _ in reversed(owners.values()))))
    for owner in layout.owners:
        got = [plan[i] for i in layout.owner_range(owner)]
        assert owner not in got and set(got) <= set(layout.owners)
        # the first n-1 pieces go to n-1 distinct peers, then it repeats
        k = min(len(got), len(layout.owners) - 1)
        assert len(set(got[:k])) == k
    alone = SwarmLayout((owners[4][0],))
    assert set(first_copy_plan(alone)) == {-1}


def test_plan_yields_when_a_designee_cannot_reach_the_owner():
    """Peer 3 is the designee of some of owner 1's pieces but loses its
    connection to owner 1 for good, while the others still see 3: they hold
    back only until they have idled ``first_copy_wait``, then ask owner 1."""
    owners, _ = random_owners({i: 6 for i in range(1, 6)}, PIECE, seed=5)
    swarm = build_swarm(owners, CFG, FAST, seed=5)
    plan = first_copy_plan(swarm.layout)
    assert 3 in [plan[i] for i in swarm.layout.owner_range(1)]
    net = swarm.network
    net.schedule(0.0, lambda: net.disconnect(1, 3))
    result = swarm.run(until=600)
    assert result.complete
    assert any(not s.picker.plan for s in swarm.sessions.values())  # someone gave up on it


def test_latency_aware_bound():
    shares = {1: 1000, 2: 1000, 3: 1000}
    links = {i: LinkProfile(up=1000.0, down=2000.0, latency=0.05) for i in shares}
    t_lb = lower_bound(shares, links)
    assert t_lb == pytest.approx(2.0)  # (n-1) S / u
    assert lower_bound_latency(shares, links) == pytest.approx(t_lb + 3 * 0.05)
    mixed = {1: LinkProfile(1000.0, 2000.0, 0.01), 2: LinkProfile(1000.0, 2000.0, 0.02),
             3: LinkProfile(1000.0, 2000.0, 0.1)}
    # L_1 + L_2 (a handshake out, the first request back) + L_1 (the last byte lands)
    assert lower_bound_latency(shares, mixed) == pytest.approx(
        lower_bound(shares, mixed) + 0.01 + 0.02 + 0.01)
    assert lower_bound_latency({1: 1000}, {1: links[1]}) == lower_bound({1: 1000}, {1: links[1]})


def test_upload_aware_rules_only_where_the_known_uplinks_differ():
    """Known links within 2x of each other: the plan and the source rules are
    off (``first_copy_wait`` 0), so a uniform swarm picks exactly as plain
    BitTorrent (same virtual time, same bytes); a 20x slower uplink keeps them."""
    assert not uplinks_heterogeneous([1e6, 1.9e6, 1.5e6])
    assert uplinks_heterogeneous([1e6, 2.1e6])
    assert not uplinks_heterogeneous([])
    assert plan_where_uplinks_differ(CFG, [1e6, 1e6]).first_copy_wait == 0.0
    assert plan_where_uplinks_differ(CFG, [1e6, 5e4]) is CFG
    owners, _ = random_owners({i: 6 for i in range(1, 7)}, PIECE, seed=12)

    def run(cfg, profiles):
        swarm = build_swarm(owners, cfg, profiles, seed=12)
        r = swarm.run(until=600)
        assert r.complete
        return r.virtual_time, {i: s.stats.bytes_up for i, s in swarm.sessions.items()}

    plain = SwarmConfig(piece_size=PIECE, block_size=4 * 1024, first_copy_wait=0.0)
    uniform = {i: FAST for i in owners}
    assert run(CFG, uniform) == run(plain, uniform)
    mixed = dict(uniform)
    mixed[3] = LinkProfile(up=FAST.up / 20, down=FAST.down, latency=FAST.latency)
    aware, bare = run(CFG, mixed), run(plain, mixed)
    assert aware[0] < bare[0] and aware[1][3] < bare[1][3], (aware, bare)


# ---- capacity hints and paced uploads ---------------------------------------------

def _owner_storage(owners, pid):
    from fs_bittorrent.core.storage import MemoryPieceStorage
    st = MemoryPieceStorage()
    if pid in owners:
        m, pieces = owners[pid]
        for k, data in enumerate(pieces):
            st.put(pid, k, m.piece_hashes[k], data)
    return st


@pytest.mark.parametrize("bad,field,value", [
    ({1: -5.0}, "uplinks[1]", -5.0),
    ({1: float("nan")}, "uplinks[1]", "nan"),
    ({1: 0}, "uplinks[1]", 0),
    ({99: 1e6}, "uplinks", 99),
    ({"2": 1e6}, "uplinks", "2"),
    ({2: "fast"}, "uplinks[2]", "fast"),
])
def test_bad_uplinks_hint_is_refused_naming_the_entry(bad, field, value):
    from fs_bittorrent.errors import ConfigError
    owners, _ = random_owners({1: 2, 2: 2, 3: 2}, PIECE, seed=1)
    layout = SwarmLayout(tuple(m for m, _ in owners.values()))
    st = _owner_storage(owners, 1)
    before = {k: st.get(1, k) for k in range(2)}
    with pytest.raises(ConfigError) as err:
        SwarmSession(1, layout, st, CFG, uplinks=bad)
    assert err.value.field == field and str(value) in str(err.value)
    # nothing lost: the storage still holds the owner's pieces, and a good
    # hint on the same storage builds a working session
    assert {k: st.get(1, k) for k in range(2)} == before
    s = SwarmSession(1, layout, st, CFG, uplinks={1: 1e6, 2: 2e6})
    assert s.uplinks == {1: 1e6, 2: 2e6} and s.pieces_have == 2


def test_capacity_aware_plan_gives_fast_relays_the_first_copies():
    owners, _ = random_owners({i: 8 for i in range(1, 9)}, PIECE, seed=4)
    layout = SwarmLayout(tuple(m for m, _ in owners.values()))
    ups = {i: 1e6 if i % 2 else 1e7 for i in owners}       # odd ids 10x slower
    plan = first_copy_plan(layout, ups)
    # the same plan whatever order the hint is given in (every peer agrees)
    assert plan == first_copy_plan(layout, dict(reversed(list(ups.items()))))
    fast = {i for i in owners if ups[i] == 1e7}
    for owner in layout.owners:
        got = [plan[i] for i in layout.owner_range(owner)]
        assert owner not in got
        # 8 pieces, fast relays 10x the weight of slow ones: all go to fast
        # relays, spread over at least three of them
        assert set(got) <= fast and len(set(got)) >= 3, (owner, got)
    # with many pieces per owner, relays get shares in proportion to uplink
    many, _ = random_owners({i: 60 for i in range(1, 5)}, PIECE, seed=4)
    big = SwarmLayout(tuple(m for m, _ in many.values()))
    plan = first_copy_plan(big, {1: 3e6, 2: 1e6, 3: 1e6, 4: 1e6})
    to_1 = sum(1 for i in big.owner_range(2) if plan[i] == 1)
    assert 30 <= to_1 <= 40   # 60 pieces * 3 / (3 + 1 + 1)
    # no hint, or an empty one: the round-robin plan as before
    assert first_copy_plan(layout, None) == first_copy_plan(layout) == first_copy_plan(layout, {})


def _first_copies(paced: bool) -> tuple[dict[int, int], list[int], dict]:
    """Half the uplinks 10x slower; owner 4 (slow) paced or not: its pieces'
    first receivers, the order its first-copy blocks left, and the swarm."""
    owners, _ = random_owners({i: 6 for i in range(1, 7)}, PIECE, seed=6)
    profiles = {i: LinkProfile(up=FAST.up / 10, down=FAST.down, latency=FAST.latency)
                if i % 2 == 0 else FAST for i in owners}
    cfg = SwarmConfig(piece_size=PIECE, block_size=1024)  # 16 blocks a piece, as by default
    swarm = build_swarm(owners, cfg, profiles, seed=6)
    owner = swarm.sessions[4]
    assert owner.paced_uploads and owner.uplinks == {i: profiles[i].up for i in owners}
    owner.paced_uploads = paced    # the simulator paces only where this is on
    sent = sent_blocks(swarm, 4)
    assert swarm.run(until=600).complete
    assert all(v == 0 for v in owner.record_counts().values()), owner.record_counts()
    mine = set(swarm.layout.owner_range(4))
    first: dict[int, int] = {}
    for index, pid in sent:
        if index in mine:
            first.setdefault(index, pid)
    assert set(first) == mine
    order = [index for index, pid in sent if index in mine and first[index] == pid]
    return first, order, swarm


def test_slow_owner_sends_its_first_copies_to_fast_relays_about_one_piece_at_a_time():
    """Every first copy a slow owner gives goes to a fast peer (capacity-aware
    plan), and paced, its uplink mostly finishes one piece before starting
    the next, so relays start early; a FIFO uplink interleaves them."""
    first, order, swarm = _first_copies(paced=True)
    assert all(pid % 2 == 1 for pid in first.values()), first   # odd ids are fast
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches <= 2 * (len(first) - 1), order
    _, fifo, _ = _first_copies(paced=False)
    assert switches < sum(1 for a, b in zip(fifo, fifo[1:]) if a != b), (order, fifo)


def test_paced_session_holds_requests_until_the_host_has_room():
    from fs_bittorrent.core.messages import Cancel, Handshake, Piece, Request
    owners, _ = random_owners({1: 2, 2: 2}, PIECE, seed=2)
    layout = SwarmLayout(tuple(m for m, _ in owners.values()))
    s = SwarmSession(1, layout, _owner_storage(owners, 1), CFG, paced_uploads=True)
    s.handle(2, Handshake(swarm_id=layout.swarm_id, peer_id=2, credit=CFG.credit_bytes,
                          auth=b"\x00" * 32), 0.0)
    bs = CFG.block_size
    reqs = [Request(0, 0, bs), Request(0, bs, bs), Request(1, 0, bs)]
    for r in reqs:
        assert s.handle(2, r, 0.1) == []        # held, nothing sent yet
    assert s.upload_waiting and s.record_counts()["held_uploads"] == 3
    assert s.handle(2, Cancel(1, 0, bs), 0.1) == []   # a cancel drops a held block
    out = s.upload_ready(0.2, 1)                 # room for less than a block: one block
    assert [(m.index, m.begin) for _, m in out if isinstance(m, Piece)] == [(0, 0)]
    out = s.upload_ready(0.3, 10 * bs)
    assert [(m.index, m.begin) for _, m in out] == [(0, bs)]
    assert not s.upload_waiting and s.stats.bytes_up == 2 * bs
    assert s.upload_ready(0.4, bs) == []


def test_paced_session_serves_a_request_that_waited_half_the_timeout_before_more_urgent_ones():
    """The serving order never starves a requester: a relay request that
    every first copy outranks is served once it has waited half the
    request timeout, before the first copies that keep arriving (else its
    requester times out again and again and drops us)."""
    from fs_bittorrent.core.messages import Handshake, Have, Piece, Request
    owners, _ = random_owners({1: 4, 2: 1, 3: 1}, PIECE, seed=3)
    layout = SwarmLayout(tuple(m for m, _ in owners.values()))
    s = SwarmSession(1, layout, _owner_storage(owners, 1), CFG, paced_uploads=True)
    for pid in (2, 3):
        s.handle(pid, Handshake(swarm_id=layout.swarm_id, peer_id=pid,
                                credit=CFG.credit_bytes, auth=b"\x00" * 32), 0.0)
    s.handle(3, Have(0), 0.0)                  # piece 0 has a copy elsewhere: a relay
    bs, patience = CFG.block_size, CFG.request_timeout / 2
    s.handle(2, Request(0, 0, bs), 0.1)        # the relay, outranked by every first copy
    served: list[tuple[int, int]] = []
    t, begin, piece = 0.1, 0, 1
    while (2, 0) not in served and t < 0.1 + 2 * patience:
        s.handle(3, Request(piece, begin, bs), t)   # first copies keep coming
        begin += bs
        if begin + bs > layout.piece_length(piece):
            begin, piece = 0, piece % 3 + 1
        served += [(pid, m.index) for pid, m in s.upload_ready(t, 1) if isinstance(m, Piece)]
        t += 0.25
    assert (2, 0) in served
    waited = t - 0.25 - 0.1
    assert patience <= waited < patience + 0.5, waited   # not before, not much after
    assert all(pid == 3 for pid, _ in served[:-1])        # until then, first copies only
