"""The flow level in the FederatedScope standalone runner (skipped without FS)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: FS integration tests skipped")

import torch  # noqa: E402

from fs_bittorrent.errors import ConfigError  # noqa: E402
from fs_bittorrent.fs.config import BitTorrentSettings  # noqa: E402
from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_bittorrent.fs.runner import BitTorrentStandaloneRunner  # noqa: E402
from fs_bittorrent.store.sqlite_store import SQLitePieceStore  # noqa: E402
from fs_helpers import BT, round_stats, toy_cfg  # noqa: E402
from fs_helpers import client_models as models  # noqa: E402

pytestmark = pytest.mark.fs

FLOW = BT + ["bittorrent.simulation", "flow"]




def test_flow_level_gives_the_block_levels_models_and_store(tmp_path):
    """Aggregation is exact at the flow level: every client ends each round
    with the very model the block level gives, and the store records every
    piece at every holder."""
    flow, _ = run_experiment(toy_cfg(tmp_path, name="flow"), FLOW)
    block, _ = run_experiment(toy_cfg(tmp_path, name="block"), BT)
    assert set(flow.levels.values()) == {"flow"} and set(block.levels.values()) == {"block"}
    a, b = models(flow), models(block)
    for cid in a:
        for k in a[cid]:
            assert torch.equal(a[cid][k], b[cid][k]), (cid, k)
    fs, bs = round_stats(flow), round_stats(block)
    assert [s["reason"] for s in fs] == ["complete"] * 3
    for f, b_ in zip(fs, bs):
        assert f["completion_ratio"] == 1.0 and f["t_lb"] == b_["t_lb"]
        assert f["t_lb"] <= f["exchange_time"]
        assert sum(f["bytes_down"].values()) == sum(f["bytes_up"].values())
    db = SQLitePieceStore(str(Path(flow.settings.db_dir) / "pieces.db"))
    try:
        for r in db.rounds():
            everything = {(m.owner, k) for m in db.manifests(r) for k in range(m.num_pieces)}
            for holder in flow.client:
                assert db.held_pieces(r, holder) == everything
    finally:
        db.close()


def test_reused_flow_schedule_never_changes_results(tmp_path, monkeypatch):
    """With a static network and unchanged model sizes each round's schedule
    is the first round's: reusing it gives exactly the figures of
    simulating every round afresh.  (Names of equal length: the experiment
    name travels in control messages, so it shows in ``server_bytes``.)"""
    reused, _ = run_experiment(toy_cfg(tmp_path, name="reuse"), FLOW)
    monkeypatch.setattr(BitTorrentStandaloneRunner, "flow_reuse", False)
    fresh, _ = run_experiment(toy_cfg(tmp_path, name="fresh"), FLOW)
    assert round_stats(reused) == round_stats(fresh)
    assert reused.flow_cpu[1] == reused.flow_cpu[2] == 0.0   # reused
    assert all(fresh.flow_cpu[r] > 0 for r in (0, 1, 2))
    a, b = models(reused), models(fresh)
    assert all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


def test_flow_level_deadline_gives_partial_rounds(tmp_path):
    opts = FLOW[:-4] + ["bittorrent.timeout", "0.5", "bittorrent.min_completion_ratio", "0.0",
                        "bittorrent.network.upload", "0.004", "bittorrent.network.download",
                        "0.004", "bittorrent.missing_policy", "local",
                        "bittorrent.simulation", "flow"]
    runner, _ = run_experiment(toy_cfg(tmp_path), opts)
    stats = round_stats(runner)
    assert len(stats) == 3
    for s in stats:
        assert s["reason"] in ("deadline", "partial")
        assert 0.0 < min(s["completion"].values()) and max(s["completion"].values()) < 1.0
    for c in runner.client.values():
        agg = c.bt.last_aggregate
        # its own model always arrives; missing elements follow the local policy
        assert c.ID in agg.contributors and agg.covered_fraction == 1.0
        assert c.bt.session.completion() < 1.0


def test_flow_level_crash_fault(tmp_path):
    """A client crashing at the start of round 1 sends no report and its
    model never leaves it: the round ends at the deadline with nobody
    complete (insufficient, proceed); it rejoins in round 2."""
    crash = ["bittorrent.faults.crash_clients", "[2]", "bittorrent.faults.crash_round", "1",
             "bittorrent.faults.crash_at", "0.0", "bittorrent.timeout", "5.0"]
    opts = FLOW + crash
    runner, _ = run_experiment(toy_cfg(tmp_path, name="flow"), opts)
    stats = round_stats(runner)
    assert runner.crashed == [(1, 2)]
    assert stats[1]["reason"] == "insufficient" and "2" not in stats[1]["completion"]
    assert all(0 < v < 1 for v in stats[1]["completion"].values())
    assert stats[0]["reason"] == stats[2]["reason"] == "complete"
    # the block level ends the same rounds the same way, with the same holdings
    block, _ = run_experiment(toy_cfg(tmp_path, name="block"),
                              BT + ["bittorrent.simulation", "block"] + crash)
    assert set(block.levels.values()) == {"block"}
    for f, b in zip(stats, round_stats(block)):
        assert (f["reason"], f["completion"]) == (b["reason"], b["completion"])


@pytest.mark.parametrize("opts,why", [
    (["bittorrent.simulation", "fluid"], "must be one of"),
    (["bittorrent.simulation", "flow", "bittorrent.faults.drop", "0.1"], "per-message faults"),
    (["bittorrent.simulation", "flow", "bittorrent.max_upload_slots", "2"], "upload slots"),
])
def test_bad_simulation_settings_are_refused(tmp_path, opts, why):
    from fs_bittorrent.fs.entry import build_config
    with pytest.raises(ConfigError) as e:
        cfg = build_config(toy_cfg(tmp_path), ["bittorrent.enable", "True"] + opts)
        BitTorrentSettings.from_cfg(cfg)
    assert e.value.field == "bittorrent.simulation" and why in str(e.value)
