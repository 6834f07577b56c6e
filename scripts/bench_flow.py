"""Benchmark: the flow-level simulator against the block-level one, side by side.

n clients, each sharing --model-mb MB of random bytes in 256 KiB pieces, on
a named link scenario (fs_bittorrent/sim/scenarios.py).  For each level it
prints the virtual exchange time, the CPU and wall time the simulation took,
the peak RSS of the process, and the error of the flow level against the
block level (exchange time, per-client completion times, completion order
as Spearman's rank correlation).

    python scripts/bench_flow.py --clients 16 --model-mb 8 --scenarios uniform half_slow
    python scripts/bench_flow.py --levels block --jsonl out.jsonl ...   # one level per process

Each level runs in its own process (--levels one at a time with --jsonl)
when peak RSS matters: ru_maxrss is a per-process high-water mark.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_exchange import owners  # noqa: E402  (the same random-byte owners)
from fs_bittorrent.core.config import SwarmConfig  # noqa: E402
from fs_bittorrent.sim.scenarios import SCENARIOS, scenario  # noqa: E402
from fs_bittorrent.sim.swarm import build_swarm, lower_bound  # noqa: E402


def run_level(level: str, own, links, piece: int, deadline):
    cfg = SwarmConfig(piece_size=piece)
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    if level == "block":
        swarm = build_swarm(own, cfg, links, seed=0)
        r = swarm.run(until=36000, deadline=deadline)
        completed = r.completed_at
        completion = r.completion
        virtual = r.virtual_time
        events = r.events
    else:
        from fs_bittorrent.sim.flow import FlowSwarm
        manifests = [m for m, _ in own.values()]
        fr = FlowSwarm(manifests, links, cfg, seed=0).run(deadline=deadline)
        completed = fr.completed_at
        completion = fr.completion
        virtual = fr.end_time
        events = fr.events
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"level": level, "virtual": virtual, "wall": wall, "cpu": cpu, "events": events,
            "completed_at": {str(k): v for k, v in completed.items()},
            "completion": {str(k): v for k, v in completion.items()},
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spearman(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k] is not None and b.get(k) is not None]
    if len(keys) < 2:
        return 1.0
    def ranks(d):
        order = sorted(keys, key=lambda k: (d[k], int(k)))
        return {k: r for r, k in enumerate(order)}
    ra, rb = ranks(a), ranks(b)
    n = len(keys)
    d2 = sum((ra[k] - rb[k]) ** 2 for k in keys)
    return 1 - 6 * d2 / (n * (n * n - 1))


def compare(block: dict, flow: dict) -> dict:
    rel = (flow["virtual"] - block["virtual"]) / block["virtual"]
    per = [abs(flow["completed_at"][k] - v) / v for k, v in block["completed_at"].items()
           if v and flow["completed_at"].get(k)]
    return {"time_error": rel, "max_client_error": max(per, default=0.0),
            "mean_client_error": sum(per) / len(per) if per else 0.0,
            "order_spearman": spearman(block["completed_at"], flow["completed_at"]),
            "cpu_ratio": block["cpu"] / flow["cpu"] if flow["cpu"] else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model-mb", type=float, default=8.0)
    ap.add_argument("--piece-kib", type=int, default=256)
    ap.add_argument("--scenarios", nargs="+", default=["uniform"], choices=list(SCENARIOS))
    ap.add_argument("--levels", nargs="+", default=["block", "flow"], choices=["block", "flow"])
    ap.add_argument("--deadline", type=float, default=None)
    ap.add_argument("--jsonl", default=None, help="append one JSON record per level here")
    a = ap.parse_args()
    size, piece = int(a.model_mb * 1e6), a.piece_kib * 1024
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    print(f"{a.clients} clients x {a.model_mb:g} MB in {a.piece_kib} KiB pieces\n", flush=True)
    own = owners(a.clients, size, piece)
    for name in a.scenarios:
        links = scenario(name, a.clients)
        t_lb = lower_bound({o: m.total_size for o, (m, _) in own.items()}, links)
        results = {}
        for level in a.levels:
            r = run_level(level, own, links, piece, a.deadline)
            r.update(scenario=name, clients=a.clients, model_mb=a.model_mb, t_lb=t_lb)
            results[level] = r
            print(f"{name:13s} {level:5s} T {r['virtual']:9.3f} s  T_LB {t_lb:8.3f}  "
                  f"cpu {r['cpu']:7.1f} s  wall {r['wall']:7.1f} s  events {r['events']:>9}  "
                  f"maxrss {r['maxrss_mb']:.0f} MB", flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
        if len(results) == 2:
            c = compare(results["block"], results["flow"])
            print(f"{name:13s} flow vs block: T error {100 * c['time_error']:+.2f} %, "
                  f"client completion error mean {100 * c['mean_client_error']:.2f} % "
                  f"max {100 * c['max_client_error']:.2f} %, order rho "
                  f"{c['order_spearman']:.3f}, cpu ratio {c['cpu_ratio']:.0f}x", flush=True)


if __name__ == "__main__":
    main()
