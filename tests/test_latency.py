"""Long paths (issue 12 item 2): the latency rules of a cooperative swarm.

Behaviour, not timings: when requests may leave after a connect, what a
not-interested peer keeps, how deep the request window gets on a long path,
and that end-game copies are not sent for blocks merely queued at their
source.  Where the first-copy plan is on (uplinks that differ), the same
rules act per source on long paths only: deep windows at fast sources, the
slow owner still sending about one copy of its share, and nothing changed
on short paths.  Every swarm here is small and runs in well under a second.
"""
from __future__ import annotations

import pytest

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.layout import SwarmLayout
from fs_bittorrent.core.messages import (Bitfield, Choke, Handshake, Interested, NotInterested,
                                         Piece, Request, Unchoke)
from fs_bittorrent.core.session import SwarmSession
from fs_bittorrent.core.storage import MemoryPieceStorage
from fs_bittorrent.sim.network import LinkProfile
from fs_bittorrent.sim.swarm import build_swarm, lower_bound, lower_bound_latency
from swarm_helpers import random_owners

KiB = 1024


def owners(n: int, pieces: int, piece: int) -> dict:
    """Owners 1..n, each with ``pieces`` random pieces (the last one short)."""
    return random_owners({o: pieces for o in range(1, n + 1)}, piece)[0]


def cooperative(**kw) -> SwarmConfig:
    """Unlimited upload slots and no first-copy plan: the latency rules apply."""
    base = dict(piece_size=64 * KiB, first_copy_wait=0.0)
    base.update(kw)
    return SwarmConfig(**base)


def two_sessions(config: SwarmConfig) -> dict[int, SwarmSession]:
    own = owners(2, 4, 64 * KiB)
    layout = SwarmLayout(tuple(m for m, _ in own.values()))
    out = {}
    for pid, (m, pieces) in own.items():
        st = MemoryPieceStorage()
        for k, data in enumerate(pieces):
            st.put(pid, k, m.piece_hashes[k], data)
        out[pid] = SwarmSession(pid, layout, st, config)
    return out


def deliver(s: dict[int, SwarmSession], src: int, msgs, now: float) -> list:
    """Hand ``msgs`` from ``src`` to the other session; what it sends back."""
    dst = 2 if src == 1 else 1
    out = []
    for m in msgs:
        out.extend(msg for _, msg in s[dst].handle(src, m, now))
    return out


def test_requests_leave_one_latency_after_the_dial_and_the_dialers_after_one_round_trip():
    L = 0.05
    s = two_sessions(cooperative())
    opening = [m for _, m in s[1].connect(2, 0.0)]
    # the dialer's bitfield and unchoke ride behind its handshake
    assert [type(m) for m in opening] == [Handshake, Bitfield, Unchoke]
    reply = deliver(s, 1, opening, L)
    # the other side requests as soon as the handshake arrives: one latency
    assert any(isinstance(m, Request) for m in reply)
    assert Unchoke in map(type, reply)
    back = deliver(s, 2, reply, 2 * L)
    # the dialer requests, and serves, one round trip after dialing
    assert any(isinstance(m, Request) for m in back)
    assert any(isinstance(m, Piece) for m in back)
    # both sides measured the path's round trip from the handshake
    assert s[1].peers[2].path_rtt == pytest.approx(2 * L)
    deliver(s, 1, back, 3 * L)
    assert s[2].peers[1].path_rtt == pytest.approx(2 * L)


def test_with_capped_slots_or_the_first_copy_plan_the_dialer_waits_for_the_handshake():
    for config in (cooperative(max_upload_slots=2), cooperative(first_copy_wait=2.0)):
        s = two_sessions(config)
        assert [type(m) for _, m in s[1].connect(2, 0.0)] == [Handshake]


def test_a_not_interested_peer_stays_unchoked_and_may_request_again_at_once():
    s = two_sessions(cooperative())
    msgs = [m for _, m in s[1].connect(2, 0.0)]
    for t in range(1, 4):
        msgs = deliver(s, 1 if t % 2 else 2, msgs, t * 0.01)
    up = s[2].peers[1]
    assert not up.am_choking
    assert s[2].handle(1, NotInterested(), 0.1) == []
    assert not up.am_choking                       # no choke, no slot to free
    assert s[2].handle(1, Interested(), 0.2) == [(1, Unchoke())]  # (a lost unchoke is resent)
    # the plan's swarms choke as BEP 3 does
    p = two_sessions(cooperative(first_copy_wait=2.0))
    msgs = [m for _, m in p[1].connect(2, 0.0)]
    for t in range(1, 4):
        msgs = deliver(p, 1 if t % 2 else 2, msgs, t * 0.01)
    p[2].handle(1, Interested(), 0.1)
    assert p[2].handle(1, NotInterested(), 0.2) == [(1, Choke())]


def _one_source(latency: float, config: SwarmConfig):
    """Owner 1 sends about 4 MiB to owner 2 (one short piece) at 20 Mbit/s."""
    own = random_owners({1: 16, 2: 1}, 256 * KiB)[0]
    link = LinkProfile(up=2.5e6, down=2.5e6, latency=latency)
    return own, build_swarm(own, config, {1: link, 2: link}, seed=0), link


def test_the_request_window_grows_to_cover_the_bandwidth_delay_product():
    L = 0.05
    own, swarm, link = _one_source(L, cooperative(piece_size=256 * KiB))
    net = swarm.network
    windows = []
    sess = swarm.sessions[2]
    def watch() -> None:
        p = sess.peers.get(1)
        if p is not None:
            windows.append(p.pipeline_depth(4, 64))
        if not sess.complete:
            net.schedule(net.now + 0.05, watch)
    net.schedule(0.0, watch)
    r = swarm.run(until=60)
    assert r.complete
    bdp_blocks = link.up * 2 * L / (16 * KiB)       # 15.3 blocks on the wire per round trip
    assert max(windows) >= bdp_blocks
    # and the link was busy: within a few latencies of the bandwidth bound
    shares = {o: m.total_size for o, (m, _) in own.items()}
    t_lb = lower_bound(shares, {1: link, 2: link})
    assert r.virtual_time <= t_lb + 10 * L


def test_end_game_sends_no_copy_of_a_block_that_is_only_queued_at_its_source():
    # 300 ms one way: a block's normal round trip (0.6 s and more) is longer
    # than end_game_delay, so an age-only end game would copy healthy blocks.
    own = owners(4, 2, 256 * KiB)
    link = LinkProfile(up=12.5e6, down=12.5e6, latency=0.3)
    swarm = build_swarm(own, cooperative(piece_size=256 * KiB), link, seed=0)
    r = swarm.run(until=60)
    assert r.complete
    for sess in swarm.sessions.values():
        assert sess.stats.duplicate_blocks == 0 and sess.stats.cancels_sent == 0


def test_latency_bound_is_below_every_measured_time_on_long_paths():
    for n, lat in ((3, 0.05), (4, 0.1)):
        own = owners(n, 2, 256 * KiB)
        link = LinkProfile(up=12.5e6, down=12.5e6, latency=lat)
        swarm = build_swarm(own, cooperative(piece_size=256 * KiB), link, seed=0)
        r = swarm.run(until=60)
        shares = {o: m.total_size for o, (m, _) in own.items()}
        bound = lower_bound_latency(shares, {o: link for o in own})
        assert r.complete and bound <= max(r.completed_at.values())


def _far_and_mixed(latency: float):
    """Six owners of eight 16 KiB pieces; owner 4's uplink 20x slower; one
    latency everywhere.  The uplinks differ, so ``build_swarm`` keeps the
    first-copy plan, passes the uplinks hint and paces uploads."""
    own = random_owners({i: 8 for i in range(1, 7)}, 16 * KiB, seed=6)[0]
    fast = LinkProfile(up=2e6, down=2e6, latency=latency)
    profiles = {i: fast for i in own}
    profiles[4] = LinkProfile(up=fast.up / 20, down=fast.down, latency=latency)
    config = SwarmConfig(piece_size=16 * KiB, block_size=4 * KiB)
    return own, profiles, build_swarm(own, config, profiles, seed=6)


def _max_in_flight(swarm) -> dict[tuple[int, int], int]:
    """(requester, source) -> most requests it had in flight there at once
    (sampled every 10 ms of virtual time)."""
    net, most = swarm.network, {}

    def watch() -> None:
        for pid, sess in swarm.sessions.items():
            for q, p in sess.peers.items():
                most[(pid, q)] = max(most.get((pid, q), 0), len(p.inflight))
        if not all(s.complete for s in swarm.sessions.values()):
            net.schedule(net.now + 0.01, watch)
    net.schedule(0.0, watch)
    return most


@pytest.mark.parametrize("L", [0.05, 0.1])
def test_with_the_plan_on_long_paths_requests_cover_rate_times_rtt_and_the_slow_owner_sends_one_copy(L):
    from test_hetero import by_piece, sent_blocks
    slow = 4
    own, profiles, swarm = _far_and_mixed(L)
    most = _max_in_flight(swarm)
    sent = sent_blocks(swarm, slow)
    assert swarm.run(until=60).complete
    sessions = swarm.sessions
    for pid, sess in sessions.items():
        for q, p in sess.peers.items():
            # both ends measured the path from the handshakes (the accepting
            # side from the dialer's bitfield, not from its first request,
            # which the plan may hold back)
            assert p.path_rtt == pytest.approx(2 * L, abs=0.005), (pid, q, p.path_rtt)
            # a standing queue at fast sources only
            assert p.standing_queue == (q != slow), (pid, q)
    # each requester kept, at some fast source, at least its fair share of
    # that source's bandwidth-delay product in flight (without these rules:
    # 6 or 7 blocks, the first window plus slow start)
    bdp = profiles[1].up * 2 * L / (4 * KiB)
    fair = bdp / (len(own) - 1)
    for pid in sessions:
        deepest = max(most[(pid, q)] for q in sessions if q not in (pid, slow))
        assert deepest > max(fair, SwarmConfig().min_requests_per_peer), (pid, deepest)
    # and the slow owner still uploads about one copy of its share (at
    # 100 ms without these rules: 1.63 copies), each of its pieces to at
    # most two peers
    share = own[slow][0].total_size
    assert sessions[slow].stats.bytes_up <= 1.25 * share
    mine = set(swarm.layout.owner_range(slow))
    served = by_piece(sent)
    assert max(len(peers) for i, peers in served.items() if i in mine) <= 2


def test_with_the_plan_on_short_paths_the_latency_rules_stay_off():
    _, _, swarm = _far_and_mixed(0.002)
    assert swarm.run(until=60).complete
    for sess in swarm.sessions.values():
        for p in sess.peers.values():
            assert 0 < p.path_rtt < sess.config.request_queue_time
            assert not p.standing_queue
