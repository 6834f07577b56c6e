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

Fault injection (``bittorrent.faults``, decided by ``core/faults.py`` with
the exchange seed) acts on the peer messages only; FS's control messages
(manifests, start, reports, round end) are never faulted:

* drop, duplicate, reorder, corrupt (a flipped byte in a piece block),
  delay (a stall before sending): applied by the ``VirtualNetwork``;
* disconnect: the message's connection (of its round) is cut, both clients
  learn it at once, whatever was in flight on it is lost, and the lower id
  redials after ``reconnect_after`` seconds if the round is still on;
* crash: in round ``crash_round``, ``crash_at`` seconds after a listed
  client received ``bt_start``, its exchange dies: its session is dropped
  without a word to anyone (peers see their connections reset), it sends
  no report, and its verified pieces stay in the store.  It handles the
  round's end and the following rounds as a restarted client.

Fidelity (``bittorrent.simulation``): ``block`` runs the ``SwarmSession``
of every client over the ``VirtualNetwork`` (every block, request and
``have`` is an event); ``flow`` simulates the round at once with
``sim/flow.py`` when ``bt_start`` goes out (pieces as max-min fair flows,
the engine's piece choice, end game, deadline and crashes) and hands each
client a ``FlowSessionView`` of the result, read at the virtual clock: the
clients report, time out and aggregate as they do at block level, from the
owners' verified pieces (recorded for each holder by reference in the
store at round end).  ``auto`` (the default) takes flow for rounds whose
block-level simulation would move more than ``AUTO_FLOW_BLOCKS`` blocks.
With a static network and unchanged model sizes a round's flow schedule
is the previous round's: it is computed once and reused.

``round_hooks``: callables ``hook(runner, round)`` run after each round's
``bt_round_end`` was handled by its clients (store flushed and cleaned),
for measurements such as ``scripts/soak.py``.
"""
from __future__ import annotations

import copy
import heapq
import logging
import os
import time
from typing import Any, Callable, Optional

from federatedscope.core.fed_runner import StandaloneRunner

from ..core.faults import flip_byte
from ..errors import BitTorrentError
from ..core.messages import Message as PeerMessage
from ..core.messages import Piece, message_size
from ..core.picker import plan_where_uplinks_differ
from ..core.session import SwarmSession
from ..sim.flow import FlowResult, FlowSessionView, FlowSwarm
from ..sim.network import VirtualNetwork
from ..store.sqlite_store import SQLitePieceStore
from . import wire
from .config import BitTorrentSettings
from .progress import SwarmProgress
from .wire import MSG_ROUND_END, MSG_START, PEER_MESSAGE_TYPES

log = logging.getLogger(__name__)

#: ``simulation: auto`` takes the flow level above this many block deliveries
#: per round.  Measured in this runner (FS messages, SQLite store): about
#: 270 us of wall time per block delivered (10 clients x 45 MB: 275 K blocks,
#: 75 s a round), so this is about a minute per round; below it the block
#: level is cheap and exact, above it the flow level is within a few percent
#: (docs/benchmarks.md).  The bare simulator is about 5x cheaper per block.
AUTO_FLOW_BLOCKS = 200_000

# What handling a message to clients is, for the wall-time split: training
# (model_para: FS trains, the client cuts and stores its pieces), the
# exchange (bt_start with the flow simulation, peer messages, network
# events), aggregation (bt_round_end: store bookkeeping and FedAvg),
# evaluation; messages to the server count as "server".
_WALL_PARTS = {"model_para": "training", MSG_ROUND_END: "aggregation",
               "evaluate": "evaluation", "finish": "evaluation"}


class BitTorrentStandaloneRunner(StandaloneRunner):
    """Standalone FS runner whose clients swarm on a virtual network."""

    #: reuse the last round's flow schedule when nothing it depends on changed
    flow_reuse = True

    def _set_up(self) -> None:
        super()._set_up()
        self.settings = BitTorrentSettings.from_cfg(self.cfg)
        ids = sorted(self.client)
        self.links = self.settings.links(ids)
        self.faults = self.settings.faults
        self.network = VirtualNetwork(self._deliver_peer, seed=self.settings.seed,
                                      faults=self.faults, corrupt=_corrupt_piece,
                                      on_disconnect=self._fault_disconnect)
        self._closed: set[tuple[int, int, int]] = set()  # (round, low id, high id)
        # A connection's generation: what was in flight when a fault cut it
        # is lost, never delivered on the redialled connection.
        self._generation: dict[tuple[int, int, int], int] = {}
        self._fault_closed: set[tuple[int, int, int]] = set()
        self.crashed: list[tuple[int, int]] = []  # (round, client) crashes injected
        self.levels: dict[int, str] = {}          # round -> 'block' | 'flow' it ran at
        # Wall seconds of the run by what the runner was doing (see _WALL_PARTS).
        self.wall_split: dict[str, float] = dict.fromkeys(
            ("training", "exchange", "aggregation", "evaluation", "server"), 0.0)
        self.flow_cpu: dict[int, float] = {}      # round -> CPU s of its flow simulation
        self._flow_cache: tuple = ((), None)      # (key, FlowResult) of the last flow round
        self._flow_round: Optional[tuple[int, FlowResult, float]] = None  # (round, result, t0)
        self.round_hooks: list[Callable[[Any, int], None]] = []
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
        """Run ``fn`` at virtual time ``at``."""
        self.network.schedule(at, fn)

    # ---- PeerTransport ---------------------------------------------------------------
    def send_peer(self, src: int, dst: int, round_idx: int, msg: PeerMessage) -> None:
        from federatedscope.core.message import Message
        fs_msg = Message(msg_type=PEER_MESSAGE_TYPES[type(msg)], sender=src, receiver=[dst],
                         state=round_idx, content=msg)
        gen = self._generation.get((round_idx, min(src, dst), max(src, dst)), 0)
        self.network.send(src, dst, (gen, fs_msg), message_size(msg))

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

    def _deliver_peer(self, src: int, dst: int, payload: Any) -> None:
        gen, fs_msg = payload
        key = (fs_msg.state, min(src, dst), max(src, dst))
        if key in self._closed or self._generation.get(key, 0) != gen:
            return
        self.client[dst].msg_handlers[fs_msg.msg_type](fs_msg)

    def _forget_round(self, round_idx: int) -> None:
        """A round ended: its connection records go (its sessions are closed,
        so whatever of it is still in flight is dropped as stale anyway)."""
        for book in (self._closed, self._fault_closed, self._generation):
            for key in [k for k in book if k[0] <= round_idx]:
                if isinstance(book, dict):
                    del book[key]
                else:
                    book.discard(key)

    # ---- injected faults ---------------------------------------------------------------
    def _fault_disconnect(self, src: int, dst: int, payload: Any) -> None:
        """The disconnect fault hit a message on the src-dst connection."""
        _, fs_msg = payload
        round_idx = fs_msg.state
        key = (round_idx, min(src, dst), max(src, dst))
        if key in self._closed:
            return
        self._closed.add(key)
        self._fault_closed.add(key)
        self._generation[key] = self._generation.get(key, 0) + 1
        log.debug("fault: round %s connection %s-%s cut", round_idx, key[1], key[2])

        def lost() -> None:
            self.client[src].bt.peer_closed(dst, round_idx)
            self.client[dst].bt.peer_closed(src, round_idx)

        def redial() -> None:
            if key not in self._fault_closed:
                return
            self._fault_closed.discard(key)
            self._closed.discard(key)
            lo, hi = key[1], key[2]
            bt = self.client[lo].bt
            if bt.round != round_idx or bt.session is None or bt.session.closed:
                return  # the round is over (or the client crashed): nothing to redial
            for peer, msg in bt.session.connect(hi, self.network.now):
                self.send_peer(lo, peer, round_idx, msg)

        self.network.schedule(self.network.now, lost)
        self.network.schedule(self.network.now + self.faults.reconnect_after, redial)

    def _arm_crashes(self, msg: Any) -> None:
        """After a ``bt_start``: schedule the crashes configured for its round."""
        receivers = msg.receiver if isinstance(msg.receiver, list) else [msg.receiver]
        for cid in self.faults.crashes_in(msg.state):
            if cid in receivers:
                self.network.schedule(self.network.now + self.faults.crash_at,
                                      lambda cid=cid, r=msg.state: self._crash(cid, r))

    def _crash(self, cid: int, round_idx: int) -> None:
        """Client ``cid``'s exchange dies: no goodbye, no report, no memory."""
        bt = self.client[cid].bt
        session = bt.session
        if bt.round != round_idx or session is None or session.closed:
            return
        now = self.network.now
        log.warning("fault: client %s crashes in round %s, %.3fs into the exchange with "
                    "%d/%d pieces", cid, round_idx, now - bt.started_at, session.pieces_have,
                    session.layout.num_pieces)
        self.crashed.append((round_idx, cid))
        peers = list(session.peers)
        session.close(now, "crashed")   # its Close actions are never sent: it is dead
        for peer in peers:
            key = (round_idx, min(cid, peer), max(cid, peer))
            if key in self._closed:
                continue
            self._closed.add(key)
            self._fault_closed.discard(key)
            # the peer sees the connection reset after one latency
            self.network.schedule(now + self.links[cid].latency,
                                  lambda peer=peer: self.client[peer].bt.peer_closed(
                                      cid, round_idx))

    # ---- the loop ----------------------------------------------------------------------
    def _run_simulation_online(self) -> None:
        """``federate.online_aggr``: FS's online loop hands a broadcast to one
        client at a time so its server can add each upload as it arrives.
        Here each client runs FS's online aggregator itself (in client-id
        order), and the exchange needs the virtual network: the usual loop."""
        self._run_simulation()

    def _run_simulation(self) -> None:
        """FS's control flow, with virtual time filling the idle gaps."""
        to_server: list = []
        serial = 0
        queue = self.shared_comm_queue
        split = self.wall_split
        clock = time.perf_counter
        while True:
            t0 = clock()
            if queue:
                msg = queue.popleft()
                if msg.receiver == [self.server_id]:
                    serial += 1
                    msg.serial_num = serial
                    heapq.heappush(to_server, msg)
                    continue
                kind = msg.msg_type
                if kind == MSG_START:
                    self._choose_level(msg)
                elif kind == MSG_ROUND_END:
                    self._record_flow_holdings(msg)
                self._handle_msg(msg)
                if kind == MSG_START and self.faults.crash_clients:
                    self._arm_crashes(msg)
                elif kind == MSG_ROUND_END:
                    self._forget_round(msg.state)
                    for hook in self.round_hooks:
                        hook(self, msg.state)
                part = _WALL_PARTS.get(kind, "exchange")
            elif to_server:
                self._handle_msg(heapq.heappop(to_server))
                part = "server"
            elif self.network.step():
                part = "exchange"
            else:
                break
            split[part] += clock() - t0
        self._closed.clear()
        self._fault_closed.clear()
        self._generation.clear()
        if self.faults.any or self.crashed:
            log.info("fault injection: %s; crashes (round, client): %s",
                     ", ".join(f"{k} {v}" for k, v in self.network.fault_counts.items()),
                     self.crashed)
        self.progress.close()
        self.store.close()
        log.info("wall time: %s", ", ".join(f"{k} {v:.1f} s" for k, v in self.wall_split.items()))


    # ---- fidelity levels -----------------------------------------------------------
    def _choose_level(self, msg: Any) -> None:
        """A ``bt_start`` is about to reach its clients: pick the round's level
        and, at flow level, simulate the round now."""
        try:
            start = wire.unpack_start(msg.content)
        except BitTorrentError:     # malformed: the clients refuse it themselves, and count it
            return
        round_idx, manifests, neighbours, timeout = (start.round, start.manifests,
                                                     start.neighbours, start.timeout)
        receivers = sorted(msg.receiver if isinstance(msg.receiver, list) else [msg.receiver])
        level = self.settings.simulation
        if level == "auto":
            blocks = len(receivers) * sum(m.total_size for m in manifests) \
                / self.settings.block_size
            level = "flow" if blocks > AUTO_FLOW_BLOCKS and \
                not self.settings.flow_unsupported() else "block"
        self.levels[round_idx] = level
        if level == "block":
            self._flow_round = None
            # the runner knows the links: the first-copy plan only where uplinks differ
            ups = [self.links[c].up for c in receivers if c in self.links]

            def block_factory(me, layout, storage, config, **kw):
                config = plan_where_uplinks_differ(config, ups)
                if config.first_copy_wait > 0:
                    # ... and the configured uplinks for a capacity-aware plan
                    kw.setdefault("uplinks", {o: self.links[o].up for o in layout.owners
                                              if o in self.links} or None)
                return SwarmSession(me, layout, storage, config, **kw)
            for cid in receivers:
                self.client[cid].bt.session_factory = block_factory
            return
        now = self.network.now
        result = self._flow_result(round_idx, manifests, neighbours, timeout, receivers)
        self._flow_round = (round_idx, result, now)

        def factory(me, layout, storage, config, secret=b"", now=now, **_hints):
            return FlowSessionView(result, me, layout, self.now, offset=now)
        for cid in receivers:
            bt = self.client[cid].bt
            bt.session_factory = factory
            done = result.completed_at.get(cid)
            if done is not None:
                # report at the very instant the last piece lands, as at block level
                self.network.schedule(now + done, lambda bt=bt, r=round_idx: (
                    bt._check_done() if bt.round == r and
                    isinstance(bt.session, FlowSessionView) else None))

    def _flow_result(self, round_idx: int, manifests: list, neighbours: dict,
                     timeout: float, receivers: list[int]) -> FlowResult:
        """The round's flow schedule, times relative to its start; the last
        one is reused when nothing it depends on changed (sizes, links,
        participants, topology, deadline, crashes)."""
        crashes = {c: self.faults.crash_at for c in self.faults.crashes_in(round_idx)
                   if c in receivers}
        key = (tuple((m.owner, m.total_size, m.piece_size) for m in sorted(
                   manifests, key=lambda m: m.owner)),
               tuple(receivers), tuple(sorted((k, tuple(v)) for k, v in neighbours.items())),
               float(timeout), tuple(sorted(crashes.items())))
        cached_key, cached = self._flow_cache
        if self.flow_reuse and cached is not None and cached_key == key:
            self.flow_cpu[round_idx] = 0.0
            return cached
        c0 = time.process_time()
        swarm = FlowSwarm(manifests, {c: self.links[c] for c in receivers},
                          self.settings.swarm_config(), seed=self.settings.seed,
                          neighbours=neighbours, peers=receivers, crashes=crashes)
        result = swarm.run(deadline=float(timeout))
        self.flow_cpu[round_idx] = time.process_time() - c0
        log.info("round %s: flow-level exchange of %d pieces among %d clients simulated in "
                 "%.2f CPU s (%d events, %d rate updates)", round_idx, swarm.P,
                 len(receivers), self.flow_cpu[round_idx], result.events, result.rate_updates)
        self._flow_cache = (key, result)
        return result

    def _record_flow_holdings(self, msg: Any) -> None:
        """A flow round ends: record in the store which pieces each client
        holds (references to the owners' verified bytes: no copy, no hash)."""
        if self._flow_round is None or self._flow_round[0] != msg.state:
            return
        receivers = msg.receiver if isinstance(msg.receiver, list) else [msg.receiver]
        for cid in receivers:
            bt = self.client[cid].bt
            session = bt.session
            if not isinstance(session, FlowSessionView) or bt.round != msg.state:
                continue
            keys = [(owner, k) for owner, held in session.held_by_owner().items()
                    if owner != cid for k in sorted(held)]
            self.store.put_refs(msg.state, cid, keys)
        self._flow_round = None


def _corrupt_piece(payload: Any, rng: Any) -> Any:
    """The corrupt fault on a runner payload: flip one byte of a piece block
    (a copy: the block is a view of the sender's stored bytes)."""
    gen, fs_msg = payload
    msg = fs_msg.content
    if type(msg) is not Piece or not len(msg.block):
        return None
    bad = copy.copy(fs_msg)
    bad.content = Piece(msg.index, msg.begin, flip_byte(msg.block, rng))
    return gen, bad
