"""The distributed client's data plane: rounds, parking, refusals, on 127.0.0.1.

Each peer is a real ``RoundDataPlane`` driven by a minimal host (``Peer``)
that plays the manager's part: it owns one ``SwarmSession`` per round and
routes the session's output back through the plane.
"""
from __future__ import annotations

import asyncio
import logging
import re

import pytest

from fs_bittorrent.core.codec import encode
from fs_bittorrent.core.faults import Faults
from fs_bittorrent.core.layout import SwarmLayout, make_auth
from fs_bittorrent.core.messages import Handshake

from swarm_helpers import blob_from_storage, random_owners

from dataplane_helpers import (CFG, PIECE, SECRET, Peer, addresses, close_all,  # noqa: F401
                               started, ticking)

def test_three_rounds_on_one_listener_bit_exact_and_connections_per_round():
    async def main():
        peers = await started(4)
        try:
            for rnd in range(3):
                owners, blobs = random_owners({p.pid: 3 for p in peers}, PIECE, seed=rnd,
                                              rnd=rnd)
                for p in peers:
                    p.begin(rnd, owners, addresses(peers))
                ok = await ticking(peers, lambda: all(p.session.complete for p in peers), 10)
                assert ok, {p.pid: p.session.progress(0) for p in peers}
                for p in peers:
                    assert p.storage.bad_puts == []
                    for owner, (m, _) in owners.items():
                        assert blob_from_storage(p.storage, m) == blobs[owner]
                    assert p.plane.connected_peers == sorted({1, 2, 3, 4} - {p.pid})
                    assert all(c.round == rnd for c in p.plane._conns.values())
                for p in peers:
                    p.emit(p.session.close(asyncio.get_running_loop().time(), "round end"))
                    p.plane.end_round()
                    assert p.plane.connected_peers == []
            for p in peers:
                assert p.plane.stats.protocol_errors == 0, list(p.plane.stats.errors)
                assert p.plane.stats.handshakes_refused == 0
                assert p.plane.stats.dial_failures == 0
                assert p.plane.stats.connections_dialed == 3 * (4 - p.pid)
        finally:
            await close_all(peers)
        assert all(not p.plane._tasks for p in peers)

    asyncio.run(main())


def test_handshake_for_a_round_not_begun_is_parked_then_served():
    """A faster peer dials before we got the round's start: its connection
    waits for our begin_round instead of being refused."""
    async def main():
        a, b = await started(2)
        try:
            owners, blobs = random_owners({1: 2, 2: 2}, PIECE, seed=7)
            a.begin(0, owners, addresses([a, b]))          # a dials b at once
            await asyncio.sleep(0.3)
            assert b.plane.parked == 1 and b.plane.connected_peers == []
            b.begin(0, owners, addresses([a, b]))
            ok = await ticking([a, b], lambda: a.session.complete and b.session.complete, 10)
            assert ok
            assert b.plane.stats.handshakes_refused == 0
            assert blob_from_storage(b.storage, owners[1][0]) == blobs[1]
        finally:
            await close_all([a, b])

    asyncio.run(main())


def test_parked_handshake_is_refused_after_the_timeout(caplog):
    async def main():
        a, b = await started(2, handshake_timeout=0.5)
        try:
            owners, _ = random_owners({1: 1, 2: 1}, PIECE, seed=1)
            with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
                a.begin(0, owners, addresses([a, b]))
                await asyncio.sleep(1.2)
            assert b.plane.stats.handshakes_refused == 1
            assert "no such swarm" in b.plane.stats.errors[-1]
            assert b.plane.connected_peers == [] and b.plane._all == set()
            assert (2, 0) in a.lost                        # the dialer saw the close
        finally:
            await close_all([a, b])

    asyncio.run(main())


async def raw_handshake(port: int, hs: Handshake) -> bytes:
    """Dial, send one handshake, return what comes back before the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(hs))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    return data


def test_wrong_secret_old_round_and_other_experiment_are_refused_and_nothing_stored(caplog):
    # An FS run in the same process points the package logger at FS's
    # handlers (propagate off): listen on it directly.
    pkg_log = logging.getLogger("fs_bittorrent")
    listen = not pkg_log.propagate
    if listen:
        pkg_log.addHandler(caplog.handler)
    try:
        _refusals(caplog)
    finally:
        if listen:
            pkg_log.removeHandler(caplog.handler)


def _refusals(caplog):
    async def main():
        b, = await started(1)
        b.pid = 2
        try:
            owners0, _ = random_owners({1: 2, 2: 2}, PIECE, seed=1, rnd=0)
            owners1, _ = random_owners({1: 2, 2: 2}, PIECE, seed=2, rnd=1)
            b.begin(0, owners0, {}, connect=False)
            old_swarm = b.session.layout.swarm_id
            b.begin(1, owners1, {}, connect=False)
            swarm = b.session.layout.swarm_id
            held_before = set(b.storage.keys())
            other = SwarmLayout(tuple(m for m, _ in owners1.values()), experiment="other")
            cases = {
                "auth": Handshake(swarm, 1, 1 << 20, make_auth(b"wrong secret", swarm, 1)),
                "round 0 is over": Handshake(old_swarm, 1, 1 << 20,
                                             make_auth(SECRET, old_swarm, 1)),
                "no such swarm": Handshake(other.swarm_id, 1, 1 << 20,
                                           make_auth(SECRET, other.swarm_id, 1)),
            }
            b.plane.handshake_timeout = 0.3
            with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
                for words, hs in cases.items():
                    reply = await raw_handshake(b.plane.port, hs)
                    assert reply == b""                      # closed, nothing said
                    assert words in b.plane.stats.errors[-1], b.plane.stats.errors
                b.plane.alarms.flush()
            assert b.plane.stats.handshakes_refused == 3
            assert b.plane.connected_peers == []
            assert set(b.storage.keys()) == held_before
            assert b.session.peers == {}
            # Logged as they happen, at a bounded rate: every refusal is counted.
            warned = [r.message for r in caplog.records
                      if r.levelno == logging.WARNING and "refused" in r.message]
            assert sum(int(re.search(r"refused (\d+) connection", m).group(1))
                       for m in warned) == 3, warned
        finally:
            await close_all([b])

    asyncio.run(main())


def test_unreachable_peer_is_given_up_and_reported_lost():
    async def main():
        a, = await started(1)
        try:
            owners, _ = random_owners({1: 1, 2: 1}, PIECE, seed=3)
            a.plane.dial_attempts = 2
            dead_port = a.plane.port + 1 if a.plane.port < 65535 else a.plane.port - 1
            a.begin(0, owners, {1: ("127.0.0.1", a.plane.port), 2: ("127.0.0.1", dead_port)})
            ok = await ticking([a], lambda: (2, 0) in a.lost, 5)
            assert ok and a.plane.stats.dial_failures == 2
            assert 2 not in a.session.peers
        finally:
            await close_all([a])

    asyncio.run(main())


FAULTS = {
    "drop": Faults(drop=0.05),
    "duplicate": Faults(duplicate=0.2),
    "reorder": Faults(reorder=0.3, reorder_delay=0.05),
    "corrupt": Faults(corrupt=0.05),
    "delay": Faults(delay=0.1, delay_max=0.3),
    "disconnect": Faults(disconnect=0.01, reconnect_after=0.2),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_swarm_under_injected_faults_completes_bit_exact(name):
    faults = FAULTS[name]

    async def main():
        peers = await started(4, faults=faults)
        try:
            owners, blobs = random_owners({p.pid: 4 for p in peers}, PIECE, seed=5)
            for p in peers:
                p.begin(0, owners, addresses(peers))
            ok = await ticking(peers, lambda: all(p.session.complete for p in peers), 40)
            assert ok, {p.pid: p.session.progress(0) for p in peers}
            injected = {k: sum(p.plane.fault_counts[k] for p in peers)
                        for k in peers[0].plane.fault_counts}
            key = {"drop": "dropped", "duplicate": "duplicated", "reorder": "reordered",
                   "corrupt": "corrupted", "delay": "delayed", "disconnect": "disconnects"}[name]
            assert injected[key] > 0, injected
            for p in peers:
                assert p.storage.bad_puts == []            # no unverified byte stored
                for owner, (m, _) in owners.items():
                    assert blob_from_storage(p.storage, m) == blobs[owner]
            if name == "corrupt":
                assert sum(p.session.stats.corrupt_pieces for p in peers) > 0
            if name == "disconnect":
                assert sum(p.plane.stats.connections_dialed for p in peers) > 6  # redials
        finally:
            await close_all(peers)

    asyncio.run(main())
