"""scripts/wire_trace.py: the switch-side upload trace and the exchanges it finds."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import wire_trace  # noqa: E402

MBIT = 1e6 / 8
STEP = 0.002


def _write_trace(path, phases, ports=3, t0=1000.0):
    """``phases``: (seconds, fraction of 100 Mbit/s each client uploads);
    port 0 (the server) stays silent."""
    t, total = t0, [0] * ports
    lines = ["time," + ",".join(f"p{i}" for i in range(ports))]
    lines.append(f"{t:.4f}," + ",".join(map(str, total)))
    for seconds, fraction in phases:
        for _ in range(round(seconds / STEP)):
            t += STEP
            for p in range(1, ports):
                total[p] += int(100 * MBIT * STEP * fraction)
            lines.append(f"{t:.4f}," + ",".join(map(str, total)))
    path.write_text("\n".join(lines) + "\n")


def test_two_exchanges_with_their_ramp_and_length(tmp_path):
    path = tmp_path / "trace.csv"
    _write_trace(path, [(0.5, 0.0), (0.02, 0.5), (0.98, 1.0), (0.5, 0.0), (0.4, 1.0), (0.3, 0.0)])
    trace = wire_trace.load(str(path))
    periods = wire_trace.active_periods(trace, [100.0] * 3, bin_s=0.02)
    assert len(periods) == 2
    first, second = periods
    assert first.end - first.start == pytest.approx(1.0, abs=0.021)
    assert second.end - second.start == pytest.approx(0.4, abs=0.021)
    assert first.bins[0] == pytest.approx(0.5, abs=0.06)      # the ramp
    assert sum(first.bins[1:-1]) / len(first.bins[1:-1]) == pytest.approx(1.0, abs=0.02)
    lines = wire_trace.summary_lines(periods, 0.02)
    assert len(lines) == 2 + 2 + 1 and lines[2].startswith("| 0 | 1.0")


def test_a_short_pause_stays_inside_one_exchange(tmp_path):
    path = tmp_path / "trace.csv"
    _write_trace(path, [(0.2, 0.0), (0.3, 1.0), (0.06, 0.0), (0.3, 1.0), (0.4, 0.0)])
    periods = wire_trace.active_periods(wire_trace.load(str(path)), [100.0] * 3,
                                        bin_s=0.02, gap=0.2)
    assert len(periods) == 1
    p = periods[0]
    assert p.end - p.start == pytest.approx(0.66, abs=0.041)
    assert min(p.bins) < 0.1                                   # the pause is counted


def test_the_slow_uplink_rate_is_its_capacity(tmp_path):
    """Use is measured against each host's own rate (heterogeneous links)."""
    path = tmp_path / "trace.csv"
    _write_trace(path, [(0.2, 0.0), (0.5, 0.2), (0.4, 0.0)])   # 20 Mbit/s each
    periods = wire_trace.active_periods(wire_trace.load(str(path)), [100.0, 20.0, 20.0])
    assert len(periods) == 1
    assert sum(periods[0].bins) / len(periods[0].bins) == pytest.approx(1.0, abs=0.05)


def test_sample_reads_every_port_in_host_order_and_stops(tmp_path):
    root = tmp_path / "net"
    for name, value in (("p0", 10), ("p2", 30), ("p10", 40), ("p1", 20), ("br0", 99)):
        (root / name / "statistics").mkdir(parents=True)
        (root / name / "statistics" / "rx_bytes").write_text(f"{value}\n")
    assert wire_trace.switch_ports(str(root)) == ["p0", "p1", "p2", "p10"]
    out = tmp_path / "trace.csv"
    written = wire_trace.sample(str(out), interval=0.01, duration=0.05, root=str(root))
    assert 1 <= written <= 10
    trace = wire_trace.load(str(out))
    assert trace.ports == ["p0", "p1", "p2", "p10"]
    assert trace.counts[0] == [10, 20, 30, 40]


def test_no_ports_names_the_directory(tmp_path):
    with pytest.raises(SystemExit, match="no switch ports under"):
        wire_trace.sample(str(tmp_path / "out.csv"), duration=0.01, root=str(tmp_path))


def test_a_line_cut_short_is_skipped_and_an_empty_trace_refused(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time,p0,p1\n1.0,0,0\n1.002,0,100\n1.004,0\n")
    assert len(wire_trace.load(str(path)).times) == 2
    empty = tmp_path / "empty.csv"
    empty.write_text("time,p0,p1\n")
    with pytest.raises(ValueError, match="no samples"):
        wire_trace.load(str(empty))
