"""CPU a round's start costs, per tree, side by side (issue 12).

Every client of a distributed round starts its exchange when the server's
``bt_start`` arrives, all at the same moment; on a small host they queue
for the cores, so each millisecond of start-up CPU per client spreads the
clients' starts (docs/design.md "Where a round's time goes").  This times,
for an 8-client round of FS's convnet2 (~1.7 MB, 7 pieces a manifest) with
TLS certificates, addresses and measured uplinks:

* ``serialize``  -- the server: the content packed and serialized by FS's
  gRPC protobuf (pure Python, as FS pins it), once per round;
* ``receive``    -- a client: the protobuf request parsed, FS's ``Message``
  built from it, and the content unpacked (manifests decoded and
  validated, addresses and certificates parsed);
* ``store``      -- a client: the other owners' manifests written to a
  fresh SQLite piece store;
* ``session``    -- a client: its ``SwarmSession`` built over that store;

as the median of ``--repeat`` runs, in a subprocess per tree with that
tree first on the path (``--tree NAME=PATH``, default this checkout), and
prints one table.  CPU time of the process (``time.process_time``): the
figure that adds up when eight clients share two cores.

Usage: python scripts/bench_start.py --tree before=/tmp/old --tree now=. [--repeat 50]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENTS = 8


def measure(repeat: int) -> dict:
    """Run inside a tree's process: the four steps' median CPU ms."""
    import torch
    from federatedscope.core.message import Message
    from federatedscope.core.proto import gRPC_comm_manager_pb2 as pb

    from fs_bittorrent.core.config import SwarmConfig
    from fs_bittorrent.core.layout import SwarmLayout
    from fs_bittorrent.core.pieces import make_model_manifest
    from fs_bittorrent.core.session import SwarmSession
    from fs_bittorrent.fs import wire
    from fs_bittorrent.net.tls import LocalIdentity
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore

    torch.manual_seed(0)
    model = {"conv1.weight": torch.randn(32, 1, 5, 5), "conv1.bias": torch.randn(32),
             "conv2.weight": torch.randn(64, 32, 5, 5), "conv2.bias": torch.randn(64),
             "fc1.weight": torch.randn(128, 3136), "fc1.bias": torch.randn(128),
             "fc2.weight": torch.randn(10, 128), "fc2.bias": torch.randn(10)}
    ids = range(1, CLIENTS + 1)
    built = {c: make_model_manifest(model, owner=c, round=3, sample_count=100) for c in ids}
    manifests = tuple(built[c][0] for c in ids)
    certs = {c: wire.certificate_to_text(LocalIdentity.generate().cert_der) for c in ids}
    addresses = {c: f"10.200.0.{c}:{50000 + c}" for c in ids}
    neighbours = {c: [d for d in ids if d != c] for c in ids}
    uplinks = {c: 1.2e7 for c in ids}

    def serialize() -> bytes:
        content = wire.pack_start(3, manifests, neighbours, 60.0, addresses, certs, uplinks)
        msg = Message(msg_type="bt_start", sender=0, receiver=list(ids), state=3,
                      content=content, timestamp=0.0)
        return msg.transform(to_list=True).SerializeToString()

    payload = serialize()

    def receive():
        msg = Message()
        msg.parse(pb.MessageRequest.FromString(payload).msg)
        got = wire.unpack_start(msg.content)
        if isinstance(got, tuple):          # trees before the packed table
            wire.unpack_addresses(msg.content)
            wire.unpack_certificates(msg.content)
            wire.unpack_uplinks(msg.content)
            return got[1]
        return got.manifests

    me = 1
    tmp = tempfile.mkdtemp(prefix="bench-start-")
    stores = []

    def store_and_session(k: int) -> tuple[float, float]:
        store = SQLitePieceStore(os.path.join(tmp, f"s{k}.db"))
        stores.append(store)
        m, pieces = built[me]
        store.put_manifest(m)
        for i, data in enumerate(pieces):
            store.put_piece(3, me, i, me, data, m.piece_hashes[i])
        store.flush()
        got = receive()
        t0 = time.process_time()
        others = [x for x in got if x.owner != me]
        if hasattr(store, "put_manifests"):
            store.put_manifests(others)
        else:
            for x in others:
                store.put_manifest(x)
        t1 = time.process_time()
        SwarmSession(me, SwarmLayout(tuple(got)), store.holder_view(3, me), SwarmConfig(),
                     now=0.0)
        return t1 - t0, time.process_time() - t1

    def cpu_ms(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return statistics.median(times) * 1e3

    out = {"bytes": len(payload), "serialize": cpu_ms(serialize), "receive": cpu_ms(receive)}
    pairs = [store_and_session(k) for k in range(min(repeat, 30))]
    out["store"] = statistics.median(p[0] for p in pairs) * 1e3
    out["session"] = statistics.median(p[1] for p in pairs) * 1e3
    for s in stores:
        s.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a.repeat)))
        return 0
    trees = [t.split("=", 1) for t in a.tree] or [["this", str(HERE.parent)]]
    results = {}
    for name, path in trees:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path), PYTHONSAFEPATH="1")
        run = subprocess.run([sys.executable, str(HERE / "bench_start.py"), "--child",
                              "--repeat", str(a.repeat)], env=env, capture_output=True,
                             text=True, timeout=600, cwd=tempfile.gettempdir())
        if run.returncode:
            print(run.stderr, file=sys.stderr)
            return 1
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}; {CLIENTS} clients, convnet2, "
          f"median of {a.repeat} (CPU ms)")
    names = [n for n, _ in trees]
    print("\n| step | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for key in ("bytes", "serialize", "receive", "store", "session"):
        cells = [f"{results[n][key]:.0f}" if key == "bytes" else f"{results[n][key]:.2f}"
                 for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    client = {n: results[n]["receive"] + results[n]["store"] + results[n]["session"]
              for n in names}
    print("| client total | " + " | ".join(f"{client[n]:.2f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
