"""``fs-bittorrent`` command line: one entry point, one subcommand per job."""
from __future__ import annotations

import sys
from typing import Optional

USAGE = """usage: fs-bittorrent COMMAND [ARGS]

commands:
  run       run a FederatedScope experiment with the plugin (--cfg X.yaml [KEY VALUE ...]);
            `fs-bittorrent --cfg X.yaml ...` (FS's main.py habit) means the same
  check     preflight of a config: validate, print the resolved bittorrent settings,
            estimate a round's exchange time (--cfg X.yaml [KEY VALUE ...]; exit 0/2)
  launch    a server and N client processes of a distributed run on this host
  demo      swarm real model weights on the simulated network and verify them
  inspect   sessions and pieces per round and peer in a piece store (DB path)
  report    PNG plots and an HTML page for a run's outdir (--compare OTHER_OUTDIR)
  clean     delete rounds from a piece store (DB or outdir; --round N | --before N | --all;
            a dry run unless --yes)
"""


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--cfg" or argv[0].startswith("--cfg="):
        argv = ["run", *argv]   # `python -m fs_bittorrent --cfg X.yaml`, as FS's main.py
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from .fs.entry import main as run_main
        return run_main(rest)
    if cmd == "report":
        from .report.cli import main as report_main
        return report_main(rest)
    if cmd == "check":
        from .ops.check import main as check_main
        return check_main(rest)
    if cmd == "clean":
        from .ops.clean import main as clean_main
        return clean_main(rest)
    if cmd == "inspect":
        from .store.inspect import main as inspect_main
        return inspect_main(rest)
    if cmd == "launch":
        from .launch import main as launch_main
        return launch_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    print(f"fs-bittorrent: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
