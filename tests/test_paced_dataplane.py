"""Paced uploads in the TCP data plane (issue 12): real sockets on 127.0.0.1.

The host holds accepted requests in the session and releases them while
its uplink-wide backlog is below the low-water mark (net/pacing.py)."""
from __future__ import annotations

import asyncio
import dataclasses

from fs_bittorrent.core.layout import SwarmLayout
from fs_bittorrent.core.picker import plan_where_uplinks_differ
from fs_bittorrent.core.session import SwarmSession
from fs_bittorrent.core.storage import ContentPool
from fs_bittorrent.net.dataplane import DataPlanePeer
from fs_bittorrent.core.picker import pace_uploads
from fs_bittorrent.net.pacing import low_water_mark, poll_interval

from swarm_helpers import CheckingStorage, assert_bit_exact, blob_from_storage, expected_hashes, random_owners
from test_dataplane import CFG, PIECE, SECRET, run_mesh

MIXED = {0: 1e6, 1: 1e6, 2: 1e7, 3: 1e7}       # bytes/s: half the uplinks 10x slower
UNIFORM = {pid: 1e7 for pid in range(4)}


def build(owners, uplinks):
    layout = SwarmLayout(tuple(m for m, _ in owners.values()))
    cfg = plan_where_uplinks_differ(dataclasses.replace(CFG, first_copy_wait=2.0),
                                    uplinks.values())
    paced = pace_uploads(cfg, uplinks.values())
    hashes = expected_hashes(owners)
    peers, storages = {}, {}
    for pid, (m, pieces) in owners.items():
        st = CheckingStorage(hashes, ContentPool())
        for k, data in enumerate(pieces):
            st.put(pid, k, m.piece_hashes[k], data)
        session = SwarmSession(pid, layout, st, cfg, secret=SECRET,
                               uplinks=uplinks if paced else None, paced_uploads=paced)
        peers[pid] = DataPlanePeer(session, tick_interval=0.05)
        storages[pid] = st
    return peers, storages


async def exchange(owners, blobs, uplinks):
    peers, storages = build(owners, uplinks)
    try:
        counts = await run_mesh(peers, 15.0)
        for p in peers.values():
            assert p.stats.protocol_errors == 0, list(p.stats.errors)
            assert p.session.stats.corrupt_pieces == 0
            assert p.session.stats.unrequested_blocks == 0
            assert p.session.stats.credit_violations == 0
    finally:
        for p in peers.values():
            await p.close()
    assert_bit_exact(storages, owners, blobs)
    return peers, counts


def test_paced_swarm_completes_bit_exact_and_held_uploads_drain():
    owners, blobs = random_owners({i: 8 for i in range(4)}, PIECE, seed=12)
    peers, counts = asyncio.run(exchange(owners, blobs, MIXED))
    assert all(p.session.paced_uploads for p in peers.values())
    # Drained before close: no held block or piece left behind anywhere.
    for pid, c in counts.items():
        assert c["held_uploads"] == 0 and c["held_pieces"] == 0, (pid, c)
        assert all(v == 0 for v in c.values()), (pid, c)
    # Blocks did wait for the uplink somewhere (the pacing was exercised),
    # and every block went out: each peer uploaded at least its share once.
    assert sum(p.stats.pace_waits for p in peers.values()) > 0
    assert sum(p.session.stats.bytes_up for p in peers.values()) >= \
        3 * sum(len(b) for b in blobs.values())


def test_uniform_links_are_not_paced():
    owners, blobs = random_owners({i: 4 for i in range(4)}, PIECE, seed=13)
    peers, counts = asyncio.run(exchange(owners, blobs, UNIFORM))
    for p in peers.values():
        assert not p.session.paced_uploads
        assert p.session.config.first_copy_wait == 0
        assert p.stats.pace_waits == 0
    assert all(v == 0 for c in counts.values() for v in c.values()), counts


def test_low_water_mark_and_poll_are_bounded():
    block = 32 * 1024
    assert low_water_mark(2.5e6, block) == 2 * block          # slow: two blocks
    assert low_water_mark(1.25e8, block) == int(1.25e8 * 0.02)   # fast: 20 ms of rate
    assert low_water_mark(0.0, block) == 4 * block            # unknown rate
    for rate in (0.0, 1e3, 2.5e6, 1e10):
        assert 0.001 <= poll_interval(rate, low_water_mark(rate, block)) <= 0.02


def test_round_data_plane_paces_two_rounds_on_the_same_connections():
    """The distributed client's host paces as ClientManager drives it
    (``plane.pace(session, emit)`` after each output); a new round's
    session is pumped even while the old round's timer is pending."""
    from dataplane_helpers import addresses, close_all, started, ticking
    from dataplane_helpers import CFG as ROUND_CFG, PIECE as ROUND_PIECE

    async def main():
        peers = await started(4)
        ups = {1: 1e6, 2: 1e6, 3: 1e7, 4: 1e7}
        cfg = dataclasses.replace(ROUND_CFG, first_copy_wait=2.0)
        try:
            for rnd in range(2):
                owners, blobs = random_owners({p.pid: 4 for p in peers}, ROUND_PIECE,
                                              seed=20 + rnd, rnd=rnd)
                for p in peers:
                    p.begin(rnd, owners, addresses(peers), config=cfg, uplinks=ups)
                ok = await ticking(peers, lambda: all(p.session.complete for p in peers), 10)
                assert ok, {p.pid: p.session.progress(0) for p in peers}
                assert await ticking(peers, lambda: all(
                    p.session.record_counts()["held_uploads"] == 0
                    and p.session.record_counts()["held_pieces"] == 0 for p in peers), 3)
                for p in peers:
                    assert p.session.paced_uploads
                    assert p.storage.bad_puts == []
                    for owner, (m, _) in owners.items():
                        assert blob_from_storage(p.storage, m) == blobs[owner]
                    p.emit(p.session.close(asyncio.get_running_loop().time(), "round end"))
                    p.plane.end_round()
            for p in peers:
                assert p.plane.stats.protocol_errors == 0, list(p.plane.stats.errors)
                assert p.plane.stats.connections_dialed == 4 - p.pid     # once per pair
        finally:
            await close_all(peers)
        assert all(p.plane._pump_handle is None for p in peers)

    asyncio.run(main())
