"""Benchmark: exchange efficiency on heterogeneous networks, side by side for
several source trees (issue 12).

One all-gather round on the deterministic simulator per cell: n clients, each
sharing --mb MB in 256 KiB pieces, under one of the scenarios below.  Each
tree runs in its own subprocess with that tree first on ``sys.path``, so the
table compares e.g. today's code with an older checkout in one run:

    git archive 4303b71 | tar -x -C /tmp/base      # the code before issue 12
    python scripts/bench_hetero.py --tree /tmp/base --tree . --clients 8 16 32 --mb 2 20

Columns per tree: virtual exchange time T, eta = T_LB / T (bandwidth bound,
shared/GUIDE.md section 3), and eta_lat = T_LB,lat / T (the latency-aware
bound of sim/swarm.py ``lower_bound_latency``, when the tree has it), plus
the slowest owner's bytes uploaded per round as a multiple of its share.

Scenarios (Mbit/s, one-way latency 5 ms unless stated):
  uniform       100 up / 100 down
  half_slow     half the uplinks 10 (10x slower), the rest 100; downlinks 100
  one_slow      one uplink 5 (20x slower), the rest 100; downlinks 100
  fast_quarter  a quarter of the uplinks 100, the rest 10 (10x slower); downlinks 100
  lognormal     uplinks lognormal(ln 100, 0.8) (median 100, seeded), downlinks 100
  asym          10 up / 100 down
  lat50, lat100 uniform 100/100 with 50 ms / 100 ms one-way latency
  <bw>_lat50, <bw>_lat100  heterogeneous and far apart: the uplinks of the
                bandwidth scenario <bw> (half_slow, one_slow, fast_quarter,
                lognormal) with 50 ms / 100 ms one-way latency everywhere

--tree takes a path or name=path (the name heads the table's columns).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time

BANDWIDTH = ("uniform", "half_slow", "one_slow", "fast_quarter", "lognormal", "asym")
HETERO = ("half_slow", "one_slow", "fast_quarter", "lognormal")
COMBINED = tuple(f"{bw}_lat{ms}" for ms in (50, 100) for bw in HETERO)
SCENARIOS = BANDWIDTH + ("lat50", "lat100") + COMBINED


def links_mbit(scenario: str, n: int) -> list[tuple[float, float, float]]:
    """(up Mbit/s, down Mbit/s, one-way latency s) per client, client 1 first."""
    if scenario == "uniform":
        return [(100.0, 100.0, 0.005)] * n
    if scenario == "half_slow":
        return [(10.0 if i % 2 else 100.0, 100.0, 0.005) for i in range(n)]
    if scenario == "one_slow":
        return [(5.0 if i == n // 2 else 100.0, 100.0, 0.005) for i in range(n)]
    if scenario == "fast_quarter":
        return [(100.0 if i % 4 == 0 else 10.0, 100.0, 0.005) for i in range(n)]
    if scenario == "lognormal":
        rng = random.Random(12)
        return [(rng.lognormvariate(math.log(100.0), 0.8), 100.0, 0.005) for _ in range(n)]
    if scenario == "asym":
        return [(10.0, 100.0, 0.005)] * n
    if scenario in ("lat50", "lat100"):
        return [(100.0, 100.0, int(scenario[3:]) / 1000)] * n
    if scenario in COMBINED:
        bw, ms = scenario.rsplit("_lat", 1)
        return [(up, down, int(ms) / 1000) for up, down, _ in links_mbit(bw, n)]
    raise SystemExit(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")


def tree_path(tree: str) -> str:
    """``name=path`` or a bare path: the path."""
    return tree.split("=", 1)[1] if "=" in tree else tree


def tree_name(tree: str) -> str:
    """``name=path``: the name; a bare path: its last component."""
    return tree.split("=", 1)[0] if "=" in tree else \
        os.path.basename(os.path.abspath(tree)) or tree


def run_cell(scenario: str, n: int, mb: float, piece: int, kept: bool = False) -> dict:
    """One round in this process (whatever tree is first on sys.path)."""
    from fs_bittorrent.core.config import SwarmConfig
    from fs_bittorrent.sim import swarm as sim_swarm
    from fs_bittorrent.sim.network import LinkProfile
    # After fs_bittorrent is imported from the measured tree (bench_exchange
    # puts its own tree first on sys.path, but the modules are loaded now).
    from bench_exchange import owners as make_owners

    size = int(mb * 1e6)
    owners = make_owners(n, size, piece)
    profiles = {o: LinkProfile(up=u * 1e6 / 8, down=d * 1e6 / 8, latency=lat)
                for o, (u, d, lat) in zip(range(1, n + 1), links_mbit(scenario, n))}
    shares = {o: m.total_size for o, (m, _) in owners.items()}
    t_lb = sim_swarm.lower_bound(shares, profiles)
    t_lat = sim_swarm.lower_bound_latency(shares, profiles) \
        if hasattr(sim_swarm, "lower_bound_latency") else None
    extra = {"kept_connections": True} if kept else {}
    swarm = sim_swarm.build_swarm(owners, SwarmConfig(piece_size=piece), profiles, seed=0,
                                  **extra)
    t0 = time.perf_counter()
    r = swarm.run(until=36000)
    wall = time.perf_counter() - t0
    slowest = min(profiles, key=lambda o: (profiles[o].up, o))
    up_slowest = swarm.sessions[slowest].stats.bytes_up / shares[slowest]
    return {"T": r.virtual_time, "t_lb": t_lb, "t_lat": t_lat, "complete": r.complete,
            "wall": wall, "events": r.events, "slow_up_copies": up_slowest}


def worker(args) -> None:
    sys.path.insert(0, os.path.abspath(tree_path(args.worker)))
    for scenario in args.scenarios:
        for mb in args.mb:
            for n in args.clients:
                cell = run_cell(scenario, n, mb, args.piece_kib * 1024, args.kept)
                cell.update(scenario=scenario, n=n, mb=mb)
                print(json.dumps(cell), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=None,
                    help="source tree to measure (repeatable); default: this one")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--mb", type=float, nargs="+", default=[2.0])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--piece-kib", type=int, default=256)
    ap.add_argument("--kept", action="store_true",
                    help="a round on connections kept from the last one (FS distributed "
                         "mode from round 1): both ends open each with its round trip known")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for s in a.scenarios:
        links_mbit(s, 1)  # refuse an unknown name before anything runs
    if a.worker:
        worker(a)
        return
    trees = a.tree or [os.path.join(os.path.dirname(__file__), "..")]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    print(f"pieces {a.piece_kib} KiB; trees: " + ", ".join(trees) + "\n")
    results: dict[str, dict[tuple, dict]] = {}
    for tree in trees:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", tree,
               "--clients", *map(str, a.clients), "--mb", *map(str, a.mb),
               "--scenarios", *a.scenarios, "--piece-kib", str(a.piece_kib)] + \
            (["--kept"] if a.kept else [])
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree_path(tree)))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        cells = results[tree] = {}
        for line in proc.stdout:
            c = json.loads(line)
            cells[(c["scenario"], c["mb"], c["n"])] = c
            print(f"  {tree_name(tree)}: {c['scenario']} "
                  f"{c['mb']:g} MB n={c['n']}: T {c['T']:.3f} eta {c['t_lb'] / c['T']:.3f} "
                  f"(wall {c['wall']:.1f} s)", file=sys.stderr, flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"worker for {tree} failed")
    names = [tree_name(t) for t in trees]
    head = "| scenario | MB | n | T_LB s | T_LB,lat s | " + " | ".join(
        f"{nm} T s | {nm} η | {nm} η_lat | {nm} slow up× | {nm} wall s" for nm in names) + " |"
    print(head)
    print("|" + "---|" * (5 + 5 * len(names)))
    for scenario in a.scenarios:
        for mb in a.mb:
            for n in a.clients:
                row = [scenario, f"{mb:g}", str(n)]
                first = results[trees[0]][(scenario, mb, n)]
                lat = next((results[t][(scenario, mb, n)]["t_lat"] for t in trees
                            if results[t][(scenario, mb, n)]["t_lat"]), None)
                row += [f"{first['t_lb']:.3f}", f"{lat:.3f}" if lat else "-"]
                for t in trees:
                    c = results[t][(scenario, mb, n)]
                    done = "" if c["complete"] else " (incomplete)"
                    row += [f"{c['T']:.3f}{done}", f"{c['t_lb'] / c['T']:.3f}",
                            f"{lat / c['T']:.3f}" if lat else "-",
                            f"{c['slow_up_copies']:.2f}", f"{c['wall']:.1f}"]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
