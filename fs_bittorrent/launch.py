"""Launch one distributed FS experiment: a server and N client processes.

Every participant is ``python -m fs_bittorrent run --cfg X.yaml`` with its
own ``distribute.*`` role, ports and data index, its own ``outdir`` (logs,
piece store) and its own log file.  ``wrap(role, index)`` may prefix a
command -- ``ip netns exec h3`` for the shaped benchmarks -- and
``host_of(role, index)`` names the address each process binds.

The launcher waits for every process with a time limit.  If one fails or
time runs out, it kills the rest (their process groups), so nothing is left
behind; the result says who exited how, where the logs are, and carries
the server's per-round statistics (``bittorrent_rounds.jsonl``).

    fs-bittorrent launch --cfg configs/toy_distributed.yaml --clients 4 --out exp/dist
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)

Wrap = Callable[[str, int], list]


@dataclass
class Participant:
    role: str                 # 'server' | 'client'
    index: int                # 0 for the server, 1..N for clients (FS data_idx)
    argv: list
    log_path: Path
    outdir: Path
    proc: Optional[subprocess.Popen] = None
    returncode: Optional[int] = None


@dataclass
class LaunchResult:
    participants: list[Participant]
    wall_time: float
    timed_out: bool
    rounds: list[dict] = field(default_factory=list)   # the server's bittorrent_rounds.jsonl

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(p.returncode == 0 for p in self.participants)

    def killed(self) -> list[str]:
        return [name(p) for p in self.participants if p.returncode == -signal.SIGKILL]

    def exit_codes(self) -> dict[str, Optional[int]]:
        return {name(p): p.returncode for p in self.participants}

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for p in self.participants:
            text = p.log_path.read_text(errors="replace").splitlines() if p.log_path.exists() \
                else []
            out.append(f"== {name(p)} (exit {p.returncode}) ==")
            out.extend(text[-lines:])
        return "\n".join(out)


def name(p: Participant) -> str:
    return "server" if p.role == "server" else f"client_{p.index}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def plan(cfg_file: str, clients: int, out: Path, opts: Sequence[str] = (),
         host_of: Callable[[str, int], str] = lambda role, i: "127.0.0.1",
         wrap: Optional[Wrap] = None, python: str = sys.executable) -> list[Participant]:
    """The command line of every participant (ports picked now)."""
    server_host = host_of("server", 0)
    server_port = free_port(server_host) if server_host == "127.0.0.1" else 50051
    parts = []
    for role, index in [("server", 0)] + [("client", i) for i in range(1, clients + 1)]:
        host = host_of(role, index)
        port = server_port if role == "server" else (
            free_port(host) if host == "127.0.0.1" else 50052)
        outdir = out / ("server" if role == "server" else f"client_{index}")
        argv = [python, "-m", "fs_bittorrent", "run", "--cfg", cfg_file, *opts,
                "federate.mode", "distributed", "federate.client_num", str(clients),
                "distribute.use", "True", "distribute.role", role,
                "distribute.server_host", server_host, "distribute.server_port", str(server_port),
                "distribute.client_host", host, "distribute.client_port", str(port),
                "distribute.data_idx", str(index), "outdir", str(outdir)]
        if wrap is not None:
            argv = list(wrap(role, index)) + argv
        parts.append(Participant(role, index, argv, out / "logs" / f"{outdir.name}.log", outdir))
    return parts


def start(parts: Sequence[Participant], client_delay: float = 0.5,
          env: Optional[dict] = None) -> None:
    """Start each participant in its own process group, output to its log;
    the clients ``client_delay`` seconds after the server."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for p in parts:
        p.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(p.log_path, "wb") as f:
            p.proc = subprocess.Popen(p.argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        if p.role == "server":
            time.sleep(client_delay)     # a head start (clients also wait for its port)


def run(parts: list[Participant], timeout: float = 600.0, client_delay: float = 0.5,
        env: Optional[dict] = None, tolerate_killed: bool = False) -> LaunchResult:
    """Start the server, then the clients; wait for all (bounded); clean up.

    ``tolerate_killed``: a client that dies of SIGKILL (a crash injected by
    ``bittorrent.faults.crash_clients``) does not stop the others."""
    t0 = time.monotonic()
    timed_out = False
    server = next((p for p in parts if p.role == "server"), None)
    # rows an earlier run left in the same outdir are not this run's
    before = rounds_seen(server.outdir) if server is not None else {}
    try:
        start(parts, client_delay, env)
        deadline = t0 + timeout
        pending = list(parts)
        while pending:
            for p in list(pending):
                rc = p.proc.poll()
                if rc is not None:
                    p.returncode = rc
                    pending.remove(p)
                    if rc == -signal.SIGKILL and tolerate_killed and p.role == "client":
                        log.warning("%s was killed (SIGKILL); the others go on", name(p))
                    elif rc != 0:
                        log.error("%s exited with %s; stopping the others", name(p), rc)
                        raise _Failed()
            if time.monotonic() > deadline:
                timed_out = True
                log.error("launch: time limit of %.0fs reached; stopping everyone", timeout)
                break
            time.sleep(0.05)
    except (_Failed, KeyboardInterrupt):
        pass
    finally:
        stop_all(parts)
    result = LaunchResult(parts, time.monotonic() - t0, timed_out)
    if server is not None:
        result.rounds = read_rounds(server.outdir, skip=before)
    return result


class _Failed(Exception):
    pass


def stop_all(parts: Sequence[Participant], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every participant's process group still alive."""
    alive = [p for p in parts if p.proc is not None and p.proc.poll() is None]
    for p in alive:
        _signal_group(p.proc, signal.SIGTERM)
    end = time.monotonic() + grace
    for p in alive:
        try:
            p.proc.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p.proc, signal.SIGKILL)
            p.proc.wait()
    for p in parts:
        if p.proc is not None and p.returncode is None:
            p.returncode = p.proc.returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _round_lines(outdir: Path) -> dict[Path, list[str]]:
    """The non-empty lines of every ``bittorrent_rounds.jsonl`` under
    ``outdir`` (FS may add a sub-directory per experiment), by path."""
    out = {}
    for path in sorted(Path(outdir).rglob("bittorrent_rounds.jsonl")):
        with open(path) as f:
            out[path] = [line for line in f if line.strip()]
    return out


def rounds_seen(outdir: Path) -> dict[Path, int]:
    """How many lines each ``bittorrent_rounds.jsonl`` under ``outdir`` has
    now: what :func:`read_rounds` must skip to see only a later run's."""
    return {path: len(lines) for path, lines in _round_lines(outdir).items()}


def read_rounds(outdir: Path, skip: Optional[dict[Path, int]] = None) -> list[dict]:
    """Every ``bittorrent_rounds.jsonl`` line under ``outdir`` (FS may add
    a sub-directory per experiment), but the first ``skip[path]`` lines of
    each file: those an earlier run wrote into the same outdir (FS then
    makes a new sub-directory, or the file is appended to)."""
    skip = skip or {}
    return [json.loads(line) for path, lines in _round_lines(outdir).items()
            for line in lines[skip.get(path, 0):]]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fs-bittorrent launch",
                                 description="Run a server and N clients of one distributed "
                                             "FS experiment on this host (127.0.0.1).")
    ap.add_argument("--cfg", required=True, help="FS YAML (mode and distribute.* are set here)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", default="exp/distributed")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs for every process")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(a.out)
    result = run(plan(a.cfg, a.clients, out, a.opts), timeout=a.timeout)
    for who, rc in result.exit_codes().items():
        print(f"{who}: exit {rc}")
    for r in result.rounds:
        eta = r.get("eta")
        print(f"round {r['round']}: {r['reason']} in {r['exchange_time']:.3f}s ({r['clock']}), "
              f"completion {r['completion_ratio']:.2f}" + (f", eta {eta:.3f}" if eta else ""))
    print(f"wall {result.wall_time:.1f}s; logs in {out / 'logs'}")
    if not result.ok:
        print(result.log_tail(), file=sys.stderr)
    return 0 if result.ok else 1
