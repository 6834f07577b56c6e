"""Benchmark: cost of having the plugin installed but disabled.

Runs the same FederatedScope config, alternating, as plain FS
(``python -m federatedscope.main``) and through ``fs-bittorrent run`` with
``bittorrent.enable False``, each as a fresh process, and reports the
median wall times and their ratio.  Interleaving pairs keeps a noisy,
shared machine from favouring one side.

    python scripts/bench_overhead.py [--cfg configs/toy_bittorrent.yaml] [--pairs 7] [--rounds 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def timed(cmd: list[str], cwd: str) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONHASHSEED="0")
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default=os.path.join(ROOT, "configs", "toy_bittorrent.yaml"))
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fs_bt_overhead_")
    # Plain FS must not see the bittorrent block (it would reject the keys).
    plain_cfg = os.path.join(work, "plain.yaml")
    with open(a.cfg) as src, open(plain_cfg, "w") as dst:
        skipping = False
        for line in src:
            if line.startswith("bittorrent:"):
                skipping = True
                continue
            if skipping and (line.startswith(" ") or not line.strip()):
                continue
            skipping = False
            dst.write(line)
    common = ["federate.total_round_num", str(a.rounds)]
    plain = [sys.executable, "-m", "federatedscope.main", "--cfg", plain_cfg] + common + \
        ["outdir", os.path.join(work, "plain")]
    ours = [sys.executable, "-m", "fs_bittorrent", "run", "--cfg", a.cfg,
            "bittorrent.enable", "False"] + common + ["outdir", os.path.join(work, "ours")]
    t_plain, t_ours = [], []
    for _ in range(a.pairs):
        t_plain.append(timed(plain, work))
        t_ours.append(timed(ours, work))
    mp, mo = statistics.median(t_plain), statistics.median(t_ours)
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, Python {platform.python_version()}")
    print(f"config: {os.path.relpath(a.cfg, ROOT)}, {a.rounds} rounds, {a.pairs} interleaved pairs\n")
    print("| run | median wall s | min | max |")
    print("|---|---:|---:|---:|")
    print(f"| plain FederatedScope | {mp:.2f} | {min(t_plain):.2f} | {max(t_plain):.2f} |")
    print(f"| fs-bittorrent run, enable False | {mo:.2f} | {min(t_ours):.2f} | {max(t_ours):.2f} |")
    print(f"\noverhead: {100 * (mo / mp - 1):+.1f}% (median ratio {mo / mp:.3f})")


if __name__ == "__main__":
    main()
