"""A distributed FS run with the exchange, one shaped host per participant.

Every participant (server and N clients) runs in its own network namespace
behind a bridge, its uplink and downlink capped with ``tc tbf``
(``scripts/netns_hosts.py``, shared/GUIDE.md section 4).  Every namespace
is removed afterwards, also when the run fails or is interrupted.  Needs
root.  Prints each process's exit code and, per round, the exchange time in
wall seconds next to the all-gather lower bound T_LB for the configured
rates and the round's model sizes, and eta = T_LB / T.

    sudo python scripts/launch_netns.py --cfg configs/cnn_distributed.yaml --clients 8 \\
        --up 100 --down 150 [--slow-half 20] [--out exp/netns] [KEY VALUE ...]

For the loopback equivalent (no shaping, no root) use
``fs-bittorrent launch``.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from netns_hosts import ShapedHosts, cleanup_namespaces, is_root  # noqa: E402

from fs_bittorrent.launch import plan, run  # noqa: E402
from fs_bittorrent.sim.network import LinkProfile  # noqa: E402
from fs_bittorrent.sim.swarm import lower_bound  # noqa: E402

MBIT = 1e6 / 8


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--up", type=float, default=100.0, help="Mbit/s upload per host")
    ap.add_argument("--down", type=float, default=150.0, help="Mbit/s download per host")
    ap.add_argument("--slow-half", type=float, default=None,
                    help="Mbit/s upload of every second client (heterogeneous uplinks)")
    ap.add_argument("--burst-kbit", type=int, default=None,
                    help="tbf burst (default: netns_hosts' choice, GUIDE section 4's 32 kbit); "
                         "600 spares the CPU that tiny buckets cost (see docs/benchmarks.md)")
    ap.add_argument("--out", default="exp/netns")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("opts", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not is_root():
        print("launch_netns: needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    cleanup_namespaces()                               # stale ones of crashed runs
    n = a.clients
    # host 0 is the server; client i runs on host i
    slow = {i: a.slow_half for i in range(2, n + 1, 2)} if a.slow_half else {}
    up = {i: slow.get(i, a.up) for i in range(1, n + 1)}
    out = Path(a.out)
    with ShapedHosts(n + 1, up_mbit=a.up, down_mbit=a.down, up_overrides=slow,
                     burst_kbit=a.burst_kbit) as hosts:
        parts = plan(a.cfg, n, out, a.opts, host_of=lambda role, i: hosts[i].ip,
                     wrap=lambda role, i: hosts[i].wrap([]))
        result = run(parts, timeout=a.timeout)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    print(f"{n} clients, upload {a.up:g} Mbit/s" +
          (f" ({len(slow)} at {a.slow_half:g})" if slow else "") +
          f", download {a.down:g} Mbit/s (tc tbf)")
    for who, rc in result.exit_codes().items():
        print(f"{who}: exit {rc}")
    links = {c: LinkProfile(up=up[c] * MBIT, down=a.down * MBIT, latency=0.0)
             for c in range(1, n + 1)}
    print("\n| round | reason | T wall s | T_LB s | eta | completion |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in result.rounds:
        shares = {c: r["model_bytes"] / n for c in range(1, n + 1)}   # one model each
        t_lb = lower_bound(shares, links)
        t = r["exchange_time"]
        print(f"| {r['round']} | {r['reason']} | {t:.3f} | {t_lb:.3f} | {t_lb / t:.3f} | "
              f"{r['completion_ratio']:.2f} |")
    if not result.ok:
        print(result.log_tail(), file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
