"""The report's PNG plots (matplotlib, Agg backend).

Each ``plot_*`` function writes one PNG and returns its path; missing
inputs give a figure that says "no data" instead of an exception.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import RunData, num  # noqa: E402

DPI = 110
PNG_NAMES = {
    "completion": "completion.png",
    "bytes": "bytes.png",
    "eta": "eta.png",
    "metric": "metric.png",
    "operations": "operations.png",
}


def _clients(rounds: list[dict], *keys: str) -> list[str]:
    seen: set[str] = set()
    for row in rounds:
        for key in keys:
            val = row.get(key)
            if isinstance(val, dict):
                seen.update(str(c) for c in val)
    return sorted(seen, key=lambda c: (0, int(c)) if c.isdigit() else (1, c))


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({what})", ha="center", va="center", fontsize=13,
            color="dimgray", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _clock(run: RunData) -> str:
    clocks = {str(r.get("clock")) for r in run.rounds if r.get("clock")}
    if clocks == {"virtual"}:
        return "virtual"
    if clocks == {"wall"}:
        return "wall-clock"
    return "/".join(sorted(clocks)) if clocks else "unknown clock"


def round_starts(run: RunData) -> dict[int, float]:
    """Cumulative exchange time before each round (its start on the run's clock)."""
    starts, t = {}, 0.0
    for row in run.rounds:
        rnd = row.get("round")
        if isinstance(rnd, int):
            starts[rnd] = t
        t += num(row.get("exchange_time")) or 0.0
    return starts


def cumulative_after(run: RunData) -> dict[int, float]:
    """Cumulative exchange time at the end of each round."""
    out, t = {}, 0.0
    for row in run.rounds:
        t += num(row.get("exchange_time")) or 0.0
        if isinstance(row.get("round"), int):
            out[row["round"]] = t
    return out


def _legend(ax: Any, n: int) -> None:
    if n:
        ax.legend(fontsize=8, ncol=1 if n <= 8 else 2, loc="best", framealpha=0.85)


def plot_completion(run: RunData, path: Path) -> Path:
    """Swarm completion over time per client: the per-round ``timeline``
    laid end to end on the cumulative exchange clock; without timelines,
    the per-round completion per client as grouped bars."""
    rows = run.rounds
    has_tl = any(isinstance(r.get("timeline"), dict) and r["timeline"] for r in rows)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    if has_tl:
        clients = _clients(rows, "timeline")
        starts = round_starts(run)
        cmap = plt.get_cmap("tab10" if len(clients) <= 10 else "tab20")
        n = max(len(clients), 1)
        for i, c in enumerate(clients):
            first = True
            # later clients drawn thinner on top, so identical curves stay visible
            lw = 1.3 + 3.2 * (n - 1 - i) / max(n - 1, 1) if n > 1 else 1.6
            for row in rows:
                tl = (row.get("timeline") or {}).get(c)
                if not tl:
                    continue
                t0 = starts.get(row.get("round"), 0.0)
                pts = [(num(p[0]), num(p[1])) for p in tl
                       if isinstance(p, (list, tuple)) and len(p) >= 2]
                pts = [(t0 + t, f) for t, f in pts if t is not None and f is not None]
                if not pts:
                    continue
                end = t0 + (num(row.get("exchange_time")) or 0.0)
                if end > pts[-1][0]:
                    pts.append((end, pts[-1][1]))
                xs, ys = zip(*pts)
                ax.step(xs, ys, where="post", color=cmap(i % cmap.N), lw=lw,
                        label=f"client {c}" if first else None, alpha=0.9)
                first = False
        for rnd, t0 in starts.items():
            if rnd:
                ax.axvline(t0, color="gray", ls=":", lw=0.8)
        ax.set_xlabel(f"cumulative exchange time [s, {_clock(run)}]  (dotted: round boundaries)")
        ax.set_ylabel("fraction of model held")
        ax.set_ylim(-0.03, 1.05)
        ax.set_title("Swarm completion over time per client"
                     + ("\n(overlapping curves: thicker = lower client id)" if n > 1 else ""))
        _legend(ax, len(clients))
    else:
        clients = _clients(rows, "completion")
        rnds = [r.get("round") for r in rows]
        if not clients or not rows:
            _no_data(ax, "no per-client completion in bittorrent_rounds.jsonl")
            ax.set_title("Swarm completion per client")
        else:
            width = 0.8 / len(clients)
            cmap = plt.get_cmap("tab10" if len(clients) <= 10 else "tab20")
            for i, c in enumerate(clients):
                ys = [num((r.get("completion") or {}).get(c)) or 0.0 for r in rows]
                xs = [k + (i - (len(clients) - 1) / 2) * width for k in range(len(rows))]
                ax.bar(xs, ys, width=width, color=cmap(i % cmap.N), label=f"client {c}")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([str(r) for r in rnds])
            ax.set_xlabel("round")
            ax.set_ylabel("fraction of model held at round end")
            ax.set_ylim(0, 1.25)
            ax.set_title("Swarm completion per client, per round "
                         "(no within-round timeline recorded)")
            ax.legend(fontsize=8, loc="upper center", ncol=min(len(clients), 8))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _byte_unit(max_bytes: float) -> tuple[float, str]:
    if max_bytes >= 0.1 * 1024 ** 2:
        return 1024 ** 2, "MB"
    if max_bytes >= 0.1 * 1024:
        return 1024, "KB"
    return 1, "bytes"


def plot_bytes(run: RunData, path: Path) -> Path:
    """Per-client upload and download, summed over rounds (grouped bars)."""
    rows = run.rounds
    clients = _clients(rows, "bytes_up", "bytes_down")
    fig, ax = plt.subplots(figsize=(max(8, 1.5 + 0.8 * len(clients)), 4.8))
    if not clients:
        _no_data(ax, "no bytes_up / bytes_down in bittorrent_rounds.jsonl")
        ax.set_title("Bytes uploaded and downloaded per client")
        return _save(fig, path)
    up = [sum(num((r.get("bytes_up") or {}).get(c)) or 0 for r in rows) for c in clients]
    down = [sum(num((r.get("bytes_down") or {}).get(c)) or 0 for r in rows) for c in clients]
    div, unit = _byte_unit(max(up + down + [0]))
    xs = range(len(clients))
    ax.bar([x - 0.2 for x in xs], [u / div for u in up], width=0.4, label="uploaded",
           color="tab:orange")
    ax.bar([x + 0.2 for x in xs], [d / div for d in down], width=0.4, label="downloaded",
           color="tab:blue")
    mb = [r.get("model_bytes") for r in rows if num(r.get("model_bytes"))]
    if mb:
        ax.axhline(sum(num(m) for m in mb) / div, color="gray", ls="--", lw=1,
                   label="all clients' models × rounds (reference)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"client {c}" for c in clients], rotation=30 if len(clients) > 8 else 0,
                       ha="right" if len(clients) > 8 else "center")
    ax.set_ylabel(f"{unit}, summed over {len(rows)} rounds")
    ax.set_title("Bytes uploaded and downloaded per client")
    top = max([u / div for u in up] + [d / div for d in down]
              + [sum(num(m) for m in mb) / div if mb else 0])
    ax.set_ylim(0, top * 1.3 or 1.0)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_eta(run: RunData, path: Path) -> Path:
    """η per round, and the exchange time against T_LB per round."""
    rows = run.rounds
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    rnd = [r.get("round") for r in rows]
    eta = [num(r.get("eta")) for r in rows]
    pts = [(x, y) for x, y in zip(rnd, eta) if y is not None and x is not None]
    if pts:
        ax1.plot(*zip(*pts), marker="o", color="tab:green", label="η = T_LB / exchange time")
        bad = [(x, y) for (x, y), r in zip(pts, rows) if r.get("reason") not in (None, "complete")]
        if bad:
            ax1.scatter(*zip(*bad), marker="x", color="red", s=60, zorder=3,
                        label="round not complete")
        ax1.set_xlabel("round")
        ax1.set_ylabel("η")
        ax1.set_ylim(0, max(y for _, y in pts) * 1.18 or 1.0)
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
    else:
        _no_data(ax1, "no eta in bittorrent_rounds.jsonl")
    ax1.set_title("Exchange efficiency η per round")
    ex = [(x, num(r.get("exchange_time"))) for x, r in zip(rnd, rows)]
    ex = [(x, y) for x, y in ex if x is not None and y is not None]
    lb = [(x, num(r.get("t_lb"))) for x, r in zip(rnd, rows)]
    lb = [(x, y) for x, y in lb if x is not None and y is not None]
    if ex or lb:
        if ex:
            ax2.plot(*zip(*ex), marker="o", label="exchange time")
        if lb:
            ax2.plot(*zip(*lb), marker="s", ls="--", label="T_LB (lower bound)")
        vals = [y for _, y in ex + lb if y > 0]
        if vals and max(vals) / min(vals) > 50:
            ax2.set_yscale("log")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("round")
        ax2.set_ylabel(f"seconds ({_clock(run)})")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3, which="both")
    else:
        _no_data(ax2, "no exchange_time / t_lb")
    ax2.set_title("Exchange time vs lower bound T_LB")
    return _save(fig, path)


def _series(run: RunData, metric: Optional[str]) -> list[tuple[int, float]]:
    if not metric:
        return []
    pts = [(r, num(res.get(metric))) for r, res in sorted(run.evals.items())]
    return [(r, v) for r, v in pts if v is not None]


def plot_metric(run: RunData, path: Path, metric: Optional[str],
                other: Optional[RunData] = None) -> Path:
    """Left: the test metric against cumulative exchange time (this run).
    Right: the metric per round, for this run and the ``--compare`` run."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    mine = _series(run, metric)
    after = cumulative_after(run)
    timed = [(after[r], v) for r, v in mine if r in after]
    name = metric or "test metric"
    if timed:
        ax1.plot(*zip(*timed), marker="o", color="tab:blue", label="with the exchange")
        ax1.set_xlabel(f"cumulative exchange time after the round [s, {_clock(run)}]")
        ax1.set_ylabel(name)
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
    else:
        _no_data(ax1, "no server test results in eval_results.log" if not mine
                 else "no exchange times for the evaluated rounds")
    ax1.set_title(f"{name} vs exchange time (this run)")
    theirs = _series(other, metric) if other is not None else []
    if mine or theirs:
        if mine:
            ax2.plot(*zip(*mine), marker="o", color="tab:blue",
                     label="with the exchange")
        if theirs:
            ax2.plot(*zip(*theirs), marker="s", ls="--", color="tab:red", mfc="none", ms=9,
                     label="compare run")
        elif other is not None:
            ax2.text(0.5, 0.05, f"compare run: no {name} data", ha="center",
                     transform=ax2.transAxes, color="dimgray")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("round (shared x: the compare run has no exchange time)")
        ax2.set_ylabel(name)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    else:
        _no_data(ax2, "no server test results in eval_results.log")
    ax2.set_title(f"{name} per round" + (" — both runs" if other is not None else ""))
    return _save(fig, path)


def plot_operations(run: RunData, path: Path) -> Path:
    """What an operator watches per round: bytes moved by the exchange
    against plain FS's star and the server's own bytes; the piece store's
    size; the completion rate."""
    rows = [r for r in run.rounds if isinstance(r.get("round"), int)]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    rnd = [r["round"] for r in rows]
    series = {k: [num(r.get(k)) for r in rows]
              for k in ("bytes_total", "star_bytes_total", "server_bytes", "store_bytes_total",
                        "completion_ratio")}
    if not rows or all(v is None for v in series["star_bytes_total"]):
        _no_data(ax1, "no star_bytes_total in bittorrent_rounds.jsonl (an older run?)")
    else:
        top = max(v for k in ("bytes_total", "star_bytes_total", "server_bytes")
                  for v in series[k] if v is not None)
        div, unit = _byte_unit(top)
        for key, label, style in (("bytes_total", "exchange: all bytes moved", "o-"),
                                  ("star_bytes_total", "plain FS star: via the server", "s--"),
                                  ("server_bytes", "exchange: the server's own bytes", "^-")):
            pts = [(x, v / div) for x, v in zip(rnd, series[key]) if v is not None]
            if pts:
                ax1.plot(*zip(*pts), style, label=label)
        ax1.set_ylabel(unit)
        ax1.legend(fontsize=8)
    ax1.set_title("Traffic per round")
    store = [(x, v) for x, v in zip(rnd, series["store_bytes_total"]) if v is not None]
    if store:
        div, unit = _byte_unit(max(v for _, v in store))
        ax2.plot([x for x, _ in store], [v / div for _, v in store], "o-", color="tab:green")
        ax2.set_ylabel(f"{unit} on disk (peak of the round)")
        ax2.set_ylim(0, max(v / div for _, v in store) * 1.2)
    else:
        _no_data(ax2, "no store_bytes_total")
    ax2.set_title("Piece store size")
    comp = [(x, v) for x, v in zip(rnd, series["completion_ratio"]) if v is not None]
    if comp:
        ax3.plot([x for x, _ in comp], [v for _, v in comp], "o-", color="tab:purple")
        ax3.set_ylim(-0.05, 1.05)
        ax3.set_ylabel("clients complete / clients")
    else:
        _no_data(ax3, "no completion_ratio")
    ax3.set_title("Completion rate")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def make_all(run: RunData, out_dir: Path, metric: Optional[str] = None,
             other: Optional[RunData] = None) -> dict[str, Path]:
    """Write every plot; returns {kind: path}."""
    out_dir = Path(out_dir)
    return {
        "completion": plot_completion(run, out_dir / PNG_NAMES["completion"]),
        "bytes": plot_bytes(run, out_dir / PNG_NAMES["bytes"]),
        "eta": plot_eta(run, out_dir / PNG_NAMES["eta"]),
        "metric": plot_metric(run, out_dir / PNG_NAMES["metric"], metric, other),
        "operations": plot_operations(run, out_dir / PNG_NAMES["operations"]),
    }
