"""Tunables of one peer's swarm session, validated up front.

All times are in seconds of whatever clock the host passes as ``now``
(virtual in the simulator, monotonic wall time in distributed runs).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError

KiB = 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class SwarmConfig:
    piece_size: int = 256 * KiB
    block_size: int = 16 * KiB          # size of one request/piece block
    max_block_size: int = 128 * KiB     # larger requests or blocks are refused
    credit_bytes: int = 4 * MiB         # bytes of requested blocks we accept in flight
    max_requests_per_peer: int = 64     # pipeline cap per peer, on top of credit
    min_requests_per_peer: int = 4      # pipeline floor per peer (before a rate is known)
    request_queue_time: float = 0.05    # queueing the request window allows, seconds
    max_upload_slots: int = 0           # peers unchoked at once; 0 = every interested peer
    unchoke_interval: float = 10.0      # rotation period when slots are capped
    request_timeout: float = 10.0       # a block not answered by then is re-requested elsewhere
    max_retries: int = 5                # timeout rounds in a row tolerated; the next drops the peer
    end_game_threshold: int = 0         # enter end game also when <= this many blocks are unrequested
    end_game_delay: float = 0.5         # duplicate only blocks outstanding at least this long
    keepalive_interval: float = 120.0   # send a keep-alive after this much silence (BitTorrent: 2 min)
    peer_timeout: float = 300.0         # drop a peer silent this long (> keep-alive: one lost keep-alive is no drop)
    handshake_retry: float = 5.0        # resend an unanswered handshake after this long
    interest_retry: float = 5.0         # re-assert interest when choked this long
    max_corrupt_pieces: int = 3         # a peer that served this many bad pieces is banned
    first_copy_wait: float = 2.0        # drop the first-copy plan after idling this long (0: no plan)
    lead_pieces: int = 0                # a peer more pieces than this ahead of its peers' mean ... (0: off)
    lead_requests: int = 2              # ... keeps at most this many requests at each source
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f.name, v, "must be a number")
        positive = ("piece_size", "block_size", "max_block_size", "credit_bytes",
                    "max_requests_per_peer", "min_requests_per_peer",
                    "request_queue_time", "request_timeout", "keepalive_interval",
                    "peer_timeout", "handshake_retry", "interest_retry", "max_corrupt_pieces",
                    "lead_requests")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be > 0")
        for name in ("max_upload_slots", "max_retries", "end_game_threshold", "end_game_delay",
                     "unchoke_interval", "first_copy_wait", "lead_pieces"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        if self.block_size > self.max_block_size:
            raise ConfigError("block_size", self.block_size,
                              f"exceeds max_block_size={self.max_block_size}")
        if self.min_requests_per_peer > self.max_requests_per_peer:
            raise ConfigError("min_requests_per_peer", self.min_requests_per_peer,
                              f"exceeds max_requests_per_peer={self.max_requests_per_peer}")
        if self.credit_bytes < self.block_size:
            raise ConfigError("credit_bytes", self.credit_bytes,
                              f"must allow at least one block of {self.block_size} bytes")
