"""The machine's CPU load over time, from ``/proc/stat``, for benchmark reports.

Why: on the benchmark machine (2 vCPUs for a server and 8 clients) the FS
CNN's exchange keeps the CPUs 60-85 % busy, and the same code's round
times move with that load and with *steal* (time the hypervisor gave our
vCPUs to someone else).  A round's η means little without them, so
``launch_netns.py`` samples both while its runs go and prints their mean
over each round's exchange, from the server's ``started_wall`` for
``exchange_time`` seconds.

Fractions are of all CPUs together: busy = user + nice + system + irq +
softirq, steal = steal, both over the total of the first eight fields
(guest time is already counted in user).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ["CpuSample", "CpuSampler", "load_during", "parse_cpu_line"]

PROC_STAT = "/proc/stat"


@dataclass(frozen=True)
class CpuSample:
    """The load over the interval ``(start, end]`` (Unix seconds)."""

    start: float
    end: float
    busy: float
    steal: float


def parse_cpu_line(line: str) -> tuple[int, int, int]:
    """``(total, idle, steal)`` jiffies from the aggregate ``cpu`` line of
    ``/proc/stat``.  Raises ``ValueError`` naming the line if it is not one."""
    fields = line.split()
    if len(fields) < 9 or fields[0] != "cpu" or not all(f.isdigit() for f in fields[1:9]):
        raise ValueError(f"/proc/stat: {line.strip()!r} is not the aggregate 'cpu' line "
                         "(cpu user nice system idle iowait irq softirq steal ...)")
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
    return user + nice + system + idle + iowait + irq + softirq + steal, idle + iowait, steal


def _read() -> tuple[int, int, int]:
    with open(PROC_STAT) as f:
        return parse_cpu_line(f.readline())


class CpuSampler:
    """Samples the machine's load every ``period`` seconds in a thread, from
    :meth:`start` to :meth:`stop` (bounded: it stops by itself after
    ``max_seconds``)."""

    def __init__(self, period: float = 0.05, max_seconds: float = 7200.0) -> None:
        if not period > 0:
            raise ValueError(f"period: {period!r} must be > 0")
        self.period = period
        self.max_seconds = max_seconds
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "CpuSampler":
        self._thread = threading.Thread(target=self._run, name="cpu-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        t0 = last_t = time.time()
        last = _read()
        while not self._stop.wait(self.period) and time.time() - t0 < self.max_seconds:
            now, cur = time.time(), _read()
            total = cur[0] - last[0]
            if total > 0:
                idle, steal = cur[1] - last[1], cur[2] - last[2]
                self.samples.append(CpuSample(last_t, now, (total - idle - steal) / total,
                                              steal / total))
            last_t, last = now, cur


def load_during(samples: Sequence[CpuSample], start: float,
                seconds: float) -> Optional[tuple[float, float]]:
    """Mean ``(busy, steal)`` over ``[start, start + seconds]``, each sample
    weighted by its overlap with the window; None when the samples cover
    less than half of it (the sampler was not running then)."""
    if not seconds > 0:
        raise ValueError(f"seconds: {seconds!r} must be > 0")
    end = start + seconds
    covered = busy = steal = 0.0
    for s in samples:
        overlap = min(s.end, end) - max(s.start, start)
        if overlap > 0:
            covered += overlap
            busy += s.busy * overlap
            steal += s.steal * overlap
    if covered < seconds / 2:
        return None
    return busy / covered, steal / covered
