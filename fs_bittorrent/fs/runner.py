"""FederatedScope standalone runner with a virtual clock for the exchange.

FS's standalone simulation handles every message at once and has no timers.
This runner keeps FS's message flow for control messages (the shared queue,
and a timestamp-ordered queue for messages to the server) and adds a
``VirtualNetwork`` for peer messages:

* a peer message's delivery time follows from the sender's upload rate,
  the latency and the receiver's download rate (FIFO links, so concurrent
  transfers share each link);
* timers (request timeouts, keep-alives, ticks, deadlines) fire in virtual
  time;
* when no FS message is pending, the clock jumps to the next network event.

A run is deterministic for a seed.  The exchange time each round is
reported in virtual seconds next to the all-gather lower bound T_LB.
"""
from __future__ import annotations

import heapq
import logging
import os
from typing import Any, Callable

from federatedscope.core.fed_runner import StandaloneRunner

from ..core.messages import Message as PeerMessage
from ..core.messages import message_size
from ..sim.network import VirtualNetwork
from ..store.sqlite_store import SQLitePieceStore
from .config import BitTorrentSettings
from .progress import SwarmProgress
from .wire import PEER_MESSAGE_TYPES

log = logging.getLogger(__name__)


class BitTorrentStandaloneRunner(StandaloneRunner):
    """Standalone FS runner whose clients swarm on a virtual network."""

    def _set_up(self) -> None:
        super()._set_up()
        self.settings = BitTorrentSettings.from_cfg(self.cfg)
        ids = sorted(self.client)
        self.links = self.settings.links(ids)
        self.network = VirtualNetwork(self._deliver_peer, seed=self.settings.seed)
        self._closed: set[tuple[int, int, int]] = set()  # (round, low id, high id)
        for cid in ids:
            self.network.add_link(cid, self.links[cid])
        os.makedirs(self.settings.db_dir, exist_ok=True)
        self.store = SQLitePieceStore(os.path.join(self.settings.db_dir, "pieces.db"))
        aggregate_cache: dict = {}
        self.progress = SwarmProgress()
        for cid, client in self.client.items():
            client.bt.attach(self, self, self.store, aggregate_cache, self.progress)
        self.server.bt.attach(self, self.links)

    # ---- Scheduler -----------------------------------------------------------------
    def now(self) -> float:
        return self.network.now

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        self.network.schedule(at, fn)

    # ---- PeerTransport ---------------------------------------------------------------
    def send_peer(self, src: int, dst: int, round_idx: int, msg: PeerMessage) -> None:
        from federatedscope.core.message import Message
        fs_msg = Message(msg_type=PEER_MESSAGE_TYPES[type(msg)], sender=src, receiver=[dst],
                         state=round_idx, content=msg)
        self.network.send(src, dst, fs_msg, message_size(msg))

    def close_peer(self, src: int, dst: int, round_idx: int) -> None:
        """Close the src-dst connection of one round's swarm.  Connections
        belong to a round: closing round r's never touches round r+1's."""
        key = (round_idx, min(src, dst), max(src, dst))
        if key in self._closed:
            return
        self._closed.add(key)

        def lost() -> None:
            self.client[dst].bt.peer_closed(src, round_idx)
            self.client[src].bt.peer_closed(dst, round_idx)

        self.network.schedule(self.network.now + self.links[src].latency, lost)

    def _deliver_peer(self, src: int, dst: int, fs_msg: Any) -> None:
        if (fs_msg.state, min(src, dst), max(src, dst)) in self._closed:
            return
        self.client[dst].msg_handlers[fs_msg.msg_type](fs_msg)

    # ---- the loop ----------------------------------------------------------------------
    def _run_simulation(self) -> None:
        """FS's control flow, with virtual time filling the idle gaps."""
        to_server: list = []
        serial = 0
        queue = self.shared_comm_queue
        while True:
            if queue:
                msg = queue.popleft()
                if msg.receiver == [self.server_id]:
                    serial += 1
                    msg.serial_num = serial
                    heapq.heappush(to_server, msg)
                else:
                    self._handle_msg(msg)
            elif to_server:
                self._handle_msg(heapq.heappop(to_server))
            elif not self.network.step():
                break
        self._closed.clear()
        self.progress.close()
        self.store.close()
