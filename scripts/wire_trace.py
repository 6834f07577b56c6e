"""Wire-level upload trace of shaped hosts: what each uplink carried, when.

Why: the exchange's round figures are taken in the clients' processes, so
they also hold every scheduling delay of a busy machine; the switch sees
the bytes as they leave each host's tbf.  ``launch_netns.py --wire-trace
FILE`` runs :func:`sample` inside the switch namespace for the whole run:
it reads ``rx_bytes`` of every switch port (port ``p<i>`` receives what
host ``i`` uploads; host 0 is the server) every ``interval`` seconds.
:func:`active_periods` then finds the exchanges (the clients' uplinks
busy, separated by training's silence) and :func:`summary_lines` reports,
for each, its length, the mean use of the clients' uplinks, and the first
and last bins (the ramp and the tail).  docs/benchmarks.md, "Seventh
session", shows what it told about the FS CNN's rounds.

``rx_bytes`` counts IP packets (no Ethernet header) and a GRO packet's
headers once, so a saturated uplink reads a little below its tbf rate
(about 0.95 of it at 1500-byte MTU with TCP timestamps).

    ip netns exec <switch> python3 scripts/wire_trace.py sample --out F --duration 600
    python3 scripts/wire_trace.py summary F --up 100 [--bin 0.02]
"""
from __future__ import annotations

import argparse
import bisect
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

MBIT = 1e6 / 8


def switch_ports(root: str = "/sys/class/net") -> list[str]:
    """The switch's host ports (``p0``, ``p1``, ...) in host order."""
    ports = [p for p in os.listdir(root) if p.startswith("p") and p[1:].isdigit()]
    return sorted(ports, key=lambda p: int(p[1:]))


def sample(out: str, interval: float = 0.002, duration: float = 600.0,
           root: str = "/sys/class/net") -> int:
    """Append ``time,bytes_p0,bytes_p1,...`` lines to ``out`` every
    ``interval`` seconds for at most ``duration`` seconds, or until SIGTERM.
    Returns the number of samples written."""
    ports = switch_ports(root)
    if not ports:
        raise SystemExit(f"wire_trace: no switch ports under {root}: run it inside the "
                         "switch namespace (ip netns exec <switch> ...)")
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _stop)
    files = [open(os.path.join(root, p, "statistics", "rx_bytes")) for p in ports]
    written = 0
    end = time.time() + duration
    try:
        with open(out, "w") as f:
            f.write("time," + ",".join(ports) + "\n")
            while not stop and time.time() < end:
                values = []
                for stat in files:
                    stat.seek(0)
                    values.append(stat.read().strip())
                f.write(f"{time.time():.4f}," + ",".join(values) + "\n")
                written += 1
                time.sleep(interval)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for stat in files:
            stat.close()
    return written


@dataclass
class Trace:
    ports: list[str]
    times: list[float]
    counts: list[list[int]]      # per sample, cumulative bytes per port

    def at(self, t: float) -> list[int]:
        """The cumulative bytes per port at the last sample at or before
        ``t`` (the first sample if none)."""
        i = bisect.bisect_right(self.times, t) - 1
        return self.counts[max(i, 0)]


def load(path: str) -> Trace:
    with open(path) as f:
        header = f.readline().strip().split(",")
        times, counts = [], []
        for line in f:
            fields = line.strip().split(",")
            if len(fields) != len(header):
                continue                       # a line cut short by the stop
            times.append(float(fields[0]))
            counts.append([int(x) for x in fields[1:]])
    if not times:
        raise ValueError(f"{path}: no samples")
    return Trace(header[1:], times, counts)


@dataclass
class Period:
    start: float
    end: float
    bins: list[float]            # mean use of the clients' uplinks per bin, 0..1


def active_periods(trace: Trace, up_mbit: Sequence[float], bin_s: float = 0.02,
                   busy: float = 0.01, gap: float = 0.2,
                   clients: Optional[Sequence[int]] = None) -> list[Period]:
    """Stretches where the clients' uplinks (ports ``clients``, default all
    but port 0, the server) carry more than ``busy`` of their capacity (1 %:
    a round's tail is often one block at a time to the last client, and a
    higher mark cut it off), merged across gaps shorter than ``gap``
    seconds; each with its per-bin use (bytes / (rate x bin), averaged over
    the clients)."""
    ports = list(clients) if clients is not None else list(range(1, len(trace.ports)))
    capacity = sum(up_mbit[p] * MBIT for p in ports)
    t, end = trace.times[0], trace.times[-1]
    starts: list[float] = []
    use: list[float] = []
    before = trace.at(t)
    while t + bin_s <= end:
        after = trace.at(t + bin_s)
        starts.append(t)
        use.append(sum(after[p] - before[p] for p in ports) / (capacity * bin_s))
        before, t = after, t + bin_s
    periods: list[Period] = []
    current: Optional[Period] = None
    idle_from: Optional[int] = None           # first quiet bin since the last busy one
    for k, u in enumerate(use):
        if u > busy:
            if current is None:
                current = Period(starts[k], starts[k] + bin_s, [])
            elif idle_from is not None:
                current.bins.extend(use[idle_from:k])   # a short pause inside it
            current.bins.append(u)
            current.end = starts[k] + bin_s
            idle_from = None
        elif current is not None:
            if idle_from is None:
                idle_from = k
            if starts[k] + bin_s - starts[idle_from] >= gap:
                periods.append(current)
                current, idle_from = None, None
    if current is not None:
        periods.append(current)
    return periods


def summary_lines(periods: Sequence[Period], bin_s: float, edge: int = 4) -> list[str]:
    lines = [f"| period | length s | mean use | first {edge} bins | last {edge} bins |",
             "|---:|---:|---:|---|---|"]
    for k, p in enumerate(periods):
        mean = sum(p.bins) / len(p.bins)
        first = " ".join(f"{x:.2f}" for x in p.bins[:edge])
        last = " ".join(f"{x:.2f}" for x in p.bins[-edge:])
        lines.append(f"| {k} | {p.end - p.start:.3f} | {mean:.3f} | {first} | {last} |")
    lines.append(f"(use of the clients' uplinks per {bin_s * 1000:g} ms bin; rx_bytes reads "
                 "~0.95 of a saturated tbf rate)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="inside the switch namespace: record rx_bytes")
    s.add_argument("--out", required=True)
    s.add_argument("--interval", type=float, default=0.002)
    s.add_argument("--duration", type=float, default=600.0)
    m = sub.add_parser("summary", help="the exchanges found in a trace")
    m.add_argument("trace")
    m.add_argument("--up", type=float, required=True, help="Mbit/s upload per host")
    m.add_argument("--bin", type=float, default=0.02)
    a = ap.parse_args(argv)
    if a.cmd == "sample":
        sample(a.out, a.interval, a.duration)
        return 0
    trace = load(a.trace)
    periods = active_periods(trace, [a.up] * len(trace.ports), a.bin)
    print("\n".join(summary_lines(periods, a.bin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
