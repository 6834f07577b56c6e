"""A progress bar per exchange round: pieces gathered across the swarm.

Quiet when stderr is not a terminal or under CI, so logs and CI output stay
clean; pass ``enabled=True`` (and a ``file``) to force it, or set the
environment variable ``FS_BITTORRENT_PROGRESS`` to 1 (on) or 0 (off) --
handy for distributed runs whose output goes to log files.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Optional

from tqdm import tqdm

PROGRESS_ENV = "FS_BITTORRENT_PROGRESS"


class SwarmProgress:
    def __init__(self, enabled: Optional[bool] = None, file: Optional[IO[str]] = None) -> None:
        forced = os.environ.get(PROGRESS_ENV, "")
        if enabled is None and forced in ("0", "1"):
            enabled = forced == "1"
        if enabled is None:
            enabled = sys.stderr.isatty() and not os.environ.get("CI")
        self.enabled = enabled
        self.file = file if file is not None else sys.stderr
        self._bars: dict[int, tqdm] = {}

    def start(self, round_idx: int, needed: int) -> None:
        """A client joined round ``round_idx``'s exchange needing ``needed`` pieces."""
        if not self.enabled:
            return
        bar = self._bars.get(round_idx)
        if bar is None:
            bar = tqdm(total=0, desc=f"round {round_idx} exchange", unit="piece",
                       file=self.file, leave=True, dynamic_ncols=True)
            self._bars[round_idx] = bar
        bar.total += needed
        bar.refresh()

    def advance(self, round_idx: int, pieces: int) -> None:
        bar = self._bars.get(round_idx)
        if bar is not None and pieces > 0:
            bar.update(pieces)

    def finish(self, round_idx: int) -> None:
        bar = self._bars.pop(round_idx, None)
        if bar is not None:
            bar.close()

    def close(self) -> None:
        for r in list(self._bars):
            self.finish(r)
