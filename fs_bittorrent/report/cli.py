"""``fs-bittorrent report OUTDIR [--compare OTHER_OUTDIR] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import ReportError, build_report, report_text


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fs-bittorrent report",
        description="Plots and an HTML page for an fs-bittorrent experiment.")
    ap.add_argument("outdir", help="experiment dir (holding bittorrent_rounds.jsonl) "
                                   "or a parent of it; the newest one is used")
    ap.add_argument("--compare", default=None, metavar="OTHER_OUTDIR",
                    help="another run (e.g. bittorrent.enable False) drawn per round "
                         "alongside this one")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="where to write the PNGs and report.html (default: <expdir>/report)")
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        page = build_report(args.outdir, out=args.out, compare=args.compare)
        text = report_text(args.outdir, compare=args.compare)
    except ReportError as exc:
        print(f"fs-bittorrent report: {exc}", file=sys.stderr)
        return 2
    print(f"report written: {page}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
