"""Measured uplinks: reported in bt_stats, relayed in bt_start, used for the
first-copy gate; bad figures are ignored with a warning, never fatal."""
from __future__ import annotations

import importlib.util
import logging
import math

import pytest

from fs_bittorrent.fs import wire

@pytest.fixture
def warnings(caplog):
    """WARNING records of the package, also after an FS run in this process
    turned the package logger's propagation off."""
    pkg = logging.getLogger("fs_bittorrent")
    listen = not pkg.propagate
    if listen:
        pkg.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
        yield caplog
    if listen:
        pkg.removeHandler(caplog.handler)


BAD = [float("nan"), float("inf"), -5.0, 1e30, "fast", True, None]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_a_bad_uplink_in_bt_stats_is_ignored_with_a_warning_naming_it(bad, warnings):
    content = {**wire.pack_stats(1, 10, 20, 3), "uplink": bad}
    assert wire.unpack_uplink(content) is None
    assert wire.unpack_stats(content)[0] == 1          # the rest of the stats still stands
    assert any("bt_stats.uplink" in r.getMessage() for r in warnings.records)


def test_relayed_uplink_table_keeps_good_entries_and_warns_about_the_rest(warnings):
    start = wire.pack_start(2, (), {}, 5.0, uplinks={1: 1.25e7, 2: 2.5e6, 3: float("nan"),
                                                   4: -1.0, 5: float("inf")})
    got = wire.unpack_start(start)
    assert got.uplinks == {1: 1.25e7, 2: 2.5e6} and got.round == 2 and got.timeout == 5.0
    text = " ".join(r.getMessage() for r in warnings.records)
    assert all(f"bt_start.uplinks[{k}]" in text for k in (3, 4, 5))
    assert wire.unpack_start(wire.pack_start(0, (), {}, 5.0)).uplinks == {}   # none measured yet


@pytest.mark.fs
@pytest.mark.skipif(importlib.util.find_spec("federatedscope") is None,
                    reason="FederatedScope is not installed: uplink relay test skipped")
def test_measured_uplinks_are_relayed_to_the_next_round_and_gate_the_plan(tmp_path, monkeypatch):
    """Each client reports its data plane's uplink at round end; the server
    relays the table in the next bt_start.  Round 0's report of client 2 is
    NaN: ignored (warned), so round 1 knows no full table and keeps the
    configured plan; round 1's figures are uniform, so round 2's clients
    switch the first-copy plan off.  Standalone clients have no data plane:
    the measurement is what this test supplies, the rest is the real run."""
    from fs_bittorrent.fs.entry import run_experiment
    from fs_bittorrent.fs.manager import ClientManager
    from fs_helpers import BT, round_stats, toy_cfg

    figures = {0: {1: 1.0e7, 2: math.nan, 3: 3.0e7}, 1: {1: 1.0e7, 2: 1.1e7, 3: 1.2e7}}
    original = ClientManager._measure

    def measured(self, s, now):
        original(self, s, now)
        self.uplink = figures.get(self.round, {}).get(self.worker.ID, 0.0)

    seen = {}
    original_config = ClientManager._round_config

    def recording(self, uplinks):
        config = original_config(self, uplinks)
        seen[(self.round, self.worker.ID)] = (dict(uplinks), config.first_copy_wait)
        return config

    monkeypatch.setattr(ClientManager, "_measure", measured)
    monkeypatch.setattr(ClientManager, "_round_config", recording)
    runner, _ = run_experiment(toy_cfg(tmp_path, clients=3, rounds=3), BT)
    stats = {s["round"]: s for s in round_stats(runner)}
    assert stats[0]["uplink"] == {"1": 1.0e7, "3": 3.0e7}               # NaN dropped
    assert stats[1]["uplink"] == {"1": 1.0e7, "2": 1.1e7, "3": 1.2e7}
    for c in (1, 2, 3):
        assert seen[(0, c)] == ({}, 2.0)                # nothing measured yet: as configured
        assert seen[(1, c)] == ({}, 2.0)                # client 2 unknown: as configured
        assert seen[(2, c)] == ({1: 1.0e7, 2: 1.1e7, 3: 1.2e7}, 0.0)    # uniform: plan off
    log = next((tmp_path / "exp").rglob("exp_print.log")).read_text()
    assert "ignoring bt_stats.uplink = nan" in log


def test_reported_uplink_is_the_best_of_the_last_rounds_so_a_starved_round_does_not_switch_the_plan_on():
    from fs_bittorrent.core.picker import uplinks_heterogeneous
    from fs_bittorrent.net.uplink import UplinkEstimate
    # Measured in shaped namespaces (MB/s): uniform 12.5 MB/s links, then a
    # round where CPU bursts starved two clients.
    rounds = [{1: 10.9, 2: 10.7, 3: 11.3}, {1: 9.7, 2: 2.3, 3: 9.1}, {1: 10.3, 2: 10.2, 3: 4.9}]
    estimates = {c: UplinkEstimate(window=4) for c in rounds[0]}
    reported = [{c: estimates[c].add(r[c] * 1e6) for c in r} for r in rounds]
    assert uplinks_heterogeneous(rounds[1].values())          # raw: the plan would go on
    assert not any(uplinks_heterogeneous(r.values()) for r in reported)
    assert reported[1][2] == 10.7e6 and reported[2][3] == 11.3e6


def test_uplink_estimate_follows_a_real_drop_after_its_window_and_ignores_nothing_measured():
    from fs_bittorrent.net.uplink import UplinkEstimate
    est = UplinkEstimate(window=2)
    assert est.value == 0.0 and est.add(0.0) == 0.0 and est.add(float("nan")) == 0.0
    assert est.add(10e6) == 10e6
    assert est.add(0.0) == 10e6                  # a round with nothing measured changes nothing
    assert est.add(2e6) == 10e6                  # one low round: still the best of two
    assert est.add(2e6) == 2e6                   # the link really is slower now
    with pytest.raises(ValueError, match="window"):
        UplinkEstimate(window=0)
