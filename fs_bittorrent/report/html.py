"""``report.html``: one self-contained page (relative links to the PNGs)."""
from __future__ import annotations

import datetime as _dt
import html
import os
from pathlib import Path
from typing import Optional

from . import RunData, num

CAPTIONS = {
    "completion": "Swarm completion over time per client",
    "bytes": "Bytes uploaded and downloaded per client (summed over rounds)",
    "eta": "η per round, and exchange time vs T_LB",
    "metric": "Test metric against exchange time and per round",
    "operations": "Traffic against plain FS's star, piece store size and completion rate "
                  "per round",
}

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.l { text-align: left; }
tr.bad td { background: #fde8e8; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow: auto; max-height: 40em; font-size: 0.85em; }
.meta { color: #555; font-size: 0.9em; }
"""


def _fmt(x: object, digits: int = 4) -> str:
    v = num(x)
    if v is None:
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _sum(d: object) -> Optional[float]:
    if not isinstance(d, dict):
        return None
    vals = [num(v) for v in d.values()]
    vals = [v for v in vals if v is not None]
    return sum(vals) if vals else None


def _min(d: object) -> Optional[float]:
    if not isinstance(d, dict):
        return None
    vals = [v for v in (num(x) for x in d.values()) if v is not None]
    return min(vals) if vals else None


def _max(d: object) -> Optional[float]:
    if not isinstance(d, dict):
        return None
    vals = [v for v in (num(x) for x in d.values()) if v is not None]
    return max(vals) if vals else None


def round_table(run: RunData, metric: Optional[str]) -> str:
    rows = run.rounds
    if not rows:
        return "<p>No rounds recorded.</p>"
    optional = [(k, lbl) for k, lbl in (("timeouts", "timeouts"),
                                       ("corrupt_pieces", "corrupt pieces"),
                                       ("duplicate_blocks", "duplicate blocks"))
                if any(isinstance(r.get(k), dict) for r in rows)]
    has_fp = any(isinstance(r.get("first_piece_time"), dict) for r in rows)
    head = ["round", "reason", "clock", "exchange time [s]", "T_LB [s]", "η",
            "completion ratio", "min client completion", "uploaded (all) [MB]",
            "downloaded (all) [MB]", "model [bytes]"]
    if has_fp:
        head.append("max first-piece time [s]")
    head += [lbl for _, lbl in optional]
    if metric:
        head.append(html.escape(metric))
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h) if h != metric else h}</th>"
                                        for h in head) + "</tr>"]
    mb = 1024 ** 2
    for r in rows:
        up, down = _sum(r.get("bytes_up")), _sum(r.get("bytes_down"))
        cells = [
            _fmt(r.get("round")) if not isinstance(r.get("round"), int) else str(r["round"]),
            f'<td class="l">{html.escape(str(r.get("reason", "–")))}</td>',
            f'<td class="l">{html.escape(str(r.get("clock", "–")))}</td>',
            _fmt(r.get("exchange_time")), _fmt(r.get("t_lb")), _fmt(r.get("eta")),
            _fmt(r.get("completion_ratio")), _fmt(_min(r.get("completion"))),
            _fmt(up / mb if up is not None else None),
            _fmt(down / mb if down is not None else None),
            _fmt(r.get("model_bytes"), 8),
        ]
        if has_fp:
            cells.append(_fmt(_max(r.get("first_piece_time"))))
        for k, _ in optional:
            s = _sum(r.get(k))
            cells.append("–" if s is None else str(int(s)))
        if metric:
            res = run.evals.get(r.get("round")) if isinstance(r.get("round"), int) else None
            cells.append(_fmt((res or {}).get(metric)))
        tds = "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
        cls = ' class="bad"' if r.get("reason") not in (None, "complete") else ""
        out.append(f"<tr{cls}>{tds}</tr>")
    out.append("</table>")
    return "\n".join(out)


def write_html(run: RunData, out_dir: Path, pngs: dict[str, Path],
               metric: Optional[str] = None, other: Optional[RunData] = None) -> Path:
    out_dir = Path(out_dir)
    title = f"fs-bittorrent report: {run.label}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="meta">Experiment directory: <code>'
        f"{html.escape(str(run.expdir))}</code><br>",
    ]
    if other is not None:
        parts.append(f"Compared with: <code>{html.escape(str(other.expdir))}</code><br>")
    parts.append(f"Rounds recorded: {len(run.rounds)}; test metric: "
                 f"<code>{html.escape(metric or 'none found')}</code><br>"
                 f"Generated {html.escape(_dt.datetime.now().isoformat(timespec='seconds'))}"
                 "</p>")
    parts.append("<h2>Plots</h2>")
    for kind, path in pngs.items():
        rel = os.path.relpath(Path(path), out_dir).replace(os.sep, "/")
        cap = html.escape(CAPTIONS.get(kind, kind))
        parts.append(f'<figure><img src="{html.escape(rel, quote=True)}" alt="{cap}">'
                     f"<figcaption>{cap}</figcaption></figure>")
    parts.append("<h2>Per-round figures</h2>")
    parts.append(round_table(run, metric))
    parts.append("<h2>Configuration (config.yaml)</h2>")
    parts.append(f"<pre>{html.escape(run.config_text) if run.config_text else '(config.yaml not found)'}</pre>")
    parts.append("</body></html>")
    dest = out_dir / "report.html"
    dest.write_text("\n".join(parts), encoding="utf-8")
    return dest
