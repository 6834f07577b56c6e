"""Soak: 20 FS standalone rounds under seeded faults (scripts/soak.py), run as
its own process so that its resource figures are its own.  Skipped without FS.

Resources must be flat after the first rounds: open file descriptors and
threads exactly, the piece store (file + WAL) within a page or two, never
more than ``keep_rounds`` rounds in it, and the resident set within a small
allowance (FS itself keeps a per-round history of metrics).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("federatedscope",
                    reason="FederatedScope is not installed: the FS soak is skipped")

pytestmark = pytest.mark.fs

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 20


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("soak")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--rounds",
                           str(ROUNDS), "--seed", "7", "--outdir", str(out), "--json",
                           str(out / "soak.json")],
                          cwd=out, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "soak.json").read_text())
    data["stdout"] = proc.stdout
    return data


def test_soak_runs_every_round_under_every_fault(soak):
    rows = soak["rows"]
    assert [r["round"] for r in rows] == list(range(ROUNDS))
    faults = soak["faults"]
    for name in ("dropped", "duplicated", "reordered", "corrupted", "delayed", "disconnects"):
        assert faults[name] > 0, faults
    assert faults["crashes"] == 1
    assert all(r["reason"] in ("complete", "partial", "deadline", "insufficient") for r in rows)
    assert sum(r["reason"] == "complete" for r in rows) >= ROUNDS - 2
    assert sum(r["corrupt"] for r in rows) > 0            # corruption seen and counted
    assert "rss_kb" in soak["stdout"] and "faults injected" in soak["stdout"]


def test_soak_fds_threads_and_store_are_flat(soak):
    rows = soak["rows"]
    steady = rows[1:]
    assert len({r["fds"] for r in steady}) == 1, [r["fds"] for r in rows]
    assert len({r["threads"] for r in steady}) == 1, [r["threads"] for r in rows]
    assert len({r["py_threads"] for r in steady}) == 1
    assert all(r["store_rounds"] <= 2 for r in rows)       # keep_rounds
    size = [r["db_bytes"] + r["wal_bytes"] for r in rows]
    assert max(size[2:]) <= size[2] * 1.05 + 2 * 65536, size


def test_soak_resident_memory_is_flat_after_warm_up(soak):
    rss = [r["rss_kb"] for r in soak["rows"]]
    # measured: ~50 KiB per round, FS's own metric history included
    assert rss[-1] - rss[4] < 4 * 1024, rss
