"""Bandwidth-shaped hosts on one machine: network namespaces, veth, a bridge, ``tc tbf``.

Why this exists: the all-gather benchmarks need *n* hosts whose uplinks and
downlinks are capped (``netem`` is absent from this kernel, so no delay or
loss; only rates).  The recipe is the one in ``shared/GUIDE.md`` section 4:

* one "switch" namespace holding a bridge ``br0``;
* per host a namespace with one veth end ``eth0`` (address ``10.77.0.<i+1>/24``)
  whose other end ``p<i>`` is a port of the bridge;
* ``tbf`` on the host's ``eth0`` caps what the host *sends* (upload), ``tbf``
  on the bridge port ``p<i>`` caps what the switch sends *to* the host
  (download).

Namespaces are a machine-wide resource that outlives a crashed process, so
the hard requirement is cleanup.  Every namespace is named
``<prefix><creator pid>-<k>-<role>`` (prefix ``fsbt-``, ``k`` counts host
sets within the process); :class:`ShapedHosts`
removes them on normal exit, on an exception, on SIGINT/SIGTERM/SIGHUP
(handlers turn the signal into an exception so the ``with`` block unwinds),
and at ``atexit``.  On entry it also removes *stale* namespaces of the same
prefix, i.e. those whose creator pid is no longer alive (a SIGKILLed run), and
only those: a concurrent run with a live creator is never touched.  Processes
started in a host via :meth:`ShapedHosts.popen` get their own process group
and are killed (by that group id) before the namespaces go.

:class:`LocalHosts` offers the same interface on unshaped loopback (no root
needed), so a harness can be written once.

CLI::

    python scripts/netns_hosts.py --cleanup            # remove stale fsbt- namespaces
    python scripts/netns_hosts.py --cleanup --force    # remove every fsbt- namespace
    python scripts/netns_hosts.py --check --up 100 --down 150   # build 2 hosts, measure, remove
    python scripts/netns_hosts.py --hold --n 4 --up 100         # build, wait for Ctrl-C, remove
"""
from __future__ import annotations

import argparse
import atexit
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Mapping, Optional, Sequence

log = logging.getLogger("netns_hosts")

PREFIX = "fsbt-"
SUBNET = "10.77.0"
HOST_IFNAME = "eth0"
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_instances = itertools.count()        # several host sets in one process get distinct names


# ---- low-level helpers -------------------------------------------------------
def have_ip_tool() -> bool:
    """True if the ``ip`` and ``tc`` binaries are present."""
    return shutil.which("ip") is not None and shutil.which("tc") is not None


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run one ``ip``/``tc`` command; raise with its stderr when it fails."""
    log.debug("+ %s", " ".join(argv))
    res = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"command failed ({res.returncode}): {' '.join(argv)}: "
                           f"{res.stderr.strip()}")
    return res


def list_netns() -> list[str]:
    """Names of every network namespace (``ip netns list`` prints ``name (id: N)``)."""
    res = _run(["ip", "netns", "list"], check=False)
    if res.returncode != 0:
        return []
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by someone else
        return True
    return True


def _owner_pid(name: str, prefix: str) -> Optional[int]:
    m = re.match(re.escape(prefix) + r"(\d+)-", name)
    return int(m.group(1)) if m else None


def _kill_pids_in_netns(name: str) -> None:
    """Kill processes still inside one of *our* namespaces (started by a
    crashed run of this tool), by pid, so that the namespace really goes."""
    res = _run(["ip", "netns", "pids", name], check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit()] if res.returncode == 0 else []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            log.warning("killed leftover pid %d in namespace %s", pid, name)
        except ProcessLookupError:
            pass


def delete_netns(name: str) -> None:
    """Remove one namespace (its veth ends go with it); missing is fine."""
    _kill_pids_in_netns(name)
    res = _run(["ip", "netns", "del", name], check=False)
    if res.returncode != 0 and name in list_netns():
        log.error("could not delete namespace %s: %s", name, res.stderr.strip())


def cleanup_namespaces(prefix: str = PREFIX, force: bool = False) -> list[str]:
    """Remove namespaces named ``<prefix>...`` whose creator is dead (or all
    of them with ``force``).  Host namespaces go before switch namespaces.
    Returns the names removed."""
    if not prefix or not prefix.endswith("-"):
        raise ValueError("prefix must be non-empty and end with '-' (e.g. 'fsbt-')")
    doomed = []
    for name in list_netns():
        if not name.startswith(prefix):
            continue
        pid = _owner_pid(name, prefix)
        if force or pid is None or not _pid_alive(pid):
            doomed.append(name)
    doomed.sort(key=lambda s: s.endswith("-sw"))     # hosts first, then switches
    for name in doomed:
        delete_netns(name)
    if doomed:
        log.info("removed %d namespace(s): %s", len(doomed), " ".join(doomed))
    return doomed


# ---- hosts -------------------------------------------------------------------
@dataclass(frozen=True)
class Host:
    """One shaped host: its namespace (None on plain loopback), address and caps."""

    index: int
    netns: Optional[str]
    ip: str
    ifname: str
    up_mbit: Optional[float]
    down_mbit: Optional[float]

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]


class _HostSet:
    """Common part: process tracking, signal handlers and idempotent close.

    Subclasses implement ``_create`` and ``_destroy``.
    """

    hosts: list[Host]

    def __init__(self) -> None:
        self.hosts = []
        self._procs: list[subprocess.Popen] = []
        self._closed = True
        self._old_handlers: dict[int, Any] = {}
        self._lock = threading.Lock()

    # context manager ------------------------------------------------------
    def __enter__(self) -> "_HostSet":
        self._closed = False
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    # processes --------------------------------------------------------------
    def popen(self, i: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside host ``i`` in its own process group; the
        process is killed on :meth:`close` if still running."""
        if self._closed:
            raise RuntimeError("host set is closed")
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.hosts[i].wrap(argv), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def kill_processes(self, grace: float = 2.0) -> None:
        """SIGTERM each started process group, SIGKILL after ``grace`` s."""
        with self._lock:
            procs = list(self._procs)
            self._procs.clear()
        live = [p for p in procs if p.poll() is None]
        for p in live:
            _signal_group(p, signal.SIGTERM)
        end = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                try:
                    p.wait(5.0)
                except subprocess.TimeoutExpired:  # pragma: no cover
                    log.error("pid %d did not die", p.pid)
        for p in procs:  # close our pipe ends
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass

    # teardown -------------------------------------------------------------
    def close(self) -> None:
        """Kill started processes and remove what was created; safe to call
        more than once and from a signal-driven unwind."""
        if self._closed:
            return
        self._closed = True
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:      # no second signal may interrupt the teardown
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        try:
            self.kill_processes()
            self._destroy()
        finally:
            self._restore_signal_handlers()
            try:
                atexit.unregister(self.close)
            except Exception:  # pragma: no cover
                pass
            if in_main:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: no signal handlers; rely on with/atexit")
            return
        for sig in _HANDLED_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):  # pragma: no cover - not main thread
                pass
        self._old_handlers.clear()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        """Turn the signal into an exception: the ``with`` block unwinds and
        ``close`` runs.  SIGINT keeps its usual KeyboardInterrupt."""
        log.warning("signal %d: tearing down", signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _create(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _destroy(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)      # start_new_session: group id == pid
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


class LocalHosts(_HostSet):
    """``n`` unshaped "hosts" that are all 127.0.0.1 (no namespaces, no root)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def _create(self) -> None:
        self.hosts = [Host(i, None, "127.0.0.1", "lo", None, None) for i in range(self.n)]

    def _destroy(self) -> None:
        self.hosts = []


class ShapedHosts(_HostSet):
    """``n`` hosts in network namespaces behind one bridge, rate-capped by tbf.

    ``up_mbit``/``down_mbit`` are the default caps (None: no qdisc, i.e. the
    veth's native speed); ``up_overrides``/``down_overrides`` map host index
    to a different cap (e.g. half the hosts at a 20 Mbit/s uplink).

    >>> with ShapedHosts(4, up_mbit=100, down_mbit=150, up_overrides={2: 20, 3: 20}) as hs:
    ...     p = hs.popen(0, ["python3", "-c", "print('hi')"])   # doctest: +SKIP
    """

    def __init__(self, n: int, up_mbit: Optional[float] = None,
                 down_mbit: Optional[float] = None,
                 up_overrides: Optional[Mapping[int, float]] = None,
                 down_overrides: Optional[Mapping[int, float]] = None,
                 prefix: str = PREFIX, burst_kbit: Optional[int] = None,
                 latency_ms: int = 400,
                 slow_start_after_idle: Optional[int] = None) -> None:
        super().__init__()
        if not 1 <= n <= 250:
            raise ValueError(f"n must be in 1..250, got {n}")
        if not prefix.endswith("-"):
            raise ValueError("prefix must end with '-'")
        self.n = n
        self.up = {i: (up_overrides or {}).get(i, up_mbit) for i in range(n)}
        self.down = {i: (down_overrides or {}).get(i, down_mbit) for i in range(n)}
        self.prefix = prefix
        self.tag = f"{prefix}{os.getpid()}-{next(_instances)}-"
        self.switch = f"{self.tag}sw"
        self.burst_kbit = burst_kbit
        self.latency_ms = latency_ms
        # net.ipv4.tcp_slow_start_after_idle is per network namespace: 0
        # keeps a connection's congestion window across idle gaps (clients
        # train between rounds); None leaves the kernel default (1).
        self.slow_start_after_idle = slow_start_after_idle
        self._created: list[str] = []

    def _tbf(self, ns: str, dev: str, mbit: float) -> None:
        # GUIDE §4 uses 32 kbit of burst at 100-150 Mbit/s; faster links
        # need a larger bucket or tbf cannot keep up with its own rate.
        burst = self.burst_kbit or max(32, int(mbit // 4))
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", f"{mbit:g}mbit", "burst", f"{burst}kbit",
              "latency", f"{self.latency_ms}ms"])

    def _create(self) -> None:
        if not is_root():
            raise PermissionError("ShapedHosts needs root (network namespaces)")
        if not have_ip_tool():
            raise FileNotFoundError("ShapedHosts needs the 'ip' and 'tc' tools")
        cleanup_namespaces(self.prefix)              # stale ones of dead runs only
        for name in list_netns():                    # a dead run whose pid we reuse
            if name.startswith(self.tag):
                delete_netns(name)
        sw = self.switch
        _run(["ip", "netns", "add", sw])
        self._created.append(sw)
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        _run(["ip", "-n", sw, "link", "set", "lo", "up"])
        for i in range(self.n):
            ns = f"{self.tag}h{i}"
            _run(["ip", "netns", "add", ns])
            self._created.append(ns)
            port = f"p{i}"
            _run(["ip", "link", "add", HOST_IFNAME, "netns", ns, "type", "veth",
                  "peer", "name", port, "netns", sw])
            ip = f"{SUBNET}.{i + 1}"
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", HOST_IFNAME])
            _run(["ip", "-n", ns, "link", "set", HOST_IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.slow_start_after_idle is not None:
                _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                      f"net.ipv4.tcp_slow_start_after_idle={int(self.slow_start_after_idle)}"])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            if self.up[i]:
                self._tbf(ns, HOST_IFNAME, self.up[i])
            if self.down[i]:
                self._tbf(sw, port, self.down[i])
            self.hosts.append(Host(i, ns, ip, HOST_IFNAME, self.up[i], self.down[i]))
        log.info("created %d shaped hosts under %s* (up %s, down %s Mbit/s)", self.n,
                 self.tag, [self.up[i] for i in range(self.n)],
                 [self.down[i] for i in range(self.n)])

    def _destroy(self) -> None:
        for name in sorted(self._created, key=lambda s: s.endswith("-sw")):
            delete_netns(name)
        self._created.clear()
        self.hosts = []
        left = [s for s in list_netns() if s.startswith(self.tag)]
        if left:  # pragma: no cover - would be a bug
            log.error("namespaces left behind: %s", left)


# ---- CLI ---------------------------------------------------------------------
_SINK = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5999)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.monotonic()
    n += len(b)
print(n, time.monotonic() - t0, flush=True)
"""
_SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5999)); buf = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])): c.sendall(buf)
c.close()
"""


def check_goodput(hosts: ShapedHosts, mib: int = 16) -> tuple[float, float]:
    """Send ``mib`` MiB from host 0 to host 1; return goodput in Mbit/s and
    the CPU seconds (user + sys, both ends and the softirqs they were
    charged) it cost -- the emulation's own overhead."""
    py = sys.executable
    sink = hosts.popen(1, [py, "-c", _SINK, hosts[1].ip], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    sink.stdout.readline()
    before = os.times()
    src = hosts.popen(0, [py, "-c", _SOURCE, hosts[1].ip, str(mib)])
    src.wait(120)
    nbytes, secs = sink.stdout.readline().split()
    sink.wait(10)
    after = os.times()
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return int(nbytes) * 8 / float(secs) / 1e6, cpu


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cleanup", action="store_true",
                    help=f"remove stale {PREFIX}* namespaces (creator dead) and exit")
    ap.add_argument("--force", action="store_true",
                    help="with --cleanup: remove every namespace with the prefix")
    ap.add_argument("--prefix", default=PREFIX)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--up", type=float, default=None, help="upload cap, Mbit/s")
    ap.add_argument("--down", type=float, default=None, help="download cap, Mbit/s")
    ap.add_argument("--slow-half", type=float, default=None,
                    help="upload cap of the upper half of the hosts, Mbit/s")
    ap.add_argument("--burst-kbit", type=int, default=None,
                    help="tbf bucket size (default: 32 kbit as in GUIDE §4, more above 128 Mbit/s)")
    ap.add_argument("--check", action="store_true",
                    help="build the hosts, measure host0 -> host1 goodput, remove")
    ap.add_argument("--hold", action="store_true",
                    help="build the hosts and wait for Ctrl-C / SIGTERM")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cleanup:
        removed = cleanup_namespaces(args.prefix, force=args.force)
        print(f"removed {len(removed)} namespace(s)" + (": " + " ".join(removed) if removed else ""))
        return 0
    overrides = ({i: args.slow_half for i in range(args.n // 2, args.n)}
                 if args.slow_half else None)
    with ShapedHosts(max(args.n, 2 if args.check else 1), args.up, args.down,
                     up_overrides=overrides, prefix=args.prefix,
                     burst_kbit=args.burst_kbit) as hosts:
        for h in hosts:
            print(f"host {h.index}: netns {h.netns} ip {h.ip} up {h.up_mbit} down {h.down_mbit}")
        if args.check:
            mbit, cpu = check_goodput(hosts)
            print(f"goodput host0 -> host1: {mbit:.1f} Mbit/s, {cpu:.2f} CPU s for 16 MiB")
        if args.hold:
            print("holding; Ctrl-C to remove", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
