"""scripts/launch_netns.py: the busiest uplink's seconds beside a round's T."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import launch_netns  # noqa: E402


def test_busiest_uplink_and_mean_at_each_clients_own_rate():
    # 12.5 MB at 100 Mbit/s is 1 s; 6.25 MB at 20 Mbit/s is 2.5 s: the slow one is busiest
    row = {"round": 1, "bytes_up": {"1": 12_500_000, "2": 6_250_000, "3": 10_000_000}}
    seconds, client, mean = launch_netns.uplink_seconds(row, {1: 100.0, 2: 20.0, 3: 100.0})
    assert client == 2
    assert seconds == pytest.approx(2.5)
    assert mean == pytest.approx((1.0 + 2.5 + 0.8) / 3)


def test_a_row_without_upload_counts_has_no_figure():
    assert launch_netns.uplink_seconds({"round": 0}, {1: 100.0}) is None


def test_a_client_without_a_rate_is_named_and_the_row_is_untouched():
    row = {"round": 2, "bytes_up": {"1": 100, "9": 100}}
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in row.items()}
    with pytest.raises(ValueError, match=r"bytes_up: client '9'"):
        launch_netns.uplink_seconds(row, {1: 100.0, 2: 100.0})
    assert row == before


def test_a_rounds_load_is_the_mean_over_its_exchange():
    from cpu_load import CpuSample
    samples = [CpuSample(100.0, 100.5, busy=0.6, steal=0.02),
               CpuSample(100.5, 101.0, busy=0.8, steal=0.04)]
    row = {"round": 1, "started_wall": 100.0, "exchange_time": 1.0}
    busy, steal = launch_netns.round_load(row, samples)
    assert busy == pytest.approx(0.7) and steal == pytest.approx(0.03)


def test_a_row_without_a_start_time_has_no_load():
    # rounds written by a tree from before started_wall, or standalone (virtual clock)
    assert launch_netns.round_load({"round": 1, "exchange_time": 1.0}, []) is None
    assert launch_netns.round_load({"round": 1, "started_wall": None,
                                    "exchange_time": 1.0}, []) is None


def test_the_tree_summary_counts_rounds_at_or_above_target():
    line = launch_netns.tree_summary([0.85, 0.9, 0.95], [(0.6, 0.01), (0.8, 0.03)])
    assert line == ("3 rounds: median eta 0.900 (0.850-0.950), 2 >= 0.9; "
                    "CPU busy median 70 %, steal 2.0 %")
    assert launch_netns.tree_summary([], []) == "no rounds after the first"


def test_rounds_with_high_steal_are_flagged():
    line = launch_netns.tree_summary([0.8, 0.9], [(0.6, 0.25), (0.7, 0.05)])
    assert line.endswith("; 1 of 2 rounds with steal above 10 %: the machine, "
                         "not only the exchange, set them")


def test_participants_are_labelled_by_role_and_pid_and_nothing_else_is():
    label = launch_netns.participant_label
    cmd = "/x/python -m fs_bittorrent run --cfg c.yaml distribute.use True distribute.role {}"
    assert label(cmd.format("server"), 7) == "server:7"
    assert label(cmd.format("client"), 8) == "client:8"
    assert label("ip netns exec h3 " + cmd.format("client"), 9) == "client:9"
    assert label("python scripts/launch_netns.py --cfg c.yaml", 10) is None
    assert label("python other.py distribute.role client", 11) is None


def test_a_rounds_cpu_is_the_mean_client_and_the_server_over_its_exchange():
    from cpu_load import ProcSample
    samples = [ProcSample(99.0, {"client:1": 0.0, "client:2": 0.0, "server:9": 0.0}),
               ProcSample(101.5, {"client:1": 0.5, "client:2": 0.3, "server:9": 0.05})]
    row = {"round": 1, "started_wall": 99.0, "exchange_time": 2.5}
    clients, server = launch_netns.round_cpu(row, samples)
    assert clients == pytest.approx(0.4) and server == pytest.approx(0.05)
    assert launch_netns.round_cpu({"round": 1, "exchange_time": 1.0}, samples) is None
    assert launch_netns.round_cpu(row, []) is None
    only_server = [ProcSample(s.time, {"server:9": s.cpu["server:9"]}) for s in samples]
    assert launch_netns.round_cpu(row, only_server) is None


def test_the_tree_summary_gives_the_median_cpu_per_client_and_exchange():
    line = launch_netns.tree_summary([0.85, 0.9, 0.95], [(0.6, 0.01), (0.8, 0.03)],
                                     [0.21, 0.25, 0.23])
    assert line.endswith("; CPU per client and exchange median 230 ms")


def test_the_tree_summary_gives_the_median_start_spread():
    line = launch_netns.tree_summary([0.9, 0.91], [], (), [0.020, 0.040, 0.100])
    assert line.endswith("; start spread median 40 ms"), line
    assert "start spread" not in launch_netns.tree_summary([0.9], [])


def test_a_shift_larger_than_the_rounds_spread_excludes_zero_and_equal_trees_do_not():
    import random
    rng = random.Random(1)
    base = [0.89 + rng.uniform(-0.01, 0.01) for _ in range(15)]
    same = [0.89 + rng.uniform(-0.01, 0.01) for _ in range(15)]
    better = [e + 0.03 for e in base]
    diff, lo, hi = launch_netns.compare_etas(base, better)
    assert diff == pytest.approx(0.03) and 0 < lo <= diff <= hi
    diff, lo, hi = launch_netns.compare_etas(base, same)
    assert lo <= 0 <= hi and lo <= diff <= hi
    # seeded: the same rounds give the same interval
    assert launch_netns.compare_etas(base, same) == (diff, lo, hi)


def test_comparing_with_no_rounds_names_the_empty_side_and_changes_nothing():
    base = [0.9, 0.91]
    with pytest.raises(ValueError, match="other has no rounds"):
        launch_netns.compare_etas(base, [])
    with pytest.raises(ValueError, match="base has no rounds"):
        launch_netns.compare_etas([], base)
    assert base == [0.9, 0.91]
