"""``fs-bittorrent run``: FederatedScope's main flow with the plugin loaded.

FS's own ``main.py`` refuses unknown keys such as ``bittorrent.enable``
unless the plugin was imported first, so this entry point imports it, then
runs the usual steps: clone ``global_cfg``, merge the YAML and the command
line, build data, freeze, pick the worker classes, run.  With
``bittorrent.enable: False`` the classes and runner are FS's own, so the
run is plain FS.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional

from ..errors import ConfigError

log = logging.getLogger(__name__)


def build_config(cfg_file: Optional[str], opts: list[str]) -> Any:
    """Merge a YAML file and KEY VALUE options into a fresh FS config,
    with unknown keys reported by name."""
    from . import config as bt_config  # importing fs_bittorrent.fs registers the node
    from federatedscope.core.configs.config import global_cfg
    cfg = global_cfg.clone()
    try:
        if cfg_file:
            cfg.merge_from_file(cfg_file)
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError) as exc:
        # FS's yacs copy says "Non-existent key" by KeyError or AssertionError.
        if "Non-existent" not in str(exc):
            raise
        raise bt_config.unknown_key_hint(exc) from None
    return cfg


def share_fs_logging() -> None:
    """Send the plugin's log records where FS's go (console and the
    experiment's exp_print.log), so users find them where they look."""
    fs_logger = logging.getLogger("federatedscope")
    ours = logging.getLogger("fs_bittorrent")
    ours.handlers = list(fs_logger.handlers)
    ours.setLevel(fs_logger.level or logging.INFO)
    ours.propagate = False


def make_runner(cfg: Any, data: Any, client_cfgs: Any = None) -> Any:
    """The runner FS would build, or its BitTorrent variant when enabled."""
    from federatedscope.core.auxiliaries.runner_builder import get_runner
    from federatedscope.core.auxiliaries.worker_builder import get_client_cls, get_server_cls
    client_cls, server_cls = get_client_cls(cfg), get_server_cls(cfg)
    if not cfg.bittorrent.enable:
        return get_runner(data=data, server_class=server_cls, client_class=client_cls,
                          config=cfg.clone(), client_configs=client_cfgs)
    from .workers import make_bittorrent_classes
    bt_client, bt_server = make_bittorrent_classes(client_cls, server_cls)
    if cfg.federate.mode.lower() == "standalone":
        from .runner import BitTorrentStandaloneRunner
        return BitTorrentStandaloneRunner(data=data, server_class=bt_server,
                                          client_class=bt_client, config=cfg.clone(),
                                          client_configs=client_cfgs)
    from .distributed import BitTorrentDistributedRunner
    return BitTorrentDistributedRunner(data=data, server_class=bt_server,
                                       client_class=bt_client, config=cfg.clone(),
                                       client_configs=client_cfgs)


def split_client_opts(opts: list[str]) -> tuple[list[str], list[str]]:
    """KEY VALUE pairs for the global config and for ``client_<id>`` configs.

    FS's ``parse_client_cfg`` tests every token, so a *value* starting with
    'client' (``distribute.role client``) is taken as a client key and the
    pairs shift; this looks at keys only."""
    if len(opts) % 2:
        raise ConfigError("opts", opts[-1], "KEY VALUE options must come in pairs")
    cfg_opts, client_opts = [], []
    for key, value in zip(opts[::2], opts[1::2]):
        (client_opts if key.startswith("client_") else cfg_opts).extend([key, value])
    return cfg_opts, client_opts


def run_experiment(cfg_file: Optional[str], opts: list[str],
                   client_cfg_file: Optional[str] = None) -> tuple[Any, Any]:
    """Run one FS experiment; returns (runner, the runner's best results)."""
    from federatedscope.core.auxiliaries.data_builder import get_data
    from federatedscope.core.auxiliaries.logging import update_logger
    from federatedscope.core.auxiliaries.utils import setup_seed
    from federatedscope.core.configs.config import CfgNode

    cfg_opts, client_opts = split_client_opts(list(opts))
    cfg = build_config(cfg_file, cfg_opts)
    update_logger(cfg, clear_before_add=True)
    share_fs_logging()
    setup_seed(cfg.seed)
    client_cfgs = None
    if client_cfg_file:
        with open(client_cfg_file) as f:
            client_cfgs = CfgNode.load_cfg(f)
        client_cfgs.merge_from_list(client_opts)
    data, modified = get_data(config=cfg.clone(), client_cfgs=client_cfgs)
    cfg.merge_from_other_cfg(modified)
    cfg.freeze()
    runner = make_runner(cfg, data, client_cfgs)
    return runner, runner.run()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fs-bittorrent run",
                                 description="Run a FederatedScope experiment with the "
                                             "fs_bittorrent plugin loaded.")
    ap.add_argument("--cfg", dest="cfg_file", required=True, help="FS YAML config")
    ap.add_argument("--client_cfg", dest="client_cfg_file", default=None)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs, as in FS")
    args = ap.parse_args(argv)
    try:
        run_experiment(args.cfg_file, args.opts, args.client_cfg_file)
    except ConfigError as exc:
        print(f"fs-bittorrent: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
