"""Start skew: the coordinator's ``bt_start`` reaches the clients at
different times, so peers begin the round apart.  The simulator models it
(``build_swarm(start_at=...)``) and the staggered bound prices it
(behaviour in virtual time, deterministic; figures in docs/benchmarks.md)."""
from __future__ import annotations

import pytest

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.errors import ConfigError
from fs_bittorrent.sim.network import LinkProfile
from fs_bittorrent.sim.swarm import build_swarm, lower_bound, lower_bound_staggered

from swarm_helpers import random_owners

PIECE = 256 * 1024
BLOCK = 64 * 1024
LINK = LinkProfile(up=100e6 / 8, down=150e6 / 8, latency=0.0005)   # the FS CNN's shaped links


def owners(n: int, pieces: int):
    return random_owners({i: pieces for i in range(1, n + 1)}, PIECE, seed=n)[0]


def test_staggered_bound_is_the_plain_bound_without_skew_and_costs_the_mean_delay():
    share = {i: 1_000_000 for i in range(1, 5)}
    links = {i: LinkProfile(up=1e6, down=1e7, latency=0.0) for i in share}
    assert lower_bound_staggered(share, links, {}) == pytest.approx(lower_bound(share, links))
    # 12 MB of copies over 4 MB/s of uplinks: 3 s; peer 4 begins 0.4 s late,
    # so the uplinks lose 0.4 MB of work: 0.1 s, the mean delay, not 0.4 s
    assert lower_bound(share, links) == pytest.approx(3.0)
    assert lower_bound_staggered(share, links, {4: 0.4}) == pytest.approx(3.1)
    # a late owner still has to push its own share out after it begins
    assert lower_bound_staggered(share, links, {4: 3.0}) == pytest.approx(4.0)


def test_a_late_peer_neither_sends_nor_receives_before_its_round_begins():
    own = owners(4, 4)
    late, start = 4, 0.05
    swarm = build_swarm(own, SwarmConfig(block_size=BLOCK), LINK, kept_connections=True,
                        start_at={late: start})
    early = swarm.run(until=start - 1e-6)
    sessions = swarm.sessions
    assert not early.complete
    assert sessions[late].stats.bytes_down == 0 and sessions[late].stats.bytes_up == 0
    assert swarm.network.peers[late].link.wire_up == 0
    late_pieces = set(swarm.layout.owner_range(late))
    for pid in (1, 2, 3):
        assert not any(sessions[pid].have[i] for i in late_pieces)
        assert sessions[pid].stats.bytes_down > 0          # the others did exchange
    result = swarm.run(until=60)
    assert result.complete
    shares = {o: m.total_size for o, (m, _) in own.items()}
    t_lb = lower_bound_staggered(shares, {o: LINK for o in own}, {late: start})
    assert result.virtual_time >= t_lb


@pytest.mark.parametrize("start_at, field", [
    ({9: 0.01}, "start_at"),
    ({2: -0.01}, "start_at[2]"),
    ({2: float("nan")}, "start_at[2]"),
    ({2: True}, "start_at[2]"),
])
def test_bad_start_at_is_refused_naming_the_entry(start_at, field):
    own = owners(3, 1)
    with pytest.raises(ConfigError) as err:
        build_swarm(own, SwarmConfig(block_size=BLOCK), LINK, start_at=start_at)
    assert err.value.field == field
    # the owners' pieces are untouched: the same call without the bad entry runs
    assert build_swarm(own, SwarmConfig(block_size=BLOCK), LINK).run(until=60).complete
