"""Tests of the ``bittorrent`` FederatedScope config node, its checks and settings."""
from __future__ import annotations

import dataclasses
import importlib
import os
import textwrap

import pytest

fs = pytest.importorskip("federatedscope",
                         reason="FederatedScope is not installed: FS config tests skipped")

pytestmark = pytest.mark.fs

from federatedscope.core.configs.config import CN, global_cfg  # noqa: E402

import fs_bittorrent.fs  # noqa: E402,F401  (registers the node)
from fs_bittorrent.core.config import SwarmConfig  # noqa: E402
from fs_bittorrent.core.topology import is_connected  # noqa: E402
from fs_bittorrent.errors import ConfigError  # noqa: E402
from fs_bittorrent.fs import config as btc  # noqa: E402
from fs_bittorrent.fs.config import (  # noqa: E402
    HELP,
    BitTorrentSettings,
    bittorrent_keys,
    check_bittorrent_cfg,
    extend_bittorrent_cfg,
    is_unknown_key_error,
    register_bittorrent_config,
    type_mismatch_hint,
    unknown_key_hint,
)
from fs_bittorrent.sim.network import LinkProfile  # noqa: E402

AUX = {"__cfg_check_funcs__", "__help_info__", "is_ready_for_run"}

DEFAULTS = {
    "enable": False, "piece_size": 262144, "block_size": 16384, "timeout": 60.0,
    "manifest_timeout": 600.0,
    "min_completion_ratio": 0.5, "insufficient_policy": "proceed", "missing_policy": "global",
    "max_upload_slots": 0, "credit_bytes": 4194304, "max_requests_per_peer": 64,
    "min_requests_per_peer": 4, "request_queue_time": 0.05, "lead_pieces": 2, "lead_requests": 2,
    "request_timeout": 10.0,
    "max_retries": 5, "end_game_threshold": 0, "end_game_delay": 0.5,
    "keepalive_interval": 120.0, "peer_timeout": 300.0, "max_corrupt_pieces": 3,
    "first_copy_wait": 2.0,
    "tick_interval": 0.5, "simulation": "auto", "keep_rounds": 2, "db_dir": "", "secret": "",
    "encryption": True, "adaptive_block_size": True, "handshake_timeout": 10.0, "max_pending_connections": 64,
    "max_pending_per_address": 8,
    "dataplane_host": "", "dataplane_port": 0, "seed": -1,
    "topology": "full", "degree": 4, "neighbors": [],
    "network.upload": 100.0, "network.upload_per_client": [], "network.upload_dist": "",
    "network.download": 100.0, "network.download_per_client": [], "network.download_dist": "",
    "network.latency": 0.005, "network.latency_per_client": [], "network.latency_dist": "",
    "faults.drop": 0.0, "faults.duplicate": 0.0, "faults.reorder": 0.0,
    "faults.reorder_delay": 0.05, "faults.corrupt": 0.0, "faults.delay": 0.0,
    "faults.delay_max": 2.0, "faults.disconnect": 0.0, "faults.reconnect_after": 1.0,
    "faults.crash_clients": [], "faults.crash_round": 0, "faults.crash_at": 0.0,
}


def leaves(node, prefix=""):
    out = {}
    for k, v in node.items():
        if k in AUX:
            continue
        if isinstance(v, CN):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def make_cfg(tmp_path=None, client_num=4, opts=()):
    cfg = global_cfg.clone()
    cfg.federate.client_num = client_num
    if tmp_path is not None:
        cfg.outdir = str(tmp_path)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg


# --------------------------------------------------------------------------- #
# registration
# --------------------------------------------------------------------------- #

def test_node_registered_with_defaults():
    import federatedscope.register as reg

    assert "bittorrent" in global_cfg
    assert reg.config_dict["bittorrent"] is extend_bittorrent_cfg
    assert leaves(global_cfg.bittorrent) == DEFAULTS
    assert "use" not in global_cfg.bittorrent  # freeze() would empty the node
    assert global_cfg["__cfg_check_funcs__"].count(check_bittorrent_cfg) == 1


def test_import_twice_and_register_again_is_idempotent():
    before = dict(global_cfg.bittorrent)
    importlib.reload(importlib.import_module("fs_bittorrent.fs"))
    register_bittorrent_config()
    register_bittorrent_config()
    assert global_cfg["__cfg_check_funcs__"].count(check_bittorrent_cfg) == 1
    assert dict(global_cfg.bittorrent) == before


def test_register_applies_to_global_cfg_built_earlier(monkeypatch):
    # simulate the plugin being imported after FS built global_cfg without it
    import federatedscope.register as reg

    saved_node = global_cfg.pop("bittorrent")
    saved_fn = reg.config_dict.pop("bittorrent")
    funcs = global_cfg["__cfg_check_funcs__"]
    funcs.remove(check_bittorrent_cfg)
    try:
        assert "bittorrent" not in global_cfg
        register_bittorrent_config()
        assert leaves(global_cfg.bittorrent) == DEFAULTS
        assert reg.config_dict["bittorrent"] is extend_bittorrent_cfg
        assert funcs.count(check_bittorrent_cfg) == 1
        register_bittorrent_config()
        assert funcs.count(check_bittorrent_cfg) == 1
    finally:
        global_cfg["bittorrent"] = saved_node
        reg.config_dict["bittorrent"] = saved_fn
        if check_bittorrent_cfg not in funcs:
            funcs.append(check_bittorrent_cfg)


def test_fresh_init_global_cfg_includes_node():
    from federatedscope.core.configs.config import init_global_cfg

    cfg = CN()
    init_global_cfg(cfg)
    assert leaves(cfg.bittorrent) == DEFAULTS


def test_help_text_for_every_key():
    keys = {k.split(".", 1)[1] for k in bittorrent_keys()}
    assert keys == set(HELP) == set(DEFAULTS)
    for k in keys:
        assert global_cfg["__help_info__"][f"bittorrent.{k}"] == HELP[k]


def test_settings_defaults_match_cfg_defaults():
    s = BitTorrentSettings()
    for key, default in DEFAULTS.items():
        attr = key.replace(".", "_")
        if key in ("seed",):
            continue
        got = getattr(s.faults, key[len("faults."):]) if key.startswith("faults.") \
            else getattr(s, attr)
        assert got == (tuple(default) if isinstance(default, list) else default), key


# --------------------------------------------------------------------------- #
# merging and freezing
# --------------------------------------------------------------------------- #

def test_yaml_block_merges(tmp_path):
    y = tmp_path / "cfg.yaml"
    y.write_text(textwrap.dedent("""
        federate:
          client_num: 4
        bittorrent:
          enable: true
          piece_size: 65536
          block_size: 8192
          timeout: 30
          min_completion_ratio: 1
          insufficient_policy: abort
          missing_policy: local
          topology: explicit
          neighbors: [[1, 2, 3], [3, 4]]
          network:
            upload: 50
            download_per_client: [100, 20, 20, 20.5]
            latency_dist: uniform(0.001, 0.05)
    """))
    cfg = global_cfg.clone()
    cfg.outdir = str(tmp_path)
    cfg.merge_from_file(str(y))
    bt = cfg.bittorrent
    assert bt.enable is True and bt.piece_size == 65536 and bt.block_size == 8192
    assert bt.timeout == 30.0 and isinstance(bt.timeout, float)
    assert bt.min_completion_ratio == 1.0
    assert bt.insufficient_policy == "abort" and bt.missing_policy == "local"
    assert bt.neighbors == [[1, 2, 3], [3, 4]]
    assert bt.network.upload == 50.0
    assert bt.network.download_per_client == [100, 20, 20, 20.5]
    assert bt.network.latency_dist == "uniform(0.001, 0.05)"
    s = BitTorrentSettings.from_cfg(cfg)
    assert s.neighbours() == {1: [2, 3], 2: [1], 3: [1, 4], 4: [3]}
    links = s.links()
    assert links[2].down == 20 * 1e6 / 8 and links[4].down == 20.5 * 1e6 / 8
    assert all(l.up == 50 * 1e6 / 8 for l in links.values())
    assert all(0.001 <= l.latency <= 0.05 for l in links.values())


@pytest.mark.parametrize("enable", [False, True])
def test_every_key_survives_freeze(tmp_path, enable):
    cfg = make_cfg(tmp_path, opts=["bittorrent.enable", enable,
                                   "bittorrent.piece_size", 131072,
                                   "bittorrent.network.upload_dist", "uniform(10,100)"])
    cfg.freeze(save=False)
    got = leaves(cfg.bittorrent)
    want = dict(DEFAULTS, **{"enable": enable, "piece_size": 131072,
                             "network.upload_dist": "uniform(10,100)"})
    assert got == want
    assert BitTorrentSettings.from_cfg(cfg).enable is enable


def test_freeze_with_save_writes_node(tmp_path):
    cfg = make_cfg(tmp_path, opts=["bittorrent.enable", True])
    cfg.freeze(inform=False, save=True)
    text = (tmp_path / "config.yaml").read_text()
    assert "bittorrent:" in text and "piece_size: 262144" in text and "upload_dist" in text


def test_command_line_forms_merge(tmp_path):
    cfg = make_cfg(tmp_path, opts=[
        "bittorrent.enable", "True",
        "bittorrent.timeout", "5",                       # int -> float
        "bittorrent.network.upload", "12",
        "bittorrent.network.download_per_client", "[1, 2, 3, 4]",
        "bittorrent.network.latency_dist", "choice(0, 0.01)",
        "bittorrent.topology", "ring",
    ])
    s = BitTorrentSettings.from_cfg(cfg)
    assert s.timeout == 5.0 and s.network_upload == 12.0
    assert s.network_download_per_client == (1, 2, 3, 4)
    assert s.neighbours()[1] == [2, 4]


# --------------------------------------------------------------------------- #
# bad configs: ConfigError naming key and value, before anything runs
# --------------------------------------------------------------------------- #

def assert_config_error(exc_info, field, value=None):
    e = exc_info.value
    assert isinstance(e, ConfigError)
    assert e.field == field, (e.field, str(e))
    assert field in str(e)
    if value is not None:
        assert e.value == value
        assert repr(value)[:20] in str(e)


@pytest.mark.parametrize("bad", ["bittorrent.pice_size", "bittorrent.foo",
                                 "bittorrent.network.uplod"])
def test_unknown_key_hint_from_merge_from_list(tmp_path, bad):
    cfg = make_cfg(tmp_path)
    with pytest.raises((KeyError, AssertionError)) as ei:
        cfg.merge_from_list([bad, 1])
    err = unknown_key_hint(ei.value, 1)
    assert isinstance(err, ConfigError) and err.field == bad and err.value == 1
    assert err.reason.startswith("unknown key")
    if bad == "bittorrent.pice_size":
        assert "did you mean bittorrent.piece_size?" in err.reason
    if bad == "bittorrent.network.uplod":
        assert "did you mean bittorrent.network.upload?" in err.reason
    if bad == "bittorrent.foo":
        assert "bittorrent.piece_size" in err.reason  # lists the real keys


def test_is_unknown_key_error(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(AssertionError) as ei:
        cfg.merge_from_list(["bittorrent.nope", 1])
    assert is_unknown_key_error(ei.value)
    assert is_unknown_key_error(KeyError("Non-existent config key: bittorrent.x"))
    assert not is_unknown_key_error(AssertionError("Please specify the cfg.federate.mode"))
    assert not is_unknown_key_error(ValueError("Non-existent key: x"))


@pytest.mark.parametrize("opts,field,words", [
    (["bittorrent.network.upload", "uniform(1,2)"], "bittorrent.network.upload",
     "bittorrent.network.upload_dist"),
    (["bittorrent.network.latency", "[0, 1]"], "bittorrent.network.latency",
     "bittorrent.network.latency_per_client"),
    (["bittorrent.secret", "1234"], "bittorrent.secret", "quote it twice"),
    (["bittorrent.piece_size", "big"], "bittorrent.piece_size", "type int"),
])
def test_type_mismatch_hint(tmp_path, opts, field, words):
    cfg = make_cfg(tmp_path)
    with pytest.raises(ValueError) as ei:
        cfg.merge_from_list(opts)
    err = type_mismatch_hint(ei.value)
    assert isinstance(err, ConfigError) and err.field == field
    assert words in err.reason
    assert type_mismatch_hint(ValueError("something else")) is None
    assert type_mismatch_hint(KeyError("x")) is None


def test_unknown_key_hint_from_yaml(tmp_path):
    y = tmp_path / "cfg.yaml"
    y.write_text("bittorrent:\n  enabel: true\n")
    cfg = make_cfg(tmp_path)
    with pytest.raises(KeyError) as ei:
        cfg.merge_from_file(str(y))
    err = unknown_key_hint(ei.value)
    assert err.field == "bittorrent.enabel"
    assert "did you mean bittorrent.enable?" in err.reason
    assert unknown_key_hint("federate.clinet_num").reason.endswith("federate.client_num?")
    assert unknown_key_hint(ValueError("nonsense here")).field == "config"


BAD_ALWAYS = [  # rejected even with enable False
    ("bittorrent.piece_size", -1),
    ("bittorrent.piece_size", 0),
    ("bittorrent.piece_size", 128 * 1024 * 1024),
    ("bittorrent.block_size", 256 * 1024),
    ("bittorrent.min_completion_ratio", 1.5),
    ("bittorrent.min_completion_ratio", -0.1),
    ("bittorrent.insufficient_policy", "wait"),
    ("bittorrent.missing_policy", "zero"),
    ("bittorrent.topology", "star"),
    ("bittorrent.timeout", 0.0),
    ("bittorrent.timeout", -3.0),
    ("bittorrent.keep_rounds", 0),
    ("bittorrent.dataplane_port", 70000),
    ("bittorrent.dataplane_port", -1),
    ("bittorrent.seed", -2),
    ("bittorrent.degree", 0),
    ("bittorrent.max_retries", -1),
    ("bittorrent.first_copy_wait", -0.5),
    ("bittorrent.tick_interval", 0.0),
    ("bittorrent.network.upload", -5.0),
    ("bittorrent.network.latency", -0.1),
]


@pytest.mark.parametrize("enable", [False, True])
@pytest.mark.parametrize("key,value", BAD_ALWAYS)
def test_bad_single_values(tmp_path, enable, key, value):
    cfg = make_cfg(tmp_path)
    with pytest.raises(ConfigError) as ei:
        cfg.merge_from_list(["bittorrent.enable", enable, key, value])
    assert_config_error(ei, key, value)


BAD_ENABLED = [  # (opts, field, value) rejected when enable is True
    (["bittorrent.block_size", 65536, "bittorrent.piece_size", 32768],
     "bittorrent.block_size", 65536),
    (["bittorrent.credit_bytes", 1000], "bittorrent.credit_bytes", 1000),
    (["bittorrent.min_requests_per_peer", 100], "bittorrent.min_requests_per_peer", 100),
    (["bittorrent.keepalive_interval", 400.0], "bittorrent.keepalive_interval", 400.0),
    (["bittorrent.topology", "explicit", "bittorrent.neighbors", [[1, 2, 99], [2, 3], [3, 4]]],
     "bittorrent.neighbors", [99]),
    (["bittorrent.topology", "explicit", "bittorrent.neighbors", [[1, 2], [3, 4]]],
     "bittorrent.neighbors", [3, 4]),
    (["bittorrent.topology", "explicit", "bittorrent.neighbors", [[1, 1, 2], [2, 3, 4]]],
     "bittorrent.neighbors", [1]),
    (["bittorrent.topology", "random_regular", "bittorrent.degree", 4],
     "bittorrent.degree", 4),
    (["bittorrent.network.upload_per_client", [10, 20, 30]],
     "bittorrent.network.upload_per_client", [10, 20, 30]),
    (["bittorrent.network.latency_per_client", [0.1, 0.1, 0.1, -0.1]],
     "bittorrent.network.latency_per_client", -0.1),
    (["bittorrent.network.download_dist", "gamma(1, 2)"],
     "bittorrent.network.download_dist", "gamma(1, 2)"),
    (["bittorrent.network.upload_dist", "uniform(1, 2)",
      "bittorrent.network.upload_per_client", [1, 2, 3, 4]],
     "bittorrent.network.upload_dist", "uniform(1, 2)"),
]


@pytest.mark.parametrize("opts,field,value", BAD_ENABLED)
def test_bad_enabled_configs(tmp_path, opts, field, value):
    # accepted while disabled (only single-key checks run) ...
    cfg = make_cfg(tmp_path, opts=opts)
    # ... rejected as soon as the plugin is enabled
    with pytest.raises(ConfigError) as ei:
        cfg.merge_from_list(["bittorrent.enable", True])
    assert_config_error(ei, field, value)
    # and in one merge
    cfg2 = make_cfg(tmp_path)
    with pytest.raises(ConfigError) as ei:
        cfg2.merge_from_list(["bittorrent.enable", True] + opts)
    assert_config_error(ei, field, value)


def test_make_global_eval_is_accepted(tmp_path):
    """The server fetches the clients' agreed aggregate to evaluate it."""
    cfg = make_cfg(tmp_path)
    cfg.merge_from_list(["bittorrent.enable", True, "federate.make_global_eval", True])
    assert cfg.federate.make_global_eval is True


def test_bad_mode_direct_check(tmp_path):
    # FS's own check asserts on the mode first when merging; ours names the key too
    cfg = make_cfg(tmp_path, opts=["bittorrent.enable", True])
    cfg.federate.mode = "cluster"
    with pytest.raises(ConfigError) as ei:
        check_bittorrent_cfg(cfg)
    assert_config_error(ei, "federate.mode", "cluster")


def test_explicit_unknown_client_message(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(ConfigError) as ei:
        cfg.merge_from_list(["bittorrent.enable", True, "bittorrent.topology", "explicit",
                             "bittorrent.neighbors", "[[1, 2, 3, 4], [2, 99]]"])
    assert "99" in str(ei.value) and "1..4" in ei.value.reason


def test_bad_types_in_cfg(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.bittorrent.enable = "yes"
    with pytest.raises(ConfigError) as ei:
        check_bittorrent_cfg(cfg)
    assert_config_error(ei, "bittorrent.enable", "yes")
    cfg = make_cfg(tmp_path)
    cfg.bittorrent.network.upload_per_client = 5       # yacs lets an int replace a list
    with pytest.raises(ConfigError) as ei:
        check_bittorrent_cfg(cfg)
    assert_config_error(ei, "bittorrent.network.upload_per_client", 5)


def test_client_count_checks_wait_for_client_num(tmp_path):
    # standalone: client_num may be 0 until the data is loaded; checked again at freeze
    cfg = make_cfg(tmp_path, client_num=0, opts=[
        "bittorrent.enable", True, "bittorrent.topology", "explicit",
        "bittorrent.neighbors", [[1, 2], [2, 9]],
        "bittorrent.network.upload_per_client", [1, 2, 3]])
    cfg.federate.client_num = 4
    with pytest.raises(ConfigError) as ei:
        cfg.freeze(save=False)
    assert ei.value.field in ("bittorrent.neighbors", "bittorrent.network.upload_per_client")


def test_swarm_config_errors_prefixed():
    with pytest.raises(ConfigError) as ei:
        BitTorrentSettings(credit_bytes=100)
    assert ei.value.field == "bittorrent.credit_bytes"
    # through SwarmConfig itself (a bypass of our own single-key checks)
    s = BitTorrentSettings()
    object.__setattr__(s, "request_queue_time", -1.0)
    with pytest.raises(ConfigError) as ei:
        s.swarm_config()
    assert ei.value.field == "bittorrent.request_queue_time" and ei.value.value == -1.0


# --------------------------------------------------------------------------- #
# BitTorrentSettings
# --------------------------------------------------------------------------- #

def test_settings_round_trip(tmp_path):
    cfg = make_cfg(tmp_path, client_num=6, opts=[
        "seed", 7,
        "bittorrent.enable", True,
        "bittorrent.piece_size", 65536,
        "bittorrent.max_upload_slots", 3,
        "bittorrent.topology", "random_regular",
        "bittorrent.degree", 3,
        "bittorrent.network.upload", 8,
        "bittorrent.network.download_dist", "uniform(10, 100)",
        "bittorrent.network.latency_per_client", [0, 0.01, 0.02, 0.03, 0.04, 0.05],
    ])
    cfg.freeze(save=False)
    s = BitTorrentSettings.from_cfg(cfg)
    assert s.seed == 7                                    # -1 -> cfg.seed
    assert s.db_dir == os.path.join(str(tmp_path), "bittorrent")
    assert s.client_num == 6 and s.mode == "standalone"
    assert s == BitTorrentSettings.from_cfg(cfg)
    hash(s)

    sc = s.swarm_config()
    assert isinstance(sc, SwarmConfig)
    assert sc.piece_size == 65536 and sc.max_upload_slots == 3 and sc.seed == 7
    assert sc.block_size == 16384 and sc.credit_bytes == 4194304

    links = s.links()
    assert sorted(links) == [1, 2, 3, 4, 5, 6]
    for i, link in links.items():
        assert isinstance(link, LinkProfile)
        assert link.up == 8 * 1e6 / 8 == 1e6                      # Mbit/s -> bytes/s
        assert 10 * 1e6 / 8 <= link.down <= 100 * 1e6 / 8
        assert link.latency == pytest.approx((i - 1) * 0.01)
    assert s.links() == links                                      # deterministic
    assert s.links([2, 5]) == {2: links[2], 5: links[5]}           # per id, not per position
    assert len({l.down for l in links.values()}) > 1
    with pytest.raises(ConfigError):
        s.links([7])

    nb = s.neighbours()
    assert sorted(nb) == [1, 2, 3, 4, 5, 6]
    for a, ns in nb.items():
        assert len(ns) == 3 and a not in ns
        assert all(a in nb[b] for b in ns)
    assert nb == s.neighbours()

    # a different seed gives different draws
    s2 = dataclasses.replace(s, seed=8)
    assert s2.links() != links


def test_settings_explicit_seed_and_db_dir(tmp_path):
    cfg = make_cfg(tmp_path, opts=["bittorrent.seed", 3, "bittorrent.db_dir", "/tmp/btdb",
                                   "bittorrent.secret", "s3cret"])
    s = BitTorrentSettings.from_cfg(cfg)
    assert s.seed == 3 and s.db_dir == "/tmp/btdb" and s.secret == "s3cret"
    full = s.neighbours()
    assert full == {i: [j for j in range(1, 5) if j != i] for i in range(1, 5)}
    default_links = s.links()
    assert all(l == LinkProfile(up=12.5e6, down=12.5e6, latency=0.005)
               for l in default_links.values())


@pytest.mark.parametrize("topology,extra", [
    ("full", []), ("ring", []),
    ("random_regular", ["bittorrent.degree", 4]),
    ("explicit", ["bittorrent.neighbors", [[1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 1]]]),
])
def test_neighbours_of_a_subset_never_fail(tmp_path, topology, extra):
    cfg = make_cfg(tmp_path, client_num=6,
                   opts=["bittorrent.enable", True, "bittorrent.topology", topology] + extra)
    s = BitTorrentSettings.from_cfg(cfg)
    whole = s.neighbours()
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    for subset in ([1], [2, 5], [1, 3, 5], [1, 2, 4, 6], [2, 3, 4, 5, 6]):
        g = s.neighbours(subset)
        assert sorted(g) == subset
        for a, ns in g.items():
            assert a not in ns and all(a in g[b] for b in ns)
        assert is_connected(g)
        assert g == s.neighbours(subset)
    # explicit keeps configured links inside the subset
    if topology == "explicit":
        assert s.neighbours([1, 2, 3]) == {1: [2], 2: [1, 3], 3: [2]}
        assert s.neighbours([1, 3]) == {1: [3], 3: [1]}       # bridged
    with pytest.raises(ConfigError):
        s.neighbours([1, 7])


def test_from_cfg_validates_even_when_disabled(tmp_path):
    cfg = make_cfg(tmp_path, opts=["bittorrent.block_size", 65536, "bittorrent.piece_size", 32768])
    with pytest.raises(ConfigError) as ei:
        BitTorrentSettings.from_cfg(cfg)
    assert ei.value.field == "bittorrent.block_size"


def test_missing_node_named():
    cfg = CN()
    cfg.seed = 0
    with pytest.raises(ConfigError) as ei:
        BitTorrentSettings.from_cfg(cfg)
    assert ei.value.field == "bittorrent"
    check_bittorrent_cfg(cfg)  # a cfg without the node is none of our business


def test_module_all_exports():
    for name in btc.__all__:
        assert hasattr(btc, name)


@pytest.mark.parametrize("opts,field,fix", [
    (["asyn.use", "True"], "asyn.use", "set asyn.use False"),
    (["federate.use_ss", "True"], "federate.use_ss", "set federate.use_ss False"),
    (["vertical.use", "True"], "vertical.use", "set vertical.use False"),
    (["quantization.method", "uniform"], "quantization.method", "set quantization.method"),
    (["nbafl.use", "True"], "nbafl.use", "set nbafl.use False"),
    (["federate.method", "local"], "federate.method", "bittorrent.enable False"),
])
def test_features_that_cannot_work_peer_to_peer_are_refused_when_enabled(opts, field, fix):
    from fs_bittorrent.errors import ConfigError
    from federatedscope.core.configs.config import global_cfg
    cfg = global_cfg.clone()
    cfg.federate.client_num = 4
    cfg.merge_from_list(opts, check_cfg=False)
    cfg.merge_from_list(["bittorrent.enable", "False"])  # fine while disabled
    with pytest.raises(ConfigError) as err:
        cfg.merge_from_list(["bittorrent.enable", "True"])
    assert err.value.field == field
    # every refusal says what to do: the key to change, or the exchange off
    assert fix in str(err.value) and "bittorrent.enable False" in str(err.value)


@pytest.mark.parametrize("opts", [["fedopt.use", "True"], ["aggregator.robust_rule", "krum"],
                                  ["federate.online_aggr", "True"]])
def test_server_aggregation_features_run_at_every_client(opts):
    """FS's own aggregator runs at every client: no refusal."""
    from federatedscope.core.configs.config import global_cfg
    cfg = global_cfg.clone()
    cfg.federate.client_num = 4
    cfg.merge_from_list(opts + ["bittorrent.enable", "True"])
    assert cfg.bittorrent.enable is True


@pytest.mark.parametrize("key, value", [("lead_pieces", -1), ("lead_requests", 0)])
def test_bad_lead_keys_are_named_and_the_config_kept(tmp_path, key, value):
    cfg = make_cfg(tmp_path, opts=["bittorrent.enable", True])
    before = leaves(cfg.bittorrent)
    with pytest.raises(ConfigError) as ei:
        cfg.merge_from_list([f"bittorrent.{key}", value])
    assert ei.value.field == f"bittorrent.{key}" and ei.value.value == value
    # FS's merge_from_list sets, then checks: the bad key is refused and
    # every other key is as it was
    after = leaves(cfg.bittorrent)
    assert {k: v for k, v in after.items() if k != key} == \
        {k: v for k, v in before.items() if k != key}
    with pytest.raises(ConfigError):   # and the run cannot start with it
        cfg.freeze(save=False)


def test_lead_keys_reach_the_swarm_config(tmp_path):
    cfg = make_cfg(tmp_path, opts=["bittorrent.lead_pieces", 5, "bittorrent.lead_requests", 3])
    sc = BitTorrentSettings.from_cfg(cfg).swarm_config()
    assert (sc.lead_pieces, sc.lead_requests) == (5, 3)
    assert SwarmConfig().lead_pieces == 0   # the core's default: off (the simulator's)
