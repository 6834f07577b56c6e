"""The distributed client's data plane: rounds, parking, refusals, on 127.0.0.1.

Each peer is a real ``RoundDataPlane`` driven by a minimal host (``Peer``)
that plays the manager's part: it owns one ``SwarmSession`` per round and
routes the session's output back through the plane.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re

import pytest

from fs_bittorrent.core.codec import encode
from fs_bittorrent.core.faults import Faults
from fs_bittorrent.core.layout import SwarmLayout, make_auth
from fs_bittorrent.core.messages import Handshake, Have
from fs_bittorrent.net.tls import LocalIdentity

from swarm_helpers import blob_from_storage, random_owners

from dataplane_helpers import (CFG, PIECE, SECRET, Peer, addresses, certificates,  # noqa: F401
                               close_all, started, ticking)

def test_three_rounds_on_one_listener_bit_exact_over_the_same_connections():
    """Connections outlive rounds: each pair is dialed once, and rounds 1
    and 2 start with a framed handshake on the very same sockets."""
    async def main():
        peers = await started(4)
        try:
            sockets = {}
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
                    now = {q: c.writer.get_extra_info("sockname")
                           for q, c in p.plane._conns.items()}
                    assert sockets.setdefault(p.pid, now) == now      # same sockets
                for p in peers:
                    p.emit(p.session.close(asyncio.get_running_loop().time(), "round end"))
                    p.plane.end_round()
                    assert p.plane.connected_peers == sorted({1, 2, 3, 4} - {p.pid})
            for p in peers:
                assert p.plane.stats.protocol_errors == 0, list(p.plane.stats.errors)
                assert p.plane.stats.handshakes_refused == 0
                assert p.plane.stats.dial_failures == 0
                assert p.plane.stats.connections_dialed == 4 - p.pid     # once per pair
                assert p.plane.stats.connections_reused == 3 * 2         # rounds 1 and 2
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


def test_both_ends_open_a_kept_connection_and_the_first_crossing_carries_blocks():
    """From round 1 the higher id sends its handshake on the kept connection
    without waiting for the lower id's (which parks it until it begins), and
    in a cooperative swarm (no first-copy plan) its requests follow: the
    lower id's first answers are blocks.  Rounds stay bit-exact on the same
    sockets, and the higher id never dials.  (Both ends open only long
    paths: a request_queue_time of 1 µs makes loopback's one.)"""
    coop = dataclasses.replace(CFG, first_copy_wait=0.0, request_queue_time=1e-6)

    async def main():
        a, b = await started(2)
        try:
            owners, _ = random_owners({1: 3, 2: 3}, PIECE, seed=3, rnd=0)
            for p in (a, b):
                p.begin(0, owners, addresses([a, b]), config=coop)
            assert await ticking([a, b], lambda: a.session.complete and b.session.complete, 10)
            assert a.session.path_rtts().keys() == {2} and b.session.path_rtts().keys() == {1}
            _end([a, b])
            owners, blobs = random_owners({1: 3, 2: 3}, PIECE, seed=4, rnd=1)
            sent_by_b = []
            b.plane.send_peer = (lambda src, dst, rnd, msg, send=b.plane.send_peer:
                                 (sent_by_b.append(type(msg).__name__), send(src, dst, rnd, msg)))
            b.begin(1, owners, addresses([a, b]), config=coop)   # b first, alone
            await asyncio.sleep(0.3)
            assert a.plane.parked == 1                           # b's handshake is waiting
            assert sent_by_b[:3] == ["Handshake", "Bitfield", "Unchoke"]
            assert "Request" in sent_by_b                        # asked ahead, unprompted
            assert b.session.stats.bytes_down == 0
            a.begin(1, owners, addresses([a, b]), config=coop)
            assert await ticking([a, b], lambda: a.session.complete and b.session.complete, 10)
            for p, other in ((a, 2), (b, 1)):
                assert blob_from_storage(p.storage, owners[other][0]) == blobs[other]
                assert p.plane.stats.connections_reused == 1
            assert b.plane.stats.connections_dialed == 0
            assert b.session.path_rtts() == {1: b.session.peers[1].path_rtt}   # carried
        finally:
            await close_all([a, b])

    asyncio.run(main())


def test_a_higher_id_never_dials_its_handshake_is_dropped_without_a_connection():
    """Only the lower id dials: a higher id's handshake to a peer it has no
    connection to (a kept one that went away) is dropped, and the lower
    id's own dial then opens the round as on a new connection."""
    async def main():
        a, b = await started(2)
        try:
            owners, blobs = random_owners({1: 2, 2: 2}, PIECE, seed=9)
            b.begin(0, owners, addresses([a, b]), connect=False)
            b.emit(b.session.connect(1, asyncio.get_running_loop().time()))
            await asyncio.sleep(0.2)
            assert b.plane.stats.connections_dialed == 0 and b.plane._pending == {}
            assert a.plane.stats.connections_accepted == 0
            a.begin(0, owners, addresses([a, b]))                  # a dials
            assert await ticking([a, b], lambda: a.session.complete and b.session.complete, 10)
            assert blob_from_storage(b.storage, owners[1][0]) == blobs[1]
            assert b.plane.stats.connections_dialed == 0
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


# ---- connections across rounds ------------------------------------------------------
async def _round(peers, rnd, members=None, seed=0, certs=None):
    """Run round ``rnd`` among ``members`` (default: all) to completion, then end it."""
    members = peers if members is None else members
    owners, blobs = random_owners({p.pid: 2 for p in members}, PIECE, seed=seed, rnd=rnd)
    for p in members:
        p.begin(rnd, owners, addresses(members), certificates=certs)
    ok = await ticking(members, lambda: all(p.session.complete for p in members), 10)
    assert ok, {p.pid: p.session.progress(0) for p in members}
    for p in members:
        for owner, (m, _) in owners.items():
            assert blob_from_storage(p.storage, m) == blobs[owner]
    return owners


def _end(peers):
    for p in peers:
        p.emit(p.session.close(asyncio.get_running_loop().time(), "round end"))
        p.plane.end_round()


def test_a_peer_left_out_of_the_next_round_is_disconnected():
    async def main():
        peers = await started(3)
        a, b, c = peers
        try:
            await _round(peers, 0)
            _end(peers)
            assert c.plane.connected_peers == [1, 2]
            await _round([a, b], 1, seed=1)               # round 1's table: 1 and 2
            assert a.plane.connected_peers == [2] and b.plane.connected_peers == [1]
            assert await ticking([], lambda: c.plane.connected_peers == [], 3)
            assert a.plane.stats.connections_reused == 1 and a.plane.stats.connections_dialed == 2
            assert a.plane.stats.handshakes_refused == 0
        finally:
            await close_all(peers)

    asyncio.run(main())


def test_stale_round_handshake_on_a_live_connection_is_ignored_state_intact():
    """Peer 1 repeats round 0's handshake on the connection that serves
    round 1: peer 2 neither obeys it nor drops the connection; what follows
    it is dropped as late, and round 1's handshake rebinds the connection."""
    async def main():
        a, b = await started(2)
        try:
            await _round([a, b], 0)
            old = a.session._handshake()
            _end([a, b])
            await _round([a, b], 1, seed=1)
            conn = b.plane._conns[1]
            peers_before = dict(b.session.peers)
            held_before = set(b.storage.keys())
            a.plane._enqueue(2, old)                           # framed: the connection is open
            a.plane._enqueue(2, Have(0))
            assert await ticking([], lambda: b.plane.stats.late_messages >= 1, 3)
            assert b.plane.stats.stale_handshakes == 1
            assert b.plane._conns.get(1) is conn and not conn.closed
            assert b.plane.stats.handshakes_refused == 0 and b.plane.stats.protocol_errors == 0
            assert b.session.peers == peers_before and set(b.storage.keys()) == held_before
            assert b.session.stats.protocol_errors == 0
            a.plane._enqueue(2, a.session._handshake())         # back on round 1
            assert await ticking([], lambda: conn.round == 1, 3)
        finally:
            await close_all([a, b])

    asyncio.run(main())


def test_next_round_handshake_with_a_bad_hmac_closes_the_live_connection():
    """Plaintext + secret: each round's handshake carries the HMAC over that
    round's swarm id; a wrong one on a kept connection is refused."""
    async def main():
        a, b = await started(2)
        try:
            await _round([a, b], 0)
            _end([a, b])
            owners, _ = random_owners({1: 2, 2: 2}, PIECE, seed=1, rnd=1)
            b.begin(1, owners, addresses([a, b]))
            a.begin(1, owners, addresses([a, b]), connect=False)
            swarm = a.session.layout.swarm_id
            a.plane._enqueue(2, Handshake(swarm, 1, 1 << 20, make_auth(b"wrong", swarm, 1)))
            assert await ticking([], lambda: b.plane.stats.handshakes_refused == 1, 3)
            assert "auth" in b.plane.stats.errors[-1]
            assert b.plane.connected_peers == []
            assert 1 not in b.session.peers
        finally:
            await close_all([a, b])

    asyncio.run(main())


def test_a_changed_certificate_in_the_next_table_closes_the_live_connection():
    async def main():
        peers = await started(2, tls=True)
        a, b = peers
        try:
            await _round(peers, 0, certs=certificates(peers))
            _end(peers)
            forged = dict(certificates(peers))
            forged[2] = LocalIdentity.generate().cert_der       # the server now says otherwise
            owners, _ = random_owners({1: 2, 2: 2}, PIECE, seed=1, rnd=1)
            a.begin(1, owners, addresses(peers), connect=False, certificates=forged)
            assert a.plane.connected_peers == []
            assert await ticking([], lambda: b.plane.connected_peers == [], 3)
        finally:
            await close_all(peers)

    asyncio.run(main())


def test_a_peer_restarted_between_rounds_is_redialed_fresh():
    """Peer 2's process restarts between rounds (new listener, same id):
    round 1's handshake meets a dead connection, the loss is reported in
    round 1 and the lower id dials the new address."""
    async def main():
        a, b = await started(2)
        c = None
        try:
            await _round([a, b], 0)
            _end([a, b])
            await b.plane.close()
            c, = await started(1)
            c.pid = c.plane.peer_id = 2
            await _round([a, c], 1, seed=1)
            assert a.plane.connected_peers == [2]
            assert a.plane.stats.connections_dialed == 2
        finally:
            await close_all([a, c] if c else [a])

    asyncio.run(main())


# ---- measured rates ---------------------------------------------------------------
def test_uplink_is_measured_per_round_while_sending(monkeypatch):
    """Each plane measures what left it while it had a backlog; the figure
    is at least the round's average upload rate and is reset by the next
    round.  (Loopback moves the round in tens of ms: sample every 2 ms.)"""
    from fs_bittorrent.net import round_dataplane
    monkeypatch.setattr(round_dataplane, "UPLINK_SAMPLE", 0.001)

    async def main():
        a, b = await started(2)
        try:
            loop = asyncio.get_running_loop()
            owners, _ = random_owners({1: 256, 2: 256}, PIECE, seed=3)    # 8 MiB each
            t0 = loop.time()
            for p in (a, b):
                p.begin(0, owners, addresses([a, b]))
            assert await ticking([a, b], lambda: a.session.complete and b.session.complete, 10)
            took = loop.time() - t0
            for p in (a, b):
                rate = p.plane.uplink_rate()
                assert rate >= 0.5 * p.session.stats.bytes_up / took > 0, (rate, took)
                assert p.plane.uplink.bytes <= p.session.stats.bytes_up * 1.01
            _end([a, b])
            owners, _ = random_owners({1: 1, 2: 1}, PIECE, seed=4, rnd=1)  # too little to tell
            for p in (a, b):
                p.begin(1, owners, addresses([a, b]))
            assert await ticking([a, b], lambda: a.session.complete and b.session.complete, 10)
            assert a.plane.uplink_rate() == 0.0 and b.plane.uplink_rate() == 0.0
        finally:
            await close_all([a, b])

    asyncio.run(main())


def test_requesters_with_different_block_sizes_swarm_bit_exact():
    """Block sizes are the requester's choice (a distributed client sizes
    them from its measured rate): a peer asking 64 KiB blocks and one asking
    16 KiB blocks serve each other, every piece verified."""
    async def main():
        a, b, c = await started(3)
        try:
            big = dataclasses.replace(CFG, piece_size=4 * PIECE, block_size=64 * 1024)
            small = dataclasses.replace(CFG, piece_size=4 * PIECE, block_size=16 * 1024)
            owners, blobs = random_owners({1: 3, 2: 3, 3: 3}, 4 * PIECE, seed=9)
            a.begin(0, owners, addresses([a, b, c]), config=big)
            b.begin(0, owners, addresses([a, b, c]), config=small)
            c.begin(0, owners, addresses([a, b, c]), config=big)
            assert await ticking([a, b, c], lambda: all(p.session.complete
                                                        for p in (a, b, c)), 10)
            for p in (a, b, c):
                assert p.storage.bad_puts == [] and p.errors == []
                for owner, (m, _) in owners.items():
                    assert blob_from_storage(p.storage, m) == blobs[owner]
                assert p.session.stats.protocol_errors == 0
        finally:
            await close_all([a, b, c])

    asyncio.run(main())


def test_block_size_follows_the_measured_rate_within_bounds():
    from fs_bittorrent.fs.manager import BLOCK_TIME, block_size_for
    KiB = 1024
    assert block_size_for(0.0, 16 * KiB, 128 * KiB) == 16 * KiB          # unknown: the floor
    assert block_size_for(2.5e6, 16 * KiB, 128 * KiB) == 16 * KiB        # 20 Mbit/s
    assert block_size_for(12.5e6, 16 * KiB, 128 * KiB) == 64 * KiB       # 100 Mbit/s
    assert block_size_for(1e9, 16 * KiB, 128 * KiB) == 128 * KiB         # capped
    assert block_size_for(1e9, 16 * KiB, 32 * KiB) == 32 * KiB           # piece_size caps it
    for rate in (3e6, 7e6, 2e7, 4e7):
        size = block_size_for(rate, 16 * KiB, 128 * KiB)
        assert size <= max(16 * KiB, rate * BLOCK_TIME) < 2 * size or size == 128 * KiB


def test_uplink_meter_counts_only_backlogged_windows():
    from fs_bittorrent.net.uplink import MIN_BYTES, UplinkMeter
    m = UplinkMeter()
    m.sample(0.0, 0, 10)
    m.sample(1.0, 4 * MIN_BYTES, 10)          # busy: counted
    m.sample(2.0, 5 * MIN_BYTES, 0)           # ran dry during it: not counted
    m.sample(3.0, 5 * MIN_BYTES, 0)
    m.sample(4.0, 5 * MIN_BYTES, 10)          # backlog again, from here on
    m.sample(5.0, 8 * MIN_BYTES, 10)
    assert m.seconds == 2.0 and m.bytes == 7 * MIN_BYTES
    assert m.rate() == 7 * MIN_BYTES / 2.0
    m.reset()
    m.sample(0.0, 0, 1)
    m.sample(1.0, MIN_BYTES - 1, 1)           # too little to tell
    assert m.rate() == 0.0
