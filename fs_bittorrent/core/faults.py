"""Seeded fault injection: what happens to one message on its way (sans-IO).

Every host that moves peer messages can inject the same faults from the same
knobs: the simulator (``sim/network.py``), the FederatedScope standalone
runner (``bittorrent.faults`` in the config) and the distributed data plane.
This module only *decides*; the host carries the decision out, because only
the host knows how a message travels, how a connection is cut and how a
client dies.

``Faults`` holds the knobs (validated at construction: a bad value is a
``ConfigError`` naming ``faults.<key>`` and the value).  ``FaultDecider``
draws from one seeded ``random.Random``, so a run is reproducible for a
seed.  Per message, :meth:`FaultDecider.decide` returns a
:class:`FaultDecision`:

=============== ==================================================================
fault           what the host does with the message
=============== ==================================================================
``drop``        never delivers it
``duplicate``   delivers it twice
``reorder``     adds ``uniform(0, reorder_delay)`` seconds to this one message, so
                later messages may overtake it (:meth:`FaultDecider.reorder_jitter`,
                drawn per copy by hosts that model links)
``corrupt``     flips one byte of a piece block (:func:`flip_byte`); other messages
                pass untouched
``delay``       holds it back ``uniform(0, delay_max)`` seconds before sending: a
                stall long enough to hit request timeouts and late arrivals
``disconnect``  cuts the connection the message was sent on (the message is lost);
                the lower id redials after ``reconnect_after`` seconds
=============== ==================================================================

``crash_clients`` / ``crash_round`` / ``crash_at`` are not per message: in
round ``crash_round``, ``crash_at`` seconds after the exchange started, each
listed client's exchange dies (no goodbye to its peers, no report, its
in-memory swarm state lost; verified pieces already in its store survive).
It restarts for the next round.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Any, Union

from ..errors import ConfigError

__all__ = ["Faults", "FaultDecision", "FaultDecider", "PASS", "PROBABILITIES", "flip_byte"]

#: knobs that are per-message probabilities in [0, 1]
PROBABILITIES = ("drop", "duplicate", "reorder", "corrupt", "delay", "disconnect")
#: knobs that are durations in seconds (>= 0)
DURATIONS = ("reorder_delay", "delay_max", "reconnect_after", "crash_at")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Faults:
    """Per-message fault probabilities (0 = off), their magnitudes, and crashes."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.05     # seconds: maximum extra delay of a reordered message
    corrupt: float = 0.0
    delay: float = 0.0
    delay_max: float = 2.0          # seconds: maximum stall of a delayed message
    disconnect: float = 0.0
    reconnect_after: float = 1.0    # seconds from a cut to the redial
    crash_clients: tuple = ()       # ids whose exchange dies in round crash_round
    crash_round: int = 0
    crash_at: float = 0.0           # seconds after that round's exchange started

    def __post_init__(self) -> None:
        for name in PROBABILITIES:
            v = getattr(self, name)
            if not _is_num(v) or not 0.0 <= v <= 1.0:   # NaN fails both comparisons
                raise ConfigError(f"faults.{name}", v, "must be a probability in [0, 1]")
        for name in DURATIONS:
            v = getattr(self, name)
            if not _is_num(v) or not 0.0 <= v < math.inf:
                raise ConfigError(f"faults.{name}", v, "must be a number of seconds >= 0")
        ids = self.crash_clients
        if isinstance(ids, list):
            ids = tuple(ids)
            object.__setattr__(self, "crash_clients", ids)
        if not isinstance(ids, tuple) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ConfigError("faults.crash_clients", self.crash_clients,
                              "must be a list of client ids (ints >= 0)")
        if len(set(ids)) != len(ids):
            raise ConfigError("faults.crash_clients", ids, "lists a client twice")
        if not _is_int(self.crash_round) or self.crash_round < 0:
            raise ConfigError("faults.crash_round", self.crash_round, "must be an int >= 0")

    @property
    def any(self) -> bool:
        """True if any per-message fault is on (crashes are not per message)."""
        return bool(self.drop or self.duplicate or self.reorder or self.corrupt or self.delay
                    or self.disconnect)

    def crashes_in(self, round_idx: int) -> tuple:
        """The clients whose exchange dies in ``round_idx``."""
        return self.crash_clients if round_idx == self.crash_round else ()

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(getattr(self, f.name)) if f.name == "crash_clients"
                         else getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class FaultDecision:
    """What to do to one message.  ``PASS`` (nothing) is shared, not rebuilt."""

    drop: bool = False
    copies: int = 1
    corrupt: bool = False
    delay: float = 0.0
    disconnect: bool = False


PASS = FaultDecision()
_DROP = FaultDecision(drop=True, copies=0)
_DISCONNECT = FaultDecision(drop=True, copies=0, disconnect=True)


class FaultDecider:
    """Seeded per-message decisions for one host.

    ``seed`` is an int or string seed, or a ``random.Random`` to share (the
    simulator shares its network's generator, so its draws, and therefore
    its runs, stay what they were before the faults moved here).

    Draw order per message (each only when its knob is on): disconnect, drop,
    duplicate, corrupt (only for messages the host can corrupt), delay.
    """

    def __init__(self, faults: Faults = Faults(),
                 seed: Union[int, str, random.Random] = 0) -> None:
        if not isinstance(faults, Faults):
            raise ConfigError("faults", faults, "must be a Faults")
        self.faults = faults
        self.rng = seed if isinstance(seed, random.Random) else random.Random(seed)

    @property
    def active(self) -> bool:
        return self.faults.any

    def decide(self, corruptible: bool = True) -> FaultDecision:
        f = self.faults
        r = self.rng.random
        if f.disconnect and r() < f.disconnect:
            return _DISCONNECT
        if f.drop and r() < f.drop:
            return _DROP
        copies = 2 if f.duplicate and r() < f.duplicate else 1
        corrupt = bool(corruptible and f.corrupt and r() < f.corrupt)
        delay = 0.0
        if f.delay and r() < f.delay:
            delay = r() * f.delay_max
        if copies == 1 and not corrupt and not delay:
            return PASS
        return FaultDecision(copies=copies, corrupt=corrupt, delay=delay)

    def reorder_jitter(self) -> float:
        """Extra seconds for one copy of a message (0.0: in order)."""
        f = self.faults
        if f.reorder and self.rng.random() < f.reorder:
            return self.rng.random() * f.reorder_delay
        return 0.0

    def corrupt_bytes(self, data) -> bytes:
        return flip_byte(data, self.rng)


def flip_byte(data, rng: random.Random) -> bytes:
    """A copy of ``data`` with one byte (at a seeded position) inverted.
    Never mutates ``data``: a piece block may be a view of stored bytes."""
    out = bytearray(data)
    if out:
        out[rng.randrange(len(out))] ^= 0xFF
    return bytes(out)
