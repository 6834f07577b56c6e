"""The main job on real data (configs/digits_bittorrent.yaml: scikit-learn's
bundled digits, non-IID over 8 clients) and the command-line habits around it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: FS integration tests skipped")

from fs_bittorrent.fs.entry import run_experiment  # noqa: E402
from fs_bittorrent.report import load_evals  # noqa: E402

pytestmark = pytest.mark.fs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_bittorrent.yaml")
# What the main job reaches in its 10 rounds (measured: 96.4 % after round 9,
# seed 7; docs/operations.md).  The bar leaves room for other seeds and BLAS.
TARGET_ACC = 0.90


def test_digits_split_is_non_iid_and_uses_every_sample():
    from federatedscope.core.configs.config import global_cfg
    import fs_bittorrent.fs  # noqa: F401  (registers the data type)
    from fs_bittorrent.fs.data import load_digits_data
    cfg = global_cfg.clone()
    cfg.merge_from_file(DIGITS)
    data, _ = load_digits_data(cfg)
    labels = {c: np.array([int(y) for _, y in data[c].train_data]) for c in range(1, 9)}
    sizes = [len(v) for v in labels.values()]
    test = sum(len(data[c].test_data) for c in range(1, 9))
    val = sum(len(data[c].val_data) for c in range(1, 9))
    assert sum(sizes) + test + val == 1797
    assert min(sizes) >= 8
    # label skew: some client lacks a digit, or one digit dominates somewhere
    shares = [np.bincount(v, minlength=10) / len(v) for v in labels.values()]
    assert max(s.max() for s in shares) > 0.3
    # the test set is spread evenly: every client sees (nearly) all digits
    for c in range(1, 9):
        assert len({int(y) for _, y in data[c].test_data}) >= 9


def test_main_job_accuracy_rises_to_the_stated_level(tmp_path):
    runner, _ = run_experiment(DIGITS, ["outdir", str(tmp_path / "digits")])
    expdir = Path(runner.cfg.outdir)
    acc = {r: res["test_acc"] for r, res in load_evals(expdir / "eval_results.log").items()}
    rounds = sorted(acc)
    assert rounds == list(range(10))
    assert acc[rounds[-1]] >= TARGET_ACC, acc
    assert acc[rounds[-1]] > acc[1] > acc[0] + 0.3        # it learns, round over round
    stats = [json.loads(x) for x in (expdir / "bittorrent_rounds.jsonl").read_text().splitlines()]
    assert all(s["reason"] == "complete" for s in stats)  # with the exchange on


def _cli(*args: str, env_extra: dict | None = None, code: str | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "fs_bittorrent", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT),
                          timeout=300)


def test_dash_dash_cfg_alone_means_run(tmp_path):
    """``python -m fs_bittorrent --cfg X.yaml`` as FS users type ``main.py --cfg``."""
    toy = ROOT / "configs" / "toy_bittorrent.yaml"
    out = tmp_path / "toy"
    proc = _cli("--cfg", str(toy), "federate.total_round_num", "1", "outdir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(out.rglob("bittorrent_rounds.jsonl"))


def test_report_without_matplotlib_says_how_to_install_it(tmp_path):
    (tmp_path / "bittorrent_rounds.jsonl").write_text('{"round": 0}\n')
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fs_bittorrent.cli import main\n"
            f"sys.exit(main(['report', {str(tmp_path)!r}]))")
    proc = _cli(code=code)
    assert proc.returncode == 2
    assert "pip install matplotlib" in proc.stderr and ".[plots]" in proc.stderr
    assert "Traceback" not in proc.stderr
