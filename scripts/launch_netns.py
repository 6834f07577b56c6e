"""A distributed FS run with the exchange, one shaped host per participant.

Every participant (server and N clients) runs in its own network namespace
behind a bridge, its uplink and downlink capped with ``tc tbf``
(``scripts/netns_hosts.py``, shared/GUIDE.md section 4).  Every namespace
is removed afterwards, also when the run fails or is interrupted.  Needs
root.  Prints each process's exit code and, per round, the exchange time in
wall seconds next to the all-gather lower bound T_LB for the configured
rates and the round's model sizes, and eta = T_LB / T; beside them how long
the busiest client's uplink needed for what it uploaded, and the clients'
mean (``uplink_seconds``: where a round's gap to T_LB goes), and the
machine's CPU load and steal over the round's exchange (``cpu_load``: on
a small machine the round times move with both), and the CPU time the
mean client and the server used in it (each participant's
``/proc/<pid>/stat``: a CPU saving shows there directly).  Per tree, a
summary of the rounds from the second on: median and range of eta, how
many reach 0.9, the median load, the median CPU per client and exchange
and the median start spread; with several trees, each tree's median eta
against the first's with a bootstrap interval (``compare_etas``), so a
difference the machine alone makes is named as such.

    sudo python scripts/launch_netns.py --cfg configs/cnn_distributed.yaml --clients 8 \\
        --up 100 --down 150 [--slow-half 20] [--out exp/netns] [KEY VALUE ...]

Side by side: ``--tree NAME=PATH[:KEY=VALUE...]`` (repeatable) runs the
same experiment with the code of each source tree (``PYTHONPATH=PATH``),
plus that variant's own config options, interleaved ``--repeat`` times, in
the same namespaces; one table for all.  E.g. ``--tree
b16=.:bittorrent.adaptive_block_size=False:bittorrent.block_size=16384``.
``--slow-start-after-idle 0`` sets that sysctl in every namespace.
``--wire-trace FILE`` records every host's upload bytes at the switch every
2 ms (``scripts/wire_trace.py``) and prints each exchange's use of the
clients' uplinks, its ramp and its tail.

For the loopback equivalent (no shaping, no root) use
``fs-bittorrent launch``.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from cpu_load import CpuSampler, ProcessCpuSampler, cpu_during, load_during  # noqa: E402
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
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                    help="run with the code under PATH (repeatable; default: this tree)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tree, interleaved")
    ap.add_argument("--slow-start-after-idle", type=int, choices=(0, 1), default=None,
                    help="net.ipv4.tcp_slow_start_after_idle in every namespace "
                         "(default: leave the kernel's, 1)")
    ap.add_argument("--wire-trace", default=None, metavar="FILE",
                    help="record the hosts' uploads at the switch (scripts/wire_trace.py)")
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
    trees = []
    for t in a.tree or [f"this={os.path.join(HERE, '..')}"]:
        name, rest = t.split("=", 1)
        path, *kvs = rest.split(":")
        extra = [x for kv in kvs for x in kv.split("=", 1)]
        trees.append((name, path, extra))
    results = []
    with ShapedHosts(n + 1, up_mbit=a.up, down_mbit=a.down, up_overrides=slow,
                     burst_kbit=a.burst_kbit,
                     slow_start_after_idle=a.slow_start_after_idle) as hosts:
        tracer = start_wire_trace(hosts, a.wire_trace, a.timeout * a.repeat * len(trees))
        cpu = CpuSampler().start()
        procs = ProcessCpuSampler(participant_label).start()
        try:
            run_all(a, n, out, trees, hosts, results)
        finally:
            stop_wire_trace(tracer)
            cpu.stop()
            procs.stop()
    report(a, n, up, slow, results, cpu.samples, procs.samples)
    if a.wire_trace:
        import wire_trace
        trace = wire_trace.load(a.wire_trace)
        rates = [a.up] + [up[c] for c in range(1, n + 1)]
        periods = wire_trace.active_periods(trace, rates)
        print(f"\nwire trace {a.wire_trace}: {len(periods)} exchange(s) seen at the switch")
        print("\n".join(wire_trace.summary_lines(periods, 0.02)))
    return 0 if all(res.ok for _, _, res in results) else 1


def start_wire_trace(hosts: ShapedHosts, path: Optional[str],
                     duration: float) -> Optional[subprocess.Popen]:
    """The sampler in the switch namespace (None without ``path``)."""
    if not path:
        return None
    return subprocess.Popen(["ip", "netns", "exec", hosts.switch, sys.executable,
                             os.path.join(HERE, "wire_trace.py"), "sample", "--out",
                             os.path.abspath(path), "--duration", str(duration)])


def stop_wire_trace(tracer: Optional[subprocess.Popen]) -> None:
    if tracer is None:
        return
    tracer.terminate()
    try:
        tracer.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - it stops on SIGTERM
        tracer.kill()
        tracer.wait()


def run_all(a: argparse.Namespace, n: int, out: Path, trees: list, hosts: ShapedHosts,
            results: list) -> None:
    """Every tree ``a.repeat`` times, interleaved, in the same namespaces."""
    for rep_i in range(a.repeat):
        for name, path, extra in trees:
            run_out = out / f"{name}_{rep_i}"
            parts = plan(a.cfg, n, run_out, list(a.opts) + extra, host_of=lambda role, i: hosts[i].ip,
                         wrap=lambda role, i: hosts[i].wrap([]))
            # PYTHONSAFEPATH: ``python -m`` must not put the working
            # directory (this tree) ahead of PYTHONPATH.
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path), PYTHONSAFEPATH="1")
            result = run(parts, timeout=a.timeout, env=env)
            results.append((name, rep_i, result))
            print(f"{name} run {rep_i}: {'ok' if result.ok else 'FAILED'}", flush=True)
            if not result.ok:
                print(result.log_tail(), file=sys.stderr)


def uplink_seconds(row: dict, up_mbit: dict) -> Optional[tuple]:
    """(seconds, client, mean seconds): how long the busiest client's uplink
    needed for the bytes it uploaded in round ``row`` at its configured rate
    (``up_mbit``: client id -> Mbit/s), and the mean over the clients.  None
    for a row without ``bytes_up``.

    Why: it splits a round's T.  T can be no shorter than the busiest
    uplink's seconds (tbf adds about 4.5 % of framing on top); the busiest
    minus the mean is what uneven upload shares cost; T minus the busiest is
    time that uplink was not sending (the start, the ramp, the tail)."""
    sent = row.get("bytes_up")
    if not sent:
        return None
    times = {}
    for c, nbytes in sent.items():
        rate = up_mbit.get(int(c))
        if not rate or rate <= 0:
            raise ValueError(f"bytes_up: client {c!r} has no configured upload rate "
                             f"(rates for {sorted(up_mbit)})")
        times[int(c)] = nbytes / (rate * MBIT)
    busiest = max(times, key=times.get)
    return times[busiest], busiest, sum(times.values()) / len(times)


def exchange_window(row: dict) -> Optional[tuple[float, float]]:
    """(start, seconds) of round ``row``'s exchange in Unix time: from the
    server's ``started_wall`` for ``exchange_time`` seconds; None where the
    row has no start time (a tree from before ``started_wall``)."""
    start = row.get("started_wall")
    if start is None:
        return None
    return float(start), float(row["exchange_time"])


def round_load(row: dict, samples: list) -> Optional[tuple]:
    """(busy, steal): the machine's mean CPU load over round ``row``'s
    exchange (:func:`exchange_window`); None without a window or where the
    sampler did not cover it."""
    window = exchange_window(row)
    return None if window is None else load_during(samples, *window)


def participant_label(cmdline: str, pid: int) -> Optional[str]:
    """``server:<pid>`` / ``client:<pid>`` for a participant's process
    (``fs_bittorrent run ... distribute.role R``), None for anything else."""
    if "fs_bittorrent" not in cmdline:
        return None
    for role in ("server", "client"):
        if f"distribute.role {role}" in cmdline:
            return f"{role}:{pid}"
    return None


def round_cpu(row: dict, samples: list) -> Optional[tuple]:
    """(client CPU s, server CPU s): the CPU time (user + system, all
    threads) the mean client and the server used during round ``row``'s
    exchange (:func:`exchange_window`); None without a window, samples
    covering it, or a client among them."""
    window = exchange_window(row)
    used = None if window is None else cpu_during(samples, *window)
    if not used:
        return None
    clients = [v for k, v in used.items() if k.startswith("client:")]
    if not clients:
        return None
    server = sum(v for k, v in used.items() if k.startswith("server:"))
    return sum(clients) / len(clients), server


#: Steal above this over a round's exchange is flagged in the summary: the
#: round measured the hypervisor's share of the machine as much as the
#: exchange (docs/benchmarks.md, ninth session: eta falls with steal).
STEAL_WARN = 0.10


def tree_summary(etas: list, loads: list, client_cpu: Sequence[float] = (),
                 spreads: Sequence[float] = ()) -> str:
    """One line for a tree's rounds from the second on: median, range and
    how many of the etas reach 0.9; the median CPU load and steal, and how
    many rounds had more than ``STEAL_WARN`` steal; the median CPU seconds
    a client used per exchange (``client_cpu``); the median start spread
    (``spreads``, seconds)."""
    if not etas:
        return "no rounds after the first"
    line = (f"{len(etas)} rounds: median eta {statistics.median(etas):.3f} "
            f"({min(etas):.3f}-{max(etas):.3f}), {sum(e >= 0.9 for e in etas)} >= 0.9")
    if loads:
        line += (f"; CPU busy median {100 * statistics.median(b for b, _ in loads):.0f} %, "
                 f"steal {100 * statistics.median(s for _, s in loads):.1f} %")
        stolen = sum(s > STEAL_WARN for _, s in loads)
        if stolen:
            line += (f"; {stolen} of {len(loads)} rounds with steal above "
                     f"{100 * STEAL_WARN:.0f} %: the machine, not only the exchange, set them")
    if client_cpu:
        line += (f"; CPU per client and exchange median "
                 f"{1000 * statistics.median(client_cpu):.0f} ms")
    if spreads:
        line += f"; start spread median {1000 * statistics.median(spreads):.0f} ms"
    return line


#: Bootstrap resamples behind :func:`compare_etas` (seeded: the same rounds
#: give the same interval).
RESAMPLES = 2000


def compare_etas(base: Sequence[float], other: Sequence[float],
                 resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """``other``'s median eta minus ``base``'s, and a 95 % bootstrap interval
    of that difference (rounds resampled with replacement in each tree).

    Why: on the shared 2-vCPU machine an invocation's median moves by about
    0.01 with the machine alone (docs/benchmarks.md, twelfth session), and
    sessions have spent hours on differences of that size.  This says
    whether a difference is larger than its rounds' spread.  Rounds of one
    run share the machine's state, so the interval is, if anything, too
    narrow: one that includes 0 is noise, one that excludes it still wants
    a second invocation.  Raises ``ValueError`` naming the empty side."""
    for name, etas in (("base", base), ("other", other)):
        if not etas:
            raise ValueError(f"compare_etas: {name} has no rounds")
    rng = random.Random(seed)
    diffs = sorted(
        statistics.median(rng.choices(other, k=len(other)))
        - statistics.median(rng.choices(base, k=len(base)))
        for _ in range(resamples))
    lo = diffs[int(0.025 * (resamples - 1))]
    hi = diffs[int(0.975 * (resamples - 1))]
    return statistics.median(other) - statistics.median(base), lo, hi


def report(a: argparse.Namespace, n: int, up: dict, slow: dict, results: list,
           cpu_samples: Optional[list] = None, proc_samples: Optional[list] = None) -> None:
    """The machine, the links and every round's T, T_LB and eta."""
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    print(f"{n} clients, upload {a.up:g} Mbit/s" +
          (f" ({len(slow)} at {a.slow_half:g})" if slow else "") +
          f", download {a.down:g} Mbit/s (tc tbf)" +
          ("" if a.slow_start_after_idle is None else
           f", tcp_slow_start_after_idle={a.slow_start_after_idle}"))
    links = {c: LinkProfile(up=up[c] * MBIT, down=a.down * MBIT, latency=0.0)
             for c in range(1, n + 1)}
    print("\n| tree | run | round | reason | T wall s | T_LB s | eta | completion "
          "| start spread ms | busiest uplink s (client) | mean uplink s | CPU busy % "
          "| steal % | CPU ms per client | server CPU ms |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    later: dict = {}
    for name, rep_i, result in results:
        etas, loads, client_cpu, spreads = later.setdefault(name, ([], [], [], []))
        for r in result.rounds:
            shares = {c: r["model_bytes"] / n for c in range(1, n + 1)}   # one model each
            t_lb = lower_bound(shares, links)
            t = r["exchange_time"]
            ups = uplink_seconds(r, up)
            busy = f"{ups[0]:.3f} ({ups[1]}) | {ups[2]:.3f}" if ups else "- | -"
            load = round_load(r, cpu_samples or [])
            cpu = f"{100 * load[0]:.0f} | {100 * load[1]:.1f}" if load else "- | -"
            used = round_cpu(r, proc_samples or [])
            procs = f"{1000 * used[0]:.0f} | {1000 * used[1]:.0f}" if used else "- | -"
            spread = r.get("start_spread")     # trees from before it: none
            spread = "-" if spread is None else f"{1000 * spread:.0f}"
            print(f"| {name} | {rep_i} | {r['round']} | {r['reason']} | {t:.3f} | "
                  f"{t_lb:.3f} | {t_lb / t:.3f} | {r['completion_ratio']:.2f} | {spread} "
                  f"| {busy} | {cpu} | {procs} |")
            if r["round"] >= 1:
                etas.append(t_lb / t)
                if load:
                    loads.append(load)
                if used:
                    client_cpu.append(used[0])
                if r.get("start_spread") is not None:
                    spreads.append(r["start_spread"])
    print()
    for name, (etas, loads, client_cpu, spreads) in later.items():
        print(f"{name}: {tree_summary(etas, loads, client_cpu, spreads)}")
    names = list(later)
    first = later[names[0]][0] if names else []
    for name in names[1:]:
        etas = later[name][0]
        if first and etas:
            diff, lo, hi = compare_etas(first, etas)
            print(f"{name} vs {names[0]}: median eta {diff:+.3f} (95 % bootstrap interval over "
                  f"rounds {lo:+.3f} to {hi:+.3f}{'; includes 0: noise' if lo <= 0 <= hi else ''})")


if __name__ == "__main__":
    sys.exit(main())
