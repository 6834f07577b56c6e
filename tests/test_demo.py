"""The README's fallback main job: the swarm demo on real model weights."""
from __future__ import annotations

import sqlite3

from fs_bittorrent.cli import main as cli_main
from fs_bittorrent.demo import run_demo


def test_demo_reconstructs_every_model_and_matches_fedavg(tmp_path):
    db = tmp_path / "pieces.db"
    r = run_demo(peers=4, piece_size=64 * 1024, db_path=str(db))
    assert r.verified_models == 16          # 4 holders x 4 owners, bit-exact
    assert r.fedavg_max_abs_diff < 1e-6
    assert 0 < r.lower_bound < r.virtual_time
    # The store holds every piece for every holder, and the sessions are recorded.
    con = sqlite3.connect(db)
    try:
        holders = con.execute("select holder, count(*) from bt_chunks group by holder").fetchall()
        assert len(holders) == 4 and len({n for _, n in holders}) == 1
        assert holders[0][1] == 4 * r.pieces_per_model
        states = {s for (s,) in con.execute("select state from bt_sessions")}
        assert states == {"complete"}
    finally:
        con.close()


def test_cli_demo_prints_a_summary(tmp_path, capsys):
    assert cli_main(["demo", "--peers", "3", "--db", str(tmp_path / "d.db")]) == 0
    out = capsys.readouterr().out
    assert "verified 9 reconstructed models bit-exact" in out
    assert "efficiency eta" in out


def test_cli_rejects_an_unknown_command(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
