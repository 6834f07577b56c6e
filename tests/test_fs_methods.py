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
    # clients not sampled in round 0 get FS's initial model (pFedMe reads it)
    "client_sampling_pfedme": (3, ["federate.sample_client_num", "2", "federate.method",
                                   "pfedme", "personalization.beta", "0.5",
                                   "personalization.K", "2"]),
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


def test_a_client_with_a_different_aggregate_is_named(tmp_path, monkeypatch):
    """Client 2's aggregate of round 1 is perturbed after it aggregated: the
    server's agreement check names it (figures and log); the others agree."""
    from fs_bittorrent.fs.manager import ClientManager
    original = ClientManager._aggregate

    def perturbed(self):
        original(self)
        if self.worker.ID == 2 and self.round == 1:
            with torch.no_grad():
                next(iter(self.fs_agg.models[0].parameters())).add_(1e-3)
            self.fs_agg._digest = None
            self.last_digest = self.fs_agg.digest()

    monkeypatch.setattr(ClientManager, "_aggregate", perturbed)
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=CLIENTS, rounds=3), BT)
    stats = {s["round"]: s["agreement"] for s in round_stats(tmp_path / "exp")}
    assert stats[1]["differing"] == [2] and stats[1]["differing_count"] == 1
    assert stats[1]["agreeing"] == [1, 3] and not stats[1]["agreed"]
    assert stats[0]["agreed"] and stats[2]["agreed"]   # FedAvg of round 2 re-agrees
    assert runner.server.bt.disagreements == 1
    log = next((tmp_path / "exp").rglob("exp_print.log")).read_text()
    assert "round 1 aggregate: 2 client(s) agree" in log and "DIFFERING: [2]" in log
    assert re.search(r"ERROR: server: round 1: 1 complete client\(s\) reached a different "
                     r"aggregate .*: clients \[2\]", log)


@pytest.mark.parametrize("opts,fix", [
    (["asyn.use", "True"], "set asyn.use False"),
    (["federate.use_ss", "True"], "set federate.use_ss False"),
    (["vertical.use", "True"], "set vertical.use False"),
    (["federate.method", "local"], "method 'local' exchanges no models"),
])
def test_refused_features_exit_2_saying_what_to_do(tmp_path, capsys, opts, fix):
    assert run_main(["--cfg", toy_cfg(tmp_path, clients=CLIENTS)] + BT + opts) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and opts[0] in err
    assert fix in err and "bittorrent.enable False to run plain FederatedScope" in err
    assert not list(tmp_path.rglob("bittorrent_rounds.jsonl"))


def test_server_classes_with_their_own_aggregation_are_refused():
    """A method whose FS server class replaces the steps the exchange takes
    over (its own aggregation, model upload handling) cannot be run faithfully."""
    from federatedscope.core.workers import Client, Server
    from fs_bittorrent.errors import ConfigError
    from fs_bittorrent.fs.workers import make_bittorrent_classes

    class OwnAggregationServer(Server):
        def _perform_federated_aggregation(self):
            return 0

    with pytest.raises(ConfigError) as err:
        make_bittorrent_classes(Client, OwnAggregationServer)
    assert "OwnAggregationServer" in str(err.value)
    assert "bittorrent.enable False" in str(err.value)
    make_bittorrent_classes(Client, Server)        # FS's own server: fine


def test_a_client_without_an_id_never_publishes_or_swarms(tmp_path):
    """Distributed clients start as id -1 until the server assigns one."""
    from federatedscope.core.message import Message
    from fs_bittorrent.errors import BitTorrentError
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=CLIENTS, rounds=1), BT)
    client = runner.client[1]
    bt = client.bt
    client.ID = -1
    published = Message(msg_type="model_para", sender=-1, receiver=[0], state=1,
                        content=(10, client.trainer.get_model_para()))
    with pytest.raises(BitTorrentError) as err:
        bt._publish(published)
    assert "client id" in str(err.value) and "-1" in str(err.value)
    errors = bt.protocol_errors
    bt.on_start(Message(msg_type="bt_start", sender=0, receiver=[-1], state=1, content={}))
    assert bt.protocol_errors == errors + 1 and bt.round == 0   # still round 0's state


def plain_fs_distributed(parts, env, timeout: float = 240.0) -> list[dict]:
    """Run FS's own distributed mode; its server's results.  FS's processes
    do not reliably exit by themselves (gRPC threads live on), so they are
    stopped once the server wrote ``Final`` and every client got ``finish``."""
    import time
    from fs_bittorrent.launch import start, stop_all
    server = parts[0]
    # FS's own client sends its join once, at start: give its server a head start
    start(parts, client_delay=4.0, env=env)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            logs = list(server.outdir.rglob("eval_results.log"))
            done = all("received finish message" in p.log_path.read_text(errors="replace")
                       for p in parts[1:])
            if done and logs and "'Final'" in logs[0].read_text():
                break
            time.sleep(0.2)
        else:
            raise AssertionError("plain FS distributed run did not finish in time")
        return server_results(server.outdir)
    finally:
        stop_all(parts)


def test_distributed_three_clients_match_plain_fs_distributed(tmp_path):
    """One process per participant, plain FS's distributed mode against the
    exchange's, 3 clients, same config and PYTHONHASHSEED.  FS numbers
    clients in join order, so ids and data may pair differently; the
    server's results (over all clients) do not depend on that."""
    import os
    from fs_bittorrent.launch import plan, run
    cfg = toy_cfg(tmp_path, clients=CLIENTS, rounds=2, name="dist")
    env = dict(os.environ, PYTHONHASHSEED="0")
    bt = ["bittorrent.enable", "True", "bittorrent.piece_size", "128",
          "bittorrent.block_size", "64", "bittorrent.timeout", "20.0",
          "bittorrent.tick_interval", "0.1"]
    theirs = plain_fs_distributed(plan(cfg, CLIENTS, tmp_path / "plain",
                                       ["bittorrent.enable", "False"]), env)
    result = run(plan(cfg, CLIENTS, tmp_path / "bt", bt), timeout=240, env=env)
    assert result.ok, result.log_tail()
    mine, rounds = server_results(tmp_path / "bt" / "server"), result.rounds
    assert [r["Round"] for r in mine] == [r["Round"] for r in theirs] == [0, 1, "Final"]
    for a, b in zip(mine, theirs):
        assert_close_results(a, b, f"round {b['Round']}")
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["agreement"]["agreed"] and r["agreement"]["agreeing"] == [1, 2, 3]


def test_partial_round_of_a_non_linear_rule_uses_whole_models_only(tmp_path):
    """A slow network cuts every exchange short.  The median is not linear,
    so a client aggregates only the models that arrived whole (its own at
    least), logged as such, never a coverage-weighted FedAvg."""
    opts = BT[:-2] + ["bittorrent.timeout", "0.5", "bittorrent.min_completion_ratio", "0.0",
                      "bittorrent.network.upload", "0.004", "bittorrent.network.download",
                      "0.004", "aggregator.robust_rule", "median"]
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=CLIENTS, rounds=2), opts)
    stats = round_stats(tmp_path / "exp")
    assert len(stats) == 2 and all(s["reason"] in ("deadline", "partial") for s in stats)
    for c in runner.client.values():
        agg = c.bt.last_aggregate
        assert c.ID in agg.contributors and len(agg.contributors) < CLIENTS
        assert agg.coverage == {}                      # FS's rule, not the coverage FedAvg
        assert all(torch.isfinite(v).all() for v in agg.state_dict.values())
    log = next((tmp_path / "exp").rglob("exp_print.log")).read_text()
    assert "MedianAggregator (not linear) aggregates the" in log


def test_global_eval_refuses_an_aggregate_that_does_not_match_the_digest(tmp_path, monkeypatch):
    """make_global_eval: the client asked sends other bits under the agreed
    digest.  The server recomputes the digest, refuses the model (never
    evaluates it) and ends the run with an error."""
    from fs_bittorrent.fs import wire
    from fs_bittorrent.fs.fs_aggregation import flatten_models
    from fs_bittorrent.fs.manager import ClientManager

    def lying(self, message):
        state = flatten_models(self.fs_agg.state())
        next(iter(state.values())).add_(1.0)
        self._send(self._message(wire.MSG_AGGREGATE, [self.worker.server_id], self.round,
                                 wire.pack_aggregate(self.round, self.fs_agg.digest(), state)))

    monkeypatch.setattr(ClientManager, "on_fetch_aggregate", lying)
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=CLIENTS, rounds=2),
                               BT + ["federate.make_global_eval", "True"])
    assert runner.server.bt.protocol_errors == 1
    assert all(r["Round"] == "Final" for r in server_results(tmp_path / "exp"))  # no round
    log = next((tmp_path / "exp").rglob("exp_print.log")).read_text()
    assert "does not match the agreed aggregate" in log and "terminating" in log
