"""``fs-bittorrent check --cfg X.yaml [KEY VALUE ...]``: a preflight.

It does what ``fs-bittorrent run`` would do up to the first round, without
training and without writing anything:

1. merges the YAML and the options into FS's config, with every check FS
   and the plugin run at ``freeze()`` (unknown keys with a suggestion, type
   and range of each key, cross-key rules, topology and link specs against
   ``federate.client_num``, and the FS features the exchange refuses);
2. prints the resolved ``bittorrent`` settings (seed and store directory
   resolved, the secret redacted);
3. loads the data and builds the model (FS's ``get_data`` / ``get_model``,
   as the runner does: the model's input shape may come from the data) to
   learn the bytes each client publishes, then estimates one round's
   exchange for the configured network: T_LB, the all-gather lower bound,
   plus what a chunked swarm adds (``estimate_exchange``);
4. in distributed mode, as a client, binds the data-plane address it would
   listen on, and releases it.

With ``bittorrent.enable False`` the run is plain FS; check still says
which FS features would be refused once the exchange is enabled.

Exit status: 0 the config is usable, 2 it is not (the message names the
key and the value).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import socket
import sys
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError

# What a swarm adds to T_LB, in one-way latencies: set-up (the dialler's
# handshake and bitfield, the answer, a request, the first block back) and
# the request windows' ramp-up, which grows with the swarm:
#   extra = (SETUP_LATENCIES + RAMP_LATENCIES_PER_DOUBLING * ceil(log2 n)) * latency
# Fitted on the simulator (docs/operations.md has the table).
SETUP_LATENCIES = 4
RAMP_LATENCIES_PER_DOUBLING = 2


@dataclass(frozen=True)
class ExchangeEstimate:
    clients: int             # clients that swarm (everyone)
    owners: int              # clients that publish a model (sampled ones)
    model_bytes: int         # bytes one client publishes (serialized state_dict)
    pieces_per_model: int
    t_lb: float              # all-gather lower bound, seconds
    estimate: float          # expected exchange time, seconds

    @property
    def moved_bytes(self) -> int:
        """Bytes the exchange moves in a round: every client fetches every other model."""
        return self.owners * self.model_bytes * (self.clients - 1)

    @property
    def star_bytes(self) -> int:
        """What plain FS moves through its server: the model out to each
        owner, each owner's update back."""
        return 2 * self.owners * self.model_bytes


def estimate_exchange(model_bytes: int, settings: Any, owners: Optional[list[int]] = None
                      ) -> ExchangeEstimate:
    """One round's exchange time on the configured links.

    ``T_LB`` is the all-gather lower bound (``sim.swarm.lower_bound``,
    exact for any links); the swarm's overhead on top of it is latency
    bound in the simulator (set-up and request-window ramp-up, see
    ``SETUP_LATENCIES``), nearly independent of the piece size.  Measured
    within 5 % of the simulated round on uniform full-mesh networks with
    every client publishing; less exact with client sampling (the clients
    that publish nothing must also be fed) or sparse topologies.
    """
    from ..sim.swarm import lower_bound
    links = settings.links()
    ids = sorted(links)
    owners = ids if owners is None else sorted(owners)
    shares = {c: (model_bytes if c in owners else 0) for c in ids}
    t_lb = lower_bound(shares, links)
    latency = max(links[c].latency for c in ids)
    doublings = math.ceil(math.log2(len(ids))) if len(ids) > 1 else 0
    est = t_lb + (SETUP_LATENCIES + RAMP_LATENCIES_PER_DOUBLING * doublings) * latency
    return ExchangeEstimate(len(ids), len(owners), model_bytes,
                            math.ceil(model_bytes / settings.piece_size), t_lb, est)


def model_bytes_of(cfg: Any, data: Any) -> tuple[int, int]:
    """(bytes one client publishes, parameter count): FS's model for the
    config, built as the runner builds it (from client 1's data), not
    trained, with the keys FS's trainer shares (trainable parameters unless
    ``personalization.share_non_trainable_para``, minus
    ``personalization.local_param``)."""
    from federatedscope.core.auxiliaries.model_builder import get_model
    from ..core.pieces import make_model_manifest
    model = get_model(cfg.model, data[1] if 1 in data else data, backend=cfg.backend)
    state = model.state_dict()
    if not cfg.personalization.share_non_trainable_para:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    local = list(cfg.personalization.local_param)
    state = {k: v for k, v in state.items() if not any(p in k for p in local)}
    manifest, _ = make_model_manifest(state, owner=1, round=0, sample_count=1)
    return manifest.total_size, sum(v.numel() for v in state.values())


def estimate_for(cfg: Any, data: Any, settings: Any) -> tuple[ExchangeEstimate, int]:
    """The estimate for a resolved config: the model built from ``data``,
    ``federate.sample_client_num`` clients publishing.  Returns it and the
    model's parameter count."""
    size, params = model_bytes_of(cfg, data)
    sampled = int(cfg.federate.sample_client_num)
    # which clients are sampled is random; on uniform links it does not matter
    owners = list(range(1, sampled + 1)) if 0 < sampled < settings.client_num else None
    return estimate_exchange(size, settings, owners), params


def check_dataplane_bindable(cfg: Any, settings: Any) -> Optional[str]:
    """Distributed client: bind the data plane's address; None if not applicable."""
    if settings.mode != "distributed" or str(cfg.distribute.role) != "client":
        return None
    host_key = "bittorrent.dataplane_host" if settings.dataplane_host \
        else "distribute.client_host"
    host = settings.dataplane_host or str(cfg.distribute.client_host)
    port = settings.dataplane_port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(host_key, host, f"not a resolvable address: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError("bittorrent.dataplane_port", port,
                                  f"already in use on {host}") from None
            raise ConfigError(host_key, host, f"cannot listen here: {exc.strerror}") from None
        bound = s.getsockname()
    return f"{host}:{bound[1] if port == 0 else port}"


def _fs_checks(cfg: Any) -> None:
    """FS's own checks and the plugin's, as at ``freeze()``, without saving."""
    from ..fs.config import type_mismatch_hint
    try:
        cfg.ready_for_run(check_cfg=True)
    except ConfigError:
        raise
    except (AssertionError, ValueError, KeyError) as exc:
        hint = type_mismatch_hint(exc)
        if hint is not None:
            raise hint from None
        raise ConfigError("config", str(exc).strip("'\""), "refused by FederatedScope's "
                          "config checks") from None


def _refusals_if_enabled(cfg: Any) -> list[str]:
    """What enabling the exchange would refuse, for a config that has it off."""
    from ..fs.config import BitTorrentSettings
    probe = cfg.clone()
    probe.defrost()
    probe.bittorrent.enable = True
    problems = []
    for _ in range(8):                      # one refusal at a time, bounded
        try:
            BitTorrentSettings.from_cfg(probe)
            break
        except ConfigError as exc:
            problems.append(str(exc))
            if not _switch_off(probe, exc.field):
                break
    return problems


def _switch_off(cfg: Any, field: str) -> bool:
    """Turn a refused FS feature off in ``cfg`` (a switch such as
    ``asyn.use`` or ``quantization.method``), so the next refusal shows;
    False when ``field`` is no such switch."""
    *path, leaf = str(field).split(".")
    node = cfg
    for name in path:
        node = getattr(node, name, None)
        if node is None:
            return False
    value = getattr(node, leaf, None)
    if value is True:
        setattr(node, leaf, False)
        return True
    if leaf == "method" and path == ["quantization"] and value != "none":
        node.method = "none"
        return True
    return False


def _redacted(settings: Any) -> dict[str, Any]:
    """The settings under their config keys (``bittorrent.network.upload``),
    the secret redacted."""
    values = {}
    for key, value in dataclasses.asdict(settings).items():
        if key in ("client_num", "mode"):
            key = f"federate.{key}"
        elif key.startswith("network_"):
            key = "bittorrent.network." + key[len("network_"):]
        else:
            key = f"bittorrent.{key}"
        values[key] = value
    values["bittorrent.secret"] = "<set>" if settings.secret else "<none>"
    return values


def _links_line(settings: Any) -> str:
    links = settings.links()
    if not links:
        return "links: no clients"
    mbit = 8 / 1e6
    ups = [p.up * mbit for p in links.values()]
    downs = [p.down * mbit for p in links.values()]
    lats = [p.latency for p in links.values()]
    return (f"links of {len(links)} clients: upload {min(ups):g}..{max(ups):g} Mbit/s, "
            f"download {min(downs):g}..{max(downs):g} Mbit/s, "
            f"latency {min(lats):g}..{max(lats):g} s")


def run_check(cfg_file: str, opts: list[str], out=None) -> int:
    """The preflight; prints to ``out``; returns 0 (usable).  Raises
    ConfigError for an unusable config."""
    from federatedscope.core.auxiliaries.data_builder import get_data
    from ..fs.config import BitTorrentSettings, type_mismatch_hint
    from ..fs.entry import build_config, split_client_opts
    out = out if out is not None else sys.stdout
    cfg_opts, _ = split_client_opts(list(opts))
    try:
        cfg = build_config(cfg_file, cfg_opts)
    except ValueError as exc:
        hint = type_mismatch_hint(exc)
        if hint is None:
            raise
        raise hint from None
    data, modified = get_data(config=cfg.clone())
    cfg.merge_from_other_cfg(modified)
    _fs_checks(cfg)
    settings = BitTorrentSettings.from_cfg(cfg)
    print(f"config {cfg_file}: valid ({settings.mode}, {settings.client_num} clients, "
          f"federate.method {cfg.federate.method})", file=out)
    if not settings.enable:
        print("bittorrent.enable is False: this runs plain FederatedScope (same classes, "
              "same results)", file=out)
        for problem in _refusals_if_enabled(cfg):
            print(f"  once enabled, it would be refused: {problem}", file=out)
    print("resolved bittorrent settings:", file=out)
    for key, value in _redacted(settings).items():
        print(f"  {key}: {value}", file=out)
    est, params = estimate_for(cfg, data, settings)
    size = est.model_bytes
    print(f"model {cfg.model.type}: {params} parameters, {size} bytes per client "
          f"({est.pieces_per_model} pieces of {settings.piece_size})", file=out)
    if settings.mode == "standalone" or settings.client_num > 0:
        print(_links_line(settings)
              + ("" if settings.mode == "standalone" else
                 " (network.* is the standalone simulation; in distributed mode these are "
                 "the rates the estimate assumes)"), file=out)
        print(f"estimated exchange per round: {est.estimate:.3f} s (T_LB {est.t_lb:.3f} s); "
              f"{est.owners} models to {est.clients} clients move {est.moved_bytes / 1e6:.2f} MB "
              f"peer to peer, plain FS's star {est.star_bytes / 1e6:.2f} MB through its server; "
              f"bittorrent.timeout {settings.timeout:g} s", file=out)
        if est.estimate > settings.timeout:
            print(f"  warning: the estimate exceeds bittorrent.timeout ({settings.timeout:g} s): "
                  "rounds would end at the deadline", file=out)
    address = check_dataplane_bindable(cfg, settings)
    if address:
        print(f"data plane: {address} is free to listen on", file=out)
    print("check: OK", file=out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fs-bittorrent check",
        description="Preflight: validate a config, print the resolved bittorrent settings, "
                    "estimate a round's exchange; exit 0 (usable) or 2.")
    ap.add_argument("--cfg", dest="cfg_file", required=True, help="FS YAML config")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE pairs, as in FS")
    args = ap.parse_args(argv)
    try:
        return run_check(args.cfg_file, args.opts)
    except ConfigError as exc:
        print(f"fs-bittorrent check: configuration error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"fs-bittorrent check: {exc}", file=sys.stderr)
        return 2
