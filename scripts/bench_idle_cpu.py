"""Benchmark: CPU used by an idle distributed worker, fs_bittorrent vs plain FS.

FS's ``receive()`` spins on an empty queue while a worker waits; the
plugin's worker loop sleeps in epoll.  This starts a server expecting two
clients and one client (so both wait: the server for the second join, the
client for its first model), lets them settle, then reads their CPU time
from /proc over ``--seconds`` -- once with ``bittorrent.enable True`` and
once with plain FS, side by side in one run.

    python scripts/bench_idle_cpu.py [--seconds 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fs_bittorrent.launch import plan, start, stop_all  # noqa: E402

CFG = """
use_gpu: False
device: -1
seed: 1
federate:
  mode: distributed
  client_num: 2
  total_round_num: 1
data:
  type: toy
model:
  type: lr
trainer:
  type: general
eval:
  count_flops: False
outdir: {out}
"""
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS      # utime + stime


def measure(enable: bool, seconds: float, tmp: Path) -> dict[str, float]:
    cfg = tmp / f"idle_{enable}.yaml"
    cfg.write_text(CFG.format(out=tmp / f"out_{enable}"))
    opts = ["bittorrent.enable", str(enable)]
    parts = plan(str(cfg), 2, tmp / f"run_{enable}", opts)[:2]   # server + one client
    try:
        start(parts)
        client_log = parts[1].log_path
        end = time.monotonic() + 120
        while "is assigned with" not in client_log.read_text(errors="replace"):
            if time.monotonic() > end or any(p.proc.poll() is not None for p in parts):
                raise RuntimeError(f"client never joined; see {client_log}")
            time.sleep(0.2)
        time.sleep(2.0)                                  # let start-up work finish
        before = {p.role: cpu_seconds(p.proc.pid) for p in parts}
        time.sleep(seconds)
        after = {p.role: cpu_seconds(p.proc.pid) for p in parts}
        return {role: (after[role] - before[role]) / seconds for role in before}
    finally:
        stop_all(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    print(f"CPU share of one core while idle, over {a.seconds:g} s\n")
    with tempfile.TemporaryDirectory() as d:
        rows = {enable: measure(enable, a.seconds, Path(d)) for enable in (True, False)}
    print("| worker | fs_bittorrent | plain FS | ratio |")
    print("|---|---:|---:|---:|")
    for role in ("server", "client"):
        ours, fs = rows[True][role], rows[False][role]
        ratio = f"{fs / ours:,.0f}x" if ours > 0 else "inf"
        print(f"| {role} | {100 * ours:.2f}% | {100 * fs:.1f}% | {ratio} |")


if __name__ == "__main__":
    main()
