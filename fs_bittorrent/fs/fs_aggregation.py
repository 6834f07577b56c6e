"""FederatedScope's own server aggregation, run at every client.

With the exchange on, the server never holds the clients' models: each
client holds them all and aggregates itself.  To give the result FS would
give, a client does what FS's ``Server`` does, with FS's code:

* it builds the aggregator FS's server would build for this config
  (``get_aggregator(method, model, device, online, config)``: FedAvg,
  FedOpt, the robust rules, pFedMe's interpolation, online FedAvg, and
  whatever FS adds later), holding its own copy of the global model, and
  one model and aggregator per ``model.model_num_per_trainer`` (FedEM's K
  models) exactly as ``Server.__init__`` makes them;
* each round it feeds the received ``(sample_size, model_para)`` pairs to
  ``aggregator.aggregate`` with the ``agg_info`` structure of
  ``Server._perform_federated_aggregation``, in one agreed order (by client
  id: floating-point sums depend on the order, and every client must reach
  the same bits), then merges the result into its global model;
* what FS's server would broadcast next (``model_para``, ``evaluate``,
  ``finish``) is this global model's ``state_dict`` (a list of them for K
  models), which the client hands to FS's own handlers in place of the
  weights the server no longer sends.

A round in which this client misses pieces is *partial*.  FedAvg is linear,
so a partial round keeps the coverage-weighted FedAvg (element by element
over the contributors whose bytes arrived, ``missing_policy`` for the rest).
Every other rule is not: a partial round then runs FS's aggregator over the
contributors whose model arrived whole (never a silent substitute: logged),
and with none of them the global model stays as it was.

Multi-model trainers publish K state dicts; they travel as one flat dict
whose keys are prefixed ``bt_model<k>/`` (:func:`flatten_models`).
"""
from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..core.aggregate import AggregateResult, coverage_fedavg
from ..core.pieces import partial_state_dict
from ..errors import BitTorrentError

log = logging.getLogger(__name__)

ModelPara = Union[dict, list]           # one state dict, or K of them (FedEM)
MODEL_PREFIX = "bt_model"


# --------------------------------------------------------------------------- #
# K models as one flat dict
# --------------------------------------------------------------------------- #

def flatten_models(params: ModelPara) -> dict[str, torch.Tensor]:
    """One state dict as is; K state dicts as one dict, keys ``bt_model<k>/<name>``."""
    if isinstance(params, Mapping):
        return dict(params)
    if not isinstance(params, (list, tuple)) or not all(isinstance(p, Mapping) for p in params):
        raise BitTorrentError("model_para", type(params).__name__,
                              "must be a state_dict or a list of state_dicts")
    return {f"{MODEL_PREFIX}{k}/{name}": v for k, p in enumerate(params) for name, v in p.items()}


def unflatten_models(flat: Mapping[str, torch.Tensor], model_num: int) -> ModelPara:
    """The inverse of :func:`flatten_models` for ``model_num`` models."""
    if model_num == 1:
        return dict(flat)
    out: list[dict] = [{} for _ in range(model_num)]
    for key, value in flat.items():
        head, sep, name = key.partition("/")
        k = head[len(MODEL_PREFIX):]
        if not sep or not head.startswith(MODEL_PREFIX) or not k.isdigit() \
                or int(k) >= model_num:
            raise BitTorrentError("model_para", key,
                                  f"not a key of one of {model_num} models "
                                  f"({MODEL_PREFIX}<k>/<name>)")
        out[int(k)][name] = value
    return out


def state_digest(params: ModelPara) -> str:
    """sha256 (hex) of a model's exact bits: names, dtypes, shapes and bytes,
    in name order.  Clients that aggregated the same thing agree on it."""
    h = hashlib.sha256()
    for name, value in sorted(flatten_models(params).items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def merge_into(model: torch.nn.Module, result: Mapping[str, Any], assign: bool = False) -> None:
    """Load an aggregation result into a model as FS's server does (keys
    the result lacks keep their values).

    ``assign``: the model takes the result's tensors themselves (cast to
    its dtypes, as a copy would) instead of copying their values into its
    own: in-process clients that reach the same result then hold one copy
    of it, not one each.  Only for a model nothing writes into in place
    (no optimizer over its parameters, never handed out uncloned)."""
    from federatedscope.core.auxiliaries.utils import merge_param_dict
    current = model.state_dict()
    if assign:
        result = {k: (v.to(current[k].dtype) if isinstance(v, torch.Tensor) and k in current
                      and v.dtype != current[k].dtype else v)
                  for k, v in result.items()}
    merged = merge_param_dict(current.copy(), result)
    model.load_state_dict(merged, strict=False, assign=assign)


def _clone(params: ModelPara) -> ModelPara:
    if isinstance(params, Mapping):
        return {k: v.detach().clone() for k, v in params.items()}
    return [_clone(p) for p in params]


# --------------------------------------------------------------------------- #
# the aggregation
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Contribution:
    """One client's published model of this round, whole."""
    client_id: int
    sample_size: int
    params: ModelPara
    #: the tensors were decoded for this aggregation alone: FS's aggregator
    #: may change them in place without a defensive copy
    owned: bool = False


def _is_plain_fedavg(aggregator: Any) -> bool:
    """FS's FedAvg (batch or online): a linear rule of the received models."""
    from federatedscope.core.aggregators import (ClientsAvgAggregator,
                                                 OnlineClientsAvgAggregator)
    return type(aggregator) in (ClientsAvgAggregator, OnlineClientsAvgAggregator)


class FSAggregation:
    """The global model(s) and FS's aggregator(s), as FS's server keeps them."""

    def __init__(self, cfg: Any, model_template: torch.nn.Module, device: Any = "cpu") -> None:
        from federatedscope.core.auxiliaries.aggregator_builder import get_aggregator
        self.cfg = cfg
        self.device = device
        model = copy.deepcopy(model_template)
        aggregator = get_aggregator(cfg.federate.method, model=model, device=device,
                                    online=cfg.federate.online_aggr, config=cfg)
        self.model_num = int(cfg.model.model_num_per_trainer)
        # As Server.__init__: extra models and aggregators are deep copies
        # (so an extra aggregator's ``model`` is its own copy, as in FS).
        self.models = [model] + [copy.deepcopy(model) for _ in range(self.model_num - 1)]
        self.aggregators = [aggregator] + [copy.deepcopy(aggregator)
                                           for _ in range(self.model_num - 1)]
        self.linear = _is_plain_fedavg(aggregator)
        self.online = bool(cfg.federate.online_aggr)
        self.rule = type(aggregator).__name__
        self.loaded = False
        self._digest: Optional[str] = None

    # ---- the global model ---------------------------------------------------
    def load(self, content: ModelPara, cache: Optional[dict] = None) -> None:
        """The initial global model (round 0's broadcast), as FS's server holds it.

        ``cache`` (standalone, shared by the in-process clients): round 0's
        broadcast is one object for every client, so under a rule without
        state of its own (:attr:`pure`) one read-only copy of it serves them
        all, assigned rather than copied into each client's model."""
        parts = [content] if self.model_num == 1 else list(content)
        if len(parts) != self.model_num:
            raise BitTorrentError("model_para", len(parts),
                                  f"expected {self.model_num} models")
        assign = cache is not None and self.pure
        if assign:
            entry = cache.get("initial_model")
            if entry is None or entry[0] is not content:
                entry = cache["initial_model"] = (content, [_clone(p) for p in parts])
            parts = entry[1]
        for model, part in zip(self.models, parts):
            merge_into(model, part, assign=assign)
        self.loaded = True
        self._digest = None

    def state(self) -> ModelPara:
        """What FS's server would broadcast now (fresh tensors, safe to mutate)."""
        if self.model_num == 1:
            return _clone(self.models[0].state_dict())
        return [_clone(m.state_dict()) for m in self.models]

    def digest(self) -> str:
        if self._digest is None:
            self._digest = state_digest(self.state())
        return self._digest


    # ---- one round ----------------------------------------------------------
    def aggregate(self, contributions: Sequence[Contribution],
                  order: Sequence[int] = ()) -> None:
        """``Server._perform_federated_aggregation`` over ``contributions``,
        in the agreed ``order`` (the server's arrival order, as FS's buffer;
        anyone not in it after, by client id)."""
        if not self.loaded:
            raise BitTorrentError("aggregate", None,
                                  "no global model yet (round 0's model never arrived)")
        rank = {c: i for i, c in enumerate(order)}
        ordered = sorted(contributions,
                         key=lambda c: (rank.get(c.client_id, len(rank)), c.client_id))
        if not ordered:
            log.warning("aggregation: no whole contribution; the global model stays")
            return
        for idx in range(self.model_num):
            msg_list = []
            for c in ordered:
                para = c.params if self.model_num == 1 else c.params[idx]
                # FS mutates its input: a copy unless the tensors are ours alone
                msg_list.append((c.sample_size, para if c.owned else _clone(para)))
            agg_info = {"client_feedback": msg_list, "recover_fun": None,
                        "staleness": [(c.client_id, 0) for c in ordered]}
            aggregator = self.aggregators[idx]
            if self.online:
                # FS's server resets at each broadcast and adds each upload
                # as it arrives (``inc``); here they arrive in id order.
                aggregator.reset()
                for item in msg_list:
                    aggregator.inc(item)
            result = aggregator.aggregate(agg_info)
            merge_into(self.models[idx], result, assign=self.pure)
        self._digest = None

    def merge_partial(self, flat_result: Mapping[str, torch.Tensor]) -> None:
        """A partial round of a linear rule: the coverage-weighted FedAvg
        (flat, K models prefixed) becomes the new global model."""
        parts = unflatten_models(flat_result, self.model_num)
        parts = [parts] if self.model_num == 1 else parts
        for model, part in zip(self.models, parts):
            merge_into(model, part, assign=self.pure)
        self._digest = None

    # ---- a cache shared by in-process clients (standalone) -------------------
    @property
    def pure(self) -> bool:
        """The rule's result depends only on the global model and the
        received models (no state carried across rounds, unlike FedOpt's
        server optimizer): in-process clients may share one result."""
        return self.rule in _PURE_RULES

    def set_state(self, flat: Mapping[str, torch.Tensor], digest: str) -> None:
        self.merge_partial(flat)
        self._digest = digest


_PURE_RULES = frozenset({"ClientsAvgAggregator", "OnlineClientsAvgAggregator",
                         "ServerClientsInterpolateAggregator", "KrumAggregator",
                         "MedianAggregator", "TrimmedmeanAggregator", "BulyanAggregator",
                         "NormboundingAggregator"})


def _whole(manifest: Any, held: Mapping[int, set]) -> bool:
    return len(held.get(manifest.owner, ())) == manifest.num_pieces


def _decode(manifest: Any, get_piece: Callable[[int, int], bytes]) -> dict:
    """A whole model from its pieces (the store verified each on entry)."""
    pieces = {k: get_piece(manifest.owner, k) for k in range(manifest.num_pieces)}
    return {name: values for name, (values, _) in
            partial_state_dict(manifest, pieces, verify=False).items()}


def aggregate_round(agg: FSAggregation, manifests: Sequence[Any], held: Mapping[int, set],
                    get_piece: Callable[[int, int], bytes], *, missing_policy: str,
                    local_model: Optional[Mapping[str, torch.Tensor]],
                    order: Sequence[int] = (), cache: Optional[dict] = None, round_idx: int = -1,
                    client_id: int = -1) -> AggregateResult:
    """One client's aggregation of one round (the policy in the module doc).

    ``held``: piece indices held per owner.  Returns an ``AggregateResult``
    whose ``state_dict`` is the new global model, flat (K models prefixed).
    """
    complete = all(_whole(m, held) for m in manifests)
    key = None
    if cache is not None and agg.pure:
        key = (round_idx, tuple(sorted((o, tuple(sorted(ix))) for o, ix in held.items())),
               agg.digest(), tuple(order), missing_policy if not complete else "",
               None if complete or missing_policy != "local" else client_id)
        hit = cache.get(key)
        if hit is not None:
            result, digest = hit
            agg.set_state(result.state_dict, digest)
            return result
    if complete or not agg.linear:
        whole = [m for m in manifests if _whole(m, held)]
        if not complete:
            log.warning("client %s: round %s is partial; %s (not linear) aggregates the %d of "
                        "%d models that arrived whole: %s", client_id, round_idx, agg.rule,
                        len(whole), len(manifests), [m.owner for m in whole])
        agg.aggregate([Contribution(m.owner, m.sample_count,
                                    unflatten_models(_decode(m, get_piece), agg.model_num),
                                    owned=True)
                       for m in whole], order)
        state = flatten_models(agg.state())
        result = AggregateResult(state, {}, [m.owner for m in whole],
                                 1.0 if complete else len(whole) / max(len(manifests), 1))
    else:
        contributions = [(m, {k: get_piece(m.owner, k) for k in held[m.owner]})
                         for m in manifests if held.get(m.owner)]
        fallback = local_model if missing_policy == "local" else flatten_models(agg.state())
        result = coverage_fedavg(contributions, fallback=fallback, verify=False)
        agg.merge_partial(result.state_dict)
        if not result.complete:
            log.warning("client %s: round %s aggregate covers %.1f%% of the model; the rest "
                        "follows missing_policy=%s", client_id, round_idx,
                        100 * result.covered_fraction, missing_policy)
    if key is not None:
        cache.clear()                       # one round's entry at a time
        cache[key] = (result, agg.digest())
    return result
