"""``BitTorrentManager``: the FS-facing adapter around the sans-IO engine.

One manager sits beside each FederatedScope worker.  It registers the
handlers for the nine BitTorrent messages (plus handshake, keep-alive,
credit) and the control messages on the worker, and it hooks the worker's
outgoing messages so FS's own training flow keeps working unchanged:

client side
  * FS's ``model_para`` upload to the server becomes a manifest: the trained
    ``state_dict`` is cut into pieces kept in the piece store, and only the
    manifest goes to the server;
  * on ``bt_start`` the client swarms with its neighbours, reports
    completion (tagged with the round), aggregates FedAvg from the pieces
    it holds, and keeps seeding until ``bt_round_end``.
server side
  * a ``model_para`` broadcast opens a round in the ``RoundCoordinator``
    (after round 0 the broadcast carries no weights: clients hold them);
  * manifests and reports feed the coordinator; its actions start the
    exchange or end the round, which then runs FS's own ``check_and_move_on``
    (evaluation, next round, termination);
  * ``evaluate`` and ``finish`` carry no weights either, so a client's
    aggregate is what FS evaluates.

Time and transport come from the host (``Scheduler``, ``PeerTransport``):
the standalone runner's virtual clock and network, or the distributed
worker loop and data plane.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import json
import logging
import os
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional, Protocol


from ..core.coordinator import CompletionReport, RoundCoordinator, RoundEnd, StartExchange
from ..core.layout import SwarmLayout
from ..core.manifest import Manifest
from ..core.messages import Message as PeerMessage
from ..core.picker import pace_uploads, plan_where_uplinks_differ
from ..core.pieces import make_model_manifest
from ..core.session import Close, SwarmSession
from ..core.topology import openings
from ..errors import BitTorrentError, HandshakeRequired, StoreError
from ..net.uplink import UplinkEstimate
from ..sim.swarm import lower_bound, lower_bound_latency
from . import monitoring, wire
from .agreement import Agreement, check_agreement
from .fs_aggregation import FSAggregation, aggregate_round, flatten_models, unflatten_models
from .global_model import AgreedModel

log = logging.getLogger(__name__)


class Scheduler(Protocol):
    def now(self) -> float: ...
    def call_at(self, at: float, fn: Callable[[], None]) -> None: ...


class PeerTransport(Protocol):
    """How peer messages leave: the standalone runner's virtual network, or
    the distributed data plane (which also has ``begin_round(round, session,
    addresses, certificates)`` and ``end_round()``: its connections belong to
    one round; and ``kept_peers()``, the connections it kept from the last
    round, see ``core.topology.openings``)."""

    def send_peer(self, src: int, dst: int, round_idx: int, msg: PeerMessage) -> None: ...
    def close_peer(self, src: int, dst: int, round_idx: int) -> None: ...


PROGRESS_INTERVAL = 1.0   # s between a distributed client's progress messages
DISTRIBUTED_REPORT_GRACE = 1.0   # s the server waits past its deadline for reports
ROUND_STATS_KEPT = 100    # rounds of figures the server keeps in memory
BLOCK_TIME = 0.008        # s of transfer a measured block size aims at (adaptive_block_size)
MAX_BLOCK = 128 * 1024    # the largest block a peer accepts (SwarmConfig.max_block_size)


def start_delays(sent_at: Optional[float], arrivals: Mapping[int, float],
                 reports: Mapping[int, Any]) -> dict[str, float]:
    """When each client began its exchange, in seconds after the server
    sent ``bt_start`` (``sent_at``, the server's clock), estimated without
    any clock of the client's: its report arrived at ``arrivals[c]`` and
    says it exchanged for ``exchange_time`` seconds from its own start, so
    it began at ``arrival - exchange_time``.  That includes the delivery of
    ``bt_start`` and the client's start-up, and over-estimates by the
    report's own delivery (milliseconds on one host).  Why: a round's T is
    the longest exchange, each from its client's own start, so clients that
    begin apart (``bt_start`` reaching them tens of ms apart) lengthen it
    (docs/benchmarks.md, eleventh session).  Clients without both figures
    are left out."""
    if sent_at is None:
        return {}
    return {str(c): max(0.0, arrivals[c] - reports[c].exchange_time - sent_at)
            for c in sorted(reports) if c in arrivals}


def block_size_for(rate: float, floor: int, ceiling: int) -> int:
    """The block size a requester downloading at ``rate`` bytes/s asks
    for: the power of two nearest below ``rate x BLOCK_TIME``, within
    [floor, ceiling].  Why: each block costs a request, a frame and a
    message through the session (about 56 us of CPU per block and side on
    loopback, docs/design.md); at 8 ms of transfer per block that is under
    1 % of the link's time, while blocks stay small enough on slow links
    that a piece still splits across sources and the end game stays fine.
    ``rate`` 0 (unknown) gives ``floor``."""
    ceiling = max(floor, ceiling)
    if not rate > 0:
        return floor
    size = floor
    while size * 2 <= ceiling and size * 2 <= rate * BLOCK_TIME:
        size *= 2
    return size


def _fs_message():
    from federatedscope.core.message import Message
    return Message


class BitTorrentManager:
    """Common part: settings, the worker, and the hook on its sends."""

    def __init__(self, worker: Any, settings: Any) -> None:
        self.worker = worker
        self.settings = settings
        self.scheduler: Optional[Scheduler] = None
        self.stale_messages = 0
        self.protocol_errors = 0
        # FS's distributed (protobuf) messages cannot carry None.
        self.distributed = settings.mode == "distributed"
        self.no_weights = wire.NO_WEIGHTS if self.distributed else None
        self._send = worker.comm_manager.send
        worker.comm_manager.send = self._outgoing

    def _outgoing(self, message: Any) -> None:
        self._send(message)

    def now(self) -> float:
        if self.scheduler is None:
            raise RuntimeError("BitTorrentManager used before a host attached a scheduler")
        return self.scheduler.now()

    def _message(self, msg_type: str, receiver: list[int], state: int, content: Any) -> Any:
        return _fs_message()(msg_type=msg_type, sender=self.worker.ID, receiver=receiver,
                             state=state, timestamp=getattr(self.worker, "cur_timestamp", 0),
                             content=content)


class ClientManager(BitTorrentManager):
    """Client side: manifests out, swarm, aggregate, report."""

    def __init__(self, worker: Any, settings: Any) -> None:
        super().__init__(worker, settings)
        self.transport: Optional[PeerTransport] = None
        self._store = None
        self._store_factory: Optional[Callable[[], Any]] = None
        self.address = ""                         # data plane host:port (distributed)
        self.certificate = ""                     # its TLS certificate, base64 DER (public)
        self.round = -1
        self.session: Optional[SwarmSession] = None
        self._generation = 0                      # sessions started (names timers)
        self.layout: Optional[SwarmLayout] = None
        self.started_at = 0.0
        self.reported = False
        self.aggregated = False
        self.local_model: Optional[dict] = None   # this round's published model (flat)
        self.last_aggregate = None                # AggregateResult of the last round
        self.last_digest = ""                     # sha256 of the global model after it
        self.order: list[int] = []                # the server's arrival order of the models
        # FS's server aggregation (aggregator and global model), run here.
        self.fs_agg = FSAggregation(worker._cfg, worker.model)
        self.timeline: list[tuple[float, float]] = []  # (seconds, completion) this round
        self.rate_in = 0.0                        # last round's download rate, bytes/s
        self.uplinks: dict[int, float] = {}       # this round's uplinks (peer -> bytes/s)
        self.uplink = 0.0                         # this client's uplink as reported
        self.uplink_estimate = UplinkEstimate()   # windowed max of the measured rates
        self._gc_paused = False                   # we disabled gc for this exchange
        self.progress = None                      # a SwarmProgress shared by the host
        self._pieces_seen = 0
        self._progress_sent = (-1, -1.0)          # (pieces, time) of the last bt_progress
        self.aggregate_cache: Optional[dict] = None  # shared by in-process clients
        self.failure: Optional[BaseException] = None  # why this client stops: see fail
        self.on_failure: Optional[Callable[[], None]] = None   # set by a distributed host
        # Builds the round's session: SwarmSession, or a host's stand-in with
        # the same interface (the standalone runner's flow level).
        self.session_factory: Callable[..., Any] = SwarmSession
        for name in wire.PEER_MSG_NAMES:
            worker.register_handlers(name, self.on_peer_message)
        worker.register_handlers(wire.MSG_START, self.on_start)
        worker.register_handlers(wire.MSG_ROUND_END, self.on_round_end)
        worker.register_handlers(wire.MSG_GLOBAL_INIT, self.on_global_init)
        worker.register_handlers(wire.MSG_FETCH_AGGREGATE, self.on_fetch_aggregate)

    def attach(self, scheduler: Scheduler, transport: PeerTransport, store: Any = None,
               aggregate_cache: Optional[dict] = None, progress: Any = None,
               store_factory: Optional[Callable[[], Any]] = None) -> None:
        """``store`` or ``store_factory``: a distributed client opens its store
        only once the server has assigned its id (the file is named after it)."""
        self.scheduler, self.transport, self._store = scheduler, transport, store
        self._store_factory = store_factory
        self.aggregate_cache = aggregate_cache
        self.progress = progress

    @property
    def store(self) -> Any:
        if self._store is None and self._store_factory is not None:
            self._store = self._store_factory()
        return self._store

    # ---- training side -----------------------------------------------------------
    def _has_id(self) -> bool:
        """A client publishes and swarms only under the id the server gave it."""
        return isinstance(self.worker.ID, int) and self.worker.ID >= 1

    def _require_id(self, what: str) -> None:
        if not self._has_id():
            raise BitTorrentError("client id", self.worker.ID,
                                  f"{what} before the server assigned this client an id")

    def global_model(self) -> Any:
        """What FS's server would send now: the global model this client holds."""
        if not self.fs_agg.loaded:
            log.error("client %s: no global model (round 0's never arrived); FS's handler "
                      "keeps the model it has", self.worker.ID)
            return None
        return self.fs_agg.state()

    def before_training(self, content: Any) -> Any:
        """Called with the incoming ``model_para`` content.  Round 0 brings
        the initial global model; later rounds bring None (the client holds
        the global model), replaced by what FS's server would have sent."""
        if content is None or content == wire.NO_WEIGHTS:
            return self.global_model()
        if wire.is_packed_weights(content):          # round 0, distributed
            content = unflatten_models(wire.unpack_weights(content), self.fs_agg.model_num)
        self.fs_agg.load(content, cache=self.aggregate_cache)
        return content

    def on_global_init(self, message: Any) -> None:
        """Round 0's model for a client not sampled in round 0: it aggregates
        every round, so it needs the global model FS's server starts from."""
        try:
            content = unflatten_models(wire.unpack_weights(message.content),
                                       self.fs_agg.model_num)
            self.fs_agg.load(content)
        except BitTorrentError as exc:
            self.protocol_errors += 1
            log.error("client %s: bad %s: %s", self.worker.ID, wire.MSG_GLOBAL_INIT, exc)

    def on_fetch_aggregate(self, message: Any) -> None:
        """The server evaluates the agreed model (``make_global_eval``):
        send it, safetensors (never pickle), with its digest."""
        r = message.content.get("round") if isinstance(message.content, dict) else None
        if r != self.round or not self.fs_agg.loaded:
            self.stale_messages += 1
            log.warning("client %s: cannot send the aggregate of round %s (holding %s)",
                        self.worker.ID, r, self.round)
            return
        state = self.fs_agg.state()
        self._send(self._message(wire.MSG_AGGREGATE, [self.worker.server_id], self.round,
                                 wire.pack_aggregate(self.round, self.fs_agg.digest(),
                                                     flatten_models(state))))

    def _outgoing(self, message: Any) -> None:
        if message.msg_type == "model_para" and message.receiver == [self.worker.server_id]:
            self._publish(message)
            return
        self._send(message)

    def _publish(self, message: Any) -> None:
        """Replace a weight upload by a manifest; the pieces stay here."""
        self._require_id("publishing a model")
        sample_size, params = message.content
        round_idx = message.state
        flat = flatten_models(params)
        # The trained model is kept only where it may be needed (the 'local'
        # missing policy); its pieces are in the store either way.
        self.local_model = {k: v.detach().cpu().clone() for k, v in flat.items()} \
            if self.settings.missing_policy == "local" else None
        manifest, pieces = make_model_manifest(flat, owner=self.worker.ID,
                                               round=round_idx, sample_count=int(sample_size),
                                               piece_size=self.settings.piece_size)
        self._store_manifests(round_idx, [manifest])
        for k, data in enumerate(pieces):
            self.store.put_piece(round_idx, self.worker.ID, k, self.worker.ID, data,
                                 manifest.piece_hashes[k])
        self.store.flush()
        out = self._message(wire.MSG_MANIFEST, [self.worker.server_id], round_idx,
                            wire.pack_manifest(round_idx, manifest, self.address,
                                               self.certificate))
        out.timestamp = message.timestamp   # FS's simulated time: FS's arrival order
        self._send(out)

    def _store_manifests(self, round_idx: int, manifests: list[Manifest]) -> None:
        """Store ``round_idx``'s manifests, replacing what an earlier run left.

        A reused ``db_dir`` (or a restarted client) hands this process a file
        an earlier run wrote.  What matches is kept (a resumed round fetches
        only what it lacks).  What cannot be this run's is dropped, with a
        warning: rounds later than the first one this process stores (a run
        never goes back, and ``cleanup`` keeps the *newest* rounds, so they
        would push this run's own rounds out), and a (round, owner) whose
        stored manifest differs from the one this run publishes or relays,
        when this process did not store it.  A difference in a manifest this
        process stored itself is a real conflict: the store refuses it."""
        store = self.store
        # round -> owners stored through this store object (in standalone the
        # in-process clients share it), i.e. by this process
        written = getattr(store, "bt_stored_owners", None)
        if written is None:
            written = store.bt_stored_owners = {}
        mine = written.get(round_idx)
        if mine is None:
            mine = written[round_idx] = set()
            if len(written) == 1:
                later = [r for r in store.rounds() if r > round_idx]
                if later:
                    log.warning("client %s: the piece store %s holds rounds %s of an earlier "
                                "run; dropping them", self.worker.ID,
                                getattr(store, "path", ""), later)
                    store.drop_rounds_from(later[0])
        stored = {m.owner: m for m in store.manifests(round_idx)}
        for m in manifests:
            old = stored.get(m.owner)
            if old is not None and m.owner not in mine and old.encode() != m.encode():
                log.warning("client %s: the piece store %s holds another manifest for round "
                            "%s owner %s (an earlier run's); replacing it", self.worker.ID,
                            getattr(store, "path", ""), round_idx, m.owner)
                store.drop_owner(round_idx, m.owner)
        store.put_manifests(manifests)
        mine.update(m.owner for m in manifests)

    # ---- exchange ----------------------------------------------------------------
    def on_start(self, message: Any) -> None:
        try:
            start = wire.unpack_start(message.content)   # bad uplinks: warned, dropped
        except BitTorrentError as exc:
            self.protocol_errors += 1
            log.error("client %s: bad %s: %s", self.worker.ID, wire.MSG_START, exc)
            return
        if not self._has_id():
            self.protocol_errors += 1
            log.error("client %s: %s before the server assigned this client an id; ignored",
                      self.worker.ID, wire.MSG_START)
            return
        if self.session is not None and not self.session.closed:
            self.session.close(self.now(), "superseded")
        # The path round trips the last round's session measured (or carried):
        # they still hold on the connections the host keeps (see below).
        last_rtts = self.session.path_rtts() if self.session is not None else {}
        me = self.worker.ID
        round_idx, manifests, neighbours = start.round, start.manifests, start.neighbours
        timeout, addresses, certificates = start.timeout, start.addresses, start.certificates
        measured = start.uplinks
        self._store_manifests(round_idx, [m for m in manifests if m.owner != me])
        self.round = round_idx
        self.layout = SwarmLayout(tuple(manifests), experiment=experiment_name(self.worker._cfg))
        storage = self.store.holder_view(round_idx, me)
        now = self.now()
        # With encryption the data plane's TLS authenticates peers; the HMAC
        # secret is only for a plaintext data plane, and never sent by anyone.
        secret = b"" if self.certificate else self.settings.secret.encode()
        participants = sorted({m.owner for m in manifests} | set(neighbours) | {me})
        uplinks = self.uplinks = self._round_uplinks(participants, measured)
        config = self._round_config(uplinks)
        # Where the plan is on, the same uplinks make it capacity-aware (the
        # session refuses ids that own nothing this round, so only owners).
        owners = set(self.layout.owners)
        hint = {o: r for o, r in uplinks.items() if o in owners and r > 0}
        extra = {"uplinks": hint} if hint and config.first_copy_wait > 0 else {}
        if extra and getattr(self.transport, "pace", None) is not None \
                and pace_uploads(config, hint.values()):
            # A TCP host that paces (net/pacing.py): the session holds served
            # requests and the host releases them as its uplink drains.
            extra["paced_uploads"] = True
        check = getattr(self.store, "check_piece", None)
        if check is not None:
            # the store's own check: each received piece is hashed once, not
            # again when the session puts it (store.check_piece)
            extra["check"] = check
        self.session = self.session_factory(me, self.layout, storage, config,
                                            secret=secret, now=now, **extra)
        self.started_at = now
        if self.distributed and gc.isenabled():
            # No cyclic garbage collection while the exchange runs: a full
            # collection of an FS client's heap (torch, protobuf, FS objects)
            # is a CPU burst in the middle of the round that stalls every
            # upload of this client (measured: clients burning twice their
            # usual CPU in the slow rounds).  Reference counting still frees
            # what the exchange drops; the collector is back at round end.
            gc.disable()
            self._gc_paused = True
        self.reported = self.aggregated = False
        self.timeline = [(0.0, self.session.completion())]
        self._pieces_seen = self.session.pieces_have
        if self.progress is not None:
            self.progress.start(round_idx, self.layout.num_pieces - self._pieces_seen)
        self.store.begin_session(round_idx, me, now=now)
        begin_round = getattr(self.transport, "begin_round", None)
        kept: set[int] = set()
        if begin_round is not None:
            begin_round(round_idx, self.session, addresses, certificates)
            kept = self.transport.kept_peers()
        for peer, rtt in openings(me, neighbours.get(me, []), kept, last_rtts):
            self._emit(self.session.connect(peer, now, path_rtt=rtt))
        # Timers name the session by generation, not by reference: a timer
        # pending past its round must not keep that round's session alive.
        self._generation += 1
        gen = self._generation
        self.scheduler.call_at(now + timeout, lambda: self._deadline(gen))
        self.scheduler.call_at(now + self.settings.tick_interval, lambda: self._tick(gen))
        self._check_done()

    def _round_uplinks(self, participants: list[int],
                       measured: dict[int, float]) -> dict[int, float]:
        """The round's uplinks (peer id -> bytes/s).  Configured per-client
        rates (``network.upload_per_client`` / ``network.upload_dist``) take
        precedence; otherwise the rates the peers measured last round and
        the server relayed, when every participant has one; else none."""
        s = self.settings
        if self.distributed and (s.network_upload_per_client or s.network_upload_dist):
            links = s.links(participants)
            return {c: links[c].up for c in participants}
        if measured and all(c in measured for c in participants):
            return {c: measured[c] for c in participants}
        return {}

    def _round_config(self, uplinks: dict[int, float]) -> Any:
        """The session's config for this round: the first-copy plan only
        where the known uplinks differ (none known: as configured), and, in
        distributed runs with ``adaptive_block_size``, blocks sized from the
        last round's download rate."""
        config = self.settings.swarm_config()
        if not self.distributed and config.lead_pieces:
            # Leaders yield (bittorrent.lead_pieces) corrects TCP's first-come
            # sharing of an uplink; the standalone runner's simulated links
            # share fairly, and there it only costs (docs/benchmarks.md).
            config = dataclasses.replace(config, lead_pieces=0)
        if uplinks:
            config = plan_where_uplinks_differ(config, list(uplinks.values()))
        if self.distributed and self.settings.adaptive_block_size and self.rate_in > 0:
            size = block_size_for(self.rate_in, config.block_size,
                                  min(MAX_BLOCK, config.max_block_size, config.piece_size))
            if size != config.block_size:
                log.info("client %s: round %s: %d-byte blocks (measured %.1f Mbit/s down)",
                         self.worker.ID, self.round, size, self.rate_in * 8 / 1e6)
                config = dataclasses.replace(config, block_size=size)
        return config

    def on_peer_message(self, message: Any) -> None:
        """A peer message as an FS message (standalone simulation)."""
        self.handle_peer(message.sender, message.state, message.content)

    def handle_peer(self, sender: int, round_idx: int, msg: PeerMessage) -> None:
        """One message from peer ``sender`` on round ``round_idx``'s swarm."""
        session = self.session
        if session is None or round_idx != self.round or session.closed:
            self.stale_messages += 1
            log.debug("client %s: dropping %s for round %s (current %s)", self.worker.ID,
                      type(msg).__name__, round_idx, self.round)
            return
        if self.failure is not None:
            return                           # stopping: see fail
        try:
            out = session.handle(sender, msg, self.now())
        except StoreError as exc:
            self._store_failed(exc)
            return
        except BitTorrentError as exc:
            self.protocol_errors += 1
            level = logging.DEBUG if isinstance(exc, HandshakeRequired) else logging.WARNING
            log.log(level, "client %s: from peer %s: %s", self.worker.ID, sender, exc)
            if not isinstance(exc, HandshakeRequired):
                session.peer_lost(sender, self.now())
                self.transport.close_peer(self.worker.ID, sender, self.round)
            return
        self._emit(out)
        self._check_done()

    def _store_failed(self, exc: StoreError) -> None:
        """This client's own store failed while the exchange stored a piece
        (a full disk: a batch that could not commit fails the next ``put``).
        Not the sending peer's doing, so no peer is blamed or dropped: the
        client cannot go on and stops.  In distributed mode ``on_failure``
        (set by the host) ends the process with the error; without one
        (standalone) it is raised, and the run stops with it."""
        log.error("client %s: its piece store failed in round %s: %s", self.worker.ID,
                  self.round, exc)
        self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """This client cannot go on (its store failed, or a send failed
        where no caller is left to raise into): keep the first cause, stop
        handling peer messages, and let the host stop the process
        (``on_failure``); without a host hook (standalone) raise it."""
        if self.failure is None:
            self.failure = exc
        if self.on_failure is None:
            raise exc
        self.on_failure()

    def peer_closed(self, peer: int, round_idx: int) -> None:
        """The host lost round ``round_idx``'s connection to ``peer``."""
        if self.session is not None and round_idx == self.round:
            self.session.peer_lost(peer, self.now())

    def reconnect(self, peer: int, round_idx: int) -> None:
        """The host will redial ``peer`` (a lost connection): handshake again."""
        s = self.session
        if s is None or s.closed or round_idx != self.round:
            return
        self._emit(s.connect(peer, self.now()))

    def _emit(self, outgoing: list) -> None:
        for dst, msg in outgoing:
            if isinstance(msg, Close):
                self.transport.close_peer(self.worker.ID, dst, self.round)
            else:
                self.transport.send_peer(self.worker.ID, dst, self.round, msg)
        s = self.session
        if s is not None and getattr(s, "paced_uploads", False):
            self.transport.pace(s, self._emit)

    def _current(self, gen: int) -> Optional[SwarmSession]:
        """The session a timer of generation ``gen`` is for, if still open."""
        s = self.session
        if gen != self._generation or s is None or s.closed:
            return None
        return s

    def _tick(self, gen: int) -> None:
        session = self._current(gen)
        if session is None:
            return
        self._emit(session.tick(self.now()))
        self._sample()
        self._check_done()
        if self.distributed:
            self._send_progress()
        self.scheduler.call_at(self.now() + self.settings.tick_interval,
                               lambda: self._tick(gen))

    def _deadline(self, gen: int) -> None:
        session = self._current(gen)
        if session is None or session.complete:
            return
        log.info("client %s: round %s exchange deadline with %d/%d pieces", self.worker.ID,
                 self.round, session.pieces_have, self.layout.num_pieces)
        self._emit(session.deadline(self.now()))
        self._finish_exchange("deadline")

    def _send_progress(self) -> None:
        """Pieces held so far, to the server's progress bar (distributed runs;
        in standalone the host shares one bar among the clients)."""
        have, now = self.session.pieces_have, self.now()
        last_have, last_at = self._progress_sent
        if have == last_have or now - last_at < PROGRESS_INTERVAL:
            return
        self._progress_sent = (have, now)
        self._send(self._message(wire.MSG_PROGRESS, [self.worker.server_id], self.round,
                                 wire.pack_progress(self.round, have, self.layout.num_pieces)))

    def _sample(self) -> None:
        """Completion over time, for plots: one sample per tick while swarming,
        thinned to at most ~200 points."""
        self.timeline.append((self.now() - self.started_at, self.session.completion()))
        if len(self.timeline) > 200:
            self.timeline = self.timeline[::2]

    def _check_done(self) -> None:
        if self.progress is not None and self.session is not None:
            have = self.session.pieces_have
            self.progress.advance(self.round, have - self._pieces_seen)
            self._pieces_seen = have
        if self.session is not None and self.session.complete and not self.reported:
            self._finish_exchange("complete")

    def _finish_exchange(self, reason: str) -> None:
        """Report completion (or the cut) to the server.  Aggregation waits
        for the round's end: until then this client keeps serving its peers,
        and FedAvg (seconds of CPU for a real model) would stall its event
        loop, and with it everyone still fetching from it."""
        if self.reported:
            return
        s = self.session
        done_at = s.stats.completed_at if s.complete and s.stats.completed_at is not None \
            else self.now()
        self.timeline.append((done_at - self.started_at, s.completion()))
        first = s.stats.first_piece_at
        report = CompletionReport(self.round, s.complete, s.pieces_have, self.layout.num_pieces,
                                  s.stats.bytes_up, s.stats.bytes_down,
                                  done_at - self.started_at, reason,
                                  first_piece_time=-1.0 if first is None else first - self.started_at,
                                  timeouts=s.stats.timeouts, corrupt_pieces=s.stats.corrupt_pieces,
                                  duplicate_blocks=s.stats.duplicate_blocks,
                                  timeline=tuple(self.timeline))
        self.reported = True
        self._send(self._message(wire.MSG_REPORT, [self.worker.server_id], self.round,
                                 wire.pack_report(report)))

    def _aggregate(self) -> None:
        """FS's aggregation over the held models (see fs_aggregation); the
        result stays the global model this client hands to FS's handlers."""
        self.aggregated = True
        held = self.session.held_by_owner()
        view = self.store.holder_view(self.round, self.worker.ID)
        result = aggregate_round(self.fs_agg, self.layout.manifests, held, view.get,
                                 missing_policy=self.settings.missing_policy,
                                 local_model=self.local_model, order=self.order,
                                 cache=self.aggregate_cache,
                                 round_idx=self.round, client_id=self.worker.ID)
        self.last_aggregate = result
        self.last_digest = self.fs_agg.digest()

    def on_round_end(self, message: Any) -> None:
        r = message.content.get("round") if isinstance(message.content, dict) else None
        if r != self.round or self.session is None:
            self.stale_messages += 1
            return
        try:
            self.order = wire.unpack_order(message.content)
        except BitTorrentError as exc:
            self.protocol_errors += 1
            log.error("client %s: bad %s: %s; aggregating by client id", self.worker.ID,
                      wire.MSG_ROUND_END, exc)
            self.order = []
        s = self.session
        now = self.now()
        self._resume_gc()
        if self.progress is not None:
            self.progress.finish(self.round)
        if not s.closed:
            if not s.complete:
                self._emit(s.deadline(now))
                self._finish_exchange("round end")
            else:
                self._emit(s.close(now, "round end"))
        self.store.update_session(self.round, self.worker.ID, bytes_up=s.stats.bytes_up,
                                  bytes_down=s.stats.bytes_down,
                                  pieces_received=s.stats.pieces_received)
        self.store.finish_session(self.round, self.worker.ID,
                                  "complete" if s.complete else "partial", now=now)
        self.store.flush()
        self._measure(s, now)
        t0 = self.now()       # the run's clock: 0 s of virtual time in standalone
        if not self.aggregated:
            self._aggregate()
        aggregate_time = self.now() - t0
        # The final counts, equal to the store's row: the server's per-round
        # metrics then agree with every client's database.  Plus the store's
        # size (monitoring), the aggregate's digest (agreement), and the bytes
        # into FS's own monitor.
        content = wire.pack_stats(self.round, s.stats.bytes_up, s.stats.bytes_down,
                                  s.pieces_have, aggregate_time, self.last_digest,
                                  uplink=self.uplink)
        store_path, store_bytes = monitoring.store_size(self.store)
        content.update(store_path=store_path, store_bytes=float(store_bytes))
        self._send(self._message(wire.MSG_STATS, [self.worker.server_id], self.round, content))
        monitoring.feed_fs_monitor(self.worker, s.stats.bytes_up, s.stats.bytes_down)
        end_round = getattr(self.transport, "end_round", None)
        if end_round is not None:
            end_round()
        # Old rounds go once per round, even when in-process clients share a store.
        if getattr(self.store, "bt_cleaned_round", None) != self.round:
            self.store.bt_cleaned_round = self.round
            self.store.cleanup(self.settings.keep_rounds)


    def _measure(self, s: SwarmSession, now: float) -> None:
        """The round's measured rates: our download rate (the next round's
        block size) and the data plane's uplink meter (reported to the
        server in ``bt_stats``, relayed to everyone in the next ``bt_start``)."""
        end = s.stats.completed_at if s.complete and s.stats.completed_at is not None else now
        took = end - self.started_at
        if s.stats.bytes_down > 0 and took > 0:
            self.rate_in = s.stats.bytes_down / took
        rate = getattr(self.transport, "uplink_rate", None)
        # Reported: the best of the last rounds (net/uplink.py, UplinkEstimate).
        self.uplink = self.uplink_estimate.add(float(rate()) if rate is not None else 0.0)

    def _resume_gc(self) -> None:
        """The exchange is over: garbage collection as usual again."""
        if self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def shutdown(self) -> None:
        """``finish`` arrived (possibly mid-exchange): close the session and
        release the store; the host closes the transport."""
        self._resume_gc()
        now = self.now() if self.scheduler is not None else 0.0
        if self.session is not None and not self.session.closed:
            self._emit(self.session.close(now, "finish"))
        self._store_factory = None
        if self._store is not None:
            self._store.close()
            self._store = None


class ServerManager(BitTorrentManager):
    """Server side: relay manifests, run the round state machine."""

    def __init__(self, worker: Any, settings: Any) -> None:
        super().__init__(worker, settings)
        # Clients report at their own deadline, which starts when bt_start
        # reaches them; the server waits ``report_grace`` beyond its own for
        # those reports.  Over real networks and loaded hosts delivery takes
        # more than two ticks (measured: deadline reports 0.1 s past a 0.2 s
        # grace at load 11, the round's completion lost), so distributed
        # runs wait at least DISTRIBUTED_REPORT_GRACE.
        grace = 2 * settings.tick_interval
        if self.distributed:
            grace = max(grace, DISTRIBUTED_REPORT_GRACE)
        self.coordinator = RoundCoordinator(settings.timeout, settings.min_completion_ratio,
                                            settings.insufficient_policy,
                                            report_grace=grace,
                                            manifest_timeout=settings.manifest_timeout)
        self.links: dict = {}
        # The last rounds' figures in memory (all of them are in the outdir's
        # bittorrent_rounds.jsonl): bounded, so long runs do not grow.
        self.round_stats: deque = deque(maxlen=ROUND_STATS_KEPT)
        self._owners: list[int] = []                 # clients asked to train this round
        self._sample_sizes: dict[int, int] = {}
        self._manifest_sizes: dict[int, int] = {}    # owner -> model bytes, this round
        self._arrival: list[int] = []                # manifest senders, in arrival order
        self._addresses: dict[int, str] = {}         # client -> data plane host:port
        self._certificates: dict[int, str] = {}      # client -> its TLS certificate (base64)
        self._uplinks: dict[int, float] = {}         # client -> its last measured uplink, B/s
        self._started_wall: dict[int, float] = {}    # round -> Unix time its bt_start left
        # round -> (our clock when its bt_start left, client -> its report's arrival)
        self._start_sent: dict[int, tuple[float, dict[int, float]]] = {}
        self._armed: set[float] = set()              # coordinator deadlines with a timer
        # The last round's figures wait for the clients' final counts (bt_stats).
        self._pending_stats: Optional[dict] = None
        self._stats_due: set[int] = set()
        self.progress = None                         # a SwarmProgress (distributed runs)
        self._progress_have: dict[int, int] = {}
        self.finished = False                        # FS sent finish: no round may follow
        cfg = worker._cfg
        # The server itself needs the agreed model: to evaluate it, or to save it.
        self.needs_model = bool(cfg.federate.make_global_eval) or bool(cfg.federate.save_to)
        self.agreed_model = AgreedModel(self)
        self.agreements: deque = deque(maxlen=ROUND_STATS_KEPT)
        self.disagreements = 0                       # complete clients that differed, all rounds
        worker.register_handlers(wire.MSG_AGGREGATE, self.agreed_model.on_aggregate)
        worker.register_handlers(wire.MSG_MANIFEST, self.on_manifest)
        worker.register_handlers(wire.MSG_REPORT, self.on_report)
        worker.register_handlers(wire.MSG_STATS, self.on_stats)
        worker.register_handlers(wire.MSG_PROGRESS, self.on_progress)
        # What crosses the server's own link, and the operator's round figures.
        self.traffic = monitoring.ServerTraffic()
        self.traffic.count_incoming(worker)
        self.figures = monitoring.RoundFigures()
        # What actually sends (FS's comm manager; a distributed host may put
        # a parallel fan-out in its place, ``distributed.FanOut``).
        self.raw_send = self._send

        def counted_send(message: Any) -> None:
            self.traffic.on_send(message)
            self.raw_send(message)
        self._send = counted_send

    def attach(self, scheduler: Scheduler, links: Optional[dict] = None,
               progress: Any = None) -> None:
        self.scheduler = scheduler
        self.links = links or {}
        self.progress = progress

    def clients(self) -> list[int]:
        return sorted(self.worker.comm_manager.neighbors.keys())

    def _outgoing(self, message: Any) -> None:
        if message.msg_type == "model_para":
            receivers = message.receiver if isinstance(message.receiver, list) \
                else [message.receiver]
            self._owners = sorted(receivers)
            self._arrival = []
            self.coordinator.begin_round(message.state, receivers, self.clients(), self.now())
            self._arm_timer()
            if message.state > 0:
                message.content = self.no_weights  # clients already hold the aggregate
            else:
                self._send_initial_model(message.content, receivers)
                if self.distributed:               # never FS's pickle
                    message.content = wire.pack_weights(flatten_models(message.content))
        elif message.msg_type in ("evaluate", "finish"):
            message.content = self.no_weights      # evaluate / keep each client's aggregate
            if message.msg_type == "finish":
                self.finished = True
                self.flush_stats()
            elif self.distributed:
                self._arm_eval_deadline()
        self._send(message)

    def _send_initial_model(self, content: Any, receivers: list[int]) -> None:
        """Clients not sampled in round 0 still aggregate every round, from
        the global model FS's server starts with: send it to them."""
        others = [c for c in self.clients() if c not in receivers]
        if others:
            self._send(self._message(wire.MSG_GLOBAL_INIT, others, 0,
                                     wire.pack_weights(flatten_models(content))))

    def _arm_eval_deadline(self) -> None:
        """FS's distributed server waits for every client's evaluation; one
        that crashed would stall the run.  After ``timeout`` seconds, move on
        with the results that arrived (as the exchange does at its deadline)."""
        armed = self.worker.state

        def deadline() -> None:
            w = self.worker
            buffer = w.msg_buffer.get("eval", {})
            if w.state != armed or getattr(w, "is_finish", False) or not buffer:
                return
            rnd = max(buffer)                  # FS evaluates the latest round's buffer
            got = buffer[rnd]
            if not got or len(got) >= w.sample_client_num:
                return
            log.warning("server: round %s evaluation deadline: %d/%d clients answered; "
                        "moving on without the others", rnd, len(got), w.sample_client_num)
            w.check_and_move_on(check_eval_result=True, min_received_num=len(got))
        self.scheduler.call_at(self.now() + self.settings.timeout, deadline)

    def _refuse(self, message: Any, what: str, exc: BitTorrentError) -> None:
        """A control message that failed its checks: counted, logged, dropped;
        nothing of it reached the round's state."""
        self.protocol_errors += 1
        log.error("server: bad %s from client %s: %s", what, message.sender, exc)

    @property
    def _fs_finished(self) -> bool:
        """FS finished the course (last round, or early stopping)."""
        return self.finished or getattr(self.worker, "is_finish", False)

    def _after_finish(self, message: Any, what: str) -> bool:
        """After FS finished, a round already under way is dropped, never
        aggregated or evaluated."""
        if self._fs_finished:
            self.stale_messages += 1
            log.debug("server: %s from client %s after finish; ignored", what, message.sender)
            return True
        return False

    def on_manifest(self, message: Any) -> None:
        if self._after_finish(message, wire.MSG_MANIFEST):
            return
        try:
            round_idx, manifest, address, certificate = wire.unpack_manifest(message.content)
            actions = self.coordinator.on_manifest(message.sender, round_idx, manifest, self.now())
        except BitTorrentError as exc:
            self._refuse(message, wire.MSG_MANIFEST, exc)
            return
        self._sample_sizes[message.sender] = manifest.sample_count
        if round_idx == self.coordinator.round and message.sender not in self._arrival:
            self._arrival.append(message.sender)
        if address:
            self._addresses[message.sender] = address
        if certificate:
            self._certificates[message.sender] = certificate
        self._act(actions)

    def on_report(self, message: Any) -> None:
        if self._after_finish(message, wire.MSG_REPORT):
            return
        now = self.now()
        try:
            report = wire.unpack_report(message.content)
            actions = self.coordinator.on_report(message.sender, report, now)
        except BitTorrentError as exc:
            self._refuse(message, wire.MSG_REPORT, exc)
            return
        sent = self._start_sent.get(report.round)
        if sent is not None:
            sent[1].setdefault(message.sender, now)
        self._advance_progress(message.sender, report.round, report.pieces_have)
        self._act(actions)

    def on_stats(self, message: Any) -> None:
        """A client's final counts of a round: complete that round's figures."""
        try:
            round_idx, up, down, have, aggregate_time = wire.unpack_stats(message.content)
            digest = wire.unpack_stats_digest(message.content)
        except BitTorrentError as exc:
            self._refuse(message, wire.MSG_STATS, exc)
            return
        uplink = wire.unpack_uplink(message.content)   # a bad figure: warned, ignored
        if uplink is not None:
            self._uplinks[message.sender] = uplink
        stats = self._pending_stats
        if stats is None or stats["round"] != round_idx or message.sender not in self._stats_due:
            self.stale_messages += 1
            log.info("server: ignoring %s of round %s from client %s", wire.MSG_STATS,
                     round_idx, message.sender)
            return
        c = str(message.sender)
        stats["bytes_up"][c], stats["bytes_down"][c] = up, down
        stats["aggregate_time"][c] = aggregate_time
        if uplink is not None:
            stats["uplink"][c] = uplink
        self.figures.note_client_store(stats, message.sender, message.content)
        stats["aggregate_digest"][c] = digest
        self._stats_due.discard(message.sender)
        if not self._stats_due:
            self.flush_stats()

    def flush_stats(self) -> None:
        """Write the pending round's figures (with whatever final counts came)."""
        stats, self._pending_stats = self._pending_stats, None
        if stats is not None:
            self._stats_due.clear()
            agreement = self._judge(stats)
            self._write_stats(stats)
            self.agreed_model.judged(agreement)

    def _judge(self, stats: dict) -> Agreement:
        """The round's agreement, into its figures (and the log)."""
        complete = {int(c) for c, v in stats["completion"].items() if v >= 1.0}
        digests = {int(c): d for c, d in stats["aggregate_digest"].items()}
        agreement = check_agreement(stats["round"], digests, complete,
                                    reporters={int(c) for c in stats["completion"]})
        stats["agreement"] = agreement.as_dict()
        self.agreements.append(agreement)
        self.disagreements += len(agreement.differing)
        log.info("server: round %s aggregate: %d client(s) agree on %s%s%s", agreement.round,
                 len(agreement.agreeing), (agreement.digest or "-")[:12],
                 f"; DIFFERING: {agreement.differing}" if agreement.differing else "",
                 f"; partial: {agreement.partial}" if agreement.partial else "")
        return agreement

    def on_progress(self, message: Any) -> None:
        try:
            round_idx, have, total = wire.unpack_progress(message.content)
        except BitTorrentError as exc:
            self._refuse(message, wire.MSG_PROGRESS, exc)
            return
        self._advance_progress(message.sender, round_idx, have)

    def _advance_progress(self, client: int, round_idx: int, have: int) -> None:
        """Move the round's bar by what ``client`` gathered since it last said."""
        if self.progress is None or round_idx != self.coordinator.round:
            return
        before = self._progress_have.get(client, 0)
        if have > before:
            self._progress_have[client] = have
            self.progress.advance(round_idx, have - before)

    def poll(self) -> None:
        self._act(self.coordinator.poll(self.now()))
        self._arm_timer()

    def _arm_timer(self) -> None:
        """One pending timer per coordinator deadline (this runs after every
        event; arming each time would pile up timers)."""
        at = self.coordinator.next_deadline()
        if at is not None and at not in self._armed:
            self._armed.add(at)
            self.scheduler.call_at(at, lambda: self._fire(at))

    def _fire(self, at: float) -> None:
        self._armed.discard(at)
        self.poll()

    def _act(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, StartExchange):
                if self.finished:          # e.g. the manifest deadline after early stopping
                    log.info("server: round %s not started: FS finished", action.round)
                    continue
                self._start(action)
            elif isinstance(action, RoundEnd):
                self._end(action)
        self._arm_timer()

    def _start(self, a: StartExchange) -> None:
        neighbours = self.settings.neighbours(list(a.participants))
        log.info("server: round %s: exchanging %d manifests among %d clients", a.round,
                 len(a.manifests), len(a.participants))
        self._manifest_sizes = {m.owner: m.total_size for m in a.manifests}
        addresses = {c: self._addresses[c] for c in a.participants if c in self._addresses}
        certificates = {c: self._certificates[c] for c in a.participants
                        if c in self._certificates}
        uplinks = {c: self._uplinks[c] for c in a.participants if c in self._uplinks}
        if self.progress is not None:
            have = {m.owner: len(m.piece_hashes) for m in a.manifests}
            self._progress_have = dict(have)
            total = sum(have.values()) * len(a.participants)
            self.progress.start(a.round, total - sum(have.values()))
        self._started_wall[a.round] = time.time()
        self._start_sent[a.round] = (self.now(), {})
        self._send(self._message(wire.MSG_START, list(a.participants), a.round,
                                 wire.pack_start(a.round, a.manifests, neighbours, a.timeout,
                                                 addresses, certificates, uplinks)))

    def _end(self, e: RoundEnd) -> None:
        w = self.worker
        # FS's server aggregates in its buffer's order (arrival): the clients
        # feed FS's aggregator in that order too (ties in krum, float sums).
        order = [c for c in self._arrival if c in e.owners]
        self._send(self._message(wire.MSG_ROUND_END, list(e.participants), e.round,
                                 wire.pack_round_end(e.round, order)))
        if self._fs_finished:
            log.info("server: round %s ended after FS finished; not aggregated", e.round)
            return
        if self.progress is not None:
            self.progress.finish(e.round)
        stats = self._round_stats(e)
        self.round_stats.append(stats)
        log.info("server: round %s exchange %s: %.3fs (%s), completion %.2f, T_LB %s, eta %s",
                 e.round, e.reason, stats["exchange_time"], stats["clock"],
                 stats["completion_ratio"], _fmt(stats["t_lb"]), _fmt(stats["eta"]))
        self.flush_stats()
        self._pending_stats = stats
        self._stats_due = set(e.reports)
        if e.abort:
            log.error("server: round %s aborted (%s); terminating", e.round, e.reason)
            w.terminate(msg_type="finish")
            w.state = w.total_round_num + 1
            return
        # Hand the round back to FS: its buffer gets the owners, then FS's own
        # check_and_move_on evaluates and starts the next round (or finishes).
        for cid in self._owners:
            w.sampler.change_state(cid, "idle")
        w.msg_buffer["train"].setdefault(w.state, {})
        for cid in e.owners:
            w.msg_buffer["train"][w.state][cid] = (self._sample_sizes.get(cid, 0), None)
        need = w.sample_client_num
        for cid in self._owners:
            if len(w.msg_buffer["train"][w.state]) >= need:
                break
            w.msg_buffer["train"][w.state].setdefault(cid, (0, None))
        if self.needs_model:
            # FS evaluates (or saves) its own model next: wait for the agreed one.
            self.agreed_model.wait_for(e.round)
            return
        w.check_and_move_on()

    def _round_stats(self, e: RoundEnd) -> dict:
        sizes = self._manifest_sizes
        completion_time = max((r.exchange_time for r in e.reports.values() if r.complete),
                              default=e.exchange_time)
        exchange_time = completion_time if e.reason == "complete" else e.exchange_time
        started_wall = self._started_wall.pop(e.round, None)
        sent_at, arrivals = self._start_sent.pop(e.round, (None, {}))
        start_delay = start_delays(sent_at, arrivals, e.reports)
        t_lb = t_lb_lat = None
        if self.links and sizes and all(c in self.links for c in e.participants):
            shares = {c: sizes.get(c, 0) for c in e.participants}
            links = {c: self.links[c] for c in e.participants}
            t_lb = lower_bound(shares, links)
            t_lb_lat = lower_bound_latency(shares, links)
        return {
            "round": e.round, "reason": e.reason, "clock": "virtual" if self.links else "wall",
            "exchange_time": exchange_time,
            # Unix time the server sent the round's bt_start (wall clock
            # only): lines a round up with what else the machine did then
            "started_wall": None if self.links else started_wall,
            # when each client began its exchange, after bt_start left here
            # (estimated on our clock, see start_delays), and their spread:
            # the round's T counts from each client's own start
            "start_delay": start_delay,
            "start_spread": (max(start_delay.values()) - min(start_delay.values())
                             if start_delay else None),
            "completion_ratio": e.completion_ratio,
            "completion": {str(c): r.completion for c, r in sorted(e.reports.items())},
            "bytes_up": {str(c): r.bytes_up for c, r in sorted(e.reports.items())},
            "bytes_down": {str(c): r.bytes_down for c, r in sorted(e.reports.items())},
            "first_piece_time": {str(c): r.first_piece_time for c, r in sorted(e.reports.items())},
            "timeouts": {str(c): r.timeouts for c, r in sorted(e.reports.items())},
            "corrupt_pieces": {str(c): r.corrupt_pieces for c, r in sorted(e.reports.items())},
            "duplicate_blocks": {str(c): r.duplicate_blocks
                                 for c, r in sorted(e.reports.items())},
            "timeline": {str(c): [list(x) for x in r.timeline]
                         for c, r in sorted(e.reports.items())},
            "aggregate_time": {str(c): 0.0 for c in sorted(e.reports)},   # from bt_stats
            "aggregate_digest": {},                                       # from bt_stats
            "uplink": {},                          # measured uplinks, B/s, from bt_stats
            "model_bytes": sum(sizes.values()),
            "t_lb": t_lb,
            "eta": (t_lb / exchange_time) if t_lb and exchange_time > 0 else None,
            # beside the headline: T_LB plus the unavoidable path latency
            "t_lb_lat": t_lb_lat,
            "eta_lat": (t_lb_lat / exchange_time) if t_lb_lat and exchange_time > 0 else None,
            "server_bytes": self.traffic.take(),
            **monitoring.star_figures(sizes, self._owners, e.owners),
        }

    def _write_fs_result(self, stats: dict) -> None:
        """The round's headline in FS's own result file (``eval_results.log``,
        via FS's monitor), next to its evaluation results: one line with
        ``Results_bittorrent``, which FS's readers of ``Results_*`` keys skip."""
        monitor = getattr(self.worker, "_monitor", None)
        if monitor is None or not getattr(monitor, "outdir", None):
            return
        headline = {key: stats[key] for key in ("reason", "clock", "exchange_time",
                                                "completion_ratio", "t_lb", "eta")}
        headline.update({key: stats.get(key) for key in monitoring.HEADLINE_KEYS})
        monitor.save_formatted_results({"Role": "Server #", "Round": stats["round"],
                                        "Results_bittorrent": headline})

    def _write_stats(self, stats: dict) -> None:
        outdir = getattr(self.worker._cfg, "outdir", None)
        if not outdir:
            return
        os.makedirs(outdir, exist_ok=True)
        self.figures.complete(stats)
        with open(os.path.join(outdir, "bittorrent_rounds.jsonl"), "a") as f:
            f.write(json.dumps(stats) + "\n")
        self._write_fs_result(stats)
        # The same figures per client, one row each, for spreadsheets.
        path = os.path.join(outdir, "bittorrent_rounds.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_COLUMNS)
            for c in sorted(stats["completion"], key=int):
                w.writerow([stats["round"], c, stats["reason"], stats["clock"],
                            stats["exchange_time"], stats["completion"][c],
                            stats["bytes_up"][c], stats["bytes_down"][c],
                            stats["first_piece_time"][c], stats["timeouts"][c],
                            stats["corrupt_pieces"][c], stats["duplicate_blocks"][c],
                            stats["aggregate_time"][c],
                            "" if stats["t_lb"] is None else stats["t_lb"],
                            "" if stats["eta"] is None else stats["eta"],
                            stats["store_bytes"].get(c, ""), stats["star_bytes"].get(c, 0),
                            stats["server_bytes"]])


CSV_COLUMNS = ("round", "client", "reason", "clock", "exchange_time", "completion",
               "bytes_up", "bytes_down", "first_piece_time", "timeouts", "corrupt_pieces",
               "duplicate_blocks", "aggregate_time", "t_lb", "eta", "store_bytes", "star_bytes",
               "server_bytes")


def experiment_name(cfg: Any) -> str:
    """What the swarm id binds besides round and manifests: every process of
    one experiment reads the same YAML, so they agree on it."""
    return f"fs_bittorrent:{getattr(cfg, 'expname', '') or 'default'}"


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"
