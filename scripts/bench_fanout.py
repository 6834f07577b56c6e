"""Benchmark: the server's broadcast (``bt_start``) to n clients, side by side
for several source trees.

Why: a client's exchange time counts from its own start, so the spread of
``bt_start``'s arrivals adds to the round.  The server sends it with
``distributed.FanOut``.  Each receiver here is FS's own gRPC servicer on
127.0.0.1 that answers ``--delay`` seconds after the request arrived,
standing in for the round trip to a client far away (the issue's 50-100 ms
between continents); the receivers run in another process than the sender.  Reported per n: when the first and the last receiver
got the message after the send began, and when the send returned, median
of ``--repeat``.

    python scripts/bench_fanout.py --tree base=/tmp/base --tree . [--clients 8 16 64] [--delay 0.1]

Each tree runs in its own subprocess with that tree first on ``sys.path``.
Needs FederatedScope (its servicer and message class).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_hetero import tree_name, tree_path  # noqa: E402


def receivers(n: int, delay: float, conn) -> None:
    """n delayed FS servicers in this (child) process: sends their
    addresses, then each fan-out's arrival times (``time.monotonic``, the
    same clock in every process) whenever asked, until told to stop."""
    import grpc
    from federatedscope.core.gRPC_server import gRPCComServeFunc
    from federatedscope.core.proto import gRPC_comm_manager_pb2_grpc

    arrivals: list[float] = []
    lock = threading.Lock()

    class Delayed(gRPCComServeFunc):
        def sendMessage(self, request, context):
            with lock:
                arrivals.append(time.monotonic())
            time.sleep(delay)
            return super().sendMessage(request, context)

    servers, addresses = [], []
    for _ in range(n):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        gRPC_comm_manager_pb2_grpc.add_gRPCComServeFuncServicer_to_server(Delayed(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    conn.send(addresses)
    while conn.recv() == "arrivals":
        with lock:
            conn.send(list(arrivals))
            arrivals.clear()
    for server in servers:
        server.stop(None).wait()


def one_tree(n: int, delay: float, repeat: int) -> dict:
    """Fan-outs to n delayed receivers (another process) with this
    process's ``FanOut``."""
    import multiprocessing

    import grpc
    from federatedscope.core.message import Message
    from fs_bittorrent.fs.control_send import PersistentChannels
    from fs_bittorrent.fs.distributed import FanOut

    class CommManager:
        comp_method = grpc.Compression.NoCompression
        _send = None

    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(
        target=receivers, args=(n, delay, theirs), daemon=True)
    child.start()
    cm = CommManager()
    cm.neighbors = {i: a for i, a in enumerate(ours.recv(), start=1)}
    channels = PersistentChannels(cm).install()
    fan = FanOut(cm, send=lambda m: None)
    table = "x" * 14_000                     # an 8-client bt_start's size
    rows = []
    try:
        for k in range(repeat + 1):          # the first opens the channels: not counted
            msg = Message(msg_type="bt_start", sender=0, receiver=list(range(1, n + 1)),
                          state=k, content={"round": k, "table": table})
            t0 = time.monotonic()
            fan(msg)
            done = time.monotonic() - t0
            ours.send("arrivals")
            arrivals = ours.recv()
            if len(arrivals) != n:
                raise SystemExit(f"n={n}: {len(arrivals)} of {n} receivers got the message")
            if k:
                rows.append((min(arrivals) - t0, max(arrivals) - t0, done))
    finally:
        fan.close()
        channels.close()
        ours.send("stop")
        child.join(30)
    first, last, done = (statistics.median(r[i] for r in rows) for i in range(3))
    return {"n": n, "first": first, "last": last, "done": done}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=None,
                    help="source tree, path or name=path (repeat); default: this one")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--delay", type=float, default=0.1,
                    help="seconds each receiver takes to answer (a round trip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if any(n < 2 for n in args.clients):
        ap.error(f"--clients: {min(args.clients)} must be >= 2")
    if not args.delay >= 0:
        ap.error(f"--delay: {args.delay} must be >= 0")
    if args.repeat < 1:
        ap.error(f"--repeat: {args.repeat} must be >= 1")
    if args.worker:
        sys.path.insert(0, os.path.abspath(tree_path(args.worker)))
        for n in args.clients:
            print(json.dumps(one_tree(n, args.delay, args.repeat)), flush=True)
        return 0
    trees = args.tree or [os.path.join(HERE, "..")]
    results: dict = {}
    for tree in trees:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", tree, "--delay",
               str(args.delay), "--repeat", str(args.repeat),
               "--clients", *map(str, args.clients)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            cell = json.loads(line)
            results[(cell["n"], tree_name(tree))] = cell
    names = [tree_name(t) for t in trees]
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, Python "
          f"{platform.python_version()}")
    print(f"receivers answer {args.delay * 1000:g} ms after the request arrives; "
          f"median of {args.repeat}; times in ms from the start of the send\n")
    print("| n | " + " | ".join(f"{t} first / last arrival | {t} returned" for t in names)
          + " |")
    print("|---:|" + "---:|---:|" * len(names))
    for n in args.clients:
        row = []
        for t in names:
            c = results[(n, t)]
            row += [f"{c['first'] * 1000:.1f} / {c['last'] * 1000:.1f}", f"{c['done'] * 1000:.1f}"]
        print(f"| {n} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
