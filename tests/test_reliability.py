"""Reliability under injected faults: the decider, the simulator, and whole
FederatedScope runs (skipped without FS) under each fault of ``bittorrent.faults``.

Every FS run here is FS's toy data set with 4 clients and 3 rounds, as in
tests/test_fs_integration.py.  The strongest check is the model: when every
round completes, every client must hold exactly FS's own FedAvg model, which
is impossible if a single corrupted, replayed or unrequested byte had been
aggregated.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import sqlite3
from pathlib import Path

import pytest

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.faults import PASS, FaultDecider, Faults, flip_byte
from fs_bittorrent.core.manifest import Manifest
from fs_bittorrent.core.storage import ContentPool
from fs_bittorrent.errors import ConfigError
from fs_bittorrent.sim.network import LinkProfile, VirtualNetwork
from fs_bittorrent.sim.swarm import build_swarm

from swarm_helpers import CheckingStorage, blob_from_storage, expected_hashes, random_owners


# ---------------------------------------------------------------------------
# the decider (sans-IO)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    ({"drop": -0.1}, "faults.drop"),
    ({"drop": 1.5}, "faults.drop"),
    ({"duplicate": float("nan")}, "faults.duplicate"),
    ({"corrupt": True}, "faults.corrupt"),
    ({"reorder": "0.1"}, "faults.reorder"),
    ({"disconnect": 2}, "faults.disconnect"),
    ({"delay": -1e-9}, "faults.delay"),
    ({"delay_max": -1.0}, "faults.delay_max"),
    ({"reorder_delay": float("inf")}, "faults.reorder_delay"),
    ({"reconnect_after": None}, "faults.reconnect_after"),
    ({"crash_at": -0.5}, "faults.crash_at"),
    ({"crash_clients": (1, 1)}, "faults.crash_clients"),
    ({"crash_clients": ("a",)}, "faults.crash_clients"),
    ({"crash_clients": 3}, "faults.crash_clients"),
    ({"crash_clients": (-1,)}, "faults.crash_clients"),
    ({"crash_round": -1}, "faults.crash_round"),
    ({"crash_round": 1.0}, "faults.crash_round"),
])
def test_faults_refuse_bad_values_naming_field_and_value(kw, field):
    with pytest.raises(ConfigError) as e:
        Faults(**kw)
    assert e.value.field == field
    value = next(iter(kw.values()))
    assert e.value.value is value or e.value.value == value or value != value
    assert field in str(e.value)


def test_faults_defaults_are_off_and_lists_become_tuples():
    f = Faults()
    assert not f.any and f.crashes_in(0) == ()
    g = Faults(crash_clients=[3, 1], crash_round=2)
    assert g.crash_clients == (3, 1) and g.crashes_in(2) == (3, 1) and g.crashes_in(1) == ()
    assert not g.any  # crashes are not per-message faults
    assert Faults(delay=0.1).any and Faults(disconnect=0.1).any
    assert Faults(drop=0.5).as_dict()["drop"] == 0.5


def test_simulator_faults_are_the_core_faults():
    from fs_bittorrent.sim import network
    assert network.Faults is Faults


def test_no_faults_never_draws_and_always_passes():
    rng = random.Random(5)
    state = rng.getstate()
    d = FaultDecider(Faults(), rng)
    assert all(d.decide() is PASS for _ in range(1000))
    assert d.reorder_jitter() == 0.0
    assert rng.getstate() == state


def test_decider_is_seeded_and_rates_match_the_knobs():
    f = Faults(drop=0.1, duplicate=0.2, corrupt=0.3, delay=0.25, delay_max=3.0,
               disconnect=0.05, reorder=0.5, reorder_delay=0.2)

    def run(seed, n=20000):
        d = FaultDecider(f, seed)
        return [d.decide() for _ in range(n)], [d.reorder_jitter() for _ in range(n)]

    a, ja = run(1)
    b, jb = run(1)
    c, _ = run(2)
    assert a == b and ja == jb and a != c
    n = len(a)
    disc = sum(x.disconnect for x in a) / n
    dropped = sum(x.drop and not x.disconnect for x in a) / n
    passed = [x for x in a if not x.drop]
    assert abs(disc - 0.05) < 0.01
    assert abs(dropped - 0.95 * 0.1) < 0.01
    assert abs(sum(x.copies == 2 for x in passed) / len(passed) - 0.2) < 0.015
    assert abs(sum(x.corrupt for x in passed) / len(passed) - 0.3) < 0.015
    delays = [x.delay for x in passed if x.delay]
    assert abs(len(delays) / len(passed) - 0.25) < 0.015
    assert all(0 <= t < 3.0 for t in delays)
    jit = [t for t in ja if t]
    assert abs(len(jit) / n - 0.5) < 0.015 and all(0 <= t < 0.2 for t in jit)
    # messages the host cannot corrupt are never marked corrupt
    d = FaultDecider(Faults(corrupt=1.0), 3)
    assert all(d.decide(corruptible=False) is PASS for _ in range(100))
    assert all(d.decide().corrupt for _ in range(100))


def test_flip_byte_changes_one_byte_of_a_copy():
    data = bytes(range(64))
    view = memoryview(data)[8:40]
    out = flip_byte(view, random.Random(0))
    assert isinstance(out, bytes) and len(out) == 32 and view.tobytes() == data[8:40]
    diff = [i for i in range(32) if out[i] != data[8 + i]]
    assert len(diff) == 1 and out[diff[0]] == data[8 + diff[0]] ^ 0xFF
    assert flip_byte(b"", random.Random(0)) == b""


def test_disconnect_fault_needs_a_host_that_can_cut_connections():
    with pytest.raises(ConfigError) as e:
        VirtualNetwork(lambda *a: None, faults=Faults(disconnect=0.1))
    assert e.value.field == "faults.disconnect" and e.value.value == 0.1


# ---------------------------------------------------------------------------
# the simulator under each fault
# ---------------------------------------------------------------------------

PIECE = 8 * 1024
CFG = SwarmConfig(piece_size=PIECE, block_size=4 * 1024, request_timeout=1.0,
                  handshake_retry=0.5, interest_retry=0.5, credit_bytes=24 * 1024)
LINK = LinkProfile(up=2e6, down=3e6, latency=0.002)

SIM_FAULTS = {
    "drop": (Faults(drop=0.05), "dropped"),
    "duplicate": (Faults(duplicate=0.1), "duplicated"),
    "reorder": (Faults(reorder=0.3, reorder_delay=0.05), "reordered"),
    "corrupt": (Faults(corrupt=0.05), "corrupted"),
    "delay": (Faults(delay=0.05, delay_max=2.0), "delayed"),
    "disconnect": (Faults(disconnect=0.01, reconnect_after=0.3), "disconnects"),
    "all": (Faults(drop=0.02, duplicate=0.02, reorder=0.05, corrupt=0.02, delay=0.02,
                   disconnect=0.005, reconnect_after=0.3), "dropped"),
}


def check_memory_bounds(swarm, peak: dict) -> None:
    """Per session: receive-side reservations within the credit it advertised,
    send-side ledgers within the credit each peer advertised, partial pieces
    within the credit it gave its connected peers (plus one peer's worth of
    orphans from a lost connection), and a bounded piece cache."""
    cfg = CFG
    for pid, s in swarm.sessions.items():
        partial = sum(len(pp.buffer) for pp in s.picker.partials.values())
        peak[pid] = max(peak.get(pid, 0), partial)
        assert partial <= cfg.credit_bytes * len(swarm.sessions), (pid, partial)
        assert len(s._cache) <= s._cache_size
        for q in s.peers.values():
            assert q.reserved_total <= cfg.credit_bytes
            assert q.served_bytes <= q.their_credit


@pytest.mark.parametrize("name", sorted(SIM_FAULTS))
def test_simulated_swarm_completes_bit_exact_under_each_fault(name):
    faults, counter = SIM_FAULTS[name]
    owners, blobs = random_owners({i: 6 for i in range(6)}, PIECE, seed=61)
    hashes = expected_hashes(owners)
    pool = ContentPool()
    storages = {}

    def factory(pid):
        storages[pid] = CheckingStorage(hashes, pool)
        return storages[pid]

    swarm = build_swarm(owners, CFG, LINK, seed=61, faults=faults, storage_factory=factory)
    peak: dict = {}

    def probe():
        check_memory_bounds(swarm, peak)
        if not swarm.network._done():
            swarm.network.schedule(swarm.network.now + 0.005, probe)

    swarm.network.schedule(0.0, probe)
    result = swarm.run(until=600)
    assert result.complete, (name, result.completion)
    assert result.faults[counter] > 0
    # Only verified bytes were ever stored, and everybody holds every model.
    assert all(not st.bad_puts for st in storages.values())
    for pid, st in storages.items():
        for owner, (m, _) in owners.items():
            assert blob_from_storage(st, m) == blobs[owner], (pid, owner)
    if name in ("corrupt", "all"):
        detected = sum(s.stats.corrupt_pieces for s in swarm.sessions.values())
        assert 0 < detected <= result.faults["corrupted"]
    assert max(peak.values()) > 0  # the probe did see transfers in progress
    for s in swarm.sessions.values():
        s.close(result.virtual_time)
        assert all(v == 0 for v in s.record_counts().values())


def test_simulated_faults_are_deterministic_for_a_seed():
    faults = SIM_FAULTS["all"][0]

    def run(seed):
        owners, _ = random_owners({i: 4 for i in range(4)}, PIECE, seed=3)
        r = build_swarm(owners, CFG, LINK, seed=seed, faults=faults).run(until=600)
        return r.virtual_time, r.faults, r.wire_up

    assert run(5) == run(5)
    assert run(5) != run(6)


# ---------------------------------------------------------------------------
# FederatedScope end to end under each fault (skipped without FS)
# ---------------------------------------------------------------------------

def _fs():
    return pytest.importorskip("federatedscope",
                               reason="FederatedScope is not installed: FS fault runs skipped")


FS_FAULTS = {
    "drop": (["bittorrent.faults.drop", "0.05"], "dropped"),
    "duplicate": (["bittorrent.faults.duplicate", "0.1"], "duplicated"),
    "reorder": (["bittorrent.faults.reorder", "0.3"], "reordered"),
    "corrupt": (["bittorrent.faults.corrupt", "0.1"], "corrupted"),
    "delay": (["bittorrent.faults.delay", "0.1", "bittorrent.faults.delay_max", "2.0"],
              "delayed"),
    "disconnect": (["bittorrent.faults.disconnect", "0.02",
                    "bittorrent.faults.reconnect_after", "0.5"], "disconnects"),
}


from fs_helpers import client_models, round_stats  # noqa: E402  (plain helpers, no FS import)


def assert_models_equal(models: dict, reference: dict) -> None:
    import torch
    for cid, params in models.items():
        assert params.keys() == reference.keys()
        for k, v in params.items():
            torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6,
                                       msg=f"client {cid} tensor {k}")


def assert_store_holds_only_verified_pieces(runner) -> dict:
    """Read the run's SQLite store directly: every chunk's bytes hash to the
    owner's manifest entry.  Returns {(round, holder): {(owner, index)}}."""
    path = os.path.join(runner.settings.db_dir, "pieces.db")
    c = sqlite3.connect(path)
    try:
        assert c.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        manifests = {(r, o): Manifest.decode(enc) for r, o, enc in
                     c.execute("SELECT round, owner, encoded FROM bt_manifests")}
        held: dict = {}
        for r, s, i, h, sha, data in c.execute(
                "SELECT c.round, c.source, c.piece_index, c.holder, c.sha256, b.data "
                "FROM bt_chunks c JOIN bt_blobs b ON b.sha256 = c.sha256"):
            assert hashlib.sha256(data).digest() == sha == manifests[(r, s)].piece_hashes[i]
            held.setdefault((r, h), set()).add((s, i))
    finally:
        c.close()
    return held


@pytest.fixture(scope="module")
def plain_fedavg(tmp_path_factory):
    """FS's own global model after 3 rounds of the toy experiment (no plugin)."""
    _fs()
    from fs_bittorrent.fs.entry import run_experiment
    from fs_helpers import toy_cfg
    runner, _ = run_experiment(toy_cfg(tmp_path_factory.mktemp("plain"), name="plain"), [])
    return {k: v.detach().clone() for k, v in runner.server.models[0].state_dict().items()}


@pytest.mark.fs
@pytest.mark.parametrize("name", sorted(FS_FAULTS))
def test_fs_run_under_each_fault_completes_with_fs_fedavg(tmp_path, plain_fedavg, name):
    _fs()
    from fs_bittorrent.fs.entry import run_experiment
    from fs_helpers import BT, toy_cfg
    opts, counter = FS_FAULTS[name]
    runner, _ = run_experiment(toy_cfg(tmp_path), BT + opts)
    assert runner.network.fault_counts[counter] > 0
    stats = round_stats(runner)
    assert [s["round"] for s in stats] == [0, 1, 2]
    for s in stats:
        assert s["reason"] == "complete", s
        assert s["completion"] == {str(c): 1.0 for c in range(1, 5)}
    # Every aggregate is FS's FedAvg to float precision: no faulty byte got in.
    assert_models_equal(client_models(runner), plain_fedavg)
    held = assert_store_holds_only_verified_pieces(runner)
    assert set(held) == {(r, h) for r in (1, 2) for h in range(1, 5)}  # keep_rounds = 2
    assert all(len(v) == 8 for v in held.values())  # 4 owners x 2 pieces each
    if name == "corrupt":
        detected = sum(sum(s["corrupt_pieces"].values()) for s in stats)
        assert 0 < detected <= runner.network.fault_counts["corrupted"]
        log = (Path(runner.cfg.outdir) / "exp_print.log").read_text()
        assert "failed its hash" in log


@pytest.mark.fs
# 0.0175: late in round 1's exchange (0.02 s of virtual time), after client 2
# has given its model out.
@pytest.mark.parametrize("crash_at", [0.0, 0.0175])
def test_fs_client_crashing_mid_exchange(tmp_path, crash_at):
    """Client 2 dies in round 1: no report from it; the others finish from the
    remaining peers or stop at the deadline with what they verified; the
    server goes on under min_completion_ratio, and client 2 rejoins in round 2."""
    _fs()
    from fs_bittorrent.fs.entry import run_experiment
    from fs_helpers import BT, toy_cfg
    opts = BT + ["bittorrent.faults.crash_clients", "[2]", "bittorrent.faults.crash_round", "1",
                 "bittorrent.faults.crash_at", str(crash_at),
                 "bittorrent.min_completion_ratio", "0.5"]
    runner, _ = run_experiment(toy_cfg(tmp_path), opts)
    assert runner.crashed == [(1, 2)]
    stats = round_stats(runner)
    assert [s["round"] for s in stats] == [0, 1, 2]
    crashed = stats[1]
    assert "2" not in crashed["completion"]                    # no report from the dead client
    assert set(crashed["completion"]) == {"1", "3", "4"}
    ratio = crashed["completion_ratio"]
    assert ratio == sum(v == 1.0 for v in crashed["completion"].values()) / 4
    assert crashed["reason"] == ("deadline" if ratio >= 0.5 else "insufficient")
    assert crashed["exchange_time"] >= 30.0                   # it waited for the deadline
    held = assert_store_holds_only_verified_pieces(runner)
    everything = {(o, k) for o in range(1, 5) for k in range(2)}
    for c, frac in crashed["completion"].items():
        mine = held[(1, int(c))]
        # every live owner's model arrived; only the dead owner's may be missing
        assert {(o, k) for o, k in everything if o != 2} <= mine
        assert len(mine) == round(frac * 8)
        if frac < 1.0:
            assert runner.client[int(c)].bt.last_aggregate is not None
    if crash_at == 0.0:
        # dead before its first message left: nobody got a byte of its model
        assert all(v == 0.75 for v in crashed["completion"].values())
        assert crashed["reason"] == "insufficient"
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore
    with SQLitePieceStore(os.path.join(runner.settings.db_dir, "pieces.db")) as db:
        assert db.get_session(1, 2)["state"] == "partial"
        assert db.get_session(2, 2)["state"] == "complete"
    # the server carried on and the restarted client took part in round 2
    assert stats[2]["reason"] == "complete" and stats[2]["completion"]["2"] == 1.0


@pytest.mark.fs
def test_fs_run_with_every_fault_at_once_completes(tmp_path, plain_fedavg):
    _fs()
    from fs_bittorrent.fs.entry import run_experiment
    from fs_helpers import BT, toy_cfg
    opts = []
    for o, _ in FS_FAULTS.values():
        opts += o
    runner, _ = run_experiment(toy_cfg(tmp_path), BT + opts)
    counts = runner.network.fault_counts
    assert all(counts[c] > 0 for _, c in FS_FAULTS.values()), counts
    assert [s["reason"] for s in round_stats(runner)] == ["complete"] * 3
    assert_models_equal(client_models(runner), plain_fedavg)
    assert_store_holds_only_verified_pieces(runner)


def build_runner(cfg_file: str, opts: list[str]):
    """``run_experiment`` without the final ``run()``, so a test can add hooks."""
    from federatedscope.core.auxiliaries.data_builder import get_data
    from federatedscope.core.auxiliaries.logging import update_logger
    from federatedscope.core.auxiliaries.utils import setup_seed
    from fs_bittorrent.fs.entry import build_config, make_runner, share_fs_logging
    cfg = build_config(cfg_file, opts)
    update_logger(cfg, clear_before_add=True)
    share_fs_logging()
    setup_seed(cfg.seed)
    data, modified = get_data(config=cfg.clone())
    cfg.merge_from_other_cfg(modified)
    cfg.freeze()
    return make_runner(cfg, data)


@pytest.mark.fs
def test_fs_replays_and_forgeries_mid_round_are_refused_counted_and_never_aggregated(
        tmp_path, plain_fedavg):
    """While round 1 swarms, client 2 receives: a piece replayed from round 0
    (dropped as stale), a handshake for another experiment's swarm (refused:
    protocol error, the connection is closed), and a block nobody asked
    client 4 for, full of garbage (refused as unrequested).  Round 1 still
    completes and every model is FS's FedAvg."""
    _fs()
    from federatedscope.core.message import Message
    from fs_bittorrent.core.layout import SwarmLayout
    from fs_bittorrent.core.messages import Handshake, Piece
    from fs_bittorrent.fs.wire import PEER_MESSAGE_TYPES
    from fs_helpers import BT, toy_cfg
    runner = build_runner(toy_cfg(tmp_path), BT)
    seen: dict = {}

    def inject():
        bt = runner.client[2].bt
        assert bt.round == 1 and not bt.session.closed   # round 1 is swarming
        seen["session"] = s = bt.session
        before = (bt.stale_messages, bt.protocol_errors, s.stats.unrequested_blocks,
                  s.stats.duplicate_blocks, set(s.storage.keys()))
        seen["before"] = before
        handler = runner.client[2].msg_handlers

        def deliver(sender, state, content):
            handler[PEER_MESSAGE_TYPES[type(content)]](Message(
                msg_type=PEER_MESSAGE_TYPES[type(content)], sender=sender, receiver=[2],
                state=state, content=content))

        lay = s.layout
        old = runner.store.get_piece(0, 3, 0, 3)            # a real round-0 piece of owner 3
        deliver(3, 0, Piece(lay.to_global(3, 0), 0, old[:64]))
        other = SwarmLayout(lay.manifests, experiment="someone else's experiment")
        deliver(3, 1, Handshake(swarm_id=other.swarm_id, peer_id=3,
                                credit=1 << 20, auth=b"\x00" * 32))
        deliver(4, 1, Piece(lay.to_global(1, 0), 0, b"\xee" * 64))
        seen["after"] = (bt.stale_messages, bt.protocol_errors, s.stats.unrequested_blocks,
                         s.stats.duplicate_blocks, set(s.storage.keys()))
        seen["peer 3 dropped"] = 3 not in s.peers and 4 in s.peers

    def on_round_end(r, rnd):
        if rnd == 0:  # round 1 starts without virtual time passing; inject once the
            r.call_at(r.now() + 0.012, inject)  # handshakes are through (latency 5 ms)

    runner.round_hooks.append(on_round_end)
    runner.run()
    b, a = seen["before"], seen["after"]
    assert a[0] == b[0] + 1                      # the replay: stale, dropped
    assert a[1] == b[1] + 1                      # the forged handshake: a protocol error
    assert seen["peer 3 dropped"]                # ... and that connection is dropped
    assert a[2] + a[3] == b[2] + b[3] + 1        # the garbage block: refused
    assert a[4] == b[4]                          # and nothing was stored meanwhile
    stats = round_stats(runner)
    assert [s["reason"] for s in stats] == ["complete"] * 3
    assert_models_equal(client_models(runner), plain_fedavg)
    assert_store_holds_only_verified_pieces(runner)


@pytest.mark.fs
@pytest.mark.parametrize("opts,shown", [
    (["bittorrent.faults.drop", "1.5"], "bittorrent.faults.drop=1.5"),
    (["bittorrent.faults.corrupt", "-0.1"], "bittorrent.faults.corrupt=-0.1"),
    (["bittorrent.faults.delay_max", "-2.0"], "bittorrent.faults.delay_max=-2.0"),
    (["bittorrent.faults.crash_clients", "[9]"], "bittorrent.faults.crash_clients=[9]"),
    (["bittorrent.faults.crash_clients", "[2, 2]"], "bittorrent.faults.crash_clients=(2, 2)"),
    (["bittorrent.faults.crash_round", "-1"], "bittorrent.faults.crash_round=-1"),
    (["bittorrent.faults.dorp", "0.1"], "did you mean bittorrent.faults.drop?"),
])
def test_bad_fault_config_fails_before_training(tmp_path, capsys, opts, shown):
    _fs()
    from federatedscope.core.configs.config import global_cfg
    from fs_bittorrent.fs.entry import main as run_main
    from fs_helpers import BT, toy_cfg
    before = global_cfg.bittorrent.faults.clone()
    assert run_main(["--cfg", toy_cfg(tmp_path)] + BT + opts) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and shown in err, err
    assert not list((tmp_path / "exp").rglob("bittorrent_rounds.jsonl"))
    assert global_cfg.bittorrent.faults == before  # nothing leaked into the shared config


@pytest.mark.fs
def test_fault_settings_reach_the_runner(tmp_path):
    _fs()
    from fs_bittorrent.fs.config import BitTorrentSettings
    from fs_bittorrent.fs.entry import build_config
    from fs_helpers import BT, toy_cfg
    cfg = build_config(toy_cfg(tmp_path), BT + [
        "bittorrent.faults.drop", "0.25", "bittorrent.faults.crash_clients", "[1, 3]",
        "bittorrent.faults.crash_round", "2", "bittorrent.faults.crash_at", "0.5"])
    s = BitTorrentSettings.from_cfg(cfg)
    assert s.faults == Faults(drop=0.25, crash_clients=(1, 3), crash_round=2, crash_at=0.5)
    assert math.isclose(s.faults.reconnect_after, 1.0)


# ---------------------------------------------------------------------------
# docs/reliability.md names only tests that exist
# ---------------------------------------------------------------------------

def test_reliability_doc_names_real_tests():
    import ast
    import re
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "reliability.md").read_text()
    refs = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]*)\])?`", doc))
    assert len(refs) > 40
    defined: dict = {}
    for path in {p for p, _, _ in refs}:
        tree = ast.parse((root / path).read_text())
        defined[path] = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for path, name, param in refs:
        assert name in defined[path], f"{path}::{name} does not exist"
        if param:
            # a parametrized id: each part is a parameter value written in that module
            module = (root / path).read_text()
            assert defined[path][name].decorator_list, (path, name, "is not parametrized")
            for part in param.split("-"):
                assert re.search(rf"[\[(\s,\"']{re.escape(part)}[\"',\])]", module), \
                    (path, name, param)
