"""The operator's per-round figures (store size and growth, bytes against
plain FS's star, the server's own bytes) and FS's own accounting of the
exchange (system_metrics.log)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: FS integration tests skipped")

from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_bittorrent.fs.monitoring import wire_bytes  # noqa: E402
from fs_bittorrent.report import parse_eval_line  # noqa: E402
from fs_helpers import BT, toy_cfg  # noqa: E402

pytestmark = pytest.mark.fs

CLIENTS, ROUNDS = 4, 3


@pytest.fixture(scope="module")
def exchange_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitoring")
    runner, _ = run_experiment(toy_cfg(tmp, clients=CLIENTS, rounds=ROUNDS), BT)
    out = Path(runner.cfg.outdir)
    stats = [json.loads(x) for x in (out / "bittorrent_rounds.jsonl").read_text().splitlines()]
    return runner, out, stats


def test_system_metrics_count_the_exchange_bytes(exchange_run):
    """FS's system_metrics.log: every client's upload equals what the
    exchange sent in all rounds (FS's standalone mode counts no upload of
    its own), and its download holds the exchange's bytes plus FS's count
    of its control messages."""
    runner, out, stats = exchange_run
    lines = [json.loads(x) for x in (out / "system_metrics.log").read_text().splitlines()]
    per_worker = {m["id"]: m for m in lines if isinstance(m.get("id"), int)}
    assert set(per_worker) >= set(range(1, CLIENTS + 1))
    for c in range(1, CLIENTS + 1):
        up = sum(s["bytes_up"][str(c)] for s in stats)
        down = sum(s["bytes_down"][str(c)] for s in stats)
        assert up > 0 and down > 0
        assert per_worker[c]["total_upload_bytes"] == up
        # FS counts the control messages it delivers (pympler object sizes) on top
        assert per_worker[c]["total_download_bytes"] >= down
        # equal to the client's own session counters (the store's bt_sessions rows)
        assert runner.client[c]._monitor.total_upload_bytes == up


def test_round_figures_in_jsonl_csv_and_fs_log(exchange_run):
    runner, out, stats = exchange_run
    model = max(stats[0]["star_bytes"].values()) // 2
    assert model > 0
    last_total = None
    for s in stats:
        # the star: the global model to each client asked, each update back
        assert s["star_bytes"] == {str(c): 2 * model for c in range(1, CLIENTS + 1)}
        assert s["star_bytes_total"] == 2 * model * CLIENTS
        assert s["bytes_total"] == sum(s["bytes_down"].values()) > 0
        assert s["traffic_ratio"] == pytest.approx(s["bytes_total"] / s["star_bytes_total"])
        # every client fetched the 3 other models: at least (n-1) x model bytes each
        assert all(v >= (CLIENTS - 1) * model for v in s["bytes_down"].values())
        assert s["server_bytes"] > 0
        # one shared store in standalone: counted once
        sizes = set(s["store_bytes"].values())
        assert len(s["store_bytes"]) == CLIENTS and s["store_bytes_total"] == max(sizes) > 0
        if last_total is None:
            assert s["store_growth"] is None
        else:
            assert s["store_growth"] == s["store_bytes_total"] - last_total
        last_total = s["store_bytes_total"]
        assert s["completion_ratio"] == 1.0
    # round 0 carries the initial model through the server (plus control messages)
    assert stats[0]["server_bytes"] > CLIENTS * model
    rows = list(csv.DictReader((out / "bittorrent_rounds.csv").open()))
    assert len(rows) == CLIENTS * ROUNDS
    for row in rows:
        s = stats[int(row["round"])]
        assert int(row["star_bytes"]) == s["star_bytes"][row["client"]]
        assert int(row["store_bytes"]) == s["store_bytes"][row["client"]]
        assert int(row["server_bytes"]) == s["server_bytes"]
    heads = {rec["Round"]: rec["Results_bittorrent"]
             for rec in map(parse_eval_line, (out / "eval_results.log").read_text().splitlines())
             if rec and "Results_bittorrent" in rec}
    for s in stats:
        h = heads[s["round"]]
        for key in ("bytes_total", "star_bytes_total", "traffic_ratio", "server_bytes",
                    "store_bytes_total", "store_growth", "completion_ratio"):
            assert h[key] == s[key], key


def test_wire_bytes_counts_what_travels():
    import torch
    assert wire_bytes({"w": torch.zeros(10, dtype=torch.float32)}) == 1 + 40
    assert wire_bytes(["abc", b"\x00\x01", 3, 2.5]) == 3 + 2 + 8 + 8
