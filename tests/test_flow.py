"""The flow-level simulator against the block-level one, and in the FS runner.

Small swarms, so the block level stays cheap: 8 clients x 2 MB (8 pieces of
256 KiB each).  The tolerances are the measured agreement on these sizes;
docs/benchmarks.md states the error on larger swarms.
"""
from __future__ import annotations

import numpy as np
import pytest

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.sim.flow import FlowSwarm
from fs_bittorrent.sim.scenarios import scenario
from fs_bittorrent.sim.swarm import build_swarm, lower_bound

from swarm_helpers import random_owners

PIECE = 256 * 1024
CFG = SwarmConfig(piece_size=PIECE)
N = 8


@pytest.fixture(scope="module")
def owners():
    own, _ = random_owners({i: 8 for i in range(1, N + 1)}, PIECE, seed=7)
    return own


def both(owners, links, deadline=None):
    block = build_swarm(owners, CFG, links, seed=0).run(until=600, deadline=deadline)
    flow = FlowSwarm([m for m, _ in owners.values()], links, CFG, seed=0).run(deadline=deadline)
    return block, flow


# (scenario, tolerance on the exchange time): measured -1.4 %, -7.6 %, -2.4 %,
# -1.4 %, -1.6 %, +0.8 % at this size (flow minus block, relative).  Both levels
# use the upload-aware source rules of issue 12 where uplinks differ
# (capacity-aware first-copy plan, sparing slow sources); the flow level
# applies them per piece from the pairs' max-min rates, while the block level
# judges sources by measured rates (EWMA), lets fast idle sources share the
# open blocks of other peers' pieces and paces uploads in its own serving
# order.  In half_slow (half the uplinks 10x slower, 8 pieces per owner) the
# fluid model was 16 % faster than the block level before the block level
# paced its uploads (now 8 %), hence 0.10 there; before issue 12 the flow
# level was 11 % slower.
AGREEMENT = [("uniform", 0.05), ("half_slow", 0.10), ("one_slow", 0.05),
             ("fast_quarter", 0.05), ("lognormal", 0.05), ("up10_down100", 0.05)]


@pytest.mark.parametrize("name,tolerance", AGREEMENT)
def test_exchange_time_agrees_with_the_block_level(owners, name, tolerance):
    links = scenario(name, N)
    block, flow = both(owners, links)
    assert block.complete and all(v == 1.0 for v in flow.completion.values())
    assert abs(flow.end_time - block.virtual_time) <= tolerance * block.virtual_time, \
        (name, flow.end_time, block.virtual_time)
    # never faster than physics allows
    t_lb = lower_bound({o: m.total_size for o, (m, _) in owners.items()}, links)
    assert flow.end_time >= t_lb * 0.999
    # every piece landed once at every client that lacked it (no end-game
    # waste counted as held), and bytes balance
    assert sum(flow.bytes_up.values()) == pytest.approx(sum(flow.bytes_down.values()))
    total = sum(m.total_size for m, _ in owners.values())
    for pid, (m, _) in owners.items():
        assert flow.bytes_down[pid] >= total - m.total_size


def test_completion_order_follows_the_links(owners):
    """Log-normal links: who finishes first is decided by the links, and both
    levels agree on it: every two clients whose block-level completion times
    differ by more than a tenth of the round finish in the same order at
    flow level, and the rank correlation is high.  (Near-ties may swap: the
    block level's paced uploads serve relays to the requester furthest
    behind first, which evens out completion times; at this size four
    clients finish within 0.06 s of each other there.)"""
    links = scenario("lognormal", N)
    block, flow = both(owners, links)
    ids = sorted(owners)
    tb = {i: block.completed_at[i] for i in ids}
    tf = {i: flow.completed_at[i] for i in ids}
    for a in ids:
        for b in ids:
            if tb[a] < tb[b] - 0.1 * block.virtual_time:
                assert tf[a] < tf[b], (a, b, tb, tf)
    rb = np.argsort(np.argsort([tb[i] for i in ids]))
    rf = np.argsort(np.argsort([tf[i] for i in ids]))
    rho = 1 - 6 * float(((rb - rf) ** 2).sum()) / (N * (N * N - 1))
    assert rho >= 0.8


def test_deadline_cuts_the_round_like_the_block_level(owners):
    """At a deadline half-way through, both levels leave every client partial,
    with about the same share of the pieces; flow holds nothing that landed
    after the deadline."""
    links = scenario("up10_down100", N)
    deadline = 5.0
    block, flow = both(owners, links, deadline=deadline)
    assert not block.complete
    for pid in owners:
        assert 0 < flow.completion[pid] < 1
        assert abs(flow.completion[pid] - block.completion[pid]) <= 0.15, pid
        arrivals = flow.arrival[flow.row[pid]]
        assert (arrivals[np.isfinite(arrivals)] <= deadline).all()
    assert abs(np.mean(list(flow.completion.values()))
               - np.mean(list(block.completion.values()))) <= 0.05


def test_crash_mid_exchange_resumes_elsewhere(owners):
    """A client that crashes after its pieces are out stops serving; the
    others still complete, from each other, and later than without it."""
    links = scenario("uniform", N)
    manifests = [m for m, _ in owners.values()]
    clean = FlowSwarm(manifests, links, CFG, seed=0).run()
    crashed = FlowSwarm(manifests, links, CFG, seed=0, crashes={3: 0.6}).run()
    assert crashed.crashed == {3: pytest.approx(0.6)}
    assert crashed.completed_at[3] is None and crashed.completion[3] < 1
    for pid in owners:
        if pid != 3:
            assert crashed.completed_at[pid] is not None
    assert crashed.end_time > clean.end_time
    # nothing lands at the crashed client after its crash
    row = crashed.arrival[crashed.row[3]]
    assert (row[np.isfinite(row)] <= 0.6).all()


def test_crash_before_its_pieces_are_out_leaves_everyone_partial(owners):
    links = scenario("uniform", N)
    r = FlowSwarm([m for m, _ in owners.values()], links, CFG, seed=0,
                  crashes={2: 0.0}).run(deadline=10.0)
    assert all(r.completed_at[p] is None for p in owners)
    own = owners[2][0].num_pieces
    total = sum(m.num_pieces for m, _ in owners.values())
    for p in owners:
        if p != 2:
            assert r.completion[p] == pytest.approx((total - own) / total)


def test_same_inputs_same_schedule(owners):
    links = scenario("half_slow", N)
    manifests = [m for m, _ in owners.values()]
    a = FlowSwarm(manifests, links, CFG, seed=0).run()
    b = FlowSwarm(manifests, links, CFG, seed=0).run()
    assert np.array_equal(a.arrival, b.arrival) and a.bytes_up == b.bytes_up
