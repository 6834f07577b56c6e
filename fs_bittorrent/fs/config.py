"""The ``bittorrent`` node of FederatedScope's config, its checks and a typed view.

``register_bittorrent_config()`` (run when ``fs_bittorrent.fs`` is imported)
registers ``extend_bittorrent_cfg`` with FS and, because FS builds
``global_cfg`` once at its first import, also applies it to ``global_cfg``
when that lacks the node.  It is idempotent.

FS traps handled here:

* ``freeze()`` empties every sub-node whose ``use`` is False, so the node has
  no ``use`` key; ``enable`` switches the plugin on.
* FS's yacs refuses a merge whose type differs from the default's (only
  int<->float, int<->list and list<->tuple are converted).  Its "None default
  accepts anything" rule is dead code (it compares ``type(x)`` with ``None``),
  so a key cannot take "a number, a list or a string".  Each simulated link
  quantity therefore has three keys, one per form: ``network.upload`` (a
  number for every client), ``network.upload_per_client`` (a list, one value
  per client) and ``network.upload_dist`` (a distribution string such as
  ``'uniform(10, 100)'``); a non-empty list or string overrides the number,
  and setting both is an error.  ``linkspec.parse_spec`` resolves them.
* Check functions run after every merge and at ``freeze()``.  In standalone
  mode ``federate.client_num`` may still be 0 before the data is loaded: the
  checks that need the client count (topology, network lists) then wait for
  the check at ``freeze()``.

Validation levels: the type and range of every single key are checked always
(cheap, even with ``enable`` False); everything else (cross-key constraints,
the ``SwarmConfig`` checks, topology and network specs against
``federate.client_num`` and ``federate.mode``, and the FS features that
cannot work peer to peer)
when ``enable`` is True, and in ``BitTorrentSettings.from_cfg``.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from federatedscope.core.configs.config import CN
from federatedscope.core.configs.yacs_config import Argument, CfgNode

from ..core.config import SwarmConfig
from ..core.faults import Faults
from ..core.manifest import MAX_PIECE_SIZE
from ..core.topology import (TOPOLOGIES, feasible_degree, make_topology, restrict,
                             validate_topology)
from ..errors import ConfigError
from ..sim.linkspec import parse_spec
from ..sim.network import LinkProfile

__all__ = [
    "NODE", "INSUFFICIENT_POLICIES", "MISSING_POLICIES", "SIMULATIONS", "MAX_BLOCK_SIZE",
    "DEFAULT_RATE_MBIT", "DEFAULT_LATENCY", "HELP",
    "extend_bittorrent_cfg", "check_bittorrent_cfg", "register_bittorrent_config",
    "BitTorrentSettings", "unknown_key_hint", "is_unknown_key_error", "type_mismatch_hint",
    "bittorrent_keys",
]

NODE = "bittorrent"
INSUFFICIENT_POLICIES = ("proceed", "abort")
MISSING_POLICIES = ("global", "local")
SIMULATIONS = ("auto", "block", "flow")
MAX_BLOCK_SIZE = SwarmConfig.max_block_size     # 128 KiB: larger blocks are refused on the wire
DEFAULT_RATE_MBIT = 100.0                      # network.upload / network.download default
DEFAULT_LATENCY = 0.005                        # network.latency default, seconds
MBIT = 1e6 / 8                                 # bytes per second in one Mbit/s
FS_MODES = ("standalone", "distributed")

# yacs bookkeeping entries stored as keys of every CN
_AUX_KEYS = frozenset({"__cfg_check_funcs__", "__help_info__", "is_ready_for_run"})

HELP = {
    "enable": "switch the BitTorrent-style peer-to-peer model exchange on",
    "piece_size": "bytes per piece (the unit hashed and announced); 1..64 MiB",
    "block_size": "bytes per request/piece block; <= piece_size and <= 128 KiB",
    "timeout": "per-round exchange deadline in seconds (virtual seconds in standalone)",
    "manifest_timeout": "seconds the server waits for a round's manifests (local training) "
                        "before it starts the exchange with those that arrived",
    "min_completion_ratio": "fraction of clients that must complete by the deadline, in [0, 1]",
    "insufficient_policy": "'proceed' | 'abort': what the server does when fewer than "
                           "min_completion_ratio of the clients completed at the deadline",
    "missing_policy": "'global' | 'local': value for model elements nobody delivered: the "
                      "previous global model, or the client's own trained model",
    "max_upload_slots": "peers unchoked at once; 0 = every interested peer (a peer that says "
                        "not-interested is choked)",
    "credit_bytes": "bytes of requested blocks a peer accepts in flight",
    "max_requests_per_peer": "request pipeline cap per peer",
    "min_requests_per_peer": "request pipeline floor per peer (before a rate is measured)",
    "request_queue_time": "queueing delay the request window may build (seconds); window = rate x (path RTT + this)",
    "lead_pieces": "leaders yield, distributed runs without the first-copy plan: a peer "
                   "holding more than this many pieces above its peers' mean keeps at most "
                   "lead_requests requests at a source where they cover the path's round "
                   "trip (0: off; standalone runs: off)",
    "lead_requests": "requests a peer that is lead_pieces ahead keeps at each source",
    "request_timeout": "seconds before an unanswered block is re-requested elsewhere",
    "max_retries": "request-timeout rounds in a row a peer may have; the next one drops it "
                   "as dead (it is dropped at max_retries + 1)",
    "end_game_threshold": "also enter end game when <= this many blocks are unrequested",
    "end_game_delay": "in end game, duplicate only blocks outstanding this long (seconds)",
    "keepalive_interval": "send a keep-alive after this many seconds of silence; < peer_timeout",
    "peer_timeout": "drop a peer silent for this many seconds; > keepalive_interval",
    "max_corrupt_pieces": "ban a peer after it served this many pieces failing their hash",
    "first_copy_wait": "upload-aware swarming: an owner's piece is asked of the owner by one "
                       "designated peer until others hold it (plan dropped after idling this many "
                       "seconds), slow sources spared; 0 = off; standalone: only where the "
                       "configured uplinks differ by more than 2x",
    "tick_interval": "seconds between timer ticks of each swarm session",
    "simulation": "standalone only: 'auto' | 'block' | 'flow': fidelity of the simulated "
                  "exchange; block moves every block and message, flow moves whole pieces as "
                  "max-min fair flows (same pieces, same aggregate, coarser timing); auto picks "
                  "flow for rounds that would cost the block level more than about a minute",
    "keep_rounds": "rounds of pieces kept in the store (>= 1)",
    "db_dir": "directory of the piece store; '' means <outdir>/bittorrent",
    "secret": "plaintext data plane only (encryption False): a shared HMAC secret every "
              "process reads from its own config (never sent over the network); '' = none",
    "encryption": "distributed only: mutual TLS 1.3 on every data-plane connection, peers "
                  "pinned to the certificates the server relays; False = plaintext, "
                  "unauthenticated (trusted cluster only)",
    "adaptive_block_size": "distributed only: from round 1 on, each client sizes the blocks it "
                           "requests from its previous round's download rate (about 8 ms of "
                           "transfer per block), between block_size and min(128 KiB, "
                           "piece_size); False = always block_size",
    "handshake_timeout": "distributed only: seconds an accepted data-plane connection has to "
                         "complete TLS and the handshake (also how long it may wait for a "
                         "round this client has not begun)",
    "max_pending_connections": "distributed only: unauthenticated data-plane connections "
                               "accepted at once from addresses that are not a member's",
    "max_pending_per_address": "distributed only: unauthenticated data-plane connections "
                               "accepted at once from one source address",
    "dataplane_host": "distributed only: address this client's data plane listens on and "
                      "publishes to its peers; '' = distribute.client_host",
    "dataplane_port": "distributed only: TCP port of this client's data plane; 0 = any free port",
    "seed": "seed of the exchange (topology, picker, simulated links); -1 means cfg.seed",
    "topology": "peer graph: 'full' | 'ring' | 'random_regular' | 'explicit'",
    "degree": "neighbours per client for topology 'random_regular'",
    "neighbors": "topology 'explicit': list of lists [client_id, neighbour, neighbour, ...] "
                 "(made symmetric)",
    "network.upload": "standalone only: upload rate of every client in Mbit/s",
    "network.upload_per_client": "standalone only: upload Mbit/s, one value per client "
                                 "(client 1 first); [] = use network.upload",
    "network.upload_dist": "standalone only: upload Mbit/s drawn per client from uniform(a,b) | "
                           "normal(mu,sigma) | lognormal(mu,sigma) | choice(a,b,...); "
                           "'' = use network.upload",
    "network.download": "standalone only: download rate of every client in Mbit/s",
    "network.download_per_client": "standalone only: download Mbit/s, one value per client; "
                                   "[] = use network.download",
    "network.download_dist": "standalone only: download Mbit/s drawn per client (forms as "
                             "network.upload_dist); '' = use network.download",
    "network.latency": "standalone only: one-way latency of every client in seconds (may be 0)",
    "network.latency_per_client": "standalone only: latency in seconds, one value per client; "
                                  "[] = use network.latency",
    "network.latency_dist": "standalone only: latency in seconds drawn per client (forms as "
                            "network.upload_dist); '' = use network.latency",
    "faults.drop": "fault injection (standalone runner and distributed data plane): "
                   "probability that a peer message is lost",
    "faults.duplicate": "fault injection: probability that a peer message arrives twice",
    "faults.reorder": "fault injection: probability that a peer message is held up to "
                      "faults.reorder_delay seconds, so later ones overtake it",
    "faults.reorder_delay": "fault injection: largest extra delay of a reordered message (s)",
    "faults.corrupt": "fault injection: probability that a piece block has a byte flipped",
    "faults.delay": "fault injection: probability that a peer message stalls up to "
                    "faults.delay_max seconds before it is sent",
    "faults.delay_max": "fault injection: longest stall of a delayed message (s)",
    "faults.disconnect": "fault injection: probability per peer message that its connection "
                         "is cut (the message is lost); redialled after faults.reconnect_after",
    "faults.reconnect_after": "fault injection: seconds from a cut connection to its redial",
    "faults.crash_clients": "fault injection: client ids whose exchange dies in round "
                            "faults.crash_round (no report; they rejoin the next round)",
    "faults.crash_round": "fault injection: the round in which faults.crash_clients crash",
    "faults.crash_at": "fault injection: seconds after that round's exchange started",
}


def extend_bittorrent_cfg(cfg: CfgNode) -> None:
    """Add the ``bittorrent`` node with its defaults to ``cfg`` (FS extend fn)."""
    bt = CN()
    bt.enable = False                     # switch the plugin on (NOT `use`: freeze() would empty the node)
    bt.piece_size = 262144                # bytes per piece (256 KiB), 1..64 MiB
    bt.block_size = 16384                 # bytes per request block (16 KiB), <= piece_size, <= 128 KiB
    bt.timeout = 60.0                     # per-round exchange deadline, s (virtual s in standalone)
    bt.manifest_timeout = 600.0           # s to wait for a round's manifests (local training)
    bt.min_completion_ratio = 0.5         # fraction of clients that must complete by the deadline
    bt.insufficient_policy = 'proceed'    # 'proceed' | 'abort' when fewer completed at the deadline
    bt.missing_policy = 'global'          # 'global' | 'local': fill for elements nobody delivered
    bt.max_upload_slots = 0               # peers unchoked at once; 0 = every interested peer
    bt.credit_bytes = 4194304             # bytes of requested blocks accepted in flight (4 MiB)
    bt.max_requests_per_peer = 64         # request pipeline cap per peer
    bt.min_requests_per_peer = 4          # request pipeline floor per peer
    bt.request_queue_time = 0.05          # window = rate x (path RTT + this)
    bt.lead_pieces = 2                    # ahead of the peers' mean by more: ask for less (0: off)
    bt.lead_requests = 2                  # requests per source while ahead
    bt.request_timeout = 10.0             # s before a block is re-requested elsewhere
    bt.max_retries = 5                    # timeouts in a row before a peer is dropped
    bt.end_game_threshold = 0             # also enter end game at <= this many unrequested blocks
    bt.end_game_delay = 0.5               # end game duplicates blocks outstanding >= this long, s
    bt.keepalive_interval = 120.0         # keep-alive after this much silence, s (BitTorrent: 2 min)
    bt.peer_timeout = 300.0               # drop a peer silent this long, s (> keepalive_interval)
    bt.max_corrupt_pieces = 3             # ban a peer after this many bad pieces
    bt.first_copy_wait = 2.0              # first-copy plan; dropped after idling this long, s (0 = off)
    bt.tick_interval = 0.5                # s between session timer ticks
    bt.simulation = 'auto'                # standalone: 'auto' | 'block' | 'flow' (sim/flow.py)
    bt.keep_rounds = 2                    # rounds of pieces kept in the store
    bt.db_dir = ''                        # piece store dir; '' = <outdir>/bittorrent
    bt.secret = ''                        # HMAC secret, plaintext data plane only; '' = none
    bt.encryption = True                  # distributed: mutual TLS 1.3, pinned certificates
    bt.adaptive_block_size = True         # distributed: block size from the measured rate
    bt.handshake_timeout = 10.0           # s for an accepted connection's TLS + handshake
    bt.max_pending_connections = 64       # unauthenticated connections from non-members
    bt.max_pending_per_address = 8        # unauthenticated connections per source address
    bt.dataplane_host = ''                # distributed: data plane address; '' = distribute.client_host
    bt.dataplane_port = 0                 # distributed: data plane TCP port; 0 = any free port
    bt.seed = -1                          # exchange seed; -1 = cfg.seed
    bt.topology = 'full'                  # 'full' | 'ring' | 'random_regular' | 'explicit'
    bt.degree = 4                         # neighbours per client for 'random_regular'
    bt.neighbors = []                     # 'explicit': [[client_id, nbr, nbr, ...], ...]

    # Simulated access links (standalone only).  One key per form, because
    # FS's yacs cannot merge a number, a list and a string into one key; a
    # non-empty *_per_client or *_dist overrides the plain number.
    bt.network = CN()
    bt.network.upload = 100.0             # Mbit/s of every client's uplink
    bt.network.upload_per_client = []     # Mbit/s, one per client (client 1 first); [] = upload
    bt.network.upload_dist = ''           # e.g. 'uniform(10,100)', 'lognormal(4.6,0.5)'; '' = upload
    bt.network.download = 100.0           # Mbit/s of every client's downlink
    bt.network.download_per_client = []   # as upload_per_client
    bt.network.download_dist = ''         # as upload_dist
    bt.network.latency = 0.005            # one-way latency in seconds (may be 0)
    bt.network.latency_per_client = []    # seconds, one per client
    bt.network.latency_dist = ''          # e.g. 'choice(0.001,0.05)'

    # Fault injection on the peer messages (standalone runner and distributed
    # data plane), seeded by the
    # exchange seed.  Everything off by default.  See core/faults.py.
    bt.faults = CN()
    bt.faults.drop = 0.0                  # probability a peer message is lost
    bt.faults.duplicate = 0.0             # ... arrives twice
    bt.faults.reorder = 0.0               # ... is held up to reorder_delay (overtaken)
    bt.faults.reorder_delay = 0.05        # s
    bt.faults.corrupt = 0.0               # ... (a piece block) has one byte flipped
    bt.faults.delay = 0.0                 # ... stalls up to delay_max before it is sent
    bt.faults.delay_max = 2.0             # s
    bt.faults.disconnect = 0.0            # ... cuts its connection (redial after reconnect_after)
    bt.faults.reconnect_after = 1.0       # s
    bt.faults.crash_clients = []          # client ids whose exchange dies in crash_round
    bt.faults.crash_round = 0
    bt.faults.crash_at = 0.0              # s after that round's exchange started

    cfg.bittorrent = bt

    if "__help_info__" in cfg and isinstance(cfg["__help_info__"], dict):
        for key, text in HELP.items():
            cfg["__help_info__"][f"{NODE}.{key}"] = text
    if "__cfg_check_funcs__" in cfg and check_bittorrent_cfg not in cfg["__cfg_check_funcs__"]:
        cfg.register_cfg_check_fun(check_bittorrent_cfg)


def register_bittorrent_config() -> None:
    """Register the node with FS and add it to ``global_cfg`` (idempotent)."""
    import federatedscope.register as fs_register

    if fs_register.config_dict.get(NODE) is not extend_bittorrent_cfg:
        fs_register.register_config(NODE, extend_bittorrent_cfg)
    from federatedscope.core.configs.config import global_cfg

    if NODE not in global_cfg:
        extend_bittorrent_cfg(global_cfg)


# --------------------------------------------------------------------------- #
# reading and checking values
# --------------------------------------------------------------------------- #

_BASIC_KEYS = tuple(k for k in HELP if "." not in k)
_FAULT_KEYS = tuple(k[len("faults."):] for k in HELP if k.startswith("faults."))
_QUANTITIES = ("upload", "download", "latency")
_NETWORK_KEYS = tuple(f"{q}{sfx}" for q in _QUANTITIES for sfx in ("", "_per_client", "_dist"))

_INT_KEYS = ("piece_size", "block_size", "max_upload_slots", "credit_bytes",
             "max_requests_per_peer", "min_requests_per_peer", "max_retries",
             "end_game_threshold", "max_corrupt_pieces", "keep_rounds", "seed", "degree",
             "dataplane_port", "max_pending_connections", "max_pending_per_address",
             "lead_pieces", "lead_requests")
_FLOAT_KEYS = ("timeout", "manifest_timeout", "min_completion_ratio", "request_queue_time", "request_timeout",
               "end_game_delay", "keepalive_interval", "peer_timeout", "tick_interval",
               "handshake_timeout", "first_copy_wait")
_STR_KEYS = ("insufficient_policy", "missing_policy", "db_dir", "secret", "topology",
             "dataplane_host", "simulation")
_POSITIVE = ("piece_size", "block_size", "credit_bytes", "max_requests_per_peer",
             "min_requests_per_peer", "max_corrupt_pieces", "timeout", "manifest_timeout",
             "request_queue_time",
             "request_timeout", "keepalive_interval", "peer_timeout", "tick_interval",
             "handshake_timeout", "max_pending_connections", "max_pending_per_address",
             "lead_requests")
_NON_NEGATIVE = ("max_upload_slots", "max_retries", "end_game_threshold", "end_game_delay",
                 "first_copy_wait", "lead_pieces")

# SwarmConfig field -> our key (same names)
_SWARM_KEYS = ("piece_size", "block_size", "credit_bytes", "max_requests_per_peer",
               "min_requests_per_peer", "request_queue_time", "max_upload_slots",
               "request_timeout", "max_retries", "end_game_threshold", "end_game_delay",
               "keepalive_interval", "peer_timeout", "max_corrupt_pieces", "first_copy_wait",
               "lead_pieces", "lead_requests")


def _plain(v: Any) -> Any:
    return v.value if isinstance(v, Argument) else v


def _f(key: str) -> str:
    return f"{NODE}.{key}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_node(cfg: CfgNode) -> dict[str, Any]:
    """Flat ``{key: value}`` of the node (``network.x`` keys flattened)."""
    if NODE not in cfg:
        raise ConfigError(NODE, None, "the bittorrent config node is missing; "
                          "import fs_bittorrent.fs before building the config")
    bt = cfg[NODE]
    out: dict[str, Any] = {}
    for key in _BASIC_KEYS:
        if key not in bt:
            raise ConfigError(_f(key), None, "key missing from the bittorrent node")
        out[key] = _plain(bt[key])
    net = bt.get("network")
    for key in _NETWORK_KEYS:
        if net is None or key not in net:
            raise ConfigError(_f(f"network.{key}"), None, "key missing from the bittorrent node")
        out[f"network.{key}"] = _plain(net[key])
    faults = bt.get("faults")
    for key in _FAULT_KEYS:
        if faults is None or key not in faults:
            raise ConfigError(_f(f"faults.{key}"), None, "key missing from the bittorrent node")
        out[f"faults.{key}"] = _plain(faults[key])
    return out


def _faults_from_values(v: dict[str, Any]) -> Faults:
    """The ``faults`` sub-block as a validated ``Faults``; a bad value is a
    ``ConfigError`` naming ``bittorrent.faults.<key>``."""
    kw = {k: v[f"faults.{k}"] for k in _FAULT_KEYS}
    if isinstance(kw["crash_clients"], list):
        kw["crash_clients"] = tuple(kw["crash_clients"])
    try:
        return Faults(**kw)
    except ConfigError as e:
        raise ConfigError(_f(e.field), e.value, e.reason) from None


def _check_single(v: dict[str, Any]) -> None:
    """Type and range of each key on its own (cheap; run even when disabled)."""
    for k in ("enable", "encryption", "adaptive_block_size"):
        if not isinstance(v[k], bool):
            raise ConfigError(_f(k), v[k], "must be True or False")
    for k in _INT_KEYS:
        if not _is_int(v[k]):
            raise ConfigError(_f(k), v[k], "must be an int")
    for k in _FLOAT_KEYS:
        if not _is_num(v[k]) or v[k] != v[k]:
            raise ConfigError(_f(k), v[k], "must be a number")
    for k in _STR_KEYS:
        if not isinstance(v[k], str):
            raise ConfigError(_f(k), v[k], "must be a string")
    for k in _POSITIVE:
        if v[k] <= 0:
            raise ConfigError(_f(k), v[k], "must be > 0")
    for k in _NON_NEGATIVE:
        if v[k] < 0:
            raise ConfigError(_f(k), v[k], "must be >= 0")
    if v["piece_size"] > MAX_PIECE_SIZE:
        raise ConfigError(_f("piece_size"), v["piece_size"], f"must be <= {MAX_PIECE_SIZE} (64 MiB)")
    if v["block_size"] > MAX_BLOCK_SIZE:
        raise ConfigError(_f("block_size"), v["block_size"],
                          f"must be <= {MAX_BLOCK_SIZE} (128 KiB, the largest block peers accept)")
    if not 0.0 <= v["min_completion_ratio"] <= 1.0:
        raise ConfigError(_f("min_completion_ratio"), v["min_completion_ratio"],
                          "must be in [0, 1]")
    if v["insufficient_policy"] not in INSUFFICIENT_POLICIES:
        raise ConfigError(_f("insufficient_policy"), v["insufficient_policy"],
                          f"must be one of {', '.join(map(repr, INSUFFICIENT_POLICIES))}")
    if v["missing_policy"] not in MISSING_POLICIES:
        raise ConfigError(_f("missing_policy"), v["missing_policy"],
                          f"must be one of {', '.join(map(repr, MISSING_POLICIES))}")
    if v["simulation"] not in SIMULATIONS:
        raise ConfigError(_f("simulation"), v["simulation"],
                          f"must be one of {', '.join(map(repr, SIMULATIONS))}")
    if v["topology"] not in TOPOLOGIES:
        raise ConfigError(_f("topology"), v["topology"],
                          f"must be one of {', '.join(map(repr, TOPOLOGIES))}")
    if v["keep_rounds"] < 1:
        raise ConfigError(_f("keep_rounds"), v["keep_rounds"], "must be >= 1")
    if v["seed"] < -1:
        raise ConfigError(_f("seed"), v["seed"], "must be -1 (use cfg.seed) or >= 0")
    if v["degree"] < 1:
        raise ConfigError(_f("degree"), v["degree"], "must be >= 1")
    if not 0 <= v["dataplane_port"] <= 65535:
        raise ConfigError(_f("dataplane_port"), v["dataplane_port"], "must be in [0, 65535]")
    nb = v["neighbors"]
    if not isinstance(nb, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in nb):
        raise ConfigError(_f("neighbors"), nb,
                          "must be a list of lists [client_id, neighbour, neighbour, ...]")
    for q in _QUANTITIES:
        num, lst, dist = (v[f"network.{q}{sfx}"] for sfx in ("", "_per_client", "_dist"))
        if not _is_num(num) or num != num:
            raise ConfigError(_f(f"network.{q}"), num, "must be a number")
        if q == "latency" and num < 0:
            raise ConfigError(_f(f"network.{q}"), num, "must be >= 0")
        if q != "latency" and num <= 0:
            raise ConfigError(_f(f"network.{q}"), num, "must be > 0 (Mbit/s)")
        if not isinstance(lst, (list, tuple)):
            raise ConfigError(_f(f"network.{q}_per_client"), lst,
                              "must be a list with one value per client")
        if not isinstance(dist, str):
            raise ConfigError(_f(f"network.{q}_dist"), dist,
                              "must be a distribution string like 'uniform(10, 100)'")
    _faults_from_values(v)


def check_bittorrent_cfg(cfg: CfgNode) -> None:
    """FS check function: raise ``ConfigError`` (field ``bittorrent.<key>``) on a bad value."""
    if NODE not in cfg:
        return
    values = _read_node(cfg)
    _check_single(values)
    if values["enable"]:
        BitTorrentSettings.from_cfg(cfg)


# --------------------------------------------------------------------------- #
# typed, validated view
# --------------------------------------------------------------------------- #

# FS features that cannot work peer to peer, with why and what to do.
# Everything the server computes from the received models alone (FedAvg,
# FedOpt, robust rules, pFedMe's interpolation, online FedAvg, K models)
# runs at every client with FS's own aggregator (fs_aggregation.py) and is
# *not* here.  (key path, value that is fine, why, what to set)
_REFUSED = (
    ("asyn.use", False,
     "asynchronous FL aggregates whatever (stale) updates reach the server by a deadline, "
     "one at a time; a round-based exchange has no such order every client could share",
     "set asyn.use False"),
    ("federate.use_ss", False,
     "secret sharing exists so that nobody sees a client's model, while the exchange gives "
     "every client every model",
     "set federate.use_ss False"),
    ("vertical.use", False,
     "vertical FL exchanges embeddings and gradients between parties, not per-client models",
     "set vertical.use False"),
    ("quantization.method", "none",
     "the exchange carries float tensors and does not de-quantize received models",
     "set quantization.method 'none'"),
    ("nbafl.use", False,
     "NbAFL's server adds fresh random noise to the model it broadcasts; the clients hold "
     "the model and no server broadcast happens",
     "set nbafl.use False"),
    ("fedswa.use", False,
     "FedSWA's server averages its own model history, which the server does not hold",
     "set fedswa.use False"),
)
_NO_COMMUNICATION = ("local", "global")
_AND_OFF = "bittorrent.enable False to run plain FederatedScope"


def _check_server_side_features(cfg: CfgNode) -> None:
    for path, fine, why, fix in _REFUSED:
        node: Any = cfg
        for part in path.split("."):
            if not hasattr(node, part):
                node = fine  # this FS build has no such option
                break
            node = getattr(node, part)
        value = _plain(node)
        if value != fine:
            raise ConfigError(path, value, f"not supported with bittorrent.enable True: {why}; "
                              f"{fix}, or set {_AND_OFF}")
    method = str(_plain(cfg.federate.method)).lower()
    if method in _NO_COMMUNICATION:
        raise ConfigError("federate.method", _plain(cfg.federate.method),
                          f"method {method!r} exchanges no models, so there is nothing to "
                          f"swarm; set {_AND_OFF}")


def _freeze_spec(s: Any) -> Any:
    return tuple(s) if isinstance(s, list) else s


@dataclass(frozen=True)
class BitTorrentSettings:
    """Validated, resolved values of ``cfg.bittorrent`` (plus what they depend on).

    ``seed`` is resolved (never -1 when built by ``from_cfg``) and ``db_dir`` is
    a path; ``secret`` stays '' when unset (no HMAC; it is only for a plaintext
    data plane and never sent by anyone).  ``client_num`` is ``federate.client_num``
    (0 = not yet known: the client-count checks are then skipped).
    """

    enable: bool = False
    piece_size: int = 262144
    block_size: int = 16384
    timeout: float = 60.0
    manifest_timeout: float = 600.0
    min_completion_ratio: float = 0.5
    insufficient_policy: str = "proceed"
    missing_policy: str = "global"
    max_upload_slots: int = 0
    credit_bytes: int = 4194304
    max_requests_per_peer: int = 64
    min_requests_per_peer: int = 4
    request_queue_time: float = 0.05
    lead_pieces: int = 2
    lead_requests: int = 2
    request_timeout: float = 10.0
    max_retries: int = 5
    end_game_threshold: int = 0
    end_game_delay: float = 0.5
    keepalive_interval: float = 120.0
    peer_timeout: float = 300.0
    max_corrupt_pieces: int = 3
    first_copy_wait: float = 2.0
    tick_interval: float = 0.5
    simulation: str = "auto"
    keep_rounds: int = 2
    db_dir: str = ""
    secret: str = ""
    encryption: bool = True
    adaptive_block_size: bool = True
    handshake_timeout: float = 10.0
    max_pending_connections: int = 64
    max_pending_per_address: int = 8
    dataplane_host: str = ""
    dataplane_port: int = 0
    seed: int = 0
    topology: str = "full"
    degree: int = 4
    neighbors: tuple = ()
    network_upload: float = DEFAULT_RATE_MBIT
    network_upload_per_client: tuple = ()
    network_upload_dist: str = ""
    network_download: float = DEFAULT_RATE_MBIT
    network_download_per_client: tuple = ()
    network_download_dist: str = ""
    network_latency: float = DEFAULT_LATENCY
    network_latency_per_client: tuple = ()
    network_latency_dist: str = ""
    faults: Faults = Faults()
    client_num: int = 0
    mode: str = "standalone"

    def __post_init__(self) -> None:
        nb = self.neighbors
        if isinstance(nb, (list, tuple)):
            nb = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in nb)
        object.__setattr__(self, "neighbors", nb)
        for k in _NETWORK_KEYS:
            object.__setattr__(self, f"network_{k}", _freeze_spec(getattr(self, f"network_{k}")))
        _check_single(self._values())
        self._check_cross()

    def _values(self) -> dict[str, Any]:
        v = {k: getattr(self, k) for k in _BASIC_KEYS}
        for k in _NETWORK_KEYS:
            v[f"network.{k}"] = getattr(self, f"network_{k}")
        if not isinstance(self.faults, Faults):
            raise ConfigError(_f("faults"), self.faults, "must be a Faults")
        for k in _FAULT_KEYS:
            v[f"faults.{k}"] = getattr(self.faults, k)
        return v

    def _check_cross(self) -> None:
        if self.block_size > self.piece_size:
            raise ConfigError(_f("block_size"), self.block_size,
                              f"must be <= piece_size ({self.piece_size})")
        self.swarm_config()
        if self.keepalive_interval >= self.peer_timeout:
            raise ConfigError(_f("keepalive_interval"), self.keepalive_interval,
                              f"must be < peer_timeout ({self.peer_timeout}), or idle "
                              "peers drop each other")
        if self.mode not in FS_MODES:
            raise ConfigError("federate.mode", self.mode, f"must be one of {FS_MODES}")
        n = self.client_num
        if not _is_int(n) or n < 0:
            raise ConfigError("federate.client_num", n, "must be an int >= 0")
        if n > 0:
            validate_topology(self.topology, range(1, n + 1), self.degree,
                              self._explicit())
        for q in _QUANTITIES:
            _, spec = self.link_spec(q)
            if n > 0:
                count = n
            else:  # count unknown yet: check the syntax only
                count = len(spec) if isinstance(spec, (list, tuple)) else 1
            self._spec(q, count)
        if self.simulation == "flow" and self.flow_unsupported():
            raise ConfigError(_f("simulation"), self.simulation,
                              f"the flow level does not model {self.flow_unsupported()}; "
                              "use 'block' (or 'auto', which picks block for them)")
        crash = self.faults.crash_clients
        if n > 0 and any(not 1 <= c <= n for c in crash):
            raise ConfigError(_f("faults.crash_clients"), list(crash),
                              f"client ids {[c for c in crash if not 1 <= c <= n]} are "
                              f"outside 1..{n}")

    def flow_unsupported(self) -> str:
        """What of this configuration only the block level simulates ('' if nothing)."""
        if self.faults.any:
            return "per-message faults (bittorrent.faults drop, duplicate, reorder, corrupt, " \
                   "delay, disconnect)"
        if self.max_upload_slots:
            return "capped upload slots (bittorrent.max_upload_slots > 0)"
        return ""

    def _explicit(self) -> list[list[int]]:
        return [list(r) for r in self.neighbors]

    def link_spec(self, quantity: str) -> tuple[str, Any]:
        """``(config key, spec)`` in effect for 'upload' | 'download' | 'latency'."""
        lst = getattr(self, f"network_{quantity}_per_client")
        dist = getattr(self, f"network_{quantity}_dist")
        if lst and dist:
            raise ConfigError(_f(f"network.{quantity}_dist"), dist,
                              f"set only one of network.{quantity}_per_client and "
                              f"network.{quantity}_dist")
        if lst:
            return _f(f"network.{quantity}_per_client"), lst
        if dist:
            return _f(f"network.{quantity}_dist"), dist
        return _f(f"network.{quantity}"), getattr(self, f"network_{quantity}")

    def _spec(self, quantity: str, n: int) -> list[float]:
        field, spec = self.link_spec(quantity)
        # seeded per quantity, so upload and download draws are independent
        return parse_spec(field, spec, n, f"{self.seed}:{_f('network.' + quantity)}", 0.0,
                          allow_zero=quantity == "latency")

    @classmethod
    def from_cfg(cls, cfg: CfgNode) -> "BitTorrentSettings":
        """Validate ``cfg.bittorrent`` and resolve ``seed`` and ``db_dir``."""
        v = _read_node(cfg)
        _check_single(v)
        seed = v["seed"] if v["seed"] != -1 else _plain(cfg.seed)
        db_dir = v["db_dir"] or os.path.join(_plain(cfg.outdir), "bittorrent")
        federate = cfg.federate
        kwargs = {k: v[k] for k in _BASIC_KEYS}
        kwargs.update(seed=seed, db_dir=db_dir)
        for k in _NETWORK_KEYS:
            kwargs[f"network_{k}"] = v[f"network.{k}"]
        kwargs["faults"] = _faults_from_values(v)
        settings = cls(**kwargs, client_num=_plain(federate.client_num),
                       mode=_plain(federate.mode))
        if settings.enable:
            _check_server_side_features(cfg)
        return settings

    # ---- derived objects ---------------------------------------------------

    def swarm_config(self) -> SwarmConfig:
        """The per-peer ``SwarmConfig``; its errors come back as ``bittorrent.<key>``."""
        try:
            return SwarmConfig(**{k: getattr(self, k) for k in _SWARM_KEYS}, seed=self.seed)
        except ConfigError as e:
            field = e.field if e.field.startswith(NODE + ".") else _f(e.field)
            raise ConfigError(field, e.value, e.reason) from e

    def _ids(self, client_ids: Optional[Iterable[int]]) -> list[int]:
        if client_ids is None:
            return list(range(1, self.client_num + 1))
        return sorted(client_ids)

    def links(self, client_ids: Optional[Iterable[int]] = None) -> dict[int, LinkProfile]:
        """``{client_id: LinkProfile}`` in bytes/s and seconds (default ids 1..client_num).

        A list spec gives client ``i`` its entry ``i - 1``; draws are seeded from
        ``seed`` and the key, so a client's link does not depend on which other
        ids are asked for.
        """
        ids = self._ids(client_ids)
        if not ids:
            return {}
        n = self.client_num if self.client_num > 0 else max(ids)
        bad = [i for i in ids if not _is_int(i) or not 1 <= i <= n]
        if bad:
            raise ConfigError("federate.client_num", n,
                              f"client ids {bad} are outside 1..{n}")
        up, down, lat = (self._spec(q, n) for q in _QUANTITIES)
        return {i: LinkProfile(up=up[i - 1] * MBIT, down=down[i - 1] * MBIT, latency=lat[i - 1])
                for i in ids}

    def neighbours(self, client_ids: Optional[Iterable[int]] = None) -> dict[int, list[int]]:
        """``{client_id: sorted neighbours}``: symmetric, connected, seeded.

        For all clients (the default) this is ``make_topology`` over
        1..client_num, strict.  For a strict subset (a round's participants)
        it never fails on the subset's size: ``full`` and ``ring`` are built
        over the subset, ``random_regular`` uses the nearest feasible degree
        for the subset, and ``explicit`` keeps the configured links among the
        subset and bridges any cut-off group to the smallest id (logged).
        """
        ids = self._ids(client_ids)
        n = self.client_num
        if n <= 0 or ids == list(range(1, n + 1)):
            return make_topology(self.topology, ids, self.degree, self.seed, self._explicit())
        bad = [i for i in ids if not _is_int(i) or not 1 <= i <= n]
        if bad:
            raise ConfigError("federate.client_num", n, f"client ids {bad} are outside 1..{n}")
        if self.topology == "random_regular":
            return make_topology("random_regular", ids, feasible_degree(self.degree, len(ids)),
                                 self.seed)
        if self.topology == "explicit":
            whole = make_topology("explicit", range(1, n + 1), explicit=self._explicit())
            return restrict(whole, ids)
        return make_topology(self.topology, ids)


# --------------------------------------------------------------------------- #
# unknown keys
# --------------------------------------------------------------------------- #

_UNKNOWN_RE = re.compile(r"Non-existent (?:config )?key:\s*(\S+)")
_MISMATCH_RE = re.compile(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values "
                          r"\((.*) vs\. (.*)\) for config key: (\S+)", re.S)


def _message(exc: BaseException) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def is_unknown_key_error(exc: BaseException) -> bool:
    """True for yacs's unknown-key errors: ``KeyError`` from ``merge_from_file``,
    ``AssertionError`` from ``merge_from_list`` (which FS's own checks also raise)."""
    return isinstance(exc, (KeyError, AssertionError)) and bool(_UNKNOWN_RE.search(_message(exc)))


def type_mismatch_hint(exc: BaseException) -> Optional[ConfigError]:
    """yacs's ``ValueError('Type mismatch ... for config key: k')`` as a ``ConfigError``
    naming the key (None for any other error)."""
    if not isinstance(exc, ValueError):
        return None
    m = _MISMATCH_RE.search(_message(exc))
    if not m:
        return None
    want, got, default, value, key = m.groups()
    reason = f"must be of type {want} like its default ({default!s}), got {got}"
    net = re.fullmatch(rf"{NODE}\.network\.(upload|download|latency)", key)
    if net and got == "str":
        reason += f"; put a distribution in {NODE}.network.{net.group(1)}_dist"
    elif net and got in ("list", "tuple"):
        reason += f"; put one value per client in {NODE}.network.{net.group(1)}_per_client"
    elif want == "str":
        reason += "; on the command line quote it twice, e.g. \"'1234'\""
    return ConfigError(key, value, reason)


def _leaf_keys(node: CfgNode, prefix: str = "") -> Iterable[str]:
    for k, v in node.items():
        if k in _AUX_KEYS:
            continue
        if isinstance(v, CfgNode):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def bittorrent_keys() -> list[str]:
    """Every full key of the node, e.g. ``bittorrent.network.upload``."""
    probe = CN()
    extend_bittorrent_cfg(probe)
    return list(_leaf_keys(probe))


def unknown_key_hint(exc_or_key: Any, value: Any = None) -> ConfigError:
    """Turn yacs's unknown-key error (or a key) into a ``ConfigError`` with a suggestion.

    Understands ``KeyError('Non-existent config key: x')`` (merge_from_file)
    and ``AssertionError('Non-existent key: x')`` (merge_from_list).
    Suggestions come from ``global_cfg``'s keys (with our node in it).
    """
    if isinstance(exc_or_key, BaseException):
        text = _message(exc_or_key)
    else:
        text = str(exc_or_key)
    m = _UNKNOWN_RE.search(text)
    if m:
        key = m.group(1).strip("'\"")
    elif re.fullmatch(r"[A-Za-z_][\w.]*", text.strip()):
        key = text.strip()
    else:
        return ConfigError("config", text, "not an unknown-key error")

    from federatedscope.core.configs.config import global_cfg

    candidates = set(_leaf_keys(global_cfg)) if NODE in global_cfg else set()
    candidates.update(bittorrent_keys())
    section, _, rest = key.partition(".")
    same = sorted(c for c in candidates if c.split(".", 1)[0] == section)
    match: list[str] = []
    if same and rest:
        # compare within the section, without the shared prefix inflating the score
        tails = {c[len(section) + 1:]: c for c in same}
        last = rest.rsplit(".", 1)[-1]
        match = [c for t, c in tails.items() if t.rsplit(".", 1)[-1] == last][:1]
        if not match:
            match = [tails[t] for t in difflib.get_close_matches(rest, list(tails), n=1,
                                                                 cutoff=0.6)]
    if not match and not same:
        match = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.75)
    if match:
        reason = f"unknown key; did you mean {match[0]}?"
    elif section == NODE:
        reason = "unknown key; the bittorrent keys are " + ", ".join(same)
    else:
        reason = "unknown key"
    return ConfigError(key, value, reason)
