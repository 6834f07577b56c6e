"""Build a simulated swarm from owners' pieces: the glue tests, the demo and
the benchmarks share, so every one of them drives the engine the same way."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

from ..core.config import SwarmConfig
from ..core.layout import SwarmLayout
from ..core.manifest import Manifest
from ..core.picker import pace_uploads, plan_where_uplinks_differ
from ..core.storage import Bytes, ContentPool, MemoryPieceStorage, PieceStorage
from ..core.session import SwarmSession
from ..errors import ConfigError
from .network import Faults, LinkProfile, SimNetwork

OwnerPieces = Mapping[int, tuple[Manifest, Sequence[bytes]]]


class VerifiedCopies:
    """A piece check for many peers in one process (``SwarmSession.check``).

    Every peer must verify every piece it downloads, so a swarm of n peers
    hashes each piece n - 1 times.  Here each owner's piece is hashed once,
    when it is registered; a downloaded piece equal to that verified copy
    has the same digest, and comparing bytes is several times cheaper than
    SHA-256.  Anything else (a corrupted block, an unregistered piece) is
    hashed, so the verdict is always exactly SHA-256's.
    """

    def __init__(self) -> None:
        self._copies: dict[bytes, bytes] = {}

    def add(self, digest: bytes, data: bytes) -> None:
        if hashlib.sha256(data).digest() == digest:
            self._copies[digest] = bytes(data)  # no copy for bytes; pins a bytearray

    def __call__(self, digest: bytes, data: Bytes) -> bool:
        copy = self._copies.get(digest)
        if copy is not None and copy == data:
            return True
        return hashlib.sha256(data).digest() == digest

    def matching_copy(self, digest: bytes, blocks: Sequence[Bytes]) -> Optional[bytes]:
        """The verified copy of ``digest`` if ``blocks``, joined, equal it;
        else None (the caller then joins them and calls the check).

        Each block is compared in place with its slice of the copy, so a
        piece that matches -- every piece but a corrupted one -- is never
        joined: a 64-peer round joined 32 256 pieces of 256 KiB only to
        compare them and let the content pool drop the join for its own
        copy.  Not None exactly when ``self(digest, b"".join(blocks))`` would
        be True by its byte comparison."""
        copy = self._copies.get(digest)
        if copy is None:
            return None
        lo = 0
        for block in blocks:
            if not copy.startswith(block, lo):   # memcmp, no slice made
                return None
            lo += block.nbytes if type(block) is memoryview else len(block)
        return copy if lo == len(copy) else None


@dataclass
class SimSwarm:
    layout: SwarmLayout
    network: SimNetwork
    storages: dict[int, PieceStorage]
    owners: OwnerPieces

    @property
    def sessions(self) -> dict[int, SwarmSession]:
        return {pid: link.session for pid, link in self.network.peers.items()}

    def run(self, **kw):
        return self.network.run(**kw)


def lower_bound(piece_bytes: Mapping[int, int], profiles: Mapping[int, LinkProfile],
                server_up: float = 0.0) -> float:
    """All-gather lower bound T_LB (shared/GUIDE.md section 3).

    ``piece_bytes[i]`` is owner i's share S_i; every peer must receive every
    other share.  Three bounds: the slowest downloader must take in all the
    others' bytes; all those bytes must cross the sum of uplinks; and every
    owner must push its share out at least once.  (Every peer starting at
    0: :func:`lower_bound_staggered` computes it.)
    """
    return lower_bound_staggered(piece_bytes, profiles, {}, server_up)


def lower_bound_staggered(piece_bytes: Mapping[int, int], profiles: Mapping[int, LinkProfile],
                          start_at: Mapping[int, float], server_up: float = 0.0) -> float:
    """T_LB when peer i can only begin at ``start_at[i]`` (start skew),
    measured from time 0 (take the earliest start as 0).

    The three bounds of :func:`lower_bound`, each with its peer's start:
    peer i takes in the others' bytes after ``s_i`` (``s_i + (B - S_i) /
    d_i``) and pushes its own share out after ``s_i`` (``s_i + S_i /
    u_i``); and the uplinks, each working from its own start, must carry
    every copy: ``sum_i u_i (T - s_i) >= sum_i (n-1) S_i``, so ``T >=
    (sum_i (n-1) S_i + sum_i u_i s_i) / sum_i u_i``.  With every
    ``s_i = 0`` it is :func:`lower_bound`; with equal uplinks, start skew
    costs the round its *mean* delay at best, not its largest.
    """
    ids = list(piece_bytes)
    start = {i: float(start_at.get(i, 0.0)) for i in ids}
    total = sum(piece_bytes.values())
    need_down = max(start[i] + (total - piece_bytes[i]) / profiles[i].down for i in ids)
    sum_up = sum(profiles[i].up for i in ids) + server_up
    copies = sum((len(ids) - 1) * piece_bytes[i] for i in ids)
    need_up_total = (copies + sum(profiles[i].up * start[i] for i in ids)) / sum_up
    need_owner = max(start[i] + piece_bytes[i] / profiles[i].up for i in ids)
    return max(need_down, need_up_total, need_owner)


def lower_bound_latency(piece_bytes: Mapping[int, int], profiles: Mapping[int, LinkProfile],
                        server_up: float = 0.0) -> float:
    """T_LB plus the path latency a handshake-then-pull exchange cannot avoid.

    ``T_LB,lat = T_LB + min_{i != j} (L_i + L_j) + min_i L_i``, with ``L_i``
    peer i's one-way latency (a message from i takes ``L_i`` to arrive, as
    in the simulator; on a real network read ``L_i + L_j`` as the path's
    round trip).  No uplink can send a piece byte before some request has
    reached it, and no peer requests before it has heard from the source:
    i's handshake reaches j (``L_i``; in a cooperative swarm i's unchoke
    rides behind it), j's request comes back (``L_j``).  The last byte sent
    still needs at least ``min L`` to arrive.  The bandwidth bound applies
    in between (every uplink starts at ``min (L_i + L_j)`` at the
    earliest), so with one latency L everywhere ``T_LB,lat = T_LB + 3 L``.
    It bounds when every peer holds everything; the simulator's T also
    counts the last messages of the round (a ``not interested``, one L).
    It is a bound for BitTorrent-style exchanges (hear the peer, then
    request), not for every protocol; ``η = T_LB / T`` stays the headline
    figure.
    """
    t_lb = lower_bound(piece_bytes, profiles, server_up)
    lat = sorted(profiles[i].latency for i in piece_bytes)
    if len(lat) < 2:
        return t_lb
    # L_i + L_j over i != j is smallest for the two lowest latencies
    return t_lb + lat[0] + lat[1] + lat[0]


def build_swarm(owners: OwnerPieces, config: SwarmConfig = SwarmConfig(),
                profiles: Union[LinkProfile, Mapping[int, LinkProfile]] = LinkProfile(),
                seed: int = 0, faults: Faults = Faults(), encode: bool = False,
                secret: bytes = b"", experiment: str = "fs_bittorrent",
                peers: Optional[Sequence[int]] = None,
                storage_factory: Optional[Callable[[int], PieceStorage]] = None,
                tick_interval: float = 0.5, kept_connections: bool = False,
                start_at: Optional[Mapping[int, float]] = None) -> SimSwarm:
    """A network with one session per peer, each holding its own pieces.

    ``peers`` defaults to the owners; extra ids join as pure downloaders.
    Storages share one content pool, so each distinct piece is kept once.
    ``kept_connections``: the round runs on connections kept from an earlier
    one, opened from both ends (``SimNetwork.connect_all``).
    ``start_at``: peer id -> virtual time its round begins (start skew,
    ``SimNetwork.start_at``); others begin at 0.
    """
    layout = SwarmLayout(tuple(m for m, _ in owners.values()), experiment=experiment)
    ids = list(peers if peers is not None else sorted(owners))
    # The links are known here: the first-copy plan only where uplinks differ,
    # and there every session also knows the configured uplinks
    # (capacity-aware first-copy plan, serving order) and paces its uploads.
    ups = [] if isinstance(profiles, LinkProfile) else [profiles[p].up for p in ids]
    upload_aware = pace_uploads(config, ups)
    config = plan_where_uplinks_differ(config, ups)
    uplinks = {o: profiles[o].up for o in owners} if upload_aware else None

    net = SimNetwork(seed=seed, faults=faults, encode=encode, tick_interval=tick_interval)
    if start_at:
        for pid, at in start_at.items():
            if pid not in ids:
                raise ConfigError("start_at", pid, "is not a peer of this swarm")
            if not (isinstance(at, (int, float)) and not isinstance(at, bool)
                    and math.isfinite(at) and at >= 0):
                raise ConfigError(f"start_at[{pid}]", at, "must be a finite number >= 0")
        net.start_at = {pid: float(at) for pid, at in start_at.items()}
    pool = ContentPool()
    check = VerifiedCopies()
    for m, pieces in owners.values():
        for digest, data in zip(m.piece_hashes, pieces):
            check.add(digest, data)
    storages: dict[int, PieceStorage] = {}
    for pid in (peers if peers is not None else sorted(owners)):
        # The session hashes every piece before put(); the in-memory default
        # does not hash it a second time (the SQLite store does, on disk).
        storage = storage_factory(pid) if storage_factory else MemoryPieceStorage(pool, verify=False)
        if pid in owners:
            m, pieces = owners[pid]
            for k, data in enumerate(pieces):
                if not storage.has(pid, k):
                    storage.put(pid, k, m.piece_hashes[k], data)
        storages[pid] = storage
        profile = profiles if isinstance(profiles, LinkProfile) else profiles[pid]
        net.add_peer(SwarmSession(pid, layout, storage, config, secret=secret, check=check,
                                  uplinks=uplinks, paced_uploads=upload_aware), profile)
    net.connect_all(kept=kept_connections)
    return SimSwarm(layout, net, storages, owners)
