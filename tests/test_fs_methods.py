"""Every FederatedScope method with the exchange on, against plain FS.

One parametrized test per FS method or feature: the same config and seed
run once as plain FS and once with ``bittorrent.enable True`` (in this
process, one after the other, so string hashing is the same); the server's
evaluation results must agree round by round within 1e-5 relative, with
one ``Final`` line each.  Features that cannot work peer to peer are
refused with exit status 2 and a message saying what to do.

FS's toy data and small models, 3 clients, 2-3 rounds: seconds per run.
"""
from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: FS method tests skipped")

import torch  # noqa: E402

from fs_bittorrent.fs.entry import main as run_main  # noqa: E402
from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_helpers import BT, toy_cfg  # noqa: E402

pytestmark = pytest.mark.fs

CLIENTS = 3
MLP = ["model.type", "mlp", "model.hidden", "4", "model.layer", "2"]

# name -> (rounds, extra options for both runs)
CASES = {
    "fedavg": (2, []),
    "client_sampling": (3, ["federate.sample_client_num", "2"]),
    "fedprox": (2, ["fedprox.use", "True", "fedprox.mu", "0.1"]),
    "fedopt": (3, ["fedopt.use", "True", "fedopt.optimizer.lr", "0.5"]),
    "fedbn": (2, MLP + ["personalization.local_param", "['norms']"]),
    "fedrep": (2, MLP + ["federate.method", "fedrep",
                         "personalization.local_param", "['linears']"]),
    "ditto": (2, ["federate.method", "ditto"]),
    "pfedme_beta_0.5": (2, ["federate.method", "pfedme", "personalization.beta", "0.5",
                            "personalization.K", "2"]),
    "pfedme_beta_1": (2, ["federate.method", "pfedme", "personalization.beta", "1.0",
                          "personalization.K", "2"]),
    "fedem": (2, ["federate.method", "fedem", "model.model_num_per_trainer", "2"]),
    # FS's robust rules; BFT_args only takes new keys from a YAML file
    "median": (2, ["aggregator.robust_rule", "median"]),
    "trimmedmean": (2, ["aggregator.robust_rule", "trimmedmean",
                        "BFT_args", "{trimmedmean_excluded_ratio: 0.34}"]),
    "krum": (2, ["aggregator.robust_rule", "krum", "BFT_args", "{krum_agg_num: 1}"]),
    "multikrum": (2, ["aggregator.robust_rule", "krum", "BFT_args", "{krum_agg_num: 2}"]),
    "bulyan": (2, ["aggregator.robust_rule", "bulyan"]),
    "normbounding": (2, ["aggregator.robust_rule", "normbounding",
                         "BFT_args", "{normbounding_norm_bound: 0.05}"]),
    "online_aggr": (2, ["federate.online_aggr", "True"]),
    "share_local_model": (3, ["federate.share_local_model", "True"]),
    "share_local_model_online": (2, ["federate.share_local_model", "True",
                                     "federate.online_aggr", "True"]),
    "early_stopping": (6, ["early_stop.patience", "1", "early_stop.delta", "1000000.0"]),
    "eval_freq_2": (3, ["eval.freq", "2"]),
    "make_global_eval": (2, ["federate.make_global_eval", "True"]),
    "total_round_num_1": (1, []),
}


def _parse(line: str) -> dict:
    line = re.sub(r"np\.float64\(([^)]*)\)", r"\1", line)
    return ast.literal_eval(re.sub(r"\bnan\b", "None", line))


def server_results(outdir: Path) -> list[dict]:
    """The server's lines of FS's eval_results.log (not our Results_bittorrent)."""
    logs = list(outdir.rglob("eval_results.log"))
    assert len(logs) == 1, logs
    records = [_parse(x) for x in logs[0].read_text().splitlines() if x.strip()]
    return [r for r in records if r.get("Role") == "Server #" and "Results_bittorrent" not in r]


def assert_close_results(mine, theirs, path="") -> None:
    """Same keys, same structure, numbers within 1e-5 relative."""
    if isinstance(theirs, dict):
        assert isinstance(mine, dict) and set(mine) == set(theirs), (path, mine, theirs)
        for k in theirs:
            assert_close_results(mine[k], theirs[k], f"{path}.{k}")
    elif isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
        assert isinstance(mine, (int, float)), (path, mine, theirs)
        assert math.isclose(mine, theirs, rel_tol=1e-5, abs_tol=1e-9), (path, mine, theirs)
    else:
        assert mine == theirs, (path, mine, theirs)


def round_stats(outdir: Path) -> list[dict]:
    path = next(outdir.rglob("bittorrent_rounds.jsonl"))
    return [json.loads(x) for x in path.read_text().splitlines()]


def method_cfg(tmp_path: Path, rounds: int, opts: list[str], name: str) -> tuple[str, list]:
    """The toy YAML (plus ``aggregator.BFT_args`` from ``opts``, which FS
    only accepts from a file) and the remaining KEY VALUE options."""
    cfg = toy_cfg(tmp_path, clients=CLIENTS, rounds=rounds, name=name)
    rest = list(opts)
    if "BFT_args" in rest:
        i = rest.index("BFT_args")
        with open(cfg, "a") as f:
            f.write(f"aggregator:\n  BFT_args: {rest[i + 1]}\n")
        del rest[i:i + 2]
    return cfg, rest


@pytest.mark.parametrize("case", list(CASES))
def test_exchange_matches_plain_fs(tmp_path, case):
    rounds, opts = CASES[case]
    cfg, rest = method_cfg(tmp_path, rounds, opts, "plain")
    run_experiment(cfg, rest)
    plain = server_results(tmp_path / "plain")
    cfg, rest = method_cfg(tmp_path, rounds, opts, "bt")
    bt_runner, _ = run_experiment(cfg, BT + rest)
    mine = server_results(tmp_path / "bt")
    assert [r["Round"] for r in mine] == [r["Round"] for r in plain]
    assert sum(r["Round"] == "Final" for r in mine) == 1
    for a, b in zip(mine, plain):
        assert_close_results(a, b, f"round {b['Round']}")
    # one finish per client, no second course (early stopping), as plain FS
    assert finishes(tmp_path / "bt") == finishes(tmp_path / "plain")
    stats = round_stats(tmp_path / "bt")
    assert [s["round"] for s in stats] == list(range(len(stats)))
    for s in stats:
        agreement = s["agreement"]
        assert agreement["agreed"] and agreement["differing"] == [], (s["round"], agreement)
        assert sorted(agreement["agreeing"]) == list(range(1, CLIENTS + 1))
    assert_local_params_never_exchanged(bt_runner)


def finishes(outdir: Path) -> int:
    log = next(outdir.rglob("exp_print.log")).read_text()
    assert "duplicated tracked sys-results" not in log
    return log.count("received finish message")


def assert_local_params_never_exchanged(runner) -> None:
    """Every exchanged tensor is one FS's client uploads (get_model_para):
    personalized parameters (local_param, FedBN's norms, FedRep's head,
    Ditto's local model) never become pieces."""
    from fs_bittorrent.fs.fs_aggregation import flatten_models
    from fs_bittorrent.store.sqlite_store import SQLitePieceStore
    local = list(runner.cfg.personalization.local_param)
    shared = set(flatten_models(runner.client[1].trainer.get_model_para()))
    db = SQLitePieceStore(str(Path(runner.settings.db_dir) / "pieces.db"))
    try:
        for r in db.rounds():
            for m in db.manifests(r):
                names = {t.name for t in m.tensors}
                assert names and names <= shared, (r, m.owner, names - shared)
                assert not [n for n in names for k in local if k in n], (names, local)
    finally:
        db.close()
