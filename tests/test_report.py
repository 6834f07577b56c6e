"""``fs-bittorrent report`` on real (short) FS runs: PNGs, HTML, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: report tests skipped")
pytest.importorskip("matplotlib")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402

from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_bittorrent.report import parse_eval_line  # noqa: E402
from fs_bittorrent.report.cli import main  # noqa: E402
from fs_helpers import toy_cfg  # noqa: E402

pytestmark = pytest.mark.fs

PNGS = ["completion.png", "bytes.png", "eta.png", "metric.png"]


def _run(tmp: Path, name: str, enable: bool) -> Path:
    run_experiment(toy_cfg(tmp, name=name), ["bittorrent.enable", str(enable),
                                             "bittorrent.piece_size", "1024",
                                             "bittorrent.block_size", "256"])
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    return _run(tmp, "bt", True), _run(tmp, "plain", False)


def check_png(path: Path) -> None:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert float(np.std(img[..., :3])) > 0.02, f"{path} looks blank"


def test_report_with_compare(runs, tmp_path, capsys):
    bt, plain = runs
    out = tmp_path / "rep"
    assert main([str(bt), "--compare", str(plain), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    for name in PNGS:
        check_png(out / name)
        assert f'<img src="{name}"' in page
    expdir = next(bt.rglob("bittorrent_rounds.jsonl")).parent
    cfg_text = (expdir / "config.yaml").read_text()
    assert "<pre>" in page and "bittorrent:" in page and "total_round_num: 3" in page
    assert "client_num: 4" in cfg_text
    assert str(next(plain.rglob("eval_results.log")).parent) in page
    # one table row per round
    rounds = [json.loads(x) for x in (expdir / "bittorrent_rounds.jsonl").read_text().splitlines()]
    assert page.count("<tr") - 1 == len(rounds) == 3


def test_report_default_out_and_experiment_dir_itself(runs):
    bt, _ = runs
    expdir = next(bt.rglob("bittorrent_rounds.jsonl")).parent
    assert main([str(expdir)]) == 0
    for name in PNGS:
        check_png(expdir / "report" / name)
    assert (expdir / "report" / "report.html").is_file()


def test_missing_optional_inputs_degrade(runs, tmp_path):
    """No timeline / optional counters, no eval log, no config: still plots."""
    bt, _ = runs
    src = next(bt.rglob("bittorrent_rounds.jsonl"))
    exp = tmp_path / "stripped" / "exp"
    exp.mkdir(parents=True)
    keep = ("round", "reason", "clock", "exchange_time", "completion_ratio", "completion",
            "bytes_up", "bytes_down", "model_bytes", "t_lb", "eta")
    with open(exp / "bittorrent_rounds.jsonl", "w") as f:
        for line in src.read_text().splitlines():
            row = json.loads(line)
            f.write(json.dumps({k: row[k] for k in keep if k in row}) + "\n")
    assert main([str(tmp_path / "stripped"), "--out", str(tmp_path / "o")]) == 0
    for name in PNGS:
        check_png(tmp_path / "o" / name)
    assert "config.yaml not found" in (tmp_path / "o" / "report.html").read_text()


def test_bad_outdir_returns_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "bittorrent_rounds.jsonl" in err


def test_eval_line_parsing_is_literal():
    rec = parse_eval_line("{'Role': 'Server #', 'Round': 2, 'Results_weighted_avg': "
                          "{'test_acc': np.float64(0.5), 'x': np.float64(nan), 'y': nan}}")
    assert rec["Results_weighted_avg"] == {"test_acc": 0.5, "x": None, "y": None}
    assert parse_eval_line("__import__('os').system('true')") is None
