"""Do the clients agree on the round's aggregate?

Every client aggregates for itself (``fs_aggregation``) and reports the
sha256 of the global model it reached with its round-end stats.  Clients
that held every piece fed the same models, in the same order, to the same
FS aggregator from the same previous model, so their digests must be
equal.  The server groups the complete clients by digest: the largest group
(ties: the one with the lowest client id) is the agreed aggregate; a
complete client outside it is *differing* -- named and counted, because it
now trains from and evaluates a different model than the others.  Clients
that missed pieces (a partial round) are listed apart: they may differ by
design (``missing_policy``), which is not a fault.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Agreement:
    round: int
    digest: Optional[str]            # the agreed aggregate's sha256 (hex), None if no one complete
    agreeing: list[int]              # clients whose aggregate has that digest
    differing: list[int]             # complete clients whose aggregate does not
    partial: list[int]               # clients that missed pieces and reached another model
    missing: list[int] = field(default_factory=list)   # reporters whose digest never came

    @property
    def agreed(self) -> bool:
        return self.digest is not None and not self.differing

    def as_dict(self) -> dict:
        d = asdict(self)
        d["agreed"] = self.agreed
        d["differing_count"] = len(self.differing)
        return d

    def source(self) -> Optional[int]:
        """The client to fetch the agreed aggregate from (lowest agreeing id)."""
        return min(self.agreeing) if self.agreeing else None


def check_agreement(round_idx: int, digests: Mapping[int, str], complete: set[int],
                    reporters: Optional[set[int]] = None) -> Agreement:
    """Judge one round.  ``digests``: client -> digest ('' = none sent);
    ``complete``: clients that held every piece."""
    known = {c: d for c, d in digests.items() if d}
    groups: dict[str, list[int]] = {}
    for c in sorted(c for c in known if c in complete):
        groups.setdefault(known[c], []).append(c)
    digest = None
    if groups:
        digest = min(groups, key=lambda d: (-len(groups[d]), min(groups[d])))
    agreeing = sorted(c for c, d in known.items() if d == digest) if digest else []
    differing = sorted(c for c, d in known.items() if c in complete and d != digest)
    partial = sorted(c for c, d in known.items() if c not in complete and d != digest)
    missing = sorted((reporters or set(digests)) - set(known))
    result = Agreement(round_idx, digest, agreeing, differing, partial, missing)
    if differing:
        log.error("server: round %s: %d complete client(s) reached a different aggregate than "
                  "the %d agreeing on %s: clients %s", round_idx, len(differing),
                  len(agreeing), digest[:12], differing)
    elif digest is None and known:
        log.warning("server: round %s: no client held every piece; no agreed aggregate "
                    "(partial clients: %s)", round_idx, partial)
    return result
