"""``fs-bittorrent check``: a good config, each kind of bad one (exit 2
naming the key), and its time estimate against the simulated round."""
from __future__ import annotations

import glob
import json
import socket

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: FS integration tests skipped")

from fs_bittorrent.cli import main as cli_main  # noqa: E402
from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_bittorrent.ops.check import estimate_for  # noqa: E402

pytestmark = pytest.mark.fs

DIGITS = "configs/digits_bittorrent.yaml"
TOY_DIST = "configs/toy_distributed.yaml"
AS_CLIENT = ["distribute.use", "True", "distribute.role", "client",
             "distribute.server_host", "127.0.0.1", "distribute.server_port", "50051",
             "distribute.client_host", "127.0.0.1", "distribute.client_port", "50052",
             "distribute.data_idx", "1"]


def check(capsys, cfg: str, *opts: str) -> tuple[int, str, str]:
    rc = cli_main(["check", "--cfg", cfg, *opts])
    out, err = capsys.readouterr()
    return rc, out, err


def test_good_config_prints_settings_and_estimate(capsys, tmp_path):
    rc, out, _ = check(capsys, DIGITS, "outdir", str(tmp_path / "o"))
    assert rc == 0, out
    assert "check: OK" in out
    assert "bittorrent.piece_size: 65536" in out and "bittorrent.secret: <none>" in out
    assert "model convnet2: " in out and " bytes per client (6 pieces of 65536)" in out
    assert "estimated exchange per round:" in out and "T_LB" in out
    assert not (tmp_path / "o").exists()           # a preflight writes nothing


def test_disabled_config_says_plain_fs_and_what_enabling_would_refuse(capsys, tmp_path):
    rc, out, _ = check(capsys, DIGITS, "bittorrent.enable", "False",
                       "asyn.use", "True", "federate.use_ss", "True",
                       "outdir", str(tmp_path / "o"))
    assert rc == 0
    assert "runs plain FederatedScope" in out
    # every refusal is listed, one after the other
    assert "would be refused: asyn.use" in out and "would be refused: federate.use_ss" in out


def test_distributed_client_checks_its_dataplane_address(capsys):
    rc, out, _ = check(capsys, TOY_DIST, *AS_CLIENT)
    assert rc == 0, out
    assert "data plane: 127.0.0.1:" in out and "is free to listen on" in out


BAD = [  # (opts, key named in the error)
    (["bittorrent.pice_size", "1024"], "bittorrent.pice_size"),                  # unknown key
    (["bittorrent.min_completion_ratio", "1.5"], "bittorrent.min_completion_ratio"),  # range
    (["bittorrent.piece_size", "'big'"], "bittorrent.piece_size"),               # type
    (["bittorrent.piece_size", "16384", "bittorrent.block_size", "32768"],
     "bittorrent.block_size"),                                                    # cross-key
    (["bittorrent.network.upload_per_client", "[10.0, 20.0]"],
     "bittorrent.network.upload_per_client"),                                     # vs client_num
    (["bittorrent.topology", "explicit", "bittorrent.neighbors", "[[1, 2], [3, 4]]"],
     "bittorrent.neighbors"),                                                     # topology
    (["asyn.use", "True"], "asyn.use"),                                           # FS feature
    (["vertical.use", "True"], "vertical.use"),                                   # FS feature
    (["federate.use_ss", "True"], "federate.use_ss"),                             # FS feature
]


@pytest.mark.parametrize("opts, key", BAD, ids=[k for _, k in BAD])
def test_bad_config_exits_2_naming_the_key(capsys, opts, key):
    rc, out, err = check(capsys, DIGITS, *opts)
    assert rc == 2
    assert "configuration error" in err and key in err, err
    assert "check: OK" not in out


def test_dataplane_port_in_use(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, _, err = check(capsys, TOY_DIST, *AS_CLIENT, "bittorrent.dataplane_port", str(port))
    assert rc == 2 and "bittorrent.dataplane_port" in err and "in use" in err


def test_dataplane_host_not_on_this_machine(capsys):
    # 203.0.113.0/24 is TEST-NET-3: never an address of this host
    rc, _, err = check(capsys, TOY_DIST, *AS_CLIENT, "bittorrent.dataplane_host", "203.0.113.7")
    assert rc == 2 and "bittorrent.dataplane_host" in err and "cannot listen" in err


@pytest.mark.parametrize("opts", [
    ["federate.client_num", "8"],
    ["federate.client_num", "4", "bittorrent.network.upload", "20.0",
     "bittorrent.network.download", "20.0", "bittorrent.network.latency", "0.02",
     "bittorrent.piece_size", "262144"],
], ids=["8x100Mbit", "4x20Mbit-20ms"])
def test_estimate_within_20_percent_of_the_simulated_round(tmp_path, opts):
    """Uniform network, the real-data model: check's estimate against the
    exchange time of a simulated round (virtual seconds, deterministic)."""
    out = str(tmp_path / "run")
    runner, _ = run_experiment(DIGITS, opts + ["federate.total_round_num", "1",
                                               "eval.freq", "5", "outdir", out])
    stats = json.loads(open(glob.glob(f"{out}/*/bittorrent_rounds.jsonl")[0]).readline())
    assert stats["reason"] == "complete"
    est, _ = estimate_for(runner.cfg, runner.data, runner.settings)
    assert est.model_bytes * len(stats["star_bytes"]) == stats["model_bytes"]
    assert est.t_lb == pytest.approx(stats["t_lb"])
    assert est.estimate == pytest.approx(stats["exchange_time"], rel=0.20)
