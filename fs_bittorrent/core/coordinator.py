"""The coordinator's round state machine (sans-IO, non-blocking).

The server never waits in a loop: its message loop feeds events
(``on_manifest``, ``on_report``) and polls (``poll(now)``), and gets back
actions to carry out.  One round::

    COLLECTING --all manifests (or manifest deadline, with >= 1)--> EXCHANGING
    EXCHANGING --all participants reported-------------> DONE (complete)
               --deadline, >= min_completion_ratio------> DONE (partial)
               --deadline, fewer------------------------> DONE (by policy:
                                                           proceed or abort)

Messages tagged with another round are ignored and counted (an old round's
late report must never end the current one).
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from ..errors import ConfigError, ManifestError
from .manifest import Manifest

log = logging.getLogger(__name__)

POLICIES = ("proceed", "abort")


class Phase(enum.Enum):
    IDLE = "idle"
    COLLECTING = "collecting"
    EXCHANGING = "exchanging"
    DONE = "done"


@dataclass(frozen=True)
class CompletionReport:
    """What a client says about its exchange, tagged with the round."""

    round: int
    complete: bool
    pieces_have: int
    pieces_total: int
    bytes_up: int = 0
    bytes_down: int = 0
    exchange_time: float = 0.0     # seconds from the start to the last piece (or the cut)
    reason: str = ""
    first_piece_time: float = -1.0  # seconds to the first verified piece (-1: none)
    timeouts: int = 0
    corrupt_pieces: int = 0
    duplicate_blocks: int = 0
    timeline: tuple[tuple[float, float], ...] = ()  # (seconds, completion) samples

    @property
    def completion(self) -> float:
        return self.pieces_have / self.pieces_total if self.pieces_total else 1.0


@dataclass(frozen=True)
class StartExchange:
    """Action: tell every participant to swarm these manifests."""

    round: int
    manifests: tuple[Manifest, ...]
    participants: tuple[int, ...]
    timeout: float


@dataclass(frozen=True)
class RoundEnd:
    """Action: the exchange of ``round`` is over; move on (or abort)."""

    round: int
    reason: str                       # complete | partial | deadline | insufficient | no manifests
    reports: dict[int, CompletionReport]
    participants: tuple[int, ...]
    owners: tuple[int, ...]
    exchange_time: float
    abort: bool = False

    @property
    def completed(self) -> list[int]:
        return sorted(c for c, r in self.reports.items() if r.complete)

    @property
    def completion_ratio(self) -> float:
        return len(self.completed) / len(self.participants) if self.participants else 1.0


Action = Union[StartExchange, RoundEnd]


@dataclass
class RoundCoordinator:
    timeout: float
    min_completion_ratio: float = 0.5
    insufficient_policy: str = "proceed"
    report_grace: float = 1.0
    # How long COLLECTING waits for manifests (local training happens then);
    # None: ``timeout``.  The exchange itself always gets ``timeout``.
    manifest_timeout: Optional[float] = None
    phase: Phase = Phase.IDLE
    round: int = -1
    stale_messages: int = 0
    _participants: tuple[int, ...] = ()
    _owners: set[int] = field(default_factory=set)
    _manifests: dict[int, Manifest] = field(default_factory=dict)
    _reports: dict[int, CompletionReport] = field(default_factory=dict)
    _deadline: Optional[float] = None
    _started_at: float = 0.0

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ConfigError("timeout", self.timeout, "must be > 0")
        if self.manifest_timeout is not None and not self.manifest_timeout > 0:
            raise ConfigError("manifest_timeout", self.manifest_timeout, "must be > 0")
        if not 0.0 <= self.min_completion_ratio <= 1.0:
            raise ConfigError("min_completion_ratio", self.min_completion_ratio,
                              "must be in [0, 1]")
        if self.insufficient_policy not in POLICIES:
            raise ConfigError("insufficient_policy", self.insufficient_policy,
                              f"must be one of {POLICIES}")

    # ---- queries -------------------------------------------------------------
    def next_deadline(self) -> Optional[float]:
        """When the host must call ``poll`` next (None: no timer needed)."""
        return self._deadline if self.phase in (Phase.COLLECTING, Phase.EXCHANGING) else None

    @property
    def manifests(self) -> dict[int, Manifest]:
        return dict(self._manifests)

    # ---- events ----------------------------------------------------------------
    def begin_round(self, round_idx: int, owners: Iterable[int], participants: Iterable[int],
                    now: float) -> list[Action]:
        """Expect manifests from ``owners``; ``participants`` all swarm."""
        if self.phase in (Phase.COLLECTING, Phase.EXCHANGING):
            raise ConfigError("round", round_idx,
                              f"round {self.round} is still {self.phase.value}")
        self.round = round_idx
        self.phase = Phase.COLLECTING
        self._owners = set(owners)
        self._participants = tuple(sorted(set(participants)))
        self._manifests = {}
        self._reports = {}
        self._deadline = now + (self.timeout if self.manifest_timeout is None
                                else self.manifest_timeout)
        self._started_at = now
        return []

    def _is_current(self, what: str, client: int, round_idx: int) -> bool:
        if round_idx != self.round or self.phase in (Phase.IDLE, Phase.DONE):
            self.stale_messages += 1
            log.info("coordinator: ignoring %s from client %s for round %s (current round %s, %s)",
                     what, client, round_idx, self.round, self.phase.value)
            return False
        return True

    def on_manifest(self, client: int, round_idx: int, manifest: Manifest,
                    now: float) -> list[Action]:
        if not self._is_current("manifest", client, round_idx):
            return []
        if manifest.owner != client:
            raise ManifestError("owner", manifest.owner, f"sent by client {client}")
        if manifest.round != round_idx:
            raise ManifestError("round", manifest.round, f"message is tagged round {round_idx}")
        if self.phase is not Phase.COLLECTING:
            self.stale_messages += 1
            log.info("coordinator: late manifest from client %s for round %s ignored",
                     client, round_idx)
            return []
        if client not in self._owners:
            raise ManifestError("owner", client, f"not expected to train in round {round_idx}")
        self._manifests[client] = manifest
        if set(self._manifests) == self._owners:
            return [self._start(now)]
        return []

    def _start(self, now: float) -> StartExchange:
        self.phase = Phase.EXCHANGING
        self._started_at = now
        self._deadline = now + self.timeout + self.report_grace
        ms = tuple(self._manifests[o] for o in sorted(self._manifests))
        return StartExchange(self.round, ms, self._participants, self.timeout)

    def on_report(self, client: int, report: CompletionReport, now: float) -> list[Action]:
        if not self._is_current("report", client, report.round):
            return []
        if client not in self._participants:
            raise ConfigError("client", client, f"not a participant of round {self.round}")
        if self.phase is not Phase.EXCHANGING:
            self.stale_messages += 1
            return []
        self._reports[client] = report
        if set(self._reports) >= set(self._participants):
            if all(r.complete for r in self._reports.values()):
                return [self._end(now, "complete")]
            return [self._judge(now, "partial")]
        return []

    def _judge(self, now: float, reason: str) -> RoundEnd:
        """End a round that did not fully complete: ``reason`` if enough
        clients completed, otherwise by the insufficient-completion policy."""
        done = sum(1 for r in self._reports.values() if r.complete)
        ratio = done / len(self._participants) if self._participants else 1.0
        if ratio >= self.min_completion_ratio:
            return self._end(now, reason)
        log.warning("coordinator: round %s: only %d/%d clients completed the exchange "
                    "(min_completion_ratio %.2f); policy %s", self.round, done,
                    len(self._participants), self.min_completion_ratio, self.insufficient_policy)
        return self._end(now, "insufficient", abort=self.insufficient_policy == "abort")

    def poll(self, now: float) -> list[Action]:
        """Deadline checks; call from the message loop whenever convenient."""
        if self._deadline is None or now < self._deadline:
            return []
        if self.phase is Phase.COLLECTING:
            if self._manifests:
                missing = sorted(self._owners - set(self._manifests))
                log.warning("coordinator: round %s: no manifest from clients %s by the deadline;"
                            " exchanging the %d that arrived", self.round, missing,
                            len(self._manifests))
                return [self._start(now)]
            return [self._end(now, "no manifests", abort=self.insufficient_policy == "abort")]
        if self.phase is Phase.EXCHANGING:
            return [self._judge(now, "deadline")]
        return []

    def _end(self, now: float, reason: str, abort: bool = False) -> RoundEnd:
        self.phase = Phase.DONE
        self._deadline = None
        return RoundEnd(self.round, reason, dict(self._reports), self._participants,
                        tuple(sorted(self._manifests)), now - self._started_at, abort)
