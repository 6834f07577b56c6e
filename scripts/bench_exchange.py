"""Benchmark: virtual-time efficiency and simulation cost of one exchange round.

n clients, each sharing a model of --model-mb MB (pieces of 256 KiB) over
uniform links (--mbit up and down, 5 ms latency).  Reports, per n, the
exchange time in virtual seconds, the all-gather lower bound T_LB
(shared/GUIDE.md section 3), eta = T_LB / T, and the wall and CPU time the
simulator took (on a busy machine wall time also counts waiting for a core),
side by side in one run.

    python scripts/bench_exchange.py [--clients 4 16 64] [--model-mb 2] [--mbit 100]
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fs_bittorrent.core.config import SwarmConfig  # noqa: E402
from fs_bittorrent.core.manifest import Manifest, TensorSpec  # noqa: E402
from fs_bittorrent.sim.network import LinkProfile  # noqa: E402
from fs_bittorrent.sim.swarm import build_swarm, lower_bound  # noqa: E402


def owners(n: int, size: int, piece: int):
    out = {}
    for o in range(1, n + 1):
        blob = random.Random(o).randbytes(size)
        pieces = [blob[i:i + piece] for i in range(0, size, piece)]
        m = Manifest(o, 0, size, piece, tuple(hashlib.sha256(p).digest() for p in pieces), 1,
                     (TensorSpec("w", "U8", (size,), 0, size),))
        out[o] = (m, pieces)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--model-mb", type=float, default=2.0)
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--piece-kib", type=int, default=256)
    a = ap.parse_args()
    size = int(a.model_mb * 1e6)
    piece = a.piece_kib * 1024
    link = LinkProfile(up=a.mbit * 1e6 / 8, down=a.mbit * 1e6 / 8, latency=0.005)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, Python {platform.python_version()}")
    print(f"{a.model_mb:g} MB per client in {piece // 1024} KiB pieces, {a.mbit:g} Mbit/s up and "
          f"down, 5 ms latency\n")
    print("| clients | T virtual s | T_LB s | eta | wall s | cpu s | events | events/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in a.clients:
        own = owners(n, size, piece)
        t_lb = lower_bound({o: m.total_size for o, (m, _) in own.items()}, {o: link for o in own})
        swarm = build_swarm(own, SwarmConfig(piece_size=piece), link, seed=0)
        gc.collect()  # the previous, smaller swarm is garbage (sessions hold cycles)
        t0, c0 = time.perf_counter(), time.process_time()
        r = swarm.run(until=36000)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert r.complete
        print(f"| {n} | {r.virtual_time:.3f} | {t_lb:.3f} | {t_lb / r.virtual_time:.3f} | "
              f"{wall:.1f} | {cpu:.1f} | {r.events} | {r.events / wall:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
