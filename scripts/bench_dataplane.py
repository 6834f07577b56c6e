"""Benchmark: the asyncio TCP data plane on unshaped loopback, one process.

n peers, each owning S MiB of random bytes, all-gather over a full mesh of
real TCP connections on 127.0.0.1 in one event loop.  Reports wall time
(first dial to last completion), aggregate goodput (verified payload bytes
received by all peers / wall time) and the machine.

    python scripts/bench_dataplane.py                      # 4 x 8 MiB and 8 x 2 MiB
    python scripts/bench_dataplane.py --case 16x4 --repeat 3 --block-kib 64

One process and one core carry every peer (hashing, encoding, decoding and
both ends of every socket), so this measures the host's CPU cost per byte,
not a network.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fs_bittorrent.core.config import KiB, MiB, SwarmConfig  # noqa: E402
from fs_bittorrent.core.layout import SwarmLayout  # noqa: E402
from fs_bittorrent.core.manifest import Manifest, TensorSpec  # noqa: E402
from fs_bittorrent.core.session import SwarmSession  # noqa: E402
from fs_bittorrent.core.storage import ContentPool, MemoryPieceStorage  # noqa: E402
from fs_bittorrent.net.dataplane import DataPlanePeer, connect_mesh  # noqa: E402


def make_owners(n: int, size: int, piece: int):
    out = {}
    for o in range(n):
        blob = random.Random(o).randbytes(size)
        pieces = [blob[i:i + piece] for i in range(0, size, piece)]
        m = Manifest(o, 0, size, piece, tuple(hashlib.sha256(p).digest() for p in pieces),
                     1, (TensorSpec("w", "U8", (size,), 0, size),))
        out[o] = (m, pieces, blob)
    return out


async def one_run(n: int, size: int, cfg: SwarmConfig, timeout: float) -> tuple[float, bool]:
    owners = make_owners(n, size, cfg.piece_size)
    layout = SwarmLayout(tuple(m for m, _, _ in owners.values()))
    peers, storages = [], []
    for pid, (m, pieces, _) in owners.items():
        st = MemoryPieceStorage(ContentPool(), verify=False)
        for k, d in enumerate(pieces):
            st.put(pid, k, m.piece_hashes[k], d)
        peers.append(DataPlanePeer(SwarmSession(pid, layout, st, cfg, secret=b"bench")))
        storages.append(st)
    for p in peers:
        await p.start()
    t0 = time.perf_counter()
    try:
        await connect_mesh(peers)
        ok = all(await asyncio.gather(*(p.run_until_complete(timeout) for p in peers)))
        wall = time.perf_counter() - t0
    finally:
        for p in peers:
            await p.close()
    if ok:  # bit-exact check, outside the timed region
        for st in storages:
            for o, (m, pieces, blob) in owners.items():
                assert b"".join(st.get(o, k) for k in range(m.num_pieces)) == blob
    return wall, ok


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu or 'unknown CPU'}, {os.cpu_count()} logical CPUs, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append",
                    help="NxS: N peers x S MiB each (repeatable; default 4x8 and 8x2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--piece-kib", type=int, default=256)
    ap.add_argument("--block-kib", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.lower().split("x")) for c in (args.case or ["4x8", "8x2"])]
    cfg = SwarmConfig(piece_size=args.piece_kib * KiB, block_size=args.block_kib * KiB,
                      max_block_size=max(128 * KiB, args.block_kib * KiB))
    print(f"machine: {machine()}")
    print(f"piece {args.piece_kib} KiB, block {args.block_kib} KiB, repeat {args.repeat}, "
          f"unshaped 127.0.0.1, one process / one event loop\n")
    print("| peers | MiB each | MiB moved | wall s (median) | wall s (min) | goodput MiB/s (median) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, s in cases:
        size = s * MiB
        moved = n * (n - 1) * size
        walls = []
        for _ in range(args.repeat):
            wall, ok = asyncio.run(one_run(n, size, cfg, args.timeout))
            if not ok:
                print(f"| {n} | {s} | {moved / MiB:.0f} | TIMEOUT | | |")
                break
            walls.append(wall)
        if walls:
            med = statistics.median(walls)
            print(f"| {n} | {s} | {moved / MiB:.0f} | {med:.3f} | {min(walls):.3f} | "
                  f"{moved / MiB / med:.1f} |")


if __name__ == "__main__":
    main()
