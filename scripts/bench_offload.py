"""Benchmark: the cost of training in a worker thread instead of on the event loop.

A distributed client runs FS's training handler in a thread
(``fs_bittorrent.fs.distributed.run_offloaded``) so its data plane keeps
accepting, refusing and timing out connections meanwhile.  This measures
what that costs the training itself: the same fixed number of SGD steps of a
convnet2-sized CNN (FS's ``convnet2`` shape: 2 conv + 2 linear layers,
~1.7 MB of weights, 32x32x3 images, batch 32), run

* ``inline``  -- on the event loop, as before (the loop is blocked);
* ``thread``  -- in the worker thread while the loop serves an idle TLS
  data plane;
* ``thread+flood`` -- in the worker thread while silent connections keep
  arriving at the data plane (accepted, capped, timed out).

Alternating runs, median of ``--repeat``; torch uses one intra-op thread
(as FS's clients do under ``OMP_NUM_THREADS=1`` on a shared 2-core box).

    python scripts/bench_offload.py --steps 60 --repeat 5
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_model():
    import torch
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 96), nn.ReLU(), nn.Linear(96, 10)), torch


def train(steps: int) -> float:
    """``steps`` SGD steps; returns the wall seconds they took."""
    model, torch = make_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0


async def flood(port: int, stop: asyncio.Event) -> int:
    """Silent connections, one every 5 ms, each held until the plane drops it."""
    n = 0
    writers = []
    while not stop.is_set():
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            writers.append(w)
            n += 1
        except OSError:
            pass
        if len(writers) > 50:
            writers.pop(0).close()
        await asyncio.sleep(0.005)
    for w in writers:
        w.close()
    return n


async def one(mode: str, steps: int, pool) -> tuple[float, dict]:
    from fs_bittorrent.net.round_dataplane import RoundDataPlane
    from fs_bittorrent.net.tls import LocalIdentity

    plane = RoundDataPlane(object(), handshake_timeout=0.5, identity=LocalIdentity.generate(),
                           max_pending=16, max_pending_per_address=16)
    await plane.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    flooder = loop.create_task(flood(plane.port, stop)) if mode == "thread+flood" else None
    try:
        if mode == "inline":
            seconds = train(steps)
        else:
            seconds = await loop.run_in_executor(pool, train, steps)
    finally:
        stop.set()
        if flooder is not None:
            await flooder
        await plane.close()
    st = plane.stats
    return seconds, {"accepted": st.connections_accepted, "capped": st.connections_capped,
                     "timeouts": st.handshake_timeouts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    modes = ("inline", "thread", "thread+flood")
    times: dict = {m: [] for m in modes}
    extra: dict = {}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        train(5)                                    # warm-up
        for _ in range(args.repeat):
            for m in modes:
                t, info = asyncio.run(one(m, args.steps, pool))
                times[m].append(t)
                extra[m] = info
    finally:
        pool.shutdown()
    base = statistics.median(times["inline"])
    print(f"{args.steps} SGD steps of a convnet2-sized CNN, batch 32, median of {args.repeat}")
    print("| mode | train s (median) | min–max | vs inline | data plane during the last run |")
    print("|---|---:|---:|---:|---|")
    for m in modes:
        med = statistics.median(times[m])
        print(f"| {m} | {med:.3f} | {min(times[m]):.3f}–{max(times[m]):.3f} | "
              f"{med / base:.3f} | {extra[m]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
