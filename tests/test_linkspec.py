"""Tests of the per-client link spec parser (numbers, lists, distributions)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_bittorrent.errors import ConfigError
from fs_bittorrent.sim.linkspec import parse_spec

F = "bittorrent.network.upload"
L = "bittorrent.network.latency"


def test_none_number_and_numeric_string():
    assert parse_spec(F, None, 3, 0, 100.0) == [100.0] * 3
    assert parse_spec(F, 20, 2, 0, 100.0) == [20.0, 20.0]
    assert parse_spec(F, 2.5, 1, 0, 100.0) == [2.5]
    assert parse_spec(F, "100", 2, 0, 1.0) == [100.0, 100.0]
    assert parse_spec(F, " 1.5e2 ", 1, 0, 1.0) == [150.0]
    assert parse_spec(F, None, 0, 0, 100.0) == []


def test_lists_and_list_literals():
    assert parse_spec(F, [100, 20, 5.5], 3, 0, 1.0) == [100.0, 20.0, 5.5]
    assert parse_spec(F, (1, 2), 2, 0, 1.0) == [1.0, 2.0]
    assert parse_spec(F, "[100, 20]", 2, 0, 1.0) == [100.0, 20.0]
    assert parse_spec(F, "[ 1 ,2, 3, ]", 3, 0, 1.0) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("spec", [[1, 2], "[1, 2]", [1, 2, 3, 4]])
def test_wrong_length_names_field_length_and_n(spec):
    with pytest.raises(ConfigError) as ei:
        parse_spec(F, spec, 3, 0, 1.0)
    e = ei.value
    assert e.field == F
    assert f"has {len(spec) if isinstance(spec, list) else 2} entries" in e.reason
    assert "3 clients" in e.reason


@pytest.mark.parametrize("spec", [0, -1, "0", "-5", [1, 0], [1, -2.0], "[1, 0]",
                                  "choice(1, 0)", "uniform(0, 10)", "uniform(-1, 10)",
                                  "normal(0, 1)", "normal(-3, 1)"])
def test_non_positive_rates_rejected(spec):
    n = len(spec) if isinstance(spec, list) else 2
    with pytest.raises(ConfigError) as ei:
        parse_spec(F, spec, n, 0, 1.0)
    assert ei.value.field == F


def test_latency_may_be_zero_not_negative():
    assert parse_spec(L, 0, 2, 0, 0.005) == [0.0, 0.0]
    assert parse_spec(L, [0, 0.01], 2, 0, 0.005) == [0.0, 0.01]
    assert parse_spec(L, "uniform(0, 0.01)", 5, 0, 0.005)
    assert all(v >= 0 for v in parse_spec(L, "normal(0.001, 0.1)", 200, 1, 0.005))
    for bad in (-0.001, [0, -1], "uniform(-1, 1)", "choice(0, -1)"):
        n = len(bad) if isinstance(bad, list) else 2
        with pytest.raises(ConfigError) as ei:
            parse_spec(L, bad, n, 0, 0.005)
        assert ei.value.field == L
    # explicit override of the field-name inference
    assert parse_spec("x", 0, 1, 0, 1.0, allow_zero=True) == [0.0]
    with pytest.raises(ConfigError):
        parse_spec("x.latency", 0, 1, 0, 1.0, allow_zero=False)


@pytest.mark.parametrize("spec", [
    "uniform(10, 100)", "normal(50, 20)", "lognormal(4.6, 0.5)", "choice(10, 20, 100)",
    "UNIFORM(1,2)", " choice( 5 ) ",
])
def test_distributions_deterministic_positive(spec):
    a = parse_spec(F, spec, 50, 7, 1.0)
    b = parse_spec(F, spec, 50, 7, 1.0)
    assert a == b and len(a) == 50
    assert all(v > 0 for v in a)


def test_distribution_ranges():
    u = parse_spec(F, "uniform(10, 20)", 500, 1, 1.0)
    assert all(10 <= v <= 20 for v in u)
    assert len(set(u)) > 100
    c = parse_spec(F, "choice(1, 2.5, 7)", 300, 1, 1.0)
    assert set(c) == {1.0, 2.5, 7.0}
    nrm = parse_spec(F, "normal(10, 100)", 300, 1, 1.0)
    assert min(nrm) == pytest.approx(0.1)  # clipped to mu / 100
    assert parse_spec(F, "uniform(5, 5)", 3, 1, 1.0) == [5.0] * 3
    assert parse_spec(F, "normal(5, 0)", 3, 1, 1.0) == [5.0] * 3


def test_seed_changes_draws():
    assert parse_spec(F, "uniform(1, 100)", 20, 1, 1.0) != parse_spec(F, "uniform(1, 100)", 20, 2, 1.0)
    # string seeds are deterministic too
    assert parse_spec(F, "uniform(1, 100)", 5, "0:x", 1.0) == parse_spec(F, "uniform(1, 100)", 5, "0:x", 1.0)


@pytest.mark.parametrize("spec", [
    "fast", "uniform(1)", "uniform(1, 2, 3)", "uniform(2, 1)", "normal(5, -1)",
    "lognormal(1, -1)", "choice()", "gamma(1, 2)", "uniform(a, b)", "[1, 2", "[1, x]",
    "__import__('os').system('true')", "1+1", "lognormal(1000, 1)",
])
def test_bad_strings_rejected_without_eval(spec):
    with pytest.raises(ConfigError) as ei:
        parse_spec(F, spec, 2, 0, 1.0)
    assert ei.value.field == F
    assert ei.value.value == spec or spec in str(ei.value)


@pytest.mark.parametrize("spec", [True, {"a": 1}, float("nan"), float("inf"), ["1", 2], [None]])
def test_bad_types_rejected(spec):
    n = len(spec) if isinstance(spec, list) else 1
    with pytest.raises(ConfigError) as ei:
        parse_spec(F, spec, n, 0, 1.0)
    assert ei.value.field == F


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), seed=st.integers(0, 2**31),
       lo=st.floats(0.001, 1e4), width=st.floats(0, 1e4))
def test_uniform_property(n, seed, lo, width):
    spec = f"uniform({lo!r}, {lo + width!r})"
    vals = parse_spec(F, spec, n, seed, 1.0)
    assert vals == parse_spec(F, spec, n, seed, 1.0)
    assert len(vals) == n
    assert all(v > 0 for v in vals)


@settings(max_examples=60, deadline=None)
@given(vals=st.lists(st.floats(0.001, 1e6), min_size=0, max_size=20))
def test_list_literal_round_trip(vals):
    text = "[" + ", ".join(repr(v) for v in vals) + "]"
    assert parse_spec(F, text, len(vals), 0, 1.0) == vals
    assert parse_spec(F, vals, len(vals), 0, 1.0) == vals
