"""Benchmark: start skew -- peers that begin the round apart -- on the
deterministic simulator, side by side for several source trees.

Why: in FS distributed mode the server's ``bt_start`` reaches the clients
at different times (3-50 ms apart for the FS CNN's 8 clients on 2 shared
vCPUs, docs/benchmarks.md; over real networks by the clients' different
round trips to the server).  A client's exchange time counts from its own
start, so the round's T is about "last finish - earliest start".

Links as in the FS CNN benchmark (``launch_netns.py``): 100 Mbit/s up,
150 down, 0.5 ms one way; 256 KiB pieces, 64 KiB blocks (the adaptive block
size there), connections kept from an earlier round.  Cases per n and size:
no skew; one peer 40 ms late; every peer late by uniform(0, 45 ms), six
seeds, median and worst.  Times count from the earliest start.  Columns:
eta = T_LB / T (the bandwidth bound, no skew) and eta_st = T_LB,st / T,
with the staggered bound ``sim.swarm.lower_bound_staggered`` (each bound
from its peer's start; with equal uplinks skew costs its mean delay at
best).

    python scripts/bench_skew.py --tree base=/tmp/base --tree . [--clients 8 16] [--mb 1.7 20]

Each tree runs in its own subprocess with that tree first on ``sys.path``;
a tree needs ``build_swarm(start_at=...)``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_hetero import tree_name, tree_path  # noqa: E402

SEEDS = 6
MAX_SKEW = 0.045
LATE = 0.04


def cases(n: int) -> list[tuple[str, dict]]:
    out = [("no skew", {}), (f"one late {LATE * 1000:.0f} ms", {n: LATE})]
    for seed in range(SEEDS):
        rng = random.Random(seed)
        offs = {i: rng.uniform(0, MAX_SKEW) for i in range(1, n + 1)}
        first = min(offs.values())
        out.append((f"random 0-{MAX_SKEW * 1000:.0f} ms", {i: t - first for i, t in offs.items()}))
    return out


def run_cell(n: int, mb: float, start_at: dict, seed: int) -> dict:
    from fs_bittorrent.core.config import SwarmConfig
    from fs_bittorrent.sim import swarm as sim_swarm
    from fs_bittorrent.sim.network import LinkProfile
    from bench_exchange import owners as make_owners

    owners = make_owners(n, int(mb * 1e6), 256 * 1024)
    link = LinkProfile(up=100e6 / 8, down=150e6 / 8, latency=0.0005)
    profiles = {o: link for o in owners}
    shares = {o: m.total_size for o, (m, _) in owners.items()}
    swarm = sim_swarm.build_swarm(owners, SwarmConfig(block_size=64 * 1024), profiles,
                                  seed=seed, kept_connections=True, start_at=start_at)
    r = swarm.run(until=3600)
    if not r.complete:
        raise SystemExit(f"n={n} {mb} MB {start_at}: round did not complete")
    t = max(r.completed_at.values())
    return {"T": t, "eta": sim_swarm.lower_bound(shares, profiles) / t,
            "eta_st": sim_swarm.lower_bound_staggered(shares, profiles, start_at) / t}


def worker(args) -> None:
    sys.path.insert(0, os.path.abspath(tree_path(args.worker)))
    for mb in args.mb:
        for n in args.clients:
            for k, (case, start_at) in enumerate(cases(n)):
                cell = run_cell(n, mb, start_at, seed=k)
                cell.update(n=n, mb=mb, case=case)
                print(json.dumps(cell), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=None,
                    help="source tree, path or name=path (repeat); default: this one")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--mb", type=float, nargs="+", default=[1.7, 20.0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name, values in (("--clients", args.clients), ("--mb", args.mb)):
        bad = [v for v in values if v <= 0 or (name == "--clients" and v < 2)]
        if bad:
            ap.error(f"{name}: {bad[0]} is not a valid value")
    if args.worker:
        worker(args)
        return 0
    trees = args.tree or [os.path.join(HERE, "..")]
    results: dict = {}
    for tree in trees:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", tree,
               "--clients", *map(str, args.clients), "--mb", *map(str, args.mb)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            cell = json.loads(line)
            results.setdefault((cell["n"], cell["mb"], cell["case"], tree_name(tree)), []) \
                .append(cell)
    names = [tree_name(t) for t in trees]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, Python "
          f"{platform.python_version()}")
    print("links 100 up / 150 down Mbit/s, 0.5 ms; 256 KiB pieces, 64 KiB blocks, kept "
          f"connections; random: median (worst) of {SEEDS} seeds\n")
    print("| n | MB | case | " + " | ".join(f"{t} eta | {t} eta_st" for t in names) + " |")
    print("|---:|---:|---|" + "---:|---:|" * len(names))
    for n in args.clients:
        for mb in args.mb:
            for case in dict.fromkeys(c for c, _ in cases(n)):
                row = []
                for t in names:
                    cells = results[(n, mb, case, t)]
                    if len(cells) == 1:
                        row += [f"{cells[0]['eta']:.3f}", f"{cells[0]['eta_st']:.3f}"]
                    else:
                        for key in ("eta", "eta_st"):
                            vals = [c[key] for c in cells]
                            row.append(f"{statistics.median(vals):.3f} ({min(vals):.3f})")
                print(f"| {n} | {mb:g} | {case} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
