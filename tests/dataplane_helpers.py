"""A minimal host for ``RoundDataPlane`` in tests: what ``ClientManager`` does.

Each ``Peer`` owns one ``SwarmSession`` per round and routes the session's
output back through its plane; with ``tls=True`` it has its own
``LocalIdentity`` and peers are pinned to each other's certificates.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.faults import Faults
from fs_bittorrent.core.layout import SwarmLayout
from fs_bittorrent.core.session import Close, SwarmSession
from fs_bittorrent.core.storage import ContentPool
from fs_bittorrent.core.topology import openings
from fs_bittorrent.errors import BitTorrentError
from fs_bittorrent.net.round_dataplane import RoundDataPlane
from fs_bittorrent.net.tls import LocalIdentity

from swarm_helpers import CheckingStorage, expected_hashes

PIECE = 32 * 1024
CFG = SwarmConfig(piece_size=PIECE, block_size=16 * 1024, request_timeout=2.0,
                  handshake_retry=0.5, interest_retry=0.5, credit_bytes=1024 * 1024)
SECRET = b"experiment secret"


class Peer:
    """What ``ClientManager`` does for the plane: sessions per round, ticks."""

    def __init__(self, pid: int, secret: bytes = SECRET, handshake_timeout: float = 3.0,
                 faults: Faults = Faults(), identity: Optional[LocalIdentity] = None,
                 host: str = "127.0.0.1", **caps):
        self.pid = pid
        self.secret = secret if identity is None else b""
        self.identity = identity
        self.plane = RoundDataPlane(self, host=host, handshake_timeout=handshake_timeout,
                                    faults=faults, fault_seed=11, identity=identity, **caps)
        self.session = None
        self.round = None
        self.storage = None
        self.lost: list[tuple[int, int]] = []
        self.errors: list[str] = []

    def begin(self, rnd: int, owners, addresses, connect: bool = True,
              certificates: Optional[dict] = None, config: SwarmConfig = CFG,
              uplinks: Optional[dict] = None) -> None:
        """``uplinks``: paced uploads with that hint, as ``ClientManager``
        builds a session where the known uplinks differ."""
        last_rtts = self.session.path_rtts() if self.session is not None else {}
        layout = SwarmLayout(tuple(m for m, _ in owners.values()), experiment="t")
        self.storage = CheckingStorage(expected_hashes(owners), ContentPool())
        if self.pid in owners:
            m, pieces = owners[self.pid]
            for k, data in enumerate(pieces):
                self.storage.put(self.pid, k, m.piece_hashes[k], data)
        loop = asyncio.get_running_loop()
        self.session = SwarmSession(self.pid, layout, self.storage, config, secret=self.secret,
                                    now=loop.time(), uplinks=uplinks,
                                    paced_uploads=uplinks is not None)
        self.round = rnd
        self.plane.begin_round(rnd, self.session, addresses, certificates)
        if connect:   # as ClientManager.on_start: kept connections from both ends
            for q, rtt in openings(self.pid, addresses, self.plane.kept_peers(), last_rtts):
                self.emit(self.session.connect(q, loop.time(), path_rtt=rtt))

    def emit(self, out) -> None:
        for dst, msg in out:
            if isinstance(msg, Close):
                self.plane.close_peer(self.pid, dst, self.round)
            else:
                self.plane.send_peer(self.pid, dst, self.round, msg)
        if self.session is not None and self.session.paced_uploads:
            self.plane.pace(self.session, self.emit)     # as ClientManager._emit

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
    return {p.pid: (p.plane.host, p.plane.port) for p in peers}


def certificates(peers) -> dict[int, bytes]:
    """The coordinator's table of public certificates (TLS peers only)."""
    return {p.pid: p.identity.cert_der for p in peers if p.identity is not None}


async def started(n: int, tls: bool = False, **kw) -> list[Peer]:
    peers = [Peer(i, identity=LocalIdentity.generate() if tls else None, **kw)
             for i in range(1, n + 1)]
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


