"""Client and server classes for ``bittorrent.enable: True``.

Users keep their ``federate.method``: the plugin takes whatever client and
server classes FederatedScope would pick for it and derives BitTorrent
variants (a mixin each), so the method's own behaviour stays.  The mixins
only attach a ``BitTorrentManager`` and adjust the two places where FS
assumes the server holds the weights.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

from ..errors import ConfigError
from .config import BitTorrentSettings
from .manager import ClientManager, ServerManager

log = logging.getLogger(__name__)


class BitTorrentClientMixin:
    """Trains as FS does; exchanges the result peer to peer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # FS builds a bare instance (no config) to list handlers: no manager then.
        self.bt = ClientManager(self, BitTorrentSettings.from_cfg(self._cfg)) \
            if self._cfg is not None else None

    def callback_funcs_for_model_para(self, message: Any) -> Any:
        # In standalone mode one broadcast object reaches every client:
        # never mutate it, work on a shallow copy.
        msg = copy.copy(message)
        msg.content = self.bt.before_training(message.content)
        return super().callback_funcs_for_model_para(msg)

    def _with_global_model(self, message: Any) -> Any:
        """FS's server sends its global model with ``evaluate`` and ``finish``;
        the exchange sends none, and the client's own copy takes its place."""
        if message.content is not None:
            return message
        msg = copy.copy(message)
        msg.content = self.bt.global_model()
        return msg

    def callback_funcs_for_evaluate(self, message: Any) -> Any:
        return super().callback_funcs_for_evaluate(self._with_global_model(message))

    def callback_funcs_for_finish(self, message: Any) -> Any:
        return super().callback_funcs_for_finish(self._with_global_model(message))


class BitTorrentServerMixin:
    """Coordinates rounds; never sees a weight after round 0."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bt = ServerManager(self, BitTorrentSettings.from_cfg(self._cfg)) \
            if self._cfg is not None else None

    def _perform_federated_aggregation(self) -> int:
        """Clients aggregated from the pieces they hold; the server only
        counts the round's contributors for FS's bookkeeping."""
        return len(self.msg_buffer["train"].get(self.state, {}))


# Server steps the exchange takes over: a server class of FS's with its own
# version of one of them does something the clients cannot repeat.
_TAKEN_OVER = ("_perform_federated_aggregation", "callback_funcs_model_para",
               "broadcast_model_para", "_start_new_training_round")


def check_server_class(server_cls: type) -> None:
    """Refuse (``ConfigError``) a server class that overrides a step the
    exchange replaces (FedSage+, GCFL+, FedEx, attack servers, ...)."""
    from federatedscope.core.workers import Server
    for name in _TAKEN_OVER:
        if getattr(server_cls, name, None) is not getattr(Server, name):
            raise ConfigError("federate.method", server_cls.__name__,
                              f"its server class overrides Server.{name}, which the exchange "
                              f"replaces (every client aggregates with FS's aggregator); set "
                              f"bittorrent.enable False to run plain FederatedScope")


def make_bittorrent_classes(client_cls: type, server_cls: type) -> tuple[type, type]:
    """BitTorrent variants of the given FS worker classes."""
    check_server_class(server_cls)
    client = type(f"BitTorrent{client_cls.__name__}", (BitTorrentClientMixin, client_cls), {})
    server = type(f"BitTorrent{server_cls.__name__}", (BitTorrentServerMixin, server_cls), {})
    return client, server
