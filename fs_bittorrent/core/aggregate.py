"""FedAvg over whatever pieces arrived, element by element.

With every piece present this is plain FedAvg weighted by sample counts.
When a deadline cut the exchange short, each element is averaged over the
contributors whose bytes for that element arrived (weights renormalised),
and elements nobody delivered are left to the caller's policy (keep the
previous global model, or the local one) through ``fallback``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from ..errors import ManifestError
from .manifest import Manifest
from .pieces import TORCH_DTYPES, partial_state_dict

Contribution = tuple[Manifest, Mapping[int, bytes]]


@dataclass
class AggregateResult:
    state_dict: dict[str, torch.Tensor]
    coverage: dict[str, torch.Tensor]     # bool mask: some contributor delivered the element
    contributors: list[int]               # owners with at least one piece used
    covered_fraction: float               # elements covered / all elements

    @property
    def complete(self) -> bool:
        return self.covered_fraction == 1.0


def _layout_key(m: Manifest) -> list[tuple[str, str, tuple[int, ...]]]:
    return sorted((t.name, t.dtype, tuple(t.shape)) for t in m.tensors)


def coverage_fedavg(contributions: Sequence[Contribution],
                    fallback: Optional[Mapping[str, torch.Tensor]] = None,
                    verify: bool = True) -> AggregateResult:
    """Weighted average of the contributions, by coverage.

    ``fallback`` supplies values for elements no one delivered; without it
    they are zero (and reported in ``coverage``).  ``verify=False`` skips
    re-hashing pieces that come from a store which verified them on entry.
    """
    if not contributions:
        raise ManifestError("contributions", [], "nothing to aggregate")
    ref = _layout_key(contributions[0][0])
    for m, _ in contributions[1:]:
        if _layout_key(m) != ref:
            raise ManifestError("tensors", m.owner,
                                f"owner {m.owner}'s model layout differs from owner "
                                f"{contributions[0][0].owner}'s")
    specs = {t.name: t for t in contributions[0][0].tensors}
    acc = {name: torch.zeros(spec.shape, dtype=torch.float64) for name, spec in specs.items()}
    # Weight per element: complete contributors add a scalar (no mask work,
    # the common case); partial ones add their coverage mask times weight.
    full_weight = 0.0
    wsum: dict[str, torch.Tensor] = {}
    used: list[int] = []
    for m, pieces in contributions:
        if not pieces:
            continue
        used.append(m.owner)
        w = float(m.sample_count)
        complete = len(pieces) == m.num_pieces
        if complete:
            full_weight += w
        for name, (values, mask) in partial_state_dict(m, pieces, verify=verify).items():
            if complete:
                acc[name].add_(values.to(torch.float64), alpha=w)
                continue
            wm = mask.to(torch.float64) * w
            acc[name] += values.to(torch.float64) * wm
            if name in wsum:
                wsum[name] += wm
            else:
                wsum[name] = wm
    out: dict[str, torch.Tensor] = {}
    coverage: dict[str, torch.Tensor] = {}
    covered = total = 0
    for name, spec in specs.items():
        dtype = TORCH_DTYPES[spec.dtype]
        if name in wsum:
            weight = wsum[name] + full_weight
        else:
            weight = torch.full(spec.shape, full_weight, dtype=torch.float64)
        wsum[name] = weight
        cov = weight > 0
        mean = torch.where(cov, acc[name] / torch.where(cov, wsum[name], torch.ones_like(wsum[name])),
                           torch.zeros_like(acc[name]))
        if dtype == torch.bool:
            value = mean >= 0.5
        elif not dtype.is_floating_point:
            value = torch.round(mean).to(dtype)
        else:
            value = mean.to(dtype)
        if fallback is not None and not bool(cov.all()):
            value = torch.where(cov, value, fallback[name].to(dtype))
        out[name] = value
        coverage[name] = cov
        covered += int(cov.sum())
        total += cov.numel()
    return AggregateResult(out, coverage, used, covered / total if total else 1.0)
