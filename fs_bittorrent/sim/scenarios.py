"""Named link scenarios for validating and benchmarking the simulators.

The heterogeneous and latency cases the fidelity levels are checked on
(``tests/test_flow.py``, ``scripts/bench_flow.py``): each name maps a client
count to one ``LinkProfile`` per client (ids 1..n), rates in bytes/s.
"""
from __future__ import annotations

import random
from typing import Callable

from .network import LinkProfile

MBIT = 1e6 / 8


def _uniform(n: int, mbit: float = 100.0, latency: float = 0.005) -> dict[int, LinkProfile]:
    return {i: LinkProfile(mbit * MBIT, mbit * MBIT, latency) for i in range(1, n + 1)}


def _half_slow(n: int) -> dict[int, LinkProfile]:
    """Every second client uploads 10x slower (10 Mbit/s)."""
    return {i: LinkProfile((10.0 if i % 2 == 0 else 100.0) * MBIT, 100 * MBIT, 0.005)
            for i in range(1, n + 1)}


def _one_slow(n: int) -> dict[int, LinkProfile]:
    """Client 1 uploads 20x slower (5 Mbit/s)."""
    return {i: LinkProfile((5.0 if i == 1 else 100.0) * MBIT, 100 * MBIT, 0.005)
            for i in range(1, n + 1)}


def _fast_quarter(n: int) -> dict[int, LinkProfile]:
    """A quarter of the clients at 1 Gbit/s, the rest at 100 Mbit/s."""
    fast = max(1, n // 4)
    return {i: LinkProfile(*(2 * [(1000.0 if i <= fast else 100.0) * MBIT]), 0.005)
            for i in range(1, n + 1)}


def _lognormal(n: int, seed: int = 1) -> dict[int, LinkProfile]:
    """Uplink and downlink drawn from lognormal(4.6, 0.5) Mbit/s (median ~100)."""
    rng = random.Random(seed)
    return {i: LinkProfile(rng.lognormvariate(4.6, 0.5) * MBIT,
                           rng.lognormvariate(4.6, 0.5) * MBIT, 0.005)
            for i in range(1, n + 1)}


def _asymmetric(n: int) -> dict[int, LinkProfile]:
    """10 Mbit/s up, 100 Mbit/s down (a home connection)."""
    return {i: LinkProfile(10 * MBIT, 100 * MBIT, 0.005) for i in range(1, n + 1)}


def _latency(ms: float) -> Callable[[int], dict[int, LinkProfile]]:
    return lambda n: _uniform(n, 100.0, ms / 1000.0)


SCENARIOS: dict[str, Callable[[int], dict[int, LinkProfile]]] = {
    "uniform": _uniform,
    "half_slow": _half_slow,
    "one_slow": _one_slow,
    "fast_quarter": _fast_quarter,
    "lognormal": _lognormal,
    "up10_down100": _asymmetric,
    "latency50": _latency(50),
    "latency100": _latency(100),
}


def scenario(name: str, n: int) -> dict[int, LinkProfile]:
    """The links of scenario ``name`` for clients 1..n."""
    try:
        return SCENARIOS[name](n)
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
