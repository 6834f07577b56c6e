"""The server's own copy of the agreed aggregate (``make_global_eval``, ``save_to``).

With the exchange on, the server holds no model; FS's server evaluates its
own model under ``federate.make_global_eval`` (and saves it under
``federate.save_to``).  At a round's end the server therefore waits, before
FS's ``check_and_move_on``, for the clients' digests; once they are judged
(``agreement``), it asks the lowest agreeing client for its aggregate
(``bt_fetch_aggregate``), which answers ``bt_aggregate``: the flat global
model as base64 safetensors (never pickle) with its digest.  Only bits whose
recomputed sha256 is the agreed digest are loaded into FS's server models.
Missing digests are judged without the absent ones after ``timeout``; a
missing or wrong model ends the run with an error, because evaluating a
stale model would be a silent difference.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..errors import BitTorrentError
from . import wire
from .agreement import Agreement
from .fs_aggregation import merge_into, state_digest, unflatten_models

log = logging.getLogger(__name__)


class AgreedModel:
    """One per ``ServerManager`` (its ``host``: sending, timers, the worker)."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.awaiting: Optional[int] = None                 # round whose model we wait for
        self.asked: Optional[tuple[int, int, str]] = None   # (round, client, digest)

    def wait_for(self, round_idx: int) -> None:
        """Round ``round_idx`` ended: FS moves on once its agreed model is in."""
        self.awaiting = round_idx
        self._arm(round_idx, asked=False)

    def _arm(self, round_idx: int, asked: bool) -> None:
        h = self.host
        h.scheduler.call_at(h.now() + h.settings.timeout,
                            lambda: self._deadline(round_idx, asked))

    def judged(self, agreement: Agreement) -> None:
        """The round's digests were judged: ask an agreeing client."""
        if self.awaiting != agreement.round:
            return
        source = agreement.source()
        if source is None:
            self._fail(agreement.round, "no client reported an agreed aggregate")
            return
        self.asked = (agreement.round, source, agreement.digest)
        h = self.host
        h._send(h._message(wire.MSG_FETCH_AGGREGATE, [source], agreement.round,
                           {"round": agreement.round}))
        self._arm(agreement.round, asked=True)

    def _deadline(self, round_idx: int, asked: bool) -> None:
        """``timeout`` after the round's end (digests) or after asking (the model)."""
        if self.awaiting != round_idx or asked != (self.asked is not None):
            return
        if asked:
            self._fail(round_idx, "the agreed aggregate did not arrive in time")
            return
        pending = self.host._pending_stats
        if pending is None or pending["round"] != round_idx:
            self._fail(round_idx, "the round's figures are gone")
            return
        log.warning("server: round %s: not every client's digest came in time; judging "
                    "with those that did", round_idx)
        self.host.flush_stats()          # judges, then asks an agreeing client

    def _fail(self, round_idx: int, why: str) -> None:
        log.error("server: round %s: %s; federate.make_global_eval / save_to need it; "
                  "terminating", round_idx, why)
        self.awaiting = self.asked = None
        w = self.host.worker
        w.terminate(msg_type="finish")
        w.state = w.total_round_num + 1

    def on_aggregate(self, message: Any) -> None:
        """The client's answer: load it into FS's server models only if its
        bits have the agreed digest, then let FS move on."""
        h = self.host
        w = h.worker
        try:
            round_idx, digest, flat = wire.unpack_aggregate(message.content)
            params = unflatten_models(flat, len(w.models))
            actual = state_digest(params)
        except BitTorrentError as exc:
            h._refuse(message, wire.MSG_AGGREGATE, exc)
            return
        asked = self.asked
        if asked is None or asked[:2] != (round_idx, message.sender):
            h.stale_messages += 1
            return
        if digest != asked[2] or actual != asked[2]:
            h._refuse(message, wire.MSG_AGGREGATE, BitTorrentError(
                "digest", actual[:12], f"does not match the agreed aggregate {asked[2][:12]}"))
            self._fail(round_idx, f"client {message.sender} sent another model")
            return
        for model, part in zip(w.models, [params] if len(w.models) == 1 else params):
            merge_into(model, part)
        self.awaiting = self.asked = None
        log.info("server: round %s: loaded the agreed aggregate %s from client %s", round_idx,
                 digest[:12], message.sender)
        w.check_and_move_on()
