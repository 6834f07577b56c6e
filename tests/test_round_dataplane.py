"""The distributed client's data plane: rounds, parking, refusals, on 127.0.0.1.

Each peer is a real ``RoundDataPlane`` driven by a minimal host (``Peer``)
that plays the manager's part: it owns one ``SwarmSession`` per round and
routes the session's output back through the plane.
"""
from __future__ import annotations

import asyncio
import logging

import pytest

from fs_bittorrent.core.codec import encode
from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.faults import Faults
from fs_bittorrent.core.layout import SwarmLayout, make_auth
from fs_bittorrent.core.messages import Handshake
from fs_bittorrent.core.session import Close, SwarmSession
from fs_bittorrent.core.storage import ContentPool
from fs_bittorrent.errors import BitTorrentError
from fs_bittorrent.net.round_dataplane import RoundDataPlane

from swarm_helpers import CheckingStorage, blob_from_storage, expected_hashes, random_owners

PIECE = 32 * 1024
CFG = SwarmConfig(piece_size=PIECE, block_size=16 * 1024, request_timeout=2.0,
                  handshake_retry=0.5, interest_retry=0.5, credit_bytes=1024 * 1024)
SECRET = b"experiment secret"


class Peer:
    """What ``ClientManager`` does for the plane: sessions per round, ticks."""

    def __init__(self, pid: int, secret: bytes = SECRET, handshake_timeout: float = 3.0,
                 faults: Faults = Faults()):
        self.pid = pid
        self.secret = secret
        self.plane = RoundDataPlane(self, handshake_timeout=handshake_timeout, faults=faults,
                                    fault_seed=11)
        self.session = None
        self.round = None
        self.storage = None
        self.lost: list[tuple[int, int]] = []
        self.errors: list[str] = []

    def begin(self, rnd: int, owners, addresses, connect: bool = True) -> None:
        layout = SwarmLayout(tuple(m for m, _ in owners.values()), experiment="t")
        self.storage = CheckingStorage(expected_hashes(owners), ContentPool())
        if self.pid in owners:
            m, pieces = owners[self.pid]
            for k, data in enumerate(pieces):
                self.storage.put(self.pid, k, m.piece_hashes[k], data)
        loop = asyncio.get_running_loop()
        self.session = SwarmSession(self.pid, layout, self.storage, CFG, secret=self.secret,
                                    now=loop.time())
        self.round = rnd
        self.plane.begin_round(rnd, self.session, addresses)
        if connect:
            for q in sorted(addresses):
                if q > self.pid:
                    self.emit(self.session.connect(q, loop.time()))

    def emit(self, out) -> None:
        for dst, msg in out:
            if isinstance(msg, Close):
                self.plane.close_peer(self.pid, dst, self.round)
            else:
                self.plane.send_peer(self.pid, dst, self.round, msg)

    # RoundHandler
    def handle_peer(self, peer: int, rnd: int, msg) -> None:
        assert rnd == self.round
        try:
            self.emit(self.session.handle(peer, msg, asyncio.get_running_loop().time()))
        except BitTorrentError as exc:
            self.errors.append(str(exc))
            self.plane.close_peer(self.pid, peer, rnd)

    def peer_closed(self, peer: int, rnd: int) -> None:
        self.lost.append((peer, rnd))
        if self.session is not None and rnd == self.round:
            self.session.peer_lost(peer, asyncio.get_running_loop().time())

    def reconnect(self, peer: int, rnd: int) -> None:
        if self.session is not None and rnd == self.round:
            self.emit(self.session.connect(peer, asyncio.get_running_loop().time()))

    def tick(self) -> None:
        if self.session is not None and not self.session.closed:
            self.emit(self.session.tick(asyncio.get_running_loop().time()))


async def ticking(peers, until, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if until():
            return True
        for p in peers:
            p.tick()
        await asyncio.sleep(0.02)
    return until()


def addresses(peers) -> dict[int, tuple[str, int]]:
    return {p.pid: ("127.0.0.1", p.plane.port) for p in peers}


async def started(n: int, **kw) -> list[Peer]:
    peers = [Peer(i, **kw) for i in range(1, n + 1)]
    # Ids as the manager has them: the plane learns its id from the session.
    for p in peers:
        p.plane.peer_id = p.pid
    for p in peers:
        await p.plane.start()
    return peers


async def close_all(peers) -> None:
    for p in peers:
        p.plane.end_round()
        await p.plane.close()


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
            assert b.plane.stats.handshakes_refused == 3
            assert b.plane.connected_peers == []
            assert set(b.storage.keys()) == held_before
            assert b.session.peers == {}
            assert sum("dropping" in r.message for r in caplog.records) == 3
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
