"""Tests of the peer graph builder: shapes, symmetry, connectivity, errors."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_bittorrent.core.topology import (
    feasible_degree,
    is_connected,
    make_topology,
    restrict,
    unreachable_from,
    validate_topology,
)
from fs_bittorrent.errors import ConfigError


def assert_valid(g, ids):
    assert sorted(g) == sorted(ids)
    for a, nbrs in g.items():
        assert nbrs == sorted(set(nbrs)), "sorted, no duplicates"
        assert a not in nbrs, "no self loops"
        for b in nbrs:
            assert a in g[b], "symmetric"
    assert is_connected(g)


def test_full():
    g = make_topology("full", [3, 1, 2])
    assert g == {1: [2, 3], 2: [1, 3], 3: [1, 2]}
    assert make_topology("full", [5]) == {5: []}
    assert make_topology("full", []) == {}


def test_ring_small_cases():
    assert make_topology("ring", [1]) == {1: []}
    assert make_topology("ring", [1, 2]) == {1: [2], 2: [1]}
    assert make_topology("ring", [1, 2, 3]) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}
    assert make_topology("ring", [1, 2, 3, 4, 5]) == {
        1: [2, 5], 2: [1, 3], 3: [2, 4], 4: [3, 5], 5: [1, 4]}
    # ring follows id order, not the input order
    assert make_topology("ring", [10, 30, 20]) == {10: [20, 30], 20: [10, 30], 30: [10, 20]}


@settings(max_examples=40, deadline=None)
@given(ids=st.sets(st.integers(1, 10_000), min_size=0, max_size=40))
def test_full_and_ring_properties(ids):
    for kind in ("full", "ring"):
        g = make_topology(kind, ids)
        assert_valid(g, ids)
    ring = make_topology("ring", ids)
    n = len(ids)
    assert all(len(v) == min(2, n - 1) for v in ring.values())


@st.composite
def regular_case(draw):
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, n - 1))
    if (n * d) % 2:
        d = d - 1 if d > 1 else d + 1
    if d == 1 and n > 2:
        d = 2
    if d >= n or (n * d) % 2:
        d = n - 1
    seed = draw(st.integers(0, 2**32))
    return n, d, seed


@settings(max_examples=80, deadline=None)
@given(regular_case())
def test_random_regular_properties(case):
    n, d, seed = case
    ids = list(range(1, n + 1))
    g = make_topology("random_regular", ids, degree=d, seed=seed)
    assert_valid(g, ids)
    assert all(len(v) == d for v in g.values())
    assert g == make_topology("random_regular", ids, degree=d, seed=seed)


def test_random_regular_seed_matters_and_non_contiguous_ids():
    ids = list(range(1, 31))
    graphs = {str(make_topology("random_regular", ids, 4, seed=s)) for s in range(5)}
    assert len(graphs) > 1
    g = make_topology("random_regular", [7, 100, 3, 42, 9, 11], 3, seed=1)
    assert_valid(g, [3, 7, 9, 11, 42, 100])
    assert all(len(v) == 3 for v in g.values())
    assert make_topology("random_regular", [4], 4) == {4: []}
    assert make_topology("random_regular", [], 4) == {}


def test_random_regular_dense_uses_complement():
    ids = list(range(1, 21))
    g = make_topology("random_regular", ids, 17, seed=3)   # 20 * 17 even, complement 2-regular
    assert_valid(g, ids)
    assert all(len(v) == 17 for v in g.values())
    assert make_topology("random_regular", ids, 19, seed=3) == make_topology("full", ids)


@pytest.mark.parametrize("n,d,words", [
    (4, 4, "1 <= degree < number of clients (4)"),
    (4, 0, "1 <= degree"),
    (5, 3, "is odd"),
    (6, 1, "never connected"),
])
def test_random_regular_degree_errors(n, d, words):
    with pytest.raises(ConfigError) as ei:
        make_topology("random_regular", range(1, n + 1), degree=d)
    assert ei.value.field == "bittorrent.degree"
    assert ei.value.value == d
    assert words in ei.value.reason
    with pytest.raises(ConfigError):
        validate_topology("random_regular", range(1, n + 1), degree=d)


def test_odd_degree_hint_suggests_valid_degrees():
    with pytest.raises(ConfigError) as ei:
        make_topology("random_regular", range(1, 8), degree=3)
    assert "use degree 2 or 4" in ei.value.reason


def test_degree_type_error():
    with pytest.raises(ConfigError) as ei:
        make_topology("random_regular", [1, 2, 3], degree=2.0)
    assert ei.value.field == "bittorrent.degree"


def test_unknown_kind():
    with pytest.raises(ConfigError) as ei:
        make_topology("star", [1, 2])
    assert ei.value.field == "bittorrent.topology" and ei.value.value == "star"
    with pytest.raises(ConfigError):
        validate_topology("star", [1, 2])


def test_bad_ids():
    with pytest.raises(ConfigError) as ei:
        make_topology("full", [1, 2, 2])
    assert ei.value.field == "bittorrent.topology" and ei.value.value == [2]
    with pytest.raises(ConfigError):
        make_topology("full", [1, "2"])


def test_explicit_made_symmetric():
    g = make_topology("explicit", [1, 2, 3, 4], explicit=[[1, 2, 3], [3, 4]])
    assert g == {1: [2, 3], 2: [1], 3: [1, 4], 4: [3]}
    # duplicate rows and repeated neighbours merge; dicts work too
    g2 = make_topology("explicit", [1, 2, 3, 4], explicit=[[1, 2, 2], [1, 3], [4, 3], [2, 1]])
    assert g2 == g
    assert make_topology("explicit", [1, 2, 3, 4], explicit={1: [2, 3], 3: [4]}) == g
    assert make_topology("explicit", [1], explicit=[]) == {1: []}
    assert make_topology("explicit", [1], explicit=[[1]]) == {1: []}


def test_explicit_unknown_ids_named():
    with pytest.raises(ConfigError) as ei:
        make_topology("explicit", [1, 2, 3, 4], explicit=[[1, 2, 99], [3, 4], [2, 3]])
    e = ei.value
    assert e.field == "bittorrent.neighbors" and e.value == [99]
    assert "99" in e.reason and "1..4" in e.reason
    with pytest.raises(ConfigError) as ei:
        make_topology("explicit", [1, 2], explicit=[[7, 1, 2]])
    assert ei.value.value == [7]


def test_explicit_self_loop_named():
    with pytest.raises(ConfigError) as ei:
        make_topology("explicit", [1, 2, 3], explicit=[[1, 2], [2, 3, 2]])
    assert ei.value.field == "bittorrent.neighbors" and ei.value.value == [2]
    assert "themselves" in ei.value.reason


def test_explicit_disconnected_names_unreachable():
    with pytest.raises(ConfigError) as ei:
        make_topology("explicit", [1, 2, 3, 4, 5], explicit=[[1, 2], [3, 4]])
    e = ei.value
    assert e.field == "bittorrent.neighbors" and e.value == [3, 4, 5]
    assert "[3, 4, 5]" in e.reason and "not reachable" in e.reason
    with pytest.raises(ConfigError):
        make_topology("explicit", [1, 2], explicit=[])
    with pytest.raises(ConfigError):
        validate_topology("explicit", [1, 2, 3], explicit=[[1, 2]])


@pytest.mark.parametrize("explicit", ["1,2", [1, 2], [[]], [["1", 2]], [[1, True]], 5])
def test_explicit_malformed(explicit):
    with pytest.raises(ConfigError) as ei:
        make_topology("explicit", [1, 2], explicit=explicit)
    assert ei.value.field == "bittorrent.neighbors"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 25), data=st.data())
def test_explicit_property(n, data):
    ids = list(range(1, n + 1))
    # a random spanning tree keeps it connected, plus random extra edges
    rows = []
    for i in range(2, n + 1):
        rows.append([i, data.draw(st.integers(1, i - 1))])
    extra = data.draw(st.lists(st.tuples(st.integers(1, n), st.integers(1, n)), max_size=20))
    rows += [[a, b] for a, b in extra if a != b]
    g = make_topology("explicit", ids, explicit=rows)
    assert_valid(g, ids)
    for a, *nbrs in rows:
        for b in nbrs:
            assert b in g[a] and a in g[b]


def test_unreachable_helper():
    assert unreachable_from({}) == []
    assert unreachable_from({1: [2], 2: [1], 3: []}) == [3]
    assert unreachable_from({1: [2], 2: [1], 3: []}, start=3) == [1, 2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), d=st.integers(0, 60), seed=st.integers(0, 1000))
def test_feasible_degree_always_builds(n, d, seed):
    fd = feasible_degree(d, n)
    ids = list(range(1, n + 1))
    g = make_topology("random_regular", ids, fd if n > 1 else 4, seed=seed)
    assert_valid(g, ids)
    if n > 1:
        assert all(len(v) == fd for v in g.values())
        if 2 <= d < n and (n * d) % 2 == 0:
            assert fd == d          # unchanged when already feasible


def test_restrict_induces_and_bridges():
    ring = make_topology("ring", range(1, 7))
    assert restrict(ring, [1, 2, 3]) == {1: [2], 2: [1, 3], 3: [2]}
    # 1 and 4 are not adjacent in the ring: bridged
    assert restrict(ring, [1, 4]) == {1: [4], 4: [1]}
    assert restrict(ring, [1, 4], bridge=False) == {1: [], 4: []}
    g = restrict(ring, [1, 3, 5])
    assert_valid(g, [1, 3, 5])
    assert restrict(ring, []) == {}
    with pytest.raises(ConfigError):
        restrict(ring, [1, 9])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 20), data=st.data())
def test_restrict_property(n, data):
    ids = list(range(1, n + 1))
    g = make_topology("ring", ids)
    sub = sorted(data.draw(st.sets(st.sampled_from(ids), min_size=1)))
    r = restrict(g, sub)
    assert_valid(r, sub)
    for a in sub:   # configured links inside the subset are kept
        assert {b for b in g[a] if b in sub} <= set(r[a])
