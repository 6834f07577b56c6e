"""Soak run: many FS standalone rounds under seeded faults, resources per round.

    PYTHONPATH=. python scripts/soak.py                      # 20 rounds, 4 clients, faults on
    PYTHONPATH=. python scripts/soak.py --rounds 50 --json soak.json
    PYTHONPATH=. python scripts/soak.py --no-faults

FederatedScope's toy data and logistic regression (no download) with the
peer-to-peer exchange on, every fault of ``bittorrent.faults`` switched on at
a few percent (drop, duplicate, reorder, corrupt, delay, disconnect) and one
client crashing mid-exchange in one round, all seeded.  After every round's
``bt_round_end`` has been handled (store flushed, old rounds cleaned up) it
records, for this process:

* ``rss_kb``: resident set size (``VmRSS`` in /proc/self/status);
* ``threads``: OS threads (``Threads`` in /proc/self/status) and Python threads;
* ``fds``: open file descriptors (entries of /proc/self/fd);
* ``db_bytes`` / ``wal_bytes``: the piece store file and its WAL;
* ``store_rounds``: rounds the store holds (bounded by ``keep_rounds``);

and prints one table row per round, plus the round's outcome.  ``--json``
also writes the rows (tests/test_soak.py runs this and checks that the
figures are flat after the first rounds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOY = """
use_gpu: False
device: -1
seed: {seed}
verbose: 0
federate:
  mode: standalone
  client_num: {clients}
  total_round_num: {rounds}
data:
  type: toy
model:
  type: lr
trainer:
  type: general
eval:
  freq: 1
  metrics: ['loss_regular']
  count_flops: False
outdir: {outdir}
bittorrent:
  enable: True
  piece_size: 128
  block_size: 64
  timeout: 8.0
  request_timeout: 1.0
  keep_rounds: 2
  min_completion_ratio: 0.5
"""

# Every message-level fault at a few percent, and one crash.
FAULTS = {
    "drop": 0.02, "duplicate": 0.02, "reorder": 0.05, "corrupt": 0.02, "delay": 0.02,
    "delay_max": 2.0, "disconnect": 0.005, "reconnect_after": 0.5,
}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def probe(runner: Any, round_idx: int) -> dict:
    db = os.path.join(runner.settings.db_dir, "pieces.db")
    wal = db + "-wal"
    stats = runner.server.bt.round_stats[-1] if runner.server.bt.round_stats else {}
    return {
        "round": round_idx,
        "rss_kb": _status("VmRSS"),
        "threads": _status("Threads"),
        "py_threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "db_bytes": os.path.getsize(db) if os.path.exists(db) else 0,
        "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0,
        "store_rounds": len(runner.store.rounds()),
        "reason": stats.get("reason", ""),
        "completion": stats.get("completion_ratio", 0.0),
        "corrupt": sum(stats.get("corrupt_pieces", {}).values()),
    }


def run_soak(rounds: int = 20, clients: int = 4, seed: int = 7, faults: bool = True,
             crash_round: Optional[int] = None, outdir: Optional[str] = None,
             quiet: bool = True) -> tuple[list[dict], dict]:
    """One FS standalone run; returns (rows per round, fault counts)."""
    import random

    from fs_bittorrent.fs.entry import build_config, make_runner, share_fs_logging
    from federatedscope.core.auxiliaries.data_builder import get_data
    from federatedscope.core.auxiliaries.logging import update_logger
    from federatedscope.core.auxiliaries.utils import setup_seed

    outdir = outdir or tempfile.mkdtemp(prefix="fs_bt_soak_")
    cfg_path = os.path.join(outdir, "soak.yaml")
    with open(cfg_path, "w") as f:
        f.write(TOY.format(seed=seed, clients=clients, rounds=rounds,
                           outdir=os.path.join(outdir, "exp")))
    opts: list[str] = []
    if faults:
        rng = random.Random(seed)
        if crash_round is None:
            crash_round = rng.randrange(2, max(3, rounds - 1))
        for k, v in FAULTS.items():
            opts += [f"bittorrent.faults.{k}", str(v)]
        opts += ["bittorrent.faults.crash_clients", f"[{rng.randint(1, clients)}]",
                 "bittorrent.faults.crash_round", str(crash_round),
                 "bittorrent.faults.crash_at", "0.005"]
    cfg = build_config(cfg_path, opts)
    update_logger(cfg, clear_before_add=True)
    share_fs_logging()
    if quiet:  # the file log keeps everything; the console only warnings
        for h in logging.getLogger("federatedscope").handlers:
            if type(h) is logging.StreamHandler:
                h.setLevel(logging.ERROR)
    setup_seed(cfg.seed)
    data, modified = get_data(config=cfg.clone())
    cfg.merge_from_other_cfg(modified)
    cfg.freeze(inform=False)
    runner = make_runner(cfg, data)
    rows: list[dict] = []
    runner.round_hooks.append(lambda r, rnd: rows.append(probe(r, rnd)))
    runner.run()
    return rows, dict(runner.network.fault_counts, crashes=len(runner.crashed))


COLUMNS = ("round", "rss_kb", "threads", "py_threads", "fds", "db_bytes", "wal_bytes",
           "store_rounds", "reason", "completion", "corrupt")


def table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in COLUMNS}
    lines = [" | ".join(c.rjust(widths[c]) for c in COLUMNS),
             "-|-".join("-" * widths[c] for c in COLUMNS)]
    for r in rows:
        lines.append(" | ".join(_fmt(r[c]).rjust(widths[c]) for c in COLUMNS))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--crash-round", type=int, default=None,
                    help="round in which one client crashes (default: drawn from the seed)")
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--outdir", default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, counts = run_soak(args.rounds, args.clients, args.seed, not args.no_faults,
                            args.crash_round, args.outdir)
    wall = time.perf_counter() - t0
    print(table(rows))
    print(f"\n{len(rows)} rounds, {args.clients} clients, seed {args.seed}, {wall:.1f}s wall; "
          f"faults injected: {counts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "faults": counts, "wall": wall}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
