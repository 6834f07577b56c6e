"""Per-client link specs for the standalone simulation.

A spec says what one link parameter (upload rate, download rate, latency) is
for each of ``n`` clients.  Accepted forms:

* ``None``                        -> ``[default] * n``
* a number ``v``                  -> ``[v] * n``
* a list/tuple of ``n`` numbers   -> as is (index ``i`` is client ``i + 1``)
* a string holding one of:
    - a number:            ``'100'``, ``'2.5e1'``
    - a list literal:      ``'[100, 20, 20]'``
    - ``'uniform(a, b)'``    a draw from U(a, b) per client (``a <= b``)
    - ``'normal(mu, sigma)'`` a draw from N(mu, sigma) per client, clipped:
      rates are raised to at least ``mu / 100`` (so always > 0), latencies to 0
    - ``'lognormal(mu, sigma)'`` ``exp(N(mu, sigma))`` per client (mu and sigma
      of the underlying normal: ``lognormal(4.6, 0.5)`` has median ~100)
    - ``'choice(a, b, ...)'``  one of the listed values per client, uniformly

Draws come from ``random.Random(seed)`` and are deterministic for a seed.
Strings are parsed by a small regex parser, never ``eval``.  Rates must be
> 0; a latency (``allow_zero=True``, inferred from a field name ending in
``latency``) may be 0 but not negative.  Values are returned in the spec's own
unit (the caller converts, e.g. Mbit/s to bytes/s).
"""
from __future__ import annotations

import math
import random
import re
from typing import Any, Optional, Sequence, Union

from ..errors import ConfigError

__all__ = ["parse_spec", "DISTRIBUTIONS"]

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(rf"^\s*({_NUM})\s*$")
_LIST_RE = re.compile(rf"^\s*\[\s*((?:{_NUM})(?:\s*,\s*(?:{_NUM}))*)?\s*,?\s*\]\s*$")
_CALL_RE = re.compile(r"^\s*([A-Za-z_]+)\s*\((.*)\)\s*$", re.S)

#: distribution name -> number of parameters (None: one or more)
DISTRIBUTIONS = {"uniform": 2, "normal": 2, "lognormal": 2, "choice": None}

Seed = Union[int, str, None]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(field: str, v: Any, allow_zero: bool, what: str = "value") -> float:
    if not _is_number(v):
        raise ConfigError(field, v, f"{what} must be a number")
    f = float(v)
    if not math.isfinite(f):
        raise ConfigError(field, v, f"{what} must be finite")
    if allow_zero and f < 0:
        raise ConfigError(field, v, f"{what} must be >= 0")
    if not allow_zero and f <= 0:
        raise ConfigError(field, v, f"{what} must be > 0")
    return f


def _parse_args(field: str, spec: str, body: str) -> list[float]:
    parts = [p.strip() for p in body.split(",")]
    if parts == [""]:
        return []
    out = []
    for p in parts:
        m = _NUM_RE.match(p)
        if not m:
            raise ConfigError(field, spec, f"argument {p!r} is not a number")
        out.append(float(m.group(1)))
    return out


def _draw(field: str, spec: str, name: str, args: list[float], n: int, seed: Seed,
          allow_zero: bool) -> list[float]:
    want = DISTRIBUTIONS.get(name)
    if name not in DISTRIBUTIONS:
        raise ConfigError(field, spec, "unknown distribution; use one of "
                          + ", ".join(f"{d}(...)" for d in DISTRIBUTIONS))
    if want is not None and len(args) != want:
        raise ConfigError(field, spec, f"{name} takes {want} arguments, got {len(args)}")
    if want is None and not args:
        raise ConfigError(field, spec, f"{name} needs at least one value")
    rng = random.Random(seed)
    if name == "uniform":
        a, b = args
        if a > b:
            raise ConfigError(field, spec, f"uniform(a, b) needs a <= b, got a={a} > b={b}")
        _check_value(field, a, allow_zero, "lower bound")
        return [rng.uniform(a, b) for _ in range(n)]
    if name == "normal":
        mu, sigma = args
        _check_value(field, mu, allow_zero, "mean")
        if sigma < 0:
            raise ConfigError(field, spec, f"sigma must be >= 0, got {sigma}")
        floor = 0.0 if allow_zero else mu / 100.0
        return [max(rng.gauss(mu, sigma), floor) for _ in range(n)]
    if name == "lognormal":
        mu, sigma = args
        if sigma < 0:
            raise ConfigError(field, spec, f"sigma must be >= 0, got {sigma}")
        if mu > 700:
            raise ConfigError(field, spec, f"mu={mu} overflows exp(); it is the log of the median")
        return [rng.lognormvariate(mu, sigma) for _ in range(n)]
    # choice
    for a in args:
        _check_value(field, a, allow_zero, "choice")
    return [rng.choice(args) for _ in range(n)]


def parse_spec(field: str, spec: Any, n: int, seed: Seed, default: float,
               allow_zero: Optional[bool] = None) -> list[float]:
    """Resolve ``spec`` into ``n`` floats (see the module docstring).

    ``field`` names the config key in every error.  ``allow_zero`` defaults to
    ``field`` ending in ``latency``.
    """
    if allow_zero is None:
        allow_zero = field.rsplit(".", 1)[-1].endswith("latency")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(field, n, "client count must be an int >= 0")
    if spec is None:
        return [_check_value(field, default, allow_zero, "default")] * n
    if _is_number(spec):
        return [_check_value(field, spec, allow_zero)] * n
    if isinstance(spec, (list, tuple)):
        return _from_list(field, spec, n, allow_zero)
    if isinstance(spec, str):
        m = _NUM_RE.match(spec)
        if m:
            return [_check_value(field, float(m.group(1)), allow_zero)] * n
        if spec.strip().startswith("["):
            m = _LIST_RE.match(spec)
            if not m:
                raise ConfigError(field, spec, "not a list of numbers like '[100, 20]'")
            values = _parse_args(field, spec, m.group(1) or "")
            return _from_list(field, values, n, allow_zero)
        m = _CALL_RE.match(spec)
        if not m:
            raise ConfigError(field, spec, "not a number, a list '[a, b, ...]' or a "
                              "distribution: uniform(a,b), normal(mu,sigma), "
                              "lognormal(mu,sigma), choice(a,b,...)")
        name = m.group(1).lower()
        args = _parse_args(field, spec, m.group(2))
        return _draw(field, spec, name, args, n, seed, allow_zero)
    raise ConfigError(field, spec, "must be None, a number, a list of numbers or a string")


def _from_list(field: str, values: Sequence[Any], n: int, allow_zero: bool) -> list[float]:
    if len(values) != n:
        raise ConfigError(field, list(values),
                          f"has {len(values)} entries but there are {n} clients "
                          "(one value per client, client 1 first)")
    return [_check_value(field, v, allow_zero, f"entry {i}") for i, v in enumerate(values)]
