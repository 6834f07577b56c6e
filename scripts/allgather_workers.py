"""One rank of the all-gather benchmark (started by ``scripts/bench_allgather.py``).

Why a separate process per rank: the comparison with gloo and libtorrent is
only fair if every rank has its own interpreter, its own sockets and, when
shaped, its own network namespace -- exactly as in FederatedScope's
distributed mode.

Protocol with the harness (JSON lines; ours are prefixed with ``@@`` on stdout
so that library noise cannot be mistaken for them):

1. the worker prepares everything that does not move share bytes (imports,
   loading its share, listening socket, torrents, store) and reports
   ``{"ev": "ready", "port": p}``;
2. the harness answers ``{"cmd": "go", "t0": T, "peers": [[ip, port], ...]}``;
   every worker sleeps until the common ``time.monotonic()`` instant ``T``
   (CLOCK_MONOTONIC is machine-wide, namespaces do not change it), then
   connects and transfers;
3. the worker reports ``{"ev": "done", "t_done": ..., ...}`` and *keeps
   serving* (a finished BitTorrent peer still uploads to the others);
4. on ``{"cmd": "exit"}`` it shuts down, checks every share bit-exact against
   the files the harness wrote (outside the timed region, so verification
   never steals CPU from ranks still transferring), reports
   ``{"ev": "verified", "ok": ...}`` and exits.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import queue
import resource
import sys
import threading
import time
from typing import Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

log = logging.getLogger("allgather_worker")


# ---- harness I/O -------------------------------------------------------------
class HarnessIO:
    """Line protocol over stdin/stdout; stdin is read by a thread so that
    an asyncio loop (fsbt) or libtorrent's threads keep running meanwhile."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._q: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._out = sys.stdout
        # Anything else printed to stdout (libraries) goes to stderr.
        sys.stdout = sys.stderr
        threading.Thread(target=self._reader, daemon=True, name="stdin").start()

    def _reader(self) -> None:
        for line in sys.stdin:
            line = line.strip()
            if line:
                self._q.put(json.loads(line))
        self._q.put(None)          # harness went away

    def emit(self, ev: str, **fields: Any) -> None:
        self._out.write("@@" + json.dumps({"ev": ev, "rank": self.rank, **fields}) + "\n")
        self._out.flush()

    def command(self, expect: str, timeout: Optional[float] = None) -> dict:
        msg = self._q.get(timeout=timeout)
        if msg is None:
            raise SystemExit("harness closed stdin")
        if msg.get("cmd") != expect:
            raise RuntimeError(f"expected {expect!r}, got {msg!r}")
        return msg


def wait_until(t0: float) -> None:
    """Sleep to the common start instant (last 2 ms spun for precision)."""
    while True:
        left = t0 - time.monotonic()
        if left <= 0:
            return
        time.sleep(left - 0.002 if left > 0.003 else 0)


def cpu_seconds() -> float:
    """CPU time of this process, every thread (libtorrent and gloo use threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def sys_seconds() -> float:
    """Kernel part of :func:`cpu_seconds` (sockets, and the veth/bridge/tbf
    packet work that softirqs charge to whoever is running)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def read_share(spec: dict, owner: int) -> bytes:
    with open(spec["shares"][owner], "rb") as f:
        return f.read()


# ---- gloo --------------------------------------------------------------------
def run_gloo(spec: dict, rank: int, io: HarnessIO) -> None:
    """torch.distributed all_gather (gloo); the TCP store lives on rank 0."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    n, timeout = spec["n"], timedelta(seconds=spec["timeout"])
    share = torch.frombuffer(bytearray(read_share(spec, rank)), dtype=torch.uint8)
    out = [torch.empty_like(share) for _ in range(n)]
    store = None
    port = 0
    if rank == 0:   # listening socket only, like the other impls' listeners
        store = dist.TCPStore(spec["ips"][0], 0, n, True, timeout, wait_for_workers=False)
        port = store.port
    io.emit("ready", port=port)
    go = io.command("go")
    host0, port0 = go["peers"][0]
    wait_until(go["t0"])
    c0, s0 = cpu_seconds(), sys_seconds()
    if store is None:
        store = dist.TCPStore(host0, port0, n, False, timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n, timeout=timeout)
    t_conn = time.monotonic()
    dist.all_gather(out, share)
    t_done = time.monotonic()
    io.emit("done", t_done=t_done, t_connected=t_conn, cpu=cpu_seconds() - c0,
            cpu_sys=sys_seconds() - s0)
    io.command("exit")
    bad = [o for o in range(n) if out[o].numpy().tobytes() != read_share(spec, o)]
    dist.destroy_process_group()
    io.emit("verified", ok=not bad, detail=f"bad shares {bad}" if bad else "")


# ---- libtorrent --------------------------------------------------------------
def lt_settings(spec: dict, ip: str) -> dict:
    """Settings for a closed LAN swarm: no discovery of any kind, plain TCP,
    no per-session caps that would throttle n x n connections."""
    return {
        "listen_interfaces": f"{ip}:0",
        "outgoing_interfaces": "",
        "enable_dht": False, "enable_lsd": False,
        "enable_upnp": False, "enable_natpmp": False,
        "enable_incoming_utp": False, "enable_outgoing_utp": False,
        "enable_incoming_tcp": True, "enable_outgoing_tcp": True,
        "in_enc_policy": 2, "out_enc_policy": 2,       # pe_disabled
        "allow_multiple_connections_per_ip": True,    # loopback: every peer is 127.0.0.1
        "connections_limit": 2000, "connection_speed": 1000, "smooth_connects": False,
        "torrent_connect_boost": 255,
        "unchoke_slots_limit": -1,                    # unchoke every interested peer
        "active_downloads": -1, "active_seeds": -1, "active_limit": -1,
        "active_checking": 100,
        "max_out_request_queue": 1500, "max_allowed_in_request_queue": 4000,
        "request_queue_time": 3,
        "send_buffer_watermark": 8 * 1024 * 1024, "send_buffer_low_watermark": 1024 * 1024,
        "send_buffer_watermark_factor": 150,
        "max_queued_disk_bytes": 256 * 1024 * 1024,
        "close_redundant_connections": False,          # a seed keeps uploading to seeds-to-be
        "upload_rate_limit": 0, "download_rate_limit": 0,
        "alert_mask": 0x7fffffff & ~0x800 & ~0x1000,   # no per-block progress/debug spam
        "aio_threads": 4, "hashing_threads": 2,
    }


def run_libtorrent(spec: dict, rank: int, io: HarnessIO) -> None:
    """Rank seeds its own torrent and downloads the other n-1 torrents."""
    import libtorrent as lt

    n, ip = spec["n"], spec["ips"][rank]
    ses = lt.session(lt_settings(spec, ip))
    # Put every address in the global peer class: LAN/loopback peers are
    # otherwise in the "local" class, exempt from (here unused) rate limits.
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", 1 << lt.session.global_peer_class_id)
    ses.set_peer_class_filter(f)
    dl_dir = os.path.join(spec["run_dir"], f"lt_rank{rank}")   # fresh per run
    os.makedirs(dl_dir, exist_ok=True)
    handles = []
    for o in range(n):
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(spec["torrents"][o])
        if o == rank:
            atp.save_path = os.path.dirname(spec["shares"][o])
            atp.flags = lt.torrent_flags.seed_mode
        else:
            atp.save_path = dl_dir
            atp.flags = 0
        atp.flags |= lt.torrent_flags.disable_dht | lt.torrent_flags.disable_lsd \
            | lt.torrent_flags.disable_pex
        handles.append(ses.add_torrent(atp))
    port = ses.listen_port()
    deadline = time.monotonic() + 30
    ready = (lt.torrent_status.downloading, lt.torrent_status.seeding,
             lt.torrent_status.finished)
    while not all(h.status().state in ready for h in handles):
        if time.monotonic() > deadline:
            raise RuntimeError(f"torrents not ready: {[str(h.status().state) for h in handles]}")
        time.sleep(0.01)
    ses.pop_alerts()
    io.emit("ready", port=port)
    go = io.command("go")
    peers = [tuple(p) for p in go["peers"]]
    wait_until(go["t0"])
    c0, s0 = cpu_seconds(), sys_seconds()
    # One connection per (torrent, pair of ranks), dialed by the lower rank.
    for h in handles:
        for k in range(rank + 1, n):
            h.connect_peer((peers[k][0], peers[k][1]))
    t_conn = time.monotonic()
    want = {str(handles[o].info_hash()) for o in range(n) if o != rank}
    done: set[str] = set()
    end = t_conn + spec["timeout"]
    last_poll = 0.0
    while done != want:
        if ses.wait_for_alert(20) is not None:
            for a in ses.pop_alerts():
                if isinstance(a, lt.torrent_finished_alert):
                    done.add(str(a.handle.info_hash()))
                elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
                    log.warning("rank %d: %s", rank, a.message())
        t = time.monotonic()
        if t - last_poll > 0.25:   # belt and braces: an alert can be missed
            last_poll = t
            done |= {str(h.info_hash()) for o, h in enumerate(handles)
                     if o != rank and h.status().is_seeding}
        if t > end:
            break
    t_done = time.monotonic()
    ok = done == want
    io.emit("done", t_done=t_done, t_connected=t_conn, cpu=cpu_seconds() - c0,
            cpu_sys=sys_seconds() - s0, ok=ok, progress=[round(h.status().progress, 3) for h in handles])
    io.command("exit")
    ses.pause()
    del handles
    del ses                           # joins libtorrent's threads: files are complete
    bad = []
    for o in range(n):
        if o == rank:
            continue
        name = os.path.basename(spec["shares"][o])
        try:
            with open(os.path.join(dl_dir, name), "rb") as fh:
                got = fh.read()
        except OSError:
            got = b""
        if got != read_share(spec, o):
            bad.append(o)
    io.emit("verified", ok=ok and not bad, detail=f"bad shares {bad}" if bad else "")


# ---- fsbt --------------------------------------------------------------------
def fsbt_config(spec: dict):
    from fs_bittorrent.core.config import MiB, SwarmConfig

    opts = dict(spec.get("fsbt_opts") or {})
    block = spec["block_size"]
    opts.setdefault("piece_size", spec["piece_size"])
    opts.setdefault("block_size", block)
    opts.setdefault("max_block_size", max(128 * 1024, block))
    opts.setdefault("credit_bytes", max(4 * MiB, spec["piece_size"]))
    config = SwarmConfig(**opts)
    if spec.get("uplinks") and "first_copy_wait" not in (spec.get("fsbt_opts") or {}):
        from fs_bittorrent.core.picker import plan_where_uplinks_differ
        config = plan_where_uplinks_differ(config, spec["uplinks"])
    return config


def fsbt_layout(spec: dict):
    from fs_bittorrent.core.layout import SwarmLayout
    from fs_bittorrent.core.manifest import Manifest, TensorSpec

    size, piece = spec["size"], spec["piece_size"]
    ms = []
    for o, hashes in enumerate(spec["sha256"]):
        ms.append(Manifest(o, 0, size, piece, tuple(bytes.fromhex(h) for h in hashes), 1,
                           (TensorSpec("w", "U8", (size,), 0, size),)))
    return SwarmLayout(tuple(ms), experiment="bench_allgather")


async def _fsbt_main(spec: dict, rank: int, io: HarnessIO) -> None:
    from fs_bittorrent.core.session import SwarmSession
    from fs_bittorrent.core.storage import ContentPool, MemoryPieceStorage
    from fs_bittorrent.net.dataplane import DataPlanePeer

    n, ip = spec["n"], spec["ips"][rank]
    cfg = fsbt_config(spec)
    layout = fsbt_layout(spec)
    storage = MemoryPieceStorage(ContentPool(), verify=False)
    blob = read_share(spec, rank)
    m = layout.manifest(rank)
    for k in range(m.num_pieces):
        a, b = m.piece_range(k)
        storage.put(rank, k, m.piece_hashes[k], blob[a:b])
    del blob
    # Plaintext fsbt keeps the HMAC handshake; TLS authenticates fsbt-tls.
    secret = b"" if spec["impl"] == "fsbt-tls" else spec["secret"].encode()
    # Where the configured uplinks differ and the plan is on, as a
    # distributed client given its rates: the uplinks hint (capacity-aware
    # plan) and paced uploads (held in the session, released by the host
    # when its uplink has room); uniform links: neither, as before.
    from fs_bittorrent.core.picker import pace_uploads
    ups = spec.get("uplinks") or []
    paced = pace_uploads(cfg, ups)
    session = SwarmSession(rank, layout, storage, cfg, secret=secret, now=time.monotonic(),
                           uplinks=dict(enumerate(ups)) if paced else None,
                           paced_uploads=paced)
    served_by_owner = [0] * n
    if spec.get("trace"):
        # Diagnostics only (costs a little per message): which owners' bytes
        # this rank uploads, seen on the public session.handle's output.
        from fs_bittorrent.core.messages import Piece
        handle = session.handle

        def traced(pid, msg, t, _handle=handle, _piece=Piece, _owner=layout.owner_of):
            out = _handle(pid, msg, t)
            for _, m in out:
                if type(m) is _piece:
                    served_by_owner[_owner(m.index)] += len(m.block)
            return out
        session.handle = traced
    identity = None
    if spec["impl"] == "fsbt-tls":
        # As a distributed client does: a fresh key, only the certificate
        # goes out (here through the harness, there through the server).
        from fs_bittorrent.net.tls import LocalIdentity
        identity = LocalIdentity.generate()
    peer = DataPlanePeer(session, ip, 0, identity=identity,
                         **(spec.get("fsbt_host_opts") or {}))
    await peer.start()
    loop = asyncio.get_running_loop()
    io.emit("ready", port=peer.port,
            cert=base64.b64encode(identity.cert_der).decode() if identity else "")
    go = await loop.run_in_executor(None, io.command, "go")
    peers = go["peers"]
    if identity is not None:
        peer.set_peers({k: base64.b64decode(c) for k, c in enumerate(go["certs"])})
    await loop.run_in_executor(None, wait_until, go["t0"])
    prof = None
    if spec.get("profile_dir"):
        import cProfile
        prof = cProfile.Profile(time.process_time)   # CPU, not preemption
        prof.enable()
    c0, s0 = cpu_seconds(), sys_seconds()
    # Full mesh, each pair dialed once by the lower rank (as connect_mesh does).
    dials = await asyncio.gather(*(peer.connect_to(k, peers[k][0], peers[k][1])
                                   for k in range(rank + 1, n)))
    t_conn = time.monotonic()
    ok = await peer.run_until_complete(spec["timeout"])
    t_done = time.monotonic()
    cpu, cpu_sys = cpu_seconds() - c0, sys_seconds() - s0
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.path.join(spec["profile_dir"], f"fsbt_rank{rank}.pstats"))
    st = session.stats
    per_peer = session.progress(time.monotonic())["per_peer"]
    io.emit("done", t_done=t_done, t_connected=t_conn, cpu=cpu, cpu_sys=cpu_sys, ok=ok,
            dials_failed=dials.count(False),
            first_piece=(st.first_piece_at - go["t0"]) if st.first_piece_at else None,
            bytes_down=st.bytes_down, bytes_up=st.bytes_up,
            duplicate_blocks=st.duplicate_blocks, timeouts=st.timeouts,
            protocol_errors=st.protocol_errors + peer.stats.protocol_errors,
            bytes_out_to={str(k): v["bytes_out"] for k, v in per_peer.items()},
            served_by_owner=served_by_owner,
            progress=None if ok else session.pieces_have)
    await loop.run_in_executor(None, io.command, "exit")
    await peer.close()
    bad = []
    for o in range(n):
        mo = layout.manifest(o)
        got = b"".join(bytes(storage.get(o, k) or b"") for k in range(mo.num_pieces))
        if got != read_share(spec, o):
            bad.append(o)
    io.emit("verified", ok=ok and not bad, detail=f"bad shares {bad}" if bad else "")


def run_fsbt(spec: dict, rank: int, io: HarnessIO) -> None:
    asyncio.run(_fsbt_main(spec, rank, io))


IMPLS = {"gloo": run_gloo, "libtorrent": run_libtorrent, "fsbt": run_fsbt, "fsbt-tls": run_fsbt}


def main() -> None:
    ap = argparse.ArgumentParser(description="one rank of bench_allgather.py")
    ap.add_argument("--spec", required=True, help="job spec JSON written by the harness")
    ap.add_argument("--rank", type=int, required=True)
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    logging.basicConfig(level=getattr(logging, spec.get("log_level", "WARNING")),
                        stream=sys.stderr,
                        format=f"%(asctime)s rank{args.rank} %(name)s %(levelname)s %(message)s")
    io = HarnessIO(args.rank)
    try:
        IMPLS[spec["impl"]](spec, args.rank, io)
    except BaseException as exc:
        log.exception("rank %d failed", args.rank)
        try:
            io.emit("error", error=f"{type(exc).__name__}: {exc}")
        except Exception:
            pass
        raise


if __name__ == "__main__":
    main()
