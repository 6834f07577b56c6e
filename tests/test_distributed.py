"""FS distributed mode end to end: one OS process per participant on 127.0.0.1.

Control goes through FS's gRPC messages, pieces over each client's TCP data
plane.  Skipped without FederatedScope.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: distributed FS tests skipped")

from fs_bittorrent.launch import plan, run  # noqa: E402
from fs_bittorrent.store.sqlite_store import SQLitePieceStore  # noqa: E402
from fs_helpers import TOY  # noqa: E402

pytestmark = pytest.mark.fs

DIST_OPTS = ["bittorrent.enable", "True", "bittorrent.piece_size", "128",
             "bittorrent.block_size", "64", "bittorrent.timeout", "20.0",
             "bittorrent.tick_interval", "0.1", "bittorrent.keep_rounds", "3",
             "eval.freq", "10"]


def toy_distributed_cfg(tmp_path: Path, rounds: int) -> str:
    path = tmp_path / "dist.yaml"
    path.write_text(TOY.format(clients=4, rounds=rounds, outdir=tmp_path / "unused"))
    return str(path)


def client_db(out: Path, cid: int) -> Path:
    """Client ``cid``'s store.  FS numbers clients in the order they join,
    so the process started with data_idx i may be any client: search."""
    found = list(out.glob(f"client_*/**/bittorrent/client_{cid}.db"))
    assert len(found) == 1, found
    return found[0]


RUN_WINDOW: list = []           # Unix times the three_rounds run began and ended


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out = tmp / "out"
    env = dict(os.environ, FS_BITTORRENT_PROGRESS="1")     # bars into the log files
    began = time.time()
    result = run(plan(toy_distributed_cfg(tmp, rounds=3), 4, out, DIST_OPTS), timeout=240,
                 env=env)
    RUN_WINDOW[:] = [began, time.time()]
    return out, result


def test_four_client_processes_three_rounds_all_exit_zero(three_rounds):
    out, result = three_rounds
    assert result.ok, result.log_tail()
    assert [r["round"] for r in result.rounds] == [0, 1, 2]
    for r in result.rounds:
        assert r["reason"] == "complete" and r["clock"] == "wall"
        assert r["completion_ratio"] == 1.0
        assert set(r["completion"]) == {"1", "2", "3", "4"}
    # each round's Unix start time, in order, within the run (what launch_netns
    # lines up with the machine's CPU load)
    starts = [r["started_wall"] for r in result.rounds]
    assert RUN_WINDOW[0] < starts[0] < starts[1] < starts[2] < RUN_WINDOW[1]
    # when each client began its exchange after bt_start left (server's clock)
    for r in result.rounds:
        assert set(r["start_delay"]) == {"1", "2", "3", "4"}
        assert all(0 <= d < r["exchange_time"] + 5 for d in r["start_delay"].values())
        assert 0 <= r["start_spread"] == pytest.approx(
            max(r["start_delay"].values()) - min(r["start_delay"].values()))


def test_every_client_holds_every_piece_bit_exactly(three_rounds):
    out, result = three_rounds
    assert result.ok, result.log_tail()
    for cid in range(1, 5):
        with SQLitePieceStore(str(client_db(out, cid))) as store:
            assert store.rounds() == [0, 1, 2]
            for rnd in range(3):
                manifests = store.manifests(rnd)
                assert sorted(m.owner for m in manifests) == [1, 2, 3, 4]
                view = store.holder_view(rnd, cid)
                for m in manifests:
                    for k, digest in enumerate(m.piece_hashes):
                        data = view.get(m.owner, k)
                        assert data is not None, (cid, rnd, m.owner, k)
                        assert hashlib.sha256(data).digest() == digest
    # Every client saw the same manifests (same swarm) each round.
    digests = set()
    for cid in range(1, 5):
        with SQLitePieceStore(str(client_db(out, cid))) as store:
            digests.add(tuple(m.encode() for rnd in range(3) for m in store.manifests(rnd)))
    assert len(digests) == 1


def test_round_metrics_agree_with_every_client_database(three_rounds):
    """Bytes in the server's per-round metrics are each client's final
    counts, the same its own bt_sessions row records."""
    out, result = three_rounds
    assert result.ok, result.log_tail()
    for r in result.rounds:
        for cid in range(1, 5):
            with SQLitePieceStore(str(client_db(out, cid))) as store:
                row = store.get_session(r["round"], cid)
            assert row["state"] == "complete"
            assert r["bytes_up"][str(cid)] == row["bytes_up"], (r["round"], cid)
            assert r["bytes_down"][str(cid)] == row["bytes_down"], (r["round"], cid)
        # What was downloaded in all is what was uploaded in all.
        assert sum(r["bytes_up"].values()) == sum(r["bytes_down"].values())


def test_clients_shut_down_with_no_thread_left(three_rounds):
    out, result = three_rounds
    assert result.ok, result.log_tail()
    for i in range(1, 5):
        log = (out / "logs" / f"client_{i}.log").read_text()
        line = next(x for x in log.splitlines() if "threads left" in x)
        assert "threads left: ['MainThread']" in line, line


def test_client_killed_mid_exchange_the_others_and_the_server_go_on(tmp_path):
    """Client 3 dies of SIGKILL right after round 1's exchange starts (its
    handshakes are out, it serves nothing).  The others reach the deadline
    with everything but its pieces; the server proceeds under
    min_completion_ratio, evaluates without it, and the run ends; every
    surviving process exits 0."""
    out = tmp_path / "out"
    opts = [o for o in DIST_OPTS] + [
        "bittorrent.timeout", "4.0", "bittorrent.manifest_timeout", "60.0",
        "bittorrent.min_completion_ratio", "0.5",
        "bittorrent.faults.crash_clients", "[3]", "bittorrent.faults.crash_round", "1",
        "bittorrent.faults.crash_at", "0.0"]
    result = run(plan(toy_distributed_cfg(tmp_path, rounds=3), 4, out, opts), timeout=240,
                 tolerate_killed=True)
    codes = result.exit_codes()
    assert len(result.killed()) == 1, (codes, result.log_tail())
    assert all(rc == 0 for who, rc in codes.items() if who not in result.killed()), \
        result.log_tail()
    rounds = {r["round"]: r for r in result.rounds}
    assert sorted(rounds) == [0, 1, 2]
    assert rounds[0]["reason"] == "complete"
    r1 = rounds[1]                       # nobody could get the dead client's pieces
    assert r1["reason"] == "insufficient" and r1["completion_ratio"] == 0.0
    assert set(r1["completion"]) == {"1", "2", "4"}
    assert all(0.5 <= r1["completion"][c] < 1.0 for c in ("1", "2", "4"))
    r2 = rounds[2]                       # client 3 is gone: its manifest never came
    assert set(r2["completion"]) == {"1", "2", "4"}
    assert all(r2["completion"][c] == 1.0 for c in ("1", "2", "4"))
    server_log = (out / "logs" / "server.log").read_text()
    assert "no manifest from clients [3]" in server_log
    assert "evaluation deadline" in server_log
    killed_log = (out / "logs" / f"{result.killed()[0]}.log").read_text()
    assert "crashes (SIGKILL) in round 1" in killed_log


def test_server_shows_a_progress_bar_per_round_fed_by_the_clients(three_rounds):
    """In distributed runs the server's bar advances on the clients'
    bt_progress messages and ends full (every client holds every piece)."""
    out, result = three_rounds
    assert result.ok, result.log_tail()
    text = (out / "logs" / "server.log").read_text(errors="replace")
    for rnd in range(3):
        finals = re.findall(rf"round {rnd} exchange: +(\d+)%\|[^\r\n]*?(\d+)/(\d+)", text)
        assert finals, f"no progress bar for round {rnd}"
        pct, done, total = finals[-1]
        assert pct == "100" and done == total and int(total) > 0, finals[-1]


def test_client_data_planes_speak_tls_pinned_and_refused_nothing(three_rounds):
    """Encryption is on by default: every client's data plane runs TLS 1.3
    with its own certificate, and no honest connection was refused."""
    out, result = three_rounds
    assert result.ok, result.log_tail()
    fingerprints = set()
    dialed = 0
    for i in range(1, 5):
        log = (out / "logs" / f"client_{i}.log").read_text()
        m = re.search(r"listening on \S+ \(TLS 1\.3, certificate sha256 ([0-9a-f]{64})\)", log)
        assert m, log[-2000:]
        fingerprints.add(m.group(1))
        closed = next(x for x in log.splitlines() if "data plane closed" in x)
        assert "handshakes_refused=0" in closed and "connections_capped=0" in closed, closed
        # Connections outlive rounds: rounds 1 and 2 reuse round 0's.
        assert int(re.search(r"connections_reused=(\d+)", closed).group(1)) >= 3, closed
        dialed += int(re.search(r"connections_dialed=(\d+)", closed).group(1))
    assert len(fingerprints) == 4                # a key per client
    assert dialed == 6                           # each pair once, over three rounds


def _train_for(seconds: float) -> dict:
    """Real local training: a small MLP on random data for ``seconds``."""
    import time

    import torch
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(512, 256, generator=g), torch.randint(0, 10, (512,), generator=g)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("offloaded", [True, False], ids=["thread", "inline"])
def test_data_plane_times_out_silent_connections_while_training_runs(offloaded):
    """FS's model_para handler trains for a while.  Run as the client loop
    runs it (in the worker thread), a silent connection to the data plane
    is dropped at its handshake timeout, mid-training, and the handler's
    send reaches the loop's thread after training.  Inline (the old way),
    the same connection waits for training to end."""
    import asyncio
    import concurrent.futures
    import threading
    import time
    from types import SimpleNamespace

    from federatedscope.core.message import Message

    from fs_bittorrent.fs.distributed import OFFLOADED, LoopSends, dispatch, run_offloaded
    from fs_bittorrent.net.round_dataplane import RoundDataPlane
    from fs_bittorrent.net.tls import LocalIdentity

    # Training lasts well beyond the handshake timeout, so a loaded machine
    # (CI shares two cores) cannot blur 'mid-training' and 'after training'.
    train_s, hs_timeout = 3.0, 0.3
    events: dict = {}

    def send(message):
        events["sent_in_thread"] = threading.get_ident()
        events["sent_at"] = time.monotonic()

    def on_model_para(message):
        _train_for(train_s)
        events["trained_at"] = time.monotonic()
        worker.comm_manager.send(Message(msg_type="model_para", sender=1, receiver=[0]))

    worker = SimpleNamespace(ID=1, msg_handlers={"model_para": on_model_para},
                             comm_manager=SimpleNamespace(send=send))

    async def main():
        loop = asyncio.get_running_loop()
        LoopSends(worker, loop)
        plane = RoundDataPlane(SimpleNamespace(), handshake_timeout=hs_timeout,
                               identity=LocalIdentity.generate())
        await plane.start()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            msg = Message(msg_type="model_para", sender=0, receiver=[1])
            assert msg.msg_type in OFFLOADED
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", plane.port)
            await asyncio.sleep(0.02)              # accepted; its handshake clock runs
            if offloaded:
                handling = loop.create_task(run_offloaded(pool, worker, msg))
            else:
                loop.call_soon(dispatch, worker, msg)
            assert await asyncio.wait_for(reader.read(), 10) == b""    # dropped by the plane
            events["dropped_at"] = time.monotonic()
            writer.close()
            if offloaded:
                await handling
            await asyncio.sleep(0.05)
            return t0, plane.stats.handshake_timeouts
        finally:
            pool.shutdown(wait=True)
            await plane.close()

    t0, timeouts = asyncio.run(main())
    assert timeouts == 1
    assert events["sent_in_thread"] == threading.get_ident()     # the loop's thread
    assert events["sent_at"] >= events["trained_at"]
    if offloaded:
        assert events["dropped_at"] - t0 < hs_timeout + 2.0 < train_s
        assert events["dropped_at"] < events["trained_at"]       # mid-training
    else:
        assert events["dropped_at"] > events["trained_at"]       # deaf until training ended


def test_a_client_whose_store_cannot_open_stops_the_run_with_the_reason(tmp_path):
    """Client 2's piece store cannot open (a directory sits at its path).
    The store opens with the client's first manifest, in a send handed back
    to the loop from the training thread, where no caller is left to raise
    into: the client used to log it and carry on, never publishing, and the
    federation waited ``manifest_timeout`` (600 s) for it.  Now the client
    stops with the reason and the launcher stops the run at once."""
    out, db = tmp_path / "out", tmp_path / "db"
    (db / "client_2.db").mkdir(parents=True)
    began = time.time()
    result = run(plan(toy_distributed_cfg(tmp_path, rounds=3), 4, out,
                      DIST_OPTS + ["bittorrent.db_dir", str(db)]), timeout=90)
    took = time.time() - began
    assert not result.ok and not result.timed_out, result.log_tail()
    failed = [p for p in result.participants if p.returncode == 1]
    assert len(failed) == 1, result.exit_codes()
    log_text = failed[0].log_path.read_text()
    assert "ClientFailed: client 2:" in log_text and "client_2.db" in log_text
    assert took < 90, took             # not the 600 s manifest_timeout
    assert (db / "client_2.db").is_dir()   # nothing of the user's was touched


# Run as ``python -c FULL_DISK python -m fs_bittorrent run ...`` (the launcher's
# wrap prefix): the client's store gets tests/store_faults.py's full disk.
FULL_DISK = f"""
import runpy, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from fs_bittorrent.store.sqlite_store import SQLitePieceStore
from store_faults import full_disk_patches
for name, replacement in full_disk_patches()[0].items():
    setattr(SQLitePieceStore, name, replacement)
sys.argv = ["fs_bittorrent"] + sys.argv[4:]
runpy.run_module("fs_bittorrent", run_name="__main__", alter_sys=True)
"""


def test_a_client_whose_disk_fills_mid_exchange_stops_and_blames_no_peer(tmp_path):
    """One client's store cannot commit once the exchange has filled a
    batch with received pieces (its next ``put`` raises
    ``StoreError("flush")``): that client stops with ``ClientFailed`` naming
    the store's error, blames and drops no peer (it used to take the error
    for the sending peer's, one peer after the other), and the launcher
    stops the run at once."""
    import sys
    out = tmp_path / "out"
    # 4-byte pieces: a client receives more than a batch (64) a round
    opts = DIST_OPTS + ["bittorrent.piece_size", "4", "bittorrent.block_size", "4"]
    wrap = lambda role, i: [sys.executable, "-c", FULL_DISK] \
        if (role, i) == ("client", 2) else []                 # noqa: E731
    began = time.time()
    result = run(plan(toy_distributed_cfg(tmp_path, rounds=3), 4, out, opts, wrap=wrap),
                 timeout=90)
    took = time.time() - began
    assert not result.ok and not result.timed_out, result.log_tail()
    failed = [p for p in result.participants if p.returncode == 1]
    assert [p.index for p in failed] == [2], result.exit_codes()
    text = failed[0].log_path.read_text()
    assert "its piece store failed in round 0" in text, text[-3000:]
    assert re.search(r"ClientFailed: client \d: StoreError: flush=\d+: commit failed", text)
    assert "database or disk is full" in text
    assert "from peer" not in text                         # nobody blamed, nobody dropped
    assert took < 90, took
