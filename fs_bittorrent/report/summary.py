"""The report as text: one line per round and the accuracy line.

Printed by ``fs-bittorrent report`` after it wrote the plots (and by
``scripts/main.sh`` through it), so a terminal shows what the page shows:
exchange time and η, bytes the exchange moved against plain FS's star, the
server's own bytes, the piece store's size, the completion rate, and the
test metric per round, beside the ``--compare`` run's.
"""
from __future__ import annotations

from typing import Optional

from . import RunData, num


def _mb(x: object) -> str:
    v = num(x)
    return "-" if v is None else f"{v / 1e6:.2f}"


def _pct(x: object) -> str:
    v = num(x)
    return "-" if v is None else f"{100 * v:.1f}%"


def _metric(run: Optional[RunData], rnd: int, metric: Optional[str]) -> Optional[float]:
    if run is None or metric is None:
        return None
    return num(run.evals.get(rnd, {}).get(metric))


def _show(metric: Optional[str], v: Optional[float]) -> str:
    if v is None:
        return "-"
    return _pct(v) if metric and metric.endswith("acc") else f"{v:.4f}"


def render_summary(run: RunData, metric: Optional[str], other: Optional[RunData] = None) -> str:
    head = (f"{'round':>5} {'exchange s':>10} {'eta':>6} {'moved MB':>9} {'star MB':>8} "
            f"{'server MB':>9} {'store MB':>9} {'complete':>8} {metric or 'metric':>10}")
    if other is not None:
        head += f" {'compare':>10}"
    lines = [f"per-round figures of {run.expdir}"
             + (f" (compare: {other.expdir})" if other is not None else ""), head]
    for r in run.rounds:
        rnd = r.get("round")
        if not isinstance(rnd, int):
            continue
        eta = num(r.get("eta"))
        line = (f"{rnd:>5} {num(r.get('exchange_time')) or 0:>10.3f} "
                f"{'-' if eta is None else f'{eta:.3f}':>6} {_mb(r.get('bytes_total')):>9} "
                f"{_mb(r.get('star_bytes_total')):>8} {_mb(r.get('server_bytes')):>9} "
                f"{_mb(r.get('store_bytes_total')):>9} {_pct(r.get('completion_ratio')):>8} "
                f"{_show(metric, _metric(run, rnd, metric)):>10}")
        if other is not None:
            line += f" {_show(metric, _metric(other, rnd, metric)):>10}"
        lines.append(line)
    lines.append(accuracy_line(run, metric, other))
    return "\n".join(lines)


def accuracy_line(run: RunData, metric: Optional[str], other: Optional[RunData] = None) -> str:
    if metric is None or not run.evals:
        return "no evaluation results found (eval_results.log)"
    last = max(run.evals)
    first = min(run.evals)
    text = (f"{metric} with the exchange: {_show(metric, _metric(run, first, metric))} after "
            f"round {first} -> {_show(metric, _metric(run, last, metric))} after round {last}")
    if other is not None and other.evals:
        o_last = max(other.evals)
        text += (f"; without it ({other.expdir.parent.name}/{other.label}): "
                 f"{_show(metric, _metric(other, o_last, metric))} after round {o_last}")
    return text
