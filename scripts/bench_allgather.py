"""Benchmark: all-gather of model shares among n processes -- gloo, libtorrent, fsbt.

``fsbt`` is this project's data plane in plaintext (HMAC handshake);
``fsbt-tls`` the same with mutual TLS 1.3 and pinned per-rank certificates,
as distributed clients run it by default (``bittorrent.encryption``).

Each of n ranks holds a share of S random bytes; at the end every rank holds
all n shares, checked bit-exact.  One OS process per rank (each in its own
network namespace with ``--shaped``), so the comparison is the one that
matters for FederatedScope's distributed mode, not one event loop carrying
every peer (that is ``bench_dataplane.py``).

Timing: every rank prepares what moves no share bytes (imports, its share,
listening socket / TCP store / torrents), then all start at one common
``time.monotonic()`` instant ``t0``.  T = last rank's finish - t0, so T
includes connection set-up (TCP store rendezvous and gloo's full mesh;
BitTorrent dials and handshakes) -- every implementation pays it once per
cold start.  The "setup" column is the slowest rank's connect time for gloo
(``init_process_group``) and fsbt (its own dials); libtorrent connects
asynchronously, so it has none.

T_LB (shared/GUIDE.md §3, no server upload):
``max((n-1)·S/d_min, n(n-1)·S/Σu_i, S/u_min)`` with the configured tbf rates;
η = T_LB / T.  On unshaped loopback there is no rate, so only T is reported.
Note that tbf delivers about 0.955 × its rate as TCP goodput, so η ≈ 0.95 is
the practical ceiling.

    python scripts/bench_allgather.py --impl all --n 4 --mb-per-rank 32
    python scripts/bench_allgather.py --impl all --n 8 --mb-per-rank 8 --shaped --up 100 --down 150
    python scripts/bench_allgather.py --impl gloo,fsbt --n 8 --mb-per-rank 8 --shaped \\
        --up 100 --down 150 --slow-half 20
    # another tree side by side (e.g. main before a change), same run:
    git archive main | tar -x -C /tmp/before
    python scripts/bench_allgather.py --tree before=/tmp/before --impl fsbt-tls@before,fsbt-tls \\
        --n 8 --mb-per-rank 8 --shaped --up 100 --down 150 --slow-half 20

Where the configured uplinks differ (``--slow-half``), fsbt paces its
uploads and gives its session the uplinks hint (core/picker.pace_uploads).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from cpu_load import CpuSampler, load_during  # noqa: E402
from netns_hosts import LocalHosts, ShapedHosts  # noqa: E402

log = logging.getLogger("bench_allgather")

MiB = 1024 * 1024
ALL_IMPLS = ("gloo", "libtorrent", "fsbt", "fsbt-tls")


# ---- data --------------------------------------------------------------------
def write_shares(job_dir: str, n: int, size: int, seed: int) -> list[str]:
    """n files of random bytes (deterministic per seed and owner)."""
    import numpy as np

    d = os.path.join(job_dir, "shares")
    os.makedirs(d, exist_ok=True)
    paths = []
    for o in range(n):
        p = os.path.join(d, f"share_{o}.bin")
        with open(p, "wb") as f:
            f.write(np.random.default_rng([seed, o]).bytes(size))
        paths.append(p)
    return paths


def piece_sha256(path: str, piece: int) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    return [hashlib.sha256(data[i:i + piece]).hexdigest() for i in range(0, len(data), piece)]


def make_torrents(job_dir: str, shares: list[str], piece: int) -> list[str]:
    """One v1 .torrent per share: no trackers, no web seeds."""
    import libtorrent as lt

    d = os.path.join(job_dir, "torrents")
    os.makedirs(d, exist_ok=True)
    out = []
    for p in shares:
        ct = lt.create_torrent(lt.list_files(p), piece, flags=lt.create_torrent.v1_only)
        ct.set_creator("bench_allgather")
        lt.set_piece_hashes(ct, os.path.dirname(p))
        tp = os.path.join(d, os.path.basename(p) + ".torrent")
        with open(tp, "wb") as f:
            f.write(lt.bencode(ct.generate()))
        out.append(tp)
    return out


# ---- bounds ------------------------------------------------------------------
def t_lower_bound(n: int, size: int, up_mbit: list[Optional[float]],
                  down_mbit: list[Optional[float]]) -> Optional[float]:
    """GUIDE §3: max((n-1)S/d_min, n(n-1)S/Σu, S/u_min), server upload 0.
    None when any link is uncapped (loopback)."""
    if any(u is None for u in up_mbit) or any(d is None for d in down_mbit):
        return None
    up = [u * 1e6 / 8 for u in up_mbit]          # tc's mbit is 10^6 bit/s
    down = [d * 1e6 / 8 for d in down_mbit]
    return max((n - 1) * size / min(down), n * (n - 1) * size / sum(up), size / min(up))


# ---- one run -----------------------------------------------------------------
@dataclass
class RunResult:
    impl: str
    ok: bool
    T: Optional[float] = None
    setup: Optional[float] = None
    cpu: Optional[float] = None                  # Σ ranks, CPU s during the transfer
    cpu_sys: Optional[float] = None              # its kernel part
    first: Optional[float] = None                # first rank to finish, s after t0
    steal: Optional[float] = None                # the machine's steal over the transfer
    note: str = ""
    per_rank: list[dict] = field(default_factory=list)


class _Worker:
    """A rank's process plus a thread turning its ``@@`` lines into a queue."""

    def __init__(self, rank: int, proc: subprocess.Popen, events: "queue.Queue") -> None:
        self.rank = rank
        self.proc = proc
        self.thread = threading.Thread(target=self._pump, args=(events,), daemon=True)
        self.thread.start()

    def _pump(self, events: "queue.Queue") -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                try:
                    events.put(json.loads(line[2:]))
                except ValueError:
                    log.warning("rank %d: bad line %r", self.rank, line)
        events.put({"ev": "eof", "rank": self.rank})

    def send(self, msg: dict) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass


def _collect(events: "queue.Queue", ev: str, ranks: set[int], timeout: float,
             got: dict[int, dict]) -> Optional[str]:
    """Wait for event ``ev`` from every rank in ``ranks``; None or an error."""
    end = time.monotonic() + timeout
    while not ranks <= got.keys():
        left = end - time.monotonic()
        if left <= 0:
            return f"timeout waiting for {ev} from ranks {sorted(ranks - got.keys())}"
        try:
            msg = events.get(timeout=left)
        except queue.Empty:
            continue
        if msg["ev"] == ev:
            got[msg["rank"]] = msg
        elif msg["ev"] == "error" or (msg["ev"] == "eof" and msg["rank"] not in got):
            return f"rank {msg['rank']}: {msg.get('error', 'exited early')}"
    return None


def run_once(impl: str, hosts: Any, spec_base: dict, args: argparse.Namespace,
             job_dir: str, run_idx: int) -> RunResult:
    """Start n ranks, release them together, time them, verify, stop them."""
    n = spec_base["n"]
    run_dir = os.path.join(job_dir, f"run_{run_idx}_{impl}")
    os.makedirs(run_dir)
    # "fsbt@before": fsbt from another source tree (--tree before=PATH),
    # side by side with this one in the same namespaces and run.
    base_impl, _, tree = impl.partition("@")
    root = args.trees[tree] if tree else ROOT
    spec = dict(spec_base, impl=base_impl, ips=[h.ip for h in hosts], run_dir=run_dir,
                secret=secrets.token_hex(8))
    if args.profile and impl.startswith("fsbt"):
        spec["profile_dir"] = os.path.join(job_dir, f"prof_{run_idx}")
        os.makedirs(spec["profile_dir"], exist_ok=True)
    spec_path = os.path.join(job_dir, f"spec_{impl.replace('@', '_')}_{run_idx}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    events: "queue.Queue" = queue.Queue()
    workers: list[_Worker] = []
    logs = []
    sampler: Optional[CpuSampler] = None
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        for r in range(n):
            wenv = dict(env, GLOO_SOCKET_IFNAME=hosts[r].ifname)
            lp = os.path.join(job_dir, f"log_{impl.replace('@', '_')}_{run_idx}_rank{r}.txt")
            logs.append(lp)
            with open(lp, "w") as errf:
                proc = hosts.popen(r, [sys.executable,
                                       os.path.join(root, "scripts", "allgather_workers.py"),
                                       "--spec", spec_path, "--rank", str(r)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf,
                                   text=True, bufsize=1, env=wenv, cwd=root)
            workers.append(_Worker(r, proc, events))
        ranks = set(range(n))
        ready: dict[int, dict] = {}
        err = _collect(events, "ready", ranks, args.ready_timeout, ready)
        if err:
            return RunResult(impl, False, note=err + _tail(logs))
        t0 = time.monotonic() + 0.2
        wall0 = time.time() + 0.2                # t0 on the clock cpu_load samples with
        peers = [[hosts[r].ip, ready[r]["port"]] for r in range(n)]
        certs = [ready[r].get("cert", "") for r in range(n)]
        sampler = CpuSampler().start()
        for w in workers:
            w.send({"cmd": "go", "t0": t0, "peers": peers, "certs": certs})
        done: dict[int, dict] = {}
        err = _collect(events, "done", ranks, args.timeout + 10, done)
        sampler.stop()
        if err:
            return RunResult(impl, False, note=err + _tail(logs))
        T = max(d["t_done"] for d in done.values()) - t0
        load = load_during(sampler.samples, wall0, T) if T > 0 else None
        first = min(d["t_done"] for d in done.values()) - t0
        conns = [d["t_connected"] - t0 for d in done.values() if "t_connected" in d]
        setup = max(conns) if conns and impl != "libtorrent" else None
        cpu = sum(d.get("cpu", 0.0) for d in done.values())
        cpu_sys = sum(d.get("cpu_sys", 0.0) for d in done.values())
        for w in workers:
            w.send({"cmd": "exit"})
        verified: dict[int, dict] = {}
        err = _collect(events, "verified", ranks, 60, verified)
        if err:
            return RunResult(impl, False, T, setup, cpu, note="verify: " + err + _tail(logs))
        incomplete = sorted(r for r, d in done.items() if d.get("ok") is False)
        bad = {r: v.get("detail") for r, v in verified.items()
               if not v["ok"] and r not in incomplete}
        for w in workers:
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("rank %d did not exit; it will be killed", w.rank)
        notes = ([f"ranks {incomplete} incomplete at the {args.timeout:g} s timeout"]
                 if incomplete else []) + ([f"NOT bit-exact: {bad}"] if bad else [])
        res = RunResult(impl, not (bad or incomplete), T, setup, cpu, cpu_sys, first,
                        steal=load[1] if load else None,
                        note="; ".join(notes), per_rank=[done[r] for r in range(n)])
        return res
    finally:
        if sampler is not None:
            sampler.stop()
        hosts.kill_processes(grace=2.0)


def log_upload_matrix(res: RunResult) -> None:
    """Per fsbt rank: finish time, MiB uploaded to each rank, and how much of
    the upload was the rank's own share (why a slow uplink is or is not busy)."""
    t_first = min(d["t_done"] for d in res.per_rank)
    for d in res.per_rank:
        to = d.get("bytes_out_to") or {}
        served = d.get("served_by_owner") or []
        own = served[d["rank"]] if served else 0
        log.info("rank %d done +%.2fs up MiB to ranks %s; own share %.1f MiB of %.1f",
                 d["rank"], d["t_done"] - t_first,
                 [round(to.get(str(k), 0) / MiB, 1) for k in range(len(res.per_rank))],
                 own / MiB, sum(served) / MiB)


def _tail(logs: list[str], lines: int = 6) -> str:
    out = []
    for p in logs:
        try:
            with open(p) as f:
                t = f.read().strip().splitlines()[-lines:]
        except OSError:
            continue
        if t:
            out.append(f"\n  [{os.path.basename(p)}] " + "\n  ".join(t))
    return "".join(out[:3])


# ---- reporting -----------------------------------------------------------------
def machine_line() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = []
    for mod in ("torch", "libtorrent"):
        try:
            vers.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            pass
    return (f"{platform.platform()}, {cpu or platform.processor() or 'unknown CPU'}, "
            f"{os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            + ", ".join(vers))


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def print_table(case: str, results: dict[str, list[RunResult]], t_lb: Optional[float]) -> None:
    print(f"\n{case}\n")
    print("| impl | runs ok | T s (median) | T s (min–max) | T_LB s | η (median T) | "
          "first rank done s | setup s | CPU s Σranks (sys) | steal % | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for impl, runs in results.items():
        oks = [r for r in runs if r.ok and r.T is not None]
        notes = "; ".join(sorted({r.note.splitlines()[0] for r in runs if r.note}))
        if not oks:
            print(f"| {impl} | 0/{len(runs)} | FAILED | | {fmt(t_lb)} | | | | | | {notes} |")
            continue
        ts = [r.T for r in oks]
        med = statistics.median(ts)
        eta = fmt(t_lb / med, 2) if t_lb else "—"
        setups = [r.setup for r in oks if r.setup is not None]
        setup = fmt(statistics.median(setups)) if setups else "—"
        cpu = fmt(statistics.median([r.cpu for r in oks if r.cpu is not None]), 2)
        sys_ = [r.cpu_sys for r in oks if r.cpu_sys is not None]
        if sys_:
            cpu += f" ({statistics.median(sys_):.2f})"
        first = fmt(statistics.median([r.first for r in oks if r.first is not None]))
        steals = [r.steal for r in oks if r.steal is not None]
        steal = fmt(100 * statistics.median(steals), 1) if steals else "—"
        print(f"| {impl} | {len(oks)}/{len(runs)} | {med:.3f} | {min(ts):.3f}–{max(ts):.3f} | "
              f"{fmt(t_lb)} | {eta} | {first} | {setup} | {cpu} | {steal} | {notes} |")


def profile_report(job_dir: str, top: int) -> str:
    """Merge the fsbt ranks' cProfile dumps: where the transfer's CPU goes."""
    import glob
    import io
    import pstats

    files = sorted(glob.glob(os.path.join(job_dir, "prof_*", "*.pstats")))
    if not files:
        return ""
    buf = io.StringIO()
    st = pstats.Stats(files[0], stream=buf)
    for f in files[1:]:
        st.add(f)
    buf.write(f"\nfsbt profile, {len(files)} rank-runs merged:\n")
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--impl", default="all",
                    help="gloo, libtorrent, fsbt, fsbt-tls, a comma list, or all")
    ap.add_argument("--n", type=int, default=4, help="ranks")
    ap.add_argument("--mb-per-rank", type=float, default=8, help="share size, MiB")
    ap.add_argument("--piece-kib", type=int, default=1024,
                    help="piece size for fsbt and libtorrent (power of 2 for libtorrent)")
    ap.add_argument("--pieces", type=int, default=None,
                    help="pieces per rank (overrides --piece-kib: share / pieces)")
    ap.add_argument("--block-kib", type=int, default=None,
                    help="fsbt request block size (default: chosen as a distributed client "
                         "chooses it, from the download rate: fs/manager.block_size_for of "
                         "(n-1)*S/T_LB, the largest block on unshaped loopback)")
    ap.add_argument("--fsbt-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SwarmConfig field for fsbt (repeatable)")
    ap.add_argument("--tick", type=float, default=None, help="fsbt host tick interval, s")
    ap.add_argument("--shaped", action="store_true", help="one network namespace per rank")
    ap.add_argument("--up", type=float, default=100, help="upload cap, Mbit/s (shaped)")
    ap.add_argument("--down", type=float, default=150, help="download cap, Mbit/s (shaped)")
    ap.add_argument("--slow-half", type=float, default=None,
                    help="upload cap of the upper half of the ranks, Mbit/s (shaped)")
    ap.add_argument("--burst-kbit", type=int, default=600,
                    help="tbf bucket (default 600 kbit: GUIDE §4's 32 kbit makes tbf split "
                         "every 64 KB GSO packet, about 3x the emulation's kernel CPU, which "
                         "starves the ranks on 2 shared cores; pass 32 for GUIDE §4's)")
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                    help="another source tree (e.g. a `git archive` of main): impl "
                         "'fsbt@LABEL' / 'fsbt-tls@LABEL' runs fsbt from PATH in the same run")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per impl, interleaved across impls")
    ap.add_argument("--timeout", type=float, default=120, help="per run, s")
    ap.add_argument("--ready-timeout", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the fsbt ranks' transfer and print the merged top")
    ap.add_argument("--trace", action="store_true",
                    help="fsbt: count uploaded bytes per piece owner and per destination "
                         "(in --json and the log)")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the job directory (logs)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every finally (processes, job
    # directory, namespaces) runs even outside the ShapedHosts block.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)

    impls = list(ALL_IMPLS) if args.impl == "all" else [s.strip() for s in args.impl.split(",")]
    args.trees = {}
    for kv in args.tree:
        label, _, path = kv.partition("=")
        if not label or not os.path.isfile(os.path.join(path, "scripts", "allgather_workers.py")):
            ap.error(f"--tree {kv!r}: want LABEL=PATH, PATH a source tree with "
                     f"scripts/allgather_workers.py")
        args.trees[label] = os.path.abspath(path)
    for i in impls:
        base, _, tree = i.partition("@")
        if base not in ALL_IMPLS or (tree and (not base.startswith("fsbt")
                                               or tree not in args.trees)):
            ap.error(f"unknown impl {i!r} (trees: {sorted(args.trees)})")
    n = args.n
    size = int(args.mb_per_rank * MiB)
    piece = size // args.pieces if args.pieces else args.piece_kib * 1024
    if "libtorrent" in impls and (piece & (piece - 1) or piece < 16 * 1024):
        ap.error(f"libtorrent needs a power-of-two piece size >= 16 KiB, got {piece}")
    up = [args.up if args.shaped else None] * n
    down = [args.down if args.shaped else None] * n
    if args.shaped and args.slow_half:
        for i in range(n // 2, n):
            up[i] = args.slow_half
    t_lb = t_lower_bound(n, size, up, down)
    if args.block_kib is None:
        # As a distributed client sizes its blocks after a round like this
        # one: from its download rate, here the all-gather's at T_LB.
        sys.path.insert(0, ROOT)
        from fs_bittorrent.fs.manager import block_size_for
        rate = (n - 1) * size / t_lb if t_lb else float("inf")
        args.block_kib = block_size_for(rate, 16 * 1024, min(128 * 1024, piece)) // 1024
    fsbt_opts = {}
    for kv in args.fsbt_opt:
        k, v = kv.split("=", 1)
        fsbt_opts[k] = float(v) if "." in v or "e" in v.lower() else int(v)

    job_dir = tempfile.mkdtemp(prefix="fsbt-allgather-", dir="/dev/shm"
                               if os.path.isdir("/dev/shm") else None)
    results: dict[str, list[RunResult]] = {i: [] for i in impls}
    profile = ""
    try:
        shares = write_shares(job_dir, n, size, args.seed)
        spec_base: dict[str, Any] = {
            "n": n, "size": size, "piece_size": piece, "block_size": args.block_kib * 1024,
            # configured uplinks (bytes/s) gate the first-copy plan, as in a
            # distributed client given the rates (fs/manager._round_config)
            "uplinks": [u * 1e6 / 8 for u in up] if args.shaped else [],
            "shares": shares, "dir": job_dir, "timeout": args.timeout,
            "fsbt_opts": fsbt_opts,
            "fsbt_host_opts": {"tick_interval": args.tick} if args.tick else {},
            "log_level": "DEBUG" if args.verbose else "WARNING",
            "trace": args.trace,
        }
        if any(i.startswith("fsbt") for i in impls):
            spec_base["sha256"] = [piece_sha256(p, piece) for p in shares]
        if "libtorrent" in impls:
            spec_base["torrents"] = make_torrents(job_dir, shares, piece)
        if args.shaped:
            overrides = {i: up[i] for i in range(n) if up[i] != args.up}
            hosts_cm: Any = ShapedHosts(n, up_mbit=args.up, down_mbit=args.down,
                                        up_overrides=overrides, burst_kbit=args.burst_kbit)
        else:
            hosts_cm = LocalHosts(n)
        with hosts_cm as hosts:
            run_idx = 0
            for rep in range(args.repeat):
                for impl in impls:
                    res = run_once(impl, hosts, spec_base, args, job_dir, run_idx)
                    run_idx += 1
                    results[impl].append(res)
                    if args.trace and impl.startswith("fsbt") and res.per_rank:
                        log_upload_matrix(res)
                    if not args.keep:   # downloaded copies: free the tmpfs
                        shutil.rmtree(os.path.join(job_dir, f"run_{run_idx - 1}_{impl}"),
                                      ignore_errors=True)
                    log.info("%s run %d: ok=%s T=%s setup=%s cpu=%s sys=%s %s", impl, rep,
                             res.ok, fmt(res.T), fmt(res.setup), fmt(res.cpu, 2),
                             fmt(res.cpu_sys, 2), res.note)
        if args.profile:
            profile = profile_report(job_dir, 30)
    finally:
        if not args.keep:
            shutil.rmtree(job_dir, ignore_errors=True)
        else:
            print(f"job directory kept: {job_dir}")

    shape = (f"shaped (netns + tbf): up {args.up:g} Mbit/s"
             + (f", ranks {n // 2}..{n - 1} up {args.slow_half:g} Mbit/s" if args.slow_half else "")
             + f", down {args.down:g} Mbit/s, tbf burst "
             + f"{args.burst_kbit} kbit"
             if args.shaped else "unshaped loopback (127.0.0.1)")
    case = (f"**{n} ranks × {args.mb_per_rank:g} MiB** ({size // piece} pieces of "
            f"{piece // 1024} KiB, fsbt block {args.block_kib} KiB), {shape}; "
            f"{args.repeat} run(s) per impl" + (f"; fsbt opts {fsbt_opts}" if fsbt_opts else ""))
    print(f"\nmachine: {machine_line()}")
    print_table(case, results, t_lb)
    if profile:
        print(profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"case": case, "t_lb": t_lb, "machine": machine_line(),
                       "results": {k: [r.__dict__ for r in v] for k, v in results.items()}},
                      f, indent=1)
    return 0 if all(r.ok for v in results.values() for r in v) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; processes and namespaces removed", file=sys.stderr)
        sys.exit(130)
