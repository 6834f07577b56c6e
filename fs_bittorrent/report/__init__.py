"""``fs-bittorrent report``: plots and an HTML page for one FS experiment.

Reads what a ``fs-bittorrent run`` leaves in its experiment directory
(``bittorrent_rounds.jsonl``, ``eval_results.log``, ``config.yaml``) and
writes PNG plots plus ``report.html``.  Everything beyond the core round
fields is optional; a missing input gives a plot that says "no data".
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROUNDS_FILE = "bittorrent_rounds.jsonl"
EVAL_FILE = "eval_results.log"
CONFIG_FILE = "config.yaml"


class ReportError(Exception):
    """A bad OUTDIR or unreadable input, with a message for the user."""


@dataclass
class RunData:
    """What one experiment directory holds, parsed."""
    expdir: Path
    rounds: list[dict] = field(default_factory=list)     # bittorrent_rounds.jsonl rows
    evals: dict[int, dict] = field(default_factory=dict)  # round -> Results_weighted_avg
    config_text: str = ""
    label: str = ""

    @property
    def has_rounds(self) -> bool:
        return bool(self.rounds)


def find_expdir(outdir: str | Path, marker: str = ROUNDS_FILE) -> Path:
    """The experiment directory under (or at) ``outdir`` holding ``marker``;
    the newest one if several.  ReportError naming the path if none."""
    root = Path(outdir)
    if not root.exists():
        raise ReportError(f"{root}: no such directory")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory")
    if (root / marker).is_file():
        return root
    found = [p for p in root.rglob(marker) if p.is_file()]
    if not found:
        raise ReportError(f"{root}: no {marker} found in it or below it "
                          f"(is this an fs-bittorrent experiment outdir?)")
    newest = max(found, key=lambda p: p.stat().st_mtime)
    return newest.parent


def load_rounds(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{n}: not JSON ({exc})") from None
            if isinstance(row, dict):
                rows.append(row)
    rows.sort(key=lambda r: (r.get("round", 0) if isinstance(r.get("round"), int) else 0))
    return rows


_NP_CALL = re.compile(r"np\.(?:float|int)\d*\(([^()]*)\)")
_BARE_NAN = re.compile(r"(?<![\w'\"])-?(?:nan|inf)(?![\w'\"])")


def parse_eval_line(line: str) -> Optional[dict]:
    """One eval_results.log line as a dict (``np.float64(x)`` -> x, bare
    nan/inf -> None), parsed with ``ast.literal_eval``; None if unparsable."""
    text = _NP_CALL.sub(r"\1", line.strip())
    text = _BARE_NAN.sub("None", text)
    try:
        obj = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def load_evals(path: Path) -> dict[int, dict]:
    """Server results per round: {round: Results_weighted_avg}."""
    out: dict[int, dict] = {}
    if not path.is_file():
        return out
    with open(path) as f:
        for line in f:
            rec = parse_eval_line(line)
            if not rec or rec.get("Role") != "Server #":
                continue
            rnd = rec.get("Round")
            res = rec.get("Results_weighted_avg")
            if isinstance(rnd, int) and not isinstance(rnd, bool) and isinstance(res, dict):
                out[rnd] = res
    return out


def load_run(outdir: str | Path, require_rounds: bool = True) -> RunData:
    """Parse an experiment.  Without ``require_rounds`` (a ``--compare``
    run, e.g. with ``bittorrent.enable False``) a dir with only
    eval_results.log is accepted."""
    try:
        expdir = find_expdir(outdir, ROUNDS_FILE)
    except ReportError:
        if require_rounds:
            raise
        expdir = find_expdir(outdir, EVAL_FILE)
    rounds_path = expdir / ROUNDS_FILE
    rounds = load_rounds(rounds_path) if rounds_path.is_file() else []
    cfg_path = expdir / CONFIG_FILE
    cfg_text = cfg_path.read_text(errors="replace") if cfg_path.is_file() else ""
    return RunData(expdir=expdir, rounds=rounds, evals=load_evals(expdir / EVAL_FILE),
                   config_text=cfg_text, label=expdir.name)


def pick_metric(*runs: RunData) -> Optional[str]:
    """``test_acc`` if any run has it, else ``test_avg_loss``, else the
    first ``test_*`` key seen."""
    keys: list[str] = []
    for run in runs:
        for res in run.evals.values():
            for k in res:
                if k not in keys:
                    keys.append(k)
    for pref in ("test_acc", "test_avg_loss"):
        if pref in keys:
            return pref
    return next((k for k in keys if k.startswith("test_")), None)


def num(x: Any) -> Optional[float]:
    """A finite float or None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def build_report(outdir: str | Path, out: Optional[str | Path] = None,
                 compare: Optional[str | Path] = None) -> Path:
    """Write the PNGs and report.html; returns the path of report.html."""
    from . import html as html_mod
    try:
        from . import plots
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != "matplotlib":
            raise
        raise ReportError("the plots need matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install -e '.[plots]')") from None
    run = load_run(outdir, require_rounds=True)
    other = load_run(compare, require_rounds=False) if compare is not None else None
    if other is not None and other.label == run.label:
        run.label = f"{run.expdir.parent.name}/{run.label}"
        other.label = f"{other.expdir.parent.name}/{other.label}"
    out_dir = Path(out) if out is not None else run.expdir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = pick_metric(run, *( [other] if other else []))
    pngs = plots.make_all(run, out_dir, metric=metric, other=other)
    return html_mod.write_html(run, out_dir, pngs, metric=metric, other=other)


def report_text(outdir: str | Path, compare: Optional[str | Path] = None) -> str:
    """The per-round figures and the accuracy line as text (summary.py)."""
    from .summary import render_summary
    run = load_run(outdir, require_rounds=True)
    other = load_run(compare, require_rounds=False) if compare is not None else None
    return render_summary(run, pick_metric(run, *([other] if other else [])), other)


__all__ = ["ReportError", "RunData", "find_expdir", "load_rounds", "load_evals",
           "parse_eval_line", "load_run", "pick_metric", "build_report", "report_text"]
