"""Rate-limited warnings: an attack must show in the log while it happens,
without the log becoming the attack's amplifier.

:class:`RateLimitedWarnings` counts events by kind.  The first event logs
at once; later ones are summed and logged at most once per ``interval``
seconds ("refused 412 connections in the last 5.0 s: cap 400, handshake
timeout 12; last: ..."), with a timer so that the tail of a burst is
reported even if nothing else happens.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable, Optional

__all__ = ["RateLimitedWarnings"]


class RateLimitedWarnings:
    def __init__(self, logger: logging.Logger, prefix: str, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.prefix = prefix
        self.interval = interval
        self.clock = clock
        self.totals: Counter = Counter()           # every event since start
        self._window: Counter = Counter()          # events not logged yet
        self._last_detail = ""
        self._window_start: Optional[float] = None
        self._next_at = float("-inf")
        self._timer: Optional[asyncio.TimerHandle] = None
        self.emitted = 0                           # warnings written (for tests)

    def note(self, kind: str, detail: str = "") -> None:
        """One event of ``kind`` (e.g. ``"cap"``, ``"handshake timeout"``)."""
        self.totals[kind] += 1
        self._window[kind] += 1
        if detail:
            self._last_detail = detail
        now = self.clock()
        if self._window_start is None:
            self._window_start = now
        if now >= self._next_at:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(max(0.0, self._next_at - now), self.flush)

    def flush(self) -> None:
        """Log what was counted since the last warning (if anything)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._window:
            return
        now = self.clock()
        span = now - (self._window_start if self._window_start is not None else now)
        total = sum(self._window.values())
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self._window.items()))
        self.log.warning("%s: refused %d connection(s) in the last %.1fs (%s); last: %s",
                         self.prefix, total, span, kinds, self._last_detail or "-")
        self.emitted += 1
        self._window.clear()
        self._window_start = None
        self._next_at = now + self.interval

    def close(self) -> None:
        """Write what is pending and stop the timer (host shutdown)."""
        self.flush()
