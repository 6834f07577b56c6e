"""The launcher's per-run statistics: only the run's own rounds.

A benchmark that launches several runs into the same outdir (as
``scripts/launch_netns.py`` does with ``--repeat`` and the same tree names)
must not count rows an earlier run left there: FS puts a later run in a new
``sub_exp_*`` directory under the same outdir, and ``read_rounds`` walks all
of them.
"""
import json
from pathlib import Path

from fs_bittorrent.launch import read_rounds, rounds_seen


def _write(path: Path, rows: list[dict], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_rows_of_an_earlier_run_in_the_same_outdir_are_skipped(tmp_path):
    old = tmp_path / "server" / "exp" / "bittorrent_rounds.jsonl"
    _write(old, [{"round": 0, "run": "old"}, {"round": 1, "run": "old"}])
    before = rounds_seen(tmp_path)
    assert before == {old: 2}
    # the next run: FS's new sub-directory, and one more line in the old file
    _write(tmp_path / "server" / "exp" / "sub_exp_2" / "bittorrent_rounds.jsonl",
           [{"round": 0, "run": "new"}, {"round": 1, "run": "new"}])
    _write(old, [{"round": 2, "run": "appended"}], mode="a")
    rows = read_rounds(tmp_path, skip=before)
    assert sorted((r["run"], r["round"]) for r in rows) == \
        [("appended", 2), ("new", 0), ("new", 1)]
    # without a snapshot everything is read, as before
    assert len(read_rounds(tmp_path)) == 5
