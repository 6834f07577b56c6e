"""scripts/cpu_load.py: the machine's CPU load and steal over a round's exchange."""
from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import cpu_load  # noqa: E402
from cpu_load import CpuSample, CpuSampler, load_during, parse_cpu_line  # noqa: E402


def test_the_aggregate_line_splits_into_total_idle_and_steal():
    # user nice system idle iowait irq softirq steal guest guest_nice
    total, idle, steal = parse_cpu_line("cpu  100 5 40 800 10 3 2 40 7 0\n")
    assert (total, idle, steal) == (1000, 810, 40)     # guest is inside user already


@pytest.mark.parametrize("line", ["cpu0 1 2 3 4 5 6 7 8", "cpu 1 2 3", "cpu a b c d e f g h", ""])
def test_anything_but_the_aggregate_line_is_named_in_the_error(line):
    with pytest.raises(ValueError, match=r"/proc/stat: .* is not the aggregate 'cpu' line"):
        parse_cpu_line(line)


def test_a_window_weights_each_sample_by_its_overlap():
    samples = [CpuSample(0.0, 1.0, busy=0.2, steal=0.0),
               CpuSample(1.0, 2.0, busy=0.8, steal=0.1),
               CpuSample(2.0, 3.0, busy=0.4, steal=0.3)]
    busy, steal = load_during(samples, 0.5, 2.0)       # half of the 1st, the 2nd, half of the 3rd
    assert busy == pytest.approx((0.5 * 0.2 + 0.8 + 0.5 * 0.4) / 2.0)
    assert steal == pytest.approx((0.1 + 0.5 * 0.3) / 2.0)


def test_a_window_the_sampler_did_not_cover_has_no_figure():
    samples = [CpuSample(0.0, 1.0, busy=0.5, steal=0.0)]
    assert load_during(samples, 0.8, 1.0) is None      # 0.2 s of 1 s covered
    assert load_during([], 0.0, 1.0) is None


def test_a_window_of_no_length_is_refused_and_the_samples_are_untouched():
    samples = [CpuSample(0.0, 1.0, busy=0.5, steal=0.0)]
    before = list(samples)
    with pytest.raises(ValueError, match=r"seconds: 0 must be > 0"):
        load_during(samples, 0.0, 0)
    assert samples == before


def test_a_bad_period_is_refused():
    with pytest.raises(ValueError, match=r"period: 0 must be > 0"):
        CpuSampler(period=0)


@pytest.mark.skipif(not os.path.exists(cpu_load.PROC_STAT), reason="no /proc/stat here")
def test_the_sampler_reads_this_machine_while_it_runs():
    t0 = time.time()
    sampler = CpuSampler(period=0.02).start()
    deadline = time.time() + 2.0
    while len(sampler.samples) < 3 and time.time() < deadline:
        sum(i * i for i in range(20000))               # some load of our own
    sampler.stop()
    t1 = time.time()
    assert len(sampler.samples) >= 3
    for s in sampler.samples:
        assert t0 <= s.start < s.end <= t1
        assert 0.0 <= s.busy <= 1.0 and 0.0 <= s.steal <= 1.0
    n = len(sampler.samples)
    time.sleep(0.06)
    assert len(sampler.samples) == n                   # stopped means stopped


# ---- per process ----------------------------------------------------------------

from cpu_load import ProcSample, ProcessCpuSampler, cpu_during, parse_proc_stat  # noqa: E402


def test_a_stat_line_gives_user_plus_system_even_with_parens_in_the_name():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    line = "4242 (py (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0\n"
    assert parse_proc_stat(line) == pytest.approx(300 / cpu_load.CLK_TCK)


@pytest.mark.parametrize("line", ["", "4242 python S 1", "4242 (python) S 1 2 3 4 5 6 7 8 9 x 5",
                                  "no parens at all 1 2 3 4 5 6 7 8 9 10 11 12 13 14"])
def test_anything_but_a_stat_line_is_named_in_the_error(line):
    with pytest.raises(ValueError, match=r"/proc/<pid>/stat: .* is not a stat line"):
        parse_proc_stat(line)


def test_cpu_in_a_window_is_interpolated_at_both_ends_per_label():
    samples = [ProcSample(10.0, {"client:1": 0.0, "server:9": 1.0}),
               ProcSample(11.0, {"client:1": 0.5, "server:9": 1.0}),
               ProcSample(12.0, {"client:1": 1.5, "server:9": 2.0, "client:2": 0.3})]
    used = cpu_during(samples, 10.5, 1.0)
    # client:1 at 10.5 is 0.25, at 11.5 is 1.0; server 1.0 -> 1.5; client:2 absent at the start
    assert used == pytest.approx({"client:1": 0.75, "server:9": 0.5})
    assert cpu_during(samples, 10.0, 2.0) == pytest.approx({"client:1": 1.5, "server:9": 1.0})


def test_a_window_the_process_sampler_did_not_cover_has_no_figure_and_bad_length_is_refused():
    samples = [ProcSample(10.0, {"a": 0.0}), ProcSample(11.0, {"a": 1.0})]
    assert cpu_during(samples, 9.9, 0.5) is None            # before the first sample
    assert cpu_during(samples, 10.8, 0.5) is None           # past the last
    assert cpu_during([], 10.0, 0.5) is None
    with pytest.raises(ValueError, match=r"seconds: 0 must be > 0"):
        cpu_during(samples, 10.0, 0)
    assert [s.cpu for s in samples] == [{"a": 0.0}, {"a": 1.0}]      # untouched


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="no /proc here")
def test_the_process_sampler_measures_what_this_process_burns():
    me = os.getpid()
    sampler = ProcessCpuSampler(lambda cmd, pid: "me" if pid == me else None,
                                period=0.02).start()
    time.sleep(0.1)
    t0, c0 = time.time(), time.process_time()
    while time.process_time() - c0 < 0.5:
        sum(i * i for i in range(20000))                    # half a second of our CPU
    t1, c1 = time.time(), time.process_time()
    time.sleep(0.1)
    sampler.stop()
    assert sampler.samples and all(set(s.cpu) == {"me"} for s in sampler.samples)
    used = cpu_during(sampler.samples, t0, t1 - t0)
    # clock ticks (10 ms) and the sampler's own thread: within 0.1 s of process_time
    assert used["me"] == pytest.approx(c1 - c0, abs=0.1)
    with pytest.raises(ValueError, match=r"period: -1 must be > 0"):
        ProcessCpuSampler(lambda cmd, pid: None, period=-1)
