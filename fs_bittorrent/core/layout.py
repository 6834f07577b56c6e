"""The swarm's global piece numbering.

A round's swarm shares every owner's pieces.  To speak plain BitTorrent
(one bitfield, one piece index space), the manifests, ordered by owner id,
are laid end to end: owner A's pieces are 0..a-1, owner B's a..a+b-1, ...
Every peer derives the same numbering from the same manifests, and the swarm
id (which commits to the manifests' digest) guarantees they agree.
"""
from __future__ import annotations

import bisect
import hashlib
import hmac
import struct
from dataclasses import dataclass

from ..errors import PieceIndexOutOfRange, ManifestError
from .manifest import Manifest, manifests_digest
from .messages import SWARM_ID_LEN


def make_swarm_id(experiment: str, round_idx: int, digest: bytes) -> bytes:
    """20-byte swarm id binding experiment, round and manifests (like info_hash)."""
    h = hashlib.sha256()
    h.update(b"fs-bittorrent swarm\0")
    h.update(experiment.encode("utf-8") + b"\0")
    h.update(struct.pack(">I", round_idx))
    h.update(digest)
    return h.digest()[:SWARM_ID_LEN]


def make_auth(secret: bytes, swarm_id: bytes, peer_id: int) -> bytes:
    """HMAC-SHA256 proving the peer knows the experiment secret."""
    return hmac.new(secret, swarm_id + struct.pack(">I", peer_id), hashlib.sha256).digest()


@dataclass
class SwarmLayout:
    manifests: tuple[Manifest, ...]
    experiment: str = "fs_bittorrent"

    def __post_init__(self) -> None:
        ms = tuple(sorted(self.manifests, key=lambda m: m.owner))
        if not ms:
            raise ManifestError("manifests", [], "a swarm needs at least one manifest")
        owners = [m.owner for m in ms]
        if len(set(owners)) != len(owners):
            raise ManifestError("owner", owners, "duplicate owner in one round")
        rounds = {m.round for m in ms}
        if len(rounds) != 1:
            raise ManifestError("round", sorted(rounds), "manifests of different rounds")
        self.manifests = ms
        self.round = ms[0].round
        self.owners = tuple(owners)
        self._by_owner = {m.owner: m for m in ms}
        self._offsets: list[int] = []
        total = 0
        for m in ms:
            self._offsets.append(total)
            total += m.num_pieces
        self.num_pieces = total
        self._lengths = [m.piece_length(i) for m in ms for i in range(m.num_pieces)]
        self._hashes = [h for m in ms for h in m.piece_hashes]
        self._owner_of = [m.owner for m in ms for _ in range(m.num_pieces)]
        self.digest = manifests_digest(ms)
        self.swarm_id = make_swarm_id(self.experiment, self.round, self.digest)
        self.total_bytes = sum(self._lengths)

    def manifest(self, owner: int) -> Manifest:
        return self._by_owner[owner]

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.num_pieces:
            raise PieceIndexOutOfRange("index", index, f"swarm has {self.num_pieces} pieces")

    def piece_length(self, index: int) -> int:
        return self._lengths[index]

    def piece_hash(self, index: int) -> bytes:
        return self._hashes[index]

    def owner_of(self, index: int) -> int:
        return self._owner_of[index]

    def to_local(self, index: int) -> tuple[int, int]:
        """Global index -> (owner, index within the owner's manifest)."""
        self.check_index(index)
        k = bisect.bisect_right(self._offsets, index) - 1
        return self.manifests[k].owner, index - self._offsets[k]

    def to_global(self, owner: int, local_index: int) -> int:
        k = self.owners.index(owner)
        return self._offsets[k] + local_index

    def owner_range(self, owner: int) -> range:
        k = self.owners.index(owner)
        return range(self._offsets[k], self._offsets[k] + self.manifests[k].num_pieces)
