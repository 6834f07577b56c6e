"""End-to-end runs against the real FederatedScope (skipped without it).

FS's toy data set and logistic regression: no download, seconds per run.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: FS integration tests skipped")

import torch  # noqa: E402

from fs_bittorrent.fs.entry import main as run_main  # noqa: E402
from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_helpers import BT, client_models, round_stats, toy_cfg  # noqa: E402

pytestmark = pytest.mark.fs



@pytest.mark.parametrize("clients", [4, 16])
def test_standalone_run_every_client_gets_every_piece(tmp_path, clients):
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=clients), BT)
    stats = round_stats(runner)
    assert [s["round"] for s in stats] == [0, 1, 2]
    for s in stats:
        assert s["reason"] == "complete" and s["completion_ratio"] == 1.0
        assert set(s["completion"]) == {str(c) for c in range(1, clients + 1)}
        assert all(v == 1.0 for v in s["completion"].values())
        assert s["clock"] == "virtual" and s["t_lb"] > 0 and 0 < s["eta"] <= 1
        assert s["started_wall"] is None          # no wall-clock start in virtual time
        # the latency-aware bound beside it: T_LB + 3 x the 5 ms latency
        assert s["t_lb_lat"] == pytest.approx(s["t_lb"] + 3 * 0.005)
        assert s["eta"] < s["eta_lat"] <= 1
        # when each client began, after bt_start left the server (virtual time)
        delays = s["start_delay"]
        assert set(delays) == {str(c) for c in range(1, clients + 1)}
        assert all(0 <= d < s["exchange_time"] for d in delays.values())
        assert s["start_spread"] == pytest.approx(max(delays.values()) - min(delays.values()))
    # The store still holds the last keep_rounds rounds, every piece at every holder.
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore
    db = SQLitePieceStore(os.path.join(runner.settings.db_dir, "pieces.db"))
    try:
        rounds = db.rounds()
        assert rounds == [1, 2]  # keep_rounds = 2
        for r in rounds:
            everything = {(m.owner, k) for m in db.manifests(r) for k in range(m.num_pieces)}
            for holder in range(1, clients + 1):
                assert db.held_pieces(r, holder) == everything
    finally:
        db.close()
    # FS's own log carries the headline figures.
    log = (Path(runner.cfg.outdir) / "exp_print.log").read_text()
    assert "round 2 exchange complete" in log and "eta" in log


def test_aggregate_equals_plain_fedavg(tmp_path):
    bt_runner, _ = run_experiment(toy_cfg(tmp_path, name="bt"), BT)
    plain_runner, _ = run_experiment(toy_cfg(tmp_path, name="plain"), [])
    global_model = {k: v.detach() for k, v in plain_runner.server.models[0].state_dict().items()}
    models = client_models(bt_runner)
    for cid, params in models.items():
        assert params.keys() == global_model.keys()
        for k, v in params.items():
            torch.testing.assert_close(v, global_model[k], rtol=1e-5, atol=1e-6,
                                       msg=f"client {cid} tensor {k}")
    # and every client holds the same aggregate
    first = models[1]
    assert all(torch.equal(first[k], m[k]) for m in models.values() for k in first)


def _eval_log(outdir: Path) -> list[dict]:
    """FS's eval_results.log as dicts.  FS builds them from sets, so key order
    depends on the process's string hashing; the values are what must match,
    exactly (every digit FS wrote)."""
    logs = list(outdir.rglob("eval_results.log"))
    assert len(logs) == 1, logs
    lines = logs[0].read_text().splitlines()
    def parse(line: str) -> dict:
        line = re.sub(r"np\.float64\(([^)]*)\)", r"\1", line)
        return ast.literal_eval(re.sub(r"\bnan\b", "None", line))  # nan != nan
    return [parse(line) for line in lines if line.strip()]


def test_rollback_enable_false_matches_plain_fs_to_the_last_digit(tmp_path):
    """enable False through our entry point vs FS's own main.py.

    Both run as fresh processes with one PYTHONHASHSEED: FS picks its
    "best" results by iterating sets of metric names, so two processes
    with different string hashing can disagree even for plain FS.
    """
    env = dict(os.environ, PYTHONHASHSEED="0")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    runs = {
        "ours": [sys.executable, "-m", "fs_bittorrent", "run", "--cfg",
                 toy_cfg(tmp_path, name="ours"), "bittorrent.enable", "False"],
        "fs": [sys.executable, "-m", "federatedscope.main", "--cfg", toy_cfg(tmp_path, name="fs")],
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
    mine, theirs = _eval_log(tmp_path / "ours"), _eval_log(tmp_path / "fs")
    assert len(mine) == 8 and mine == theirs


def test_slow_network_ends_rounds_with_partial_completion(tmp_path, caplog):
    opts = BT[:-2] + ["bittorrent.timeout", "0.5", "bittorrent.min_completion_ratio", "0.0",
                      "bittorrent.network.upload", "0.004", "bittorrent.network.download",
                      "0.004", "bittorrent.missing_policy", "local"]
    runner, _ = run_experiment(toy_cfg(tmp_path), opts)
    stats = round_stats(runner)
    assert len(stats) == 3  # the run completed every round
    for s in stats:
        assert s["reason"] in ("deadline", "partial")
        assert 0.0 < min(s["completion"].values()) and max(s["completion"].values()) < 1.0
    for c in runner.client.values():
        # Its own model always arrives; some of the others' did not.
        agg = c.bt.last_aggregate
        assert c.ID in agg.contributors and len(agg.contributors) < len(runner.client)
        assert agg.covered_fraction == 1.0
        assert all(torch.isfinite(v).all() for v in agg.state_dict.values())


def test_insufficient_completion_with_abort_policy_stops_training(tmp_path):
    opts = BT[:-2] + ["bittorrent.timeout", "0.2", "bittorrent.min_completion_ratio", "1.0",
                      "bittorrent.insufficient_policy", "abort",
                      "bittorrent.network.upload", "0.001", "bittorrent.network.download",
                      "0.001"]
    runner, _ = run_experiment(toy_cfg(tmp_path, rounds=4), opts)
    stats = round_stats(runner)
    assert len(stats) == 1 and stats[0]["reason"] == "insufficient"


@pytest.mark.parametrize("opts,field", [
    (["bittorrent.enable", "True", "bittorrent.pice_size", "1024"], "bittorrent.pice_size"),
    (["bittorrent.enable", "True", "bittorrent.piece_size", "-5"], "bittorrent.piece_size"),
    (["bittorrent.enable", "True", "bittorrent.min_completion_ratio", "1.5"],
     "bittorrent.min_completion_ratio"),
    (["bittorrent.enable", "True", "bittorrent.topology", "explicit",
      "bittorrent.neighbors", "[[1, 2], [2, 99]]"], "bittorrent.neighbors"),
])
def test_bad_config_fails_before_training(tmp_path, capsys, opts, field):
    cfg = toy_cfg(tmp_path)
    assert run_main(["--cfg", cfg] + opts) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and field in err
    # nothing ran: no per-round statistics were written
    assert not list((tmp_path / "exp").rglob("bittorrent_rounds.jsonl"))


def test_client_sampling_matches_plain_fedavg(tmp_path):
    """Sampled clients train and publish; every client swarms and aggregates,
    so all hold FS's global model after each round."""
    sample = ["federate.sample_client_num", "2"]
    bt_runner, _ = run_experiment(toy_cfg(tmp_path, name="bt"), BT + sample)
    plain_runner, _ = run_experiment(toy_cfg(tmp_path, name="plain"), sample)
    global_model = {k: v.detach() for k, v in plain_runner.server.models[0].state_dict().items()}
    for cid, params in client_models(bt_runner).items():
        for k, v in params.items():
            torch.testing.assert_close(v, global_model[k], rtol=1e-5, atol=1e-6,
                                       msg=f"client {cid} tensor {k}")
    for s in round_stats(bt_runner):
        assert len(s["completion"]) == 4 and s["completion_ratio"] == 1.0


def test_standalone_runs_are_deterministic_for_a_seed(tmp_path):
    """Same seed, same virtual exchange: times, bytes and completion agree."""
    opts = BT + ["bittorrent.network.upload_dist", "uniform(1,50)",
                 "bittorrent.network.latency_dist", "uniform(0.001,0.02)"]
    first, _ = run_experiment(toy_cfg(tmp_path, name="a"), opts)
    second, _ = run_experiment(toy_cfg(tmp_path, name="b"), opts)
    a, b = round_stats(first), round_stats(second)
    assert a == b and len(a) == 3 and all(s["t_lb"] > 0 for s in a)
    # and the seed matters: other links, other exchange times
    third, _ = run_experiment(toy_cfg(tmp_path, name="c"), opts + ["bittorrent.seed", "99"])
    assert [s["exchange_time"] for s in round_stats(third)] != [s["exchange_time"] for s in a]


def test_round_metrics_files_parse_and_agree_with_the_store(tmp_path):
    import csv
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=4), BT)
    stats = round_stats(runner)
    rows = list(csv.DictReader(open(Path(runner.cfg.outdir) / "bittorrent_rounds.csv")))
    assert len(rows) == 4 * len(stats)
    for row in rows:
        s = stats[int(row["round"])]
        c = row["client"]
        assert int(row["bytes_up"]) == s["bytes_up"][c] and int(row["bytes_down"]) == \
            s["bytes_down"][c]
        assert float(row["completion"]) == s["completion"][c]
        assert float(row["first_piece_time"]) == s["first_piece_time"][c]
    for s in stats:
        for c, line in s["timeline"].items():
            times = [t for t, _ in line]
            fractions = [f for _, f in line]
            assert times == sorted(times) and fractions == sorted(fractions)
            assert fractions[-1] == s["completion"][c]
            assert 0 < s["first_piece_time"][c] <= s["exchange_time"]
        # Every byte one client downloaded, another uploaded.
        assert sum(s["bytes_down"].values()) == sum(s["bytes_up"].values())
    # The store agrees on what each client holds in the rounds it keeps.
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore
    db = SQLitePieceStore(os.path.join(runner.settings.db_dir, "pieces.db"))
    try:
        for r in db.rounds():
            total = sum(m.num_pieces for m in db.manifests(r))
            for c, frac in stats[r]["completion"].items():
                assert len(db.held_pieces(r, int(c))) == round(frac * total)
                row = db.get_session(r, int(c))
                assert row["state"] == "complete"
                # same bytes: the metrics carry each client's final counts
                assert (row["bytes_up"], row["bytes_down"]) == \
                    (stats[r]["bytes_up"][c], stats[r]["bytes_down"][c])
    finally:
        db.close()


def test_progress_bar_counts_every_piece_of_every_round(tmp_path, monkeypatch):
    import io
    from fs_bittorrent.fs import runner as runner_mod
    from fs_bittorrent.fs.progress import SwarmProgress
    buf = io.StringIO()
    monkeypatch.setattr(runner_mod, "SwarmProgress",
                        lambda: SwarmProgress(enabled=True, file=buf))
    run_experiment(toy_cfg(tmp_path, clients=4), BT)
    out = buf.getvalue()
    # 4 clients x 3 other owners x 2 pieces each = 24 pieces per round
    for r in range(3):
        assert f"round {r} exchange: 100%" in out and "24/24" in out
    assert SwarmProgress().enabled is False  # quiet under pytest (no terminal)


def test_round_headlines_in_fs_result_file(tmp_path):
    """Where FS users look: a Results_bittorrent line per round in FS's own
    eval_results.log, equal to the round's figures in bittorrent_rounds.jsonl."""
    from fs_bittorrent.report import parse_eval_line
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=4), BT)
    stats = round_stats(runner)
    lines = (Path(runner.cfg.outdir) / "eval_results.log").read_text().splitlines()
    heads = {rec["Round"]: rec["Results_bittorrent"] for rec in map(parse_eval_line, lines)
             if rec and "Results_bittorrent" in rec}
    assert sorted(heads) == [s["round"] for s in stats]
    for s in stats:
        h = heads[s["round"]]
        assert h["exchange_time"] == s["exchange_time"] and h["eta"] == s["eta"]
        assert h["completion_ratio"] == s["completion_ratio"] == 1.0
        assert h["bytes_total"] == sum(s["bytes_down"].values()) > 0


@pytest.mark.parametrize("old_rounds, warning", [
    (1, "holds another manifest for round 0 owner"),   # round 0 collides, owner by owner
    (4, "holds rounds [2, 3] of an earlier run"),      # later rounds would outlive ours
])
def test_a_reused_store_directory_runs_as_a_fresh_one(tmp_path, old_rounds, warning):
    """A new experiment in the ``db_dir`` of an earlier one (other seed,
    other models) used to stop at the first (round, owner) the old run had
    stored (a different manifest is refused), or, with later rounds left in
    the file, to lose its own rounds to ``cleanup`` (it keeps the newest).
    Now the old run's rounds are dropped with a warning, and the run equals
    the same run with an empty directory: models, figures and store."""
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore
    shared = str(tmp_path / "shared_db")
    run_experiment(toy_cfg(tmp_path, rounds=old_rounds, name="old"),
                   BT + ["bittorrent.db_dir", shared, "seed", "1"])
    reused, _ = run_experiment(toy_cfg(tmp_path, name="reused"),
                               BT + ["bittorrent.db_dir", shared, "seed", "2"])
    assert warning in (Path(reused.cfg.outdir) / "exp_print.log").read_text()
    fresh, _ = run_experiment(toy_cfg(tmp_path, name="fresh"), BT + ["seed", "2"])
    a, b = client_models(reused), client_models(fresh)
    assert a.keys() == b.keys()
    for cid in a:
        assert all(torch.equal(a[cid][k], b[cid][k]) for k in b[cid])
    # all but the store's size and the control bytes (bt_stats names the store's path)
    strip = lambda stats: [{k: v for k, v in s.items()  # noqa: E731
                            if not k.startswith("store") and k != "server_bytes"}
                           for s in stats]
    assert strip(round_stats(reused)) == strip(round_stats(fresh))
    assert all(s["reason"] == "complete" for s in round_stats(reused))
    with SQLitePieceStore(os.path.join(shared, "pieces.db")) as mine, \
            SQLitePieceStore(os.path.join(fresh.settings.db_dir, "pieces.db")) as ref:
        assert mine.rounds() == ref.rounds() == [1, 2]
        for r in (1, 2):
            assert mine.manifests(r) == ref.manifests(r)
            for holder in range(1, 5):
                assert mine.held_pieces(r, holder) == ref.held_pieces(r, holder)


def test_a_store_that_cannot_commit_mid_exchange_stops_the_run_and_blames_no_peer(
        tmp_path, monkeypatch):
    """The disk fills during an exchange: from the first batch holding a
    received piece on, every commit fails as SQLite fails on a full disk,
    and the next ``put`` raises ``StoreError("flush")``.  That is this
    client's own failure: it used to be taken for the sending peer's (a
    warning, the peer dropped, then the next one, until the round's end);
    now the client stops and the run ends with the store's error, no peer
    blamed or dropped."""
    from fs_bittorrent.errors import StoreError
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore
    from store_faults import full_disk_patches
    # Commits inline: the simulated exchange runs in milliseconds of wall
    # time, faster than a committer thread would report its failure.
    patches, failed = full_disk_patches()
    for name, replacement in patches.items():
        monkeypatch.setattr(SQLitePieceStore, name, replacement)
    cfg = toy_cfg(tmp_path)
    opts = BT + ["bittorrent.piece_size", "16", "bittorrent.block_size", "16"]
    with pytest.raises(StoreError) as e:
        run_experiment(cfg, opts)
    assert e.value.field == "flush" and "database or disk is full" in str(e.value)
    assert failed and failed[0] == 64               # a full batch: sealed mid-exchange
    text = "".join(p.read_text() for p in (tmp_path / "exp").rglob("exp_print.log"))
    assert "its piece store failed in round 0" in text
    assert "from peer" not in text                  # nobody blamed, nobody dropped


def test_start_delays_are_report_arrival_less_exchange_time_after_the_send():
    from types import SimpleNamespace as R
    from fs_bittorrent.fs.manager import start_delays
    reports = {1: R(exchange_time=1.15), 2: R(exchange_time=1.10), 3: R(exchange_time=1.0)}
    # client 3's report has not arrived: left out; a report that arrived
    # "before" its exchange could have begun (clock noise) counts as 0
    got = start_delays(10.0, {1: 11.20, 2: 11.25, 4: 12.0}, reports)
    assert got == {"1": pytest.approx(0.05), "2": pytest.approx(0.15)}
    assert start_delays(10.0, {1: 10.5}, reports) == {"1": 0.0}
    assert start_delays(None, {1: 11.2}, reports) == {}
