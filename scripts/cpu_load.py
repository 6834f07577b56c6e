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

Per process (:class:`ProcessCpuSampler`): the CPU seconds (user + system,
all threads) each participant used during a round's exchange.  Why: the
FS CNN's exchange is CPU-bound on a small machine (docs/benchmarks.md,
tenth session: about 230 ms per client and exchange), and a change that
saves CPU shows there directly, where η moves within its noise.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

__all__ = ["CpuSample", "CpuSampler", "load_during", "parse_cpu_line",
           "ProcSample", "ProcessCpuSampler", "cpu_during", "parse_proc_stat"]

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


class _PeriodicSampler:
    """A sampling thread run from :meth:`start` to :meth:`stop`, every
    ``period`` seconds (bounded: it stops by itself after ``max_seconds``);
    subclasses fill ``samples`` in ``_run``."""

    thread_name = "sampler"

    def __init__(self, period: float = 0.05, max_seconds: float = 7200.0) -> None:
        if not period > 0:
            raise ValueError(f"period: {period!r} must be > 0")
        self.period = period
        self.max_seconds = max_seconds
        self.samples: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class CpuSampler(_PeriodicSampler):
    """Samples the machine's load (:class:`CpuSample`) every ``period``
    seconds in a thread, from :meth:`start` to :meth:`stop`."""

    thread_name = "cpu-load"

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


# ---- per process ----------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcSample:
    """Cumulative CPU seconds (user + system) per labelled process at ``time``."""

    time: float
    cpu: dict = field(default_factory=dict)      # label -> seconds


def parse_proc_stat(text: str) -> float:
    """CPU seconds (utime + stime, every thread) from a ``/proc/<pid>/stat``
    line.  The command name may hold spaces and parentheses, so the fields
    are counted after its last ``)``.  Raises ``ValueError`` naming the line
    if it is not one."""
    rpar = text.rfind(")")
    fields = text[rpar + 2:].split() if rpar > 0 else []
    if len(fields) < 13 or not fields[11].isdigit() or not fields[12].isdigit():
        raise ValueError(f"/proc/<pid>/stat: {text.strip()[:80]!r} is not a stat line "
                         "(pid (comm) state ppid ... utime stime ...)")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _cmdline(pid: str) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


class ProcessCpuSampler(_PeriodicSampler):
    """Samples the CPU time of the processes ``label_of(cmdline)`` names
    (None: not one of ours) every ``period`` seconds in a thread, looking
    for new ones every ``discover_every`` seconds; bounded by
    ``max_seconds``.  A label names one process: include the pid where
    several processes play one role."""

    thread_name = "proc-cpu"

    def __init__(self, label_of: Callable[[str, int], Optional[str]], period: float = 0.05,
                 discover_every: float = 0.5, max_seconds: float = 7200.0) -> None:
        super().__init__(period, max_seconds)
        self.label_of = label_of
        self.discover_every = discover_every
        self._pids: dict[str, str] = {}          # pid -> label

    def discover(self) -> None:
        for pid in os.listdir("/proc"):
            if pid.isdigit() and pid not in self._pids:
                cmd = _cmdline(pid)
                label = self.label_of(cmd, int(pid)) if cmd else None
                if label is not None:
                    self._pids[pid] = label

    def sample(self) -> ProcSample:
        cpu = {}
        for pid, label in list(self._pids.items()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    cpu[label] = parse_proc_stat(f.read())
            except (OSError, ValueError):
                del self._pids[pid]                 # gone (or reused by another process)
        return ProcSample(time.time(), cpu)

    def _run(self) -> None:
        t0 = last_discovery = time.time()
        self.discover()
        while time.time() - t0 < self.max_seconds:
            if time.time() - last_discovery >= self.discover_every:
                self.discover()
                last_discovery = time.time()
            self.samples.append(self.sample())
            if self._stop.wait(self.period):
                return


def cpu_during(samples: Sequence[ProcSample], start: float,
               seconds: float) -> Optional[dict]:
    """CPU seconds each label used over ``[start, start + seconds]``, its
    cumulative CPU interpolated linearly at both ends between the samples
    around them; None when no sample lies at or before the start and at or
    after the end (the sampler did not cover the window).  A label missing
    at either end is left out."""
    if not seconds > 0:
        raise ValueError(f"seconds: {seconds!r} must be > 0")
    end = start + seconds
    if not samples or samples[0].time > start or samples[-1].time < end:
        return None

    times = [s.time for s in samples]

    def at(t: float) -> dict:
        i = min(max(bisect.bisect_right(times, t), 1), len(samples) - 1)
        a, b = samples[i - 1], samples[i]
        w = (t - a.time) / (b.time - a.time) if b.time > a.time else 1.0
        return {k: a.cpu[k] + w * (b.cpu[k] - a.cpu[k]) for k in a.cpu if k in b.cpu}

    lo, hi = at(start), at(end)
    return {k: hi[k] - lo[k] for k in lo if k in hi}
