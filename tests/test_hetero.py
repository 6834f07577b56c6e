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


def served_by(session: SwarmSession) -> dict[int, set[int]]:
    """Watch ``session``'s block sends (answered requests, paced or not):
    piece index -> the peers it sent blocks of that piece to (what really
    left its uplink)."""
    served: dict[int, set[int]] = {}
    serve = session._serve

    def counting(p, index, begin, length, now):
        served.setdefault(index, set()).add(p.peer_id)
        return serve(p, index, begin, length, now)

    session._serve = counting
    return served


@pytest.mark.parametrize("n,pieces", [(8, 8), (6, 12)])
def test_slow_owner_uploads_about_one_copy_and_each_piece_to_few_peers(n, pieces):
    owners, _ = random_owners({i: pieces for i in range(1, n + 1)}, PIECE, seed=n,
                              )
    slow = 1 + n // 2
    profiles = {i: FAST for i in owners}
    profiles[slow] = LinkProfile(up=FAST.up / 20, down=FAST.down, latency=FAST.latency)
    swarm = build_swarm(owners, CFG, profiles, seed=n)
    served = served_by(swarm.sessions[slow])
    result = swarm.run(until=600)
    assert result.complete
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
    served = served_by(swarm.sessions[slow])
    assert swarm.run(until=600).complete
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
    assert lower_bound_latency(shares, links) == pytest.approx(t_lb + 4 * 0.05)
    mixed = {1: LinkProfile(1000.0, 2000.0, 0.01), 2: LinkProfile(1000.0, 2000.0, 0.02),
             3: LinkProfile(1000.0, 2000.0, 0.1)}
    # 2 L_1 + L_2 (first request reaches a sender) + L_1 (the last byte lands)
    assert lower_bound_latency(shares, mixed) == pytest.approx(
        lower_bound(shares, mixed) + 2 * 0.01 + 0.02 + 0.01)
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
