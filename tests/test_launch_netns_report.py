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
