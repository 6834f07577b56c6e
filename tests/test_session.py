"""Behaviour of the sans-IO ``SwarmSession``, driven by hand.

Every test wires two or three sessions (or a session and a hand-written fake
peer) through :class:`Pump`, a tiny in-test network that delivers queued
messages in FIFO order and lets a test hold, drop, duplicate or corrupt
specific ones, so each test controls the exact interleaving.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import defaultdict, deque
from typing import Callable, Optional

import pytest

from fs_bittorrent.core.bitfield import encode_bits
from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.layout import SwarmLayout, make_auth
from fs_bittorrent.core.messages import (Bitfield, Cancel, Choke, Credit, Handshake, Have,
                                         Interested, KeepAlive, NotInterested, Piece, Request,
                                         Unchoke)
from fs_bittorrent.core.session import Close, SwarmSession
from fs_bittorrent.core.storage import MemoryPieceStorage
from fs_bittorrent.errors import (BadBlockRange, BadLength, BlockTooLarge, ConfigError,
                                  CreditExceeded, HandshakeRefused, HandshakeRequired,
                                  PieceIndexOutOfRange, ProtocolError, SpareBitsSet)

from swarm_helpers import random_owner


# ---------------------------------------------------------------------------
# fixtures: manifests, storages, configs
# ---------------------------------------------------------------------------

def make(owner, n_pieces, piece_size, rnd=0, seed=0, short_last=True):
    """(manifest, pieces) of an owner whose 'model' is random bytes."""
    m, pieces, _ = random_owner(owner, n_pieces, piece_size, rnd=rnd, seed=seed,
                                short_last=short_last)
    return m, pieces


class CountingStorage(MemoryPieceStorage):
    """Memory storage that counts ``put`` calls per key."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: dict[tuple[int, int], int] = defaultdict(int)

    def put(self, source, index, sha256, data) -> None:
        super().put(source, index, sha256, data)
        self.puts[(source, index)] += 1


def storage(*owned) -> CountingStorage:
    """A storage holding every piece of each ``(manifest, pieces)`` given."""
    s = CountingStorage()
    for m, pieces in owned:
        for k, data in enumerate(pieces):
            s.put(m.owner, k, m.piece_hashes[k], data)
    s.puts.clear()
    return s


def cfg(**kw) -> SwarmConfig:
    base = dict(piece_size=64, block_size=16, max_block_size=32, credit_bytes=4096)
    base.update(kw)
    return SwarmConfig(**base)


BS = 16  # block size used throughout


def piece_bytes(owned: dict, layout: SwarmLayout, index: int) -> bytes:
    owner, local = layout.to_local(index)
    return owned[owner][1][local]


def assert_storage_verified(sess: SwarmSession) -> None:
    """Every stored piece matches its manifest hash and is marked held, and
    every held piece is stored."""
    lay = sess.layout
    for (owner, local) in sess.storage.keys():
        data = sess.storage.get(owner, local)
        assert hashlib.sha256(data).digest() == lay.manifest(owner).piece_hashes[local]
        assert sess.have[lay.to_global(owner, local)]
    held = {lay.to_local(i) for i in range(lay.num_pieces) if sess.have[i]}
    assert held == sess.storage.keys()


def all_zero(records: dict) -> bool:
    return all(v == 0 for v in records.values())


# ---------------------------------------------------------------------------
# the pump: a hand-driven network
# ---------------------------------------------------------------------------

Pred = Callable[[int, int, object], bool]


class Pump:
    """Delivers queued ``(src, dst, msg)`` in FIFO order.

    * ``hold(src, dst, msg)``: keep the message aside (``release`` later);
    * ``hook(src, dst, msg)``: list of messages to deliver instead (``[]``
      drops, ``[m, m]`` duplicates, a changed ``m`` corrupts);
    * ``after(pump)``: called after every delivery (for invariants).

    A ``Close`` from A to B closes the connection: B is told ``peer_lost``
    and further non-handshake messages on the link are dropped (recorded in
    ``dropped``), as a real host would.  Messages to an id without a session
    go to ``outbox`` (a fake peer).
    """

    def __init__(self, sessions: dict[int, SwarmSession], now: float = 0.0) -> None:
        self.s = dict(sessions)
        self.q: deque = deque()
        self.now = now
        self.log: list = []       # delivered, in order
        self.dropped: list = []   # dropped on a closed link
        self.held: list = []
        self._released: set = set()
        self.closed: set = set()
        self.outbox: dict[int, list] = defaultdict(list)
        self.hold: Optional[Pred] = None
        self.hook: Optional[Callable] = None
        self.after: Optional[Callable] = None

    def post(self, src: int, outs) -> None:
        for dst, msg in outs:
            self.q.append((src, dst, msg))

    def connect(self, a: int, b: int) -> None:
        self.post(a, self.s[a].connect(b, self.now))

    def deliver(self, src: int, dst: int, msg) -> None:
        link = frozenset((src, dst))
        if isinstance(msg, Close):
            self.log.append((src, dst, msg))
            self.closed.add(link)
            if dst in self.s:
                self.s[dst].peer_lost(src, self.now)
            return
        if isinstance(msg, Handshake):
            self.closed.discard(link)
        elif link in self.closed:
            self.dropped.append((src, dst, msg))
            return
        self.log.append((src, dst, msg))
        if dst not in self.s:
            self.outbox[dst].append(msg)
            return
        self.post(dst, self.s[dst].handle(src, msg, self.now))

    def step(self) -> None:
        item = self.q.popleft()
        src, dst, msg = item
        if self.hold is not None and self.hold(src, dst, msg) and id(item) not in self._released:
            self.held.append(item)
            return
        self._released.discard(id(item))
        msgs = self.hook(src, dst, msg) if self.hook is not None else [msg]
        for m in msgs:
            self.deliver(src, dst, m)
        if self.after is not None:
            self.after(self)

    def run(self, max_steps: int = 50_000, dt: float = 0.0) -> int:
        n = 0
        while self.q:
            self.now += dt
            self.step()
            n += 1
            assert n < max_steps, "pump did not settle"
        return n

    def release(self, pred: Pred = lambda s, d, m: True) -> None:
        """Queue held messages matching ``pred`` again; they bypass ``hold``."""
        keep = []
        for item in self.held:
            if pred(*item):
                self._released.add(id(item))
                self.q.append(item)
            else:
                keep.append(item)
        self.held = keep

    def tick(self, now: float, *pids: int) -> None:
        self.now = now
        for pid in (pids or list(self.s)):
            self.post(pid, self.s[pid].tick(now))

    def sent(self, src: int, dst: int, kind=None) -> list:
        return [m for s, d, m in self.log
                if s == src and d == dst and (kind is None or isinstance(m, kind))]


def is_piece(src: int, dst: int) -> Pred:
    return lambda s, d, m: s == src and d == dst and isinstance(m, Piece)


# ---------------------------------------------------------------------------
# state snapshots (for "nothing changed" checks)
# ---------------------------------------------------------------------------

def peer_snapshot(p) -> dict:
    d = {k: getattr(p, k) for k in (
        "handshaken", "handshake_sent_at", "am_choking", "am_interested", "peer_choking",
        "peer_interested", "has_count", "their_credit", "inflight_bytes", "reserved_total",
        "served_bytes", "last_recv", "last_sent", "timeout_streak", "interested_since",
        "rate_in", "rate_bytes", "rate_since", "min_rtt", "window", "slow_start")}
    d.update(has=bytes(p.has), inflight=dict(p.inflight), reserved=dict(p.reserved),
             duplicates=set(p.duplicates),
             served=dict(p.served), served_by_piece={k: set(v) for k, v in p.served_by_piece.items()},
             counters=dataclasses.asdict(p.counters))
    return d


def snapshot(s: SwarmSession) -> dict:
    pk = s.picker
    return {
        "records": s.record_counts(),
        "stats": dataclasses.asdict(s.stats),
        "peers": {pid: peer_snapshot(p) for pid, p in s.peers.items()},
        "availability": list(pk.availability),
        "have": list(pk.have),
        "partials": {i: (bytes(pp.buffer), list(pp.received), set(pp.open_blocks),
                         dict(pp.contributors), list(pp.block_from), pp.peer)
                     for i, pp in pk.partials.items()},
        "assigned": {q: set(v) for q, v in pk.assigned.items() if v},
        "unassigned": set(pk.unassigned),
        "outstanding": {k: set(v) for k, v in pk.outstanding.items()},
        "requested_at": dict(pk.requested_at),
        "unstarted": set(pk.unstarted),
        "missing": pk.missing_blocks,
        "avoid": {k: set(v) for k, v in pk.avoid.items()},
        "banned": set(s.banned),
        "corrupt_by_peer": dict(s.corrupt_by_peer),
        "suspects": {k: list(v) for k, v in s._suspects.items()},
        "stored": s.storage.keys(),
        "closed": s.closed,
    }


def hs(layout: SwarmLayout, pid: int, credit: int = 4096, secret: bytes = b"", **kw) -> Handshake:
    auth = make_auth(secret, layout.swarm_id, pid) if secret else b"\x00" * 32
    fields = dict(swarm_id=layout.swarm_id, peer_id=pid, credit=credit, auth=auth)
    fields.update(kw)
    return Handshake(**fields)


# ---------------------------------------------------------------------------
# standard swarms
# ---------------------------------------------------------------------------

def two_owner_swarm(config: Optional[SwarmConfig] = None, n0: int = 5, n1: int = 3):
    """Owners 0 and 1, each holding only its own pieces (last piece short)."""
    config = config or cfg()
    owned = {0: make(0, n0, 64), 1: make(1, n1, 64)}
    layout = SwarmLayout((owned[0][0], owned[1][0]))
    sessions = {pid: SwarmSession(pid, layout, storage(owned[pid]), config) for pid in owned}
    return layout, owned, sessions


def relay_swarm(n_pieces: int = 1, piece_size: int = 64, config: Optional[SwarmConfig] = None,
                short_last: bool = False):
    """Owner 0 (A), relay 1 (B) holding a copy of everything, downloader 2 (D)."""
    config = config or cfg()
    owned = {0: make(0, n_pieces, piece_size, short_last=short_last)}
    layout = SwarmLayout((owned[0][0],))
    sessions = {0: SwarmSession(0, layout, storage(owned[0]), config),
                1: SwarmSession(1, layout, storage(owned[0]), config),
                2: SwarmSession(2, layout, storage(), config)}
    return layout, owned, sessions


# ---------------------------------------------------------------------------
# handshake
# ---------------------------------------------------------------------------

RECORDS = {"partials", "outstanding_blocks", "request_times", "inflight_requests", "reservations",
           "assigned_pieces", "unassigned_pieces", "served_blocks", "avoid_lists",
           "held_uploads", "held_pieces",
           "suspect_pieces"}


def test_two_peer_swarm_handshake_sequence_and_completion():
    layout, owned, s = two_owner_swarm()
    net = Pump(s)
    net.after = check_ledgers
    net.connect(0, 1)
    net.run()

    # message order per direction: handshake, bitfield, interested; requests
    # only after the other side's unchoke arrived.
    for a, b in ((0, 1), (1, 0)):
        msgs = [m for src, dst, m in net.log if src == a and dst == b]
        kinds = [type(m) for m in msgs]
        assert kinds[0] is Handshake
        assert kinds.index(Bitfield) < kinds.index(Interested)
        assert Unchoke in kinds and Request in kinds and Piece in kinds and Have in kinds
        first_request = next(k for k, (src, dst, m) in enumerate(net.log)
                             if src == a and dst == b and isinstance(m, Request))
        unchoke_in = next(k for k, (src, dst, m) in enumerate(net.log)
                          if src == b and dst == a and isinstance(m, Unchoke))
        assert unchoke_in < first_request
        # the bitfield announces exactly the sender's own pieces
        bf = next(m for m in msgs if isinstance(m, Bitfield))
        want = [layout.owner_of(i) == a for i in range(layout.num_pieces)]
        assert bf.bits == encode_bits(want, layout.num_pieces)

    for pid, sess in s.items():
        assert sess.complete and sess.completion() == 1.0
        assert_storage_verified(sess)
        assert sess.storage.keys() == {(o, k) for o in owned for k in range(len(owned[o][1]))}
        for (o, k) in sess.storage.keys():
            assert sess.storage.get(o, k) == owned[o][1][k]
        other = 1 - pid
        assert sess.stats.pieces_received == len(owned[other][1])
        assert sess.stats.corrupt_pieces == sess.stats.duplicate_blocks == 0
        assert sess.stats.unrequested_blocks == sess.stats.credit_violations == 0
        assert sess.stats.completed_at is not None
        assert set(sess.record_counts()) == RECORDS
        assert all_zero(sess.record_counts()), sess.record_counts()
        assert not sess.peers[other].am_interested  # lost interest once done
        # every downloaded piece was written exactly once
        assert all(n == 1 for n in sess.storage.puts.values())
        assert len(sess.storage.puts) == len(owned[other][1])


def _handshaken_owner0():
    """Session 0 with fake peer 1 (owner 1) handshaken, unchoked both ways,
    with a request in flight from 0, one block served by 0 and one block of
    a partial piece received: every ledger holds something."""
    layout, owned, s = two_owner_swarm(n0=5, n1=2)  # 7 pieces: spare bit in the bitfield
    d = s[0]
    out = d.handle(1, hs(layout, 1), 1.0)
    # cooperative swarm (no upload slots): the handshake unchokes at once
    assert [type(m) for _, m in out] == [Handshake, Bitfield, Unchoke, Interested]
    out = d.handle(1, Unchoke(), 1.0)
    reqs = [m for _, m in out if isinstance(m, Request)]
    assert reqs
    out = d.handle(1, Interested(), 1.0)
    assert [type(m) for _, m in out] == [Unchoke]
    out = d.handle(1, Request(0, 0, BS), 1.0)
    assert [type(m) for _, m in out] == [Piece]
    r = reqs[0]
    data = piece_bytes(owned, layout, r.index)[r.begin:r.begin + r.length]
    d.handle(1, Piece(r.index, r.begin, data), 1.0)
    rc = d.record_counts()
    assert rc["partials"] and rc["inflight_requests"] and rc["served_blocks"]
    assert rc["reservations"] and rc["assigned_pieces"] and rc["outstanding_blocks"]
    return layout, owned, d


@pytest.mark.parametrize("case", ["protocol", "round", "experiment", "manifests", "peer_id",
                                  "self_id", "credit"])
def test_handshake_refused_without_side_effects(case):
    layout, owned, d = _handshaken_owner0()
    good = hs(layout, 5)
    m0, m1 = owned[0][0], owned[1][0]
    other_round = SwarmLayout((make(0, 5, 64, rnd=1)[0], make(1, 2, 64, rnd=1)[0]))
    other_exp = SwarmLayout((m0, m1), experiment="another")
    other_set = SwarmLayout((make(0, 5, 64, seed=9)[0], m1))
    peer, msg, field = {
        "protocol": (5, dataclasses.replace(good, protocol=b"BitTorrent protocol"), "protocol"),
        "round": (5, hs(other_round, 5), "swarm_id"),
        "experiment": (5, hs(other_exp, 5), "swarm_id"),
        "manifests": (5, hs(other_set, 5), "swarm_id"),
        "peer_id": (5, hs(layout, 6), "peer_id"),
        "self_id": (0, hs(layout, 0), "peer_id"),
        "credit": (5, hs(layout, 5, credit=BS - 1), "credit"),
    }[case]
    before = snapshot(d)
    with pytest.raises(HandshakeRefused) as exc:
        d.handle(peer, msg, 2.0)
    assert exc.value.field == field
    assert peer not in d.peers
    assert snapshot(d) == before
    # the same peer with a correct handshake is then accepted
    if case != "self_id":
        out = d.handle(5, good, 3.0)
        assert d.peers[5].handshaken and [type(m) for _, m in out][:2] == [Handshake, Bitfield]


def test_handshake_credit_of_exactly_one_block_is_accepted():
    layout, owned, d = _handshaken_owner0()
    d.handle(5, hs(layout, 5, credit=BS), 2.0)
    assert d.peers[5].handshaken and d.peers[5].their_credit == BS


@pytest.mark.parametrize("auth", ["missing", "wrong_secret", "other_peer", "other_swarm"])
def test_handshake_with_secret_checks_hmac(auth):
    secret = b"experiment secret"
    owned = {0: make(0, 3, 64), 1: make(1, 2, 64)}
    layout = SwarmLayout((owned[0][0], owned[1][0]))
    d = SwarmSession(0, layout, storage(owned[0]), cfg(), secret=secret)
    # our own handshake carries the HMAC
    (_, mine), = d.connect(7, 0.0)
    assert mine.auth == make_auth(secret, layout.swarm_id, 0)
    bad = {
        "missing": b"\x00" * 32,
        "wrong_secret": make_auth(b"guess", layout.swarm_id, 1),
        "other_peer": make_auth(secret, layout.swarm_id, 2),
        "other_swarm": make_auth(secret, SwarmLayout((owned[0][0],)).swarm_id, 1),
    }[auth]
    before = snapshot(d)
    with pytest.raises(HandshakeRefused) as exc:
        d.handle(1, hs(layout, 1, auth=bad), 1.0)
    assert exc.value.field == "auth"
    assert 1 not in d.peers and snapshot(d) == before
    out = d.handle(1, hs(layout, 1, secret=secret), 1.0)
    assert d.peers[1].handshaken
    assert out[0][1].auth == make_auth(secret, layout.swarm_id, 0)


def test_two_sessions_with_secret_complete_and_mismatched_secrets_do_not():
    owned = {0: make(0, 3, 64), 1: make(1, 2, 64)}
    layout = SwarmLayout((owned[0][0], owned[1][0]))
    s = {pid: SwarmSession(pid, layout, storage(owned[pid]), cfg(), secret=b"k") for pid in owned}
    net = Pump(s)
    net.connect(1, 0)
    net.run()
    assert s[0].complete and s[1].complete
    s2 = {0: SwarmSession(0, layout, storage(owned[0]), cfg(), secret=b"k"),
          1: SwarmSession(1, layout, storage(owned[1]), cfg(), secret=b"other")}
    net = Pump(s2)
    net.connect(1, 0)
    with pytest.raises(HandshakeRefused) as exc:
        net.run()
    assert exc.value.field == "auth"


MESSAGES_BEFORE_HANDSHAKE = [KeepAlive(), Choke(), Unchoke(), Interested(), NotInterested(),
                             Have(0), Bitfield(b"\x00"), Request(0, 0, BS), Piece(0, 0, bytes(BS)),
                             Cancel(0, 0, BS), Credit(4096)]


@pytest.mark.parametrize("msg", MESSAGES_BEFORE_HANDSHAKE, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("connected", [False, True])
def test_message_before_handshake_is_refused(msg, connected):
    layout, owned, d = _handshaken_owner0()
    if connected:
        d.connect(5, 2.0)  # our handshake is out, theirs has not arrived
    before = snapshot(d)
    with pytest.raises(HandshakeRequired):
        d.handle(5, msg, 3.0)
    assert snapshot(d) == before
    assert (5 in d.peers) == connected


# ---------------------------------------------------------------------------
# malformed messages after the handshake
# ---------------------------------------------------------------------------

# 7 pieces: 0..3 and 5 are 64 bytes, 4 and 6 are 43 (blocks 16, 16, 11)
MALFORMED = [
    (Have(7), PieceIndexOutOfRange),
    (Have(-1), PieceIndexOutOfRange),
    (Request(7, 0, BS), PieceIndexOutOfRange),
    (Request(-1, 0, BS), PieceIndexOutOfRange),
    (Piece(7, 0, bytes(BS)), PieceIndexOutOfRange),
    (Cancel(7, 0, BS), PieceIndexOutOfRange),
    (Request(0, 0, 0), BlockTooLarge),
    (Request(0, 0, -BS), BlockTooLarge),
    (Request(0, 0, 33), BlockTooLarge),
    (Request(0, 0, 1 << 20), BlockTooLarge),
    (Cancel(0, 0, 0), BlockTooLarge),
    (Cancel(0, 0, 33), BlockTooLarge),
    (Piece(0, 0, bytes(33)), BlockTooLarge),
    (Request(0, 1, BS), BadBlockRange),            # off the block grid
    (Request(0, 8, BS), BadBlockRange),
    (Request(0, -BS, BS), BadBlockRange),
    (Request(0, 64, BS), BadBlockRange),           # begin at the piece end
    (Request(0, 8, BS - 4), BadBlockRange),        # not on the grid of its own length
    (Request(0, 48, 32), BadBlockRange),           # a requester's 32-byte block past the piece
    (Request(4, 32, BS), BadBlockRange),           # short last block is 11 bytes
    (Request(4, 48, 11), BadBlockRange),           # past the short piece
    (Cancel(0, 1, BS), BadBlockRange),
    (Cancel(4, 32, BS), BadBlockRange),
    (Piece(0, 8, bytes(BS)), BadBlockRange),
    (Piece(0, 0, bytes(BS - 1)), BadBlockRange),
    (Piece(0, 0, b""), BadBlockRange),
    (Piece(4, 32, bytes(BS)), BadBlockRange),
    (Bitfield(b""), BadLength),
    (Bitfield(b"\x00\x00"), BadLength),
    (Bitfield(b"\x01"), SpareBitsSet),             # bit 7 = piece 7, does not exist
    (Bitfield(b"\xff"), SpareBitsSet),
    (Credit(BS - 1), CreditExceeded),              # below one block
    (Credit(0), CreditExceeded),
]


@pytest.mark.parametrize("msg,err", MALFORMED, ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_malformed_message_raises_before_any_state_change(msg, err):
    layout, owned, d = _handshaken_owner0()
    before = snapshot(d)
    with pytest.raises(err) as exc:
        d.handle(1, msg, 5.0)
    assert isinstance(exc.value, ProtocolError)
    assert exc.value.field  # names the offending field
    assert snapshot(d) == before


def test_valid_boundary_messages_are_accepted():
    layout, owned, d = _handshaken_owner0()
    # short last block of the short last piece: begin 32, length 11
    out = d.handle(1, Request(4, 32, 11), 5.0)
    assert [m for _, m in out] == [Piece(4, 32, owned[0][1][4][32:43])]
    d.handle(1, Cancel(4, 32, 11), 5.0)
    assert d.handle(1, Bitfield(b"\x06"), 5.0) == []  # pieces 5 and 6: the owner's own


def test_non_wire_object_is_refused_without_state_change():
    layout, owned, d = _handshaken_owner0()
    before = snapshot(d)
    with pytest.raises(ProtocolError):
        d.handle(1, Close("not a wire message"), 9.0)
    assert d.peers[1].last_recv == before["peers"][1]["last_recv"]
    assert snapshot(d) == before


# ---------------------------------------------------------------------------
# idempotence
# ---------------------------------------------------------------------------

def test_duplicated_request_is_served_again_but_counted_once():
    layout, owned, d = _handshaken_owner0()
    p = d.peers[1]
    out1 = d.handle(1, Request(2, 16, BS), 5.0)
    served, served_bytes = dict(p.served), p.served_bytes
    out2 = d.handle(1, Request(2, 16, BS), 5.5)
    expected = Piece(2, 16, owned[0][1][2][16:32])
    assert [m for _, m in out1] == [expected] and [m for _, m in out2] == [expected]
    assert p.served_bytes == served_bytes and list(p.served) == list(served)
    assert len(p.served_by_piece[2]) == 1
    assert p.counters.credit_violations == 0
    # their have for the piece settles it exactly once
    d.handle(1, Have(2), 6.0)
    assert 2 not in p.served_by_piece and (2, 16) not in p.served
    assert p.served_bytes == served_bytes - BS


def test_duplicated_have_and_bitfield_do_not_double_availability():
    layout, owned, d = _handshaken_owner0()
    avail = list(d.picker.availability)
    p = d.peers[1]
    d.handle(1, Have(0), 5.0)
    assert d.picker.availability[0] == avail[0] + 1
    after_first = snapshot(d)
    d.handle(1, Have(0), 5.0)
    assert snapshot(d) == after_first
    bits = encode_bits([i in (0, 2, 5, 6) for i in range(7)], 7)
    d.handle(1, Bitfield(bits), 5.0)
    expected = list(avail)
    expected[0] += 1
    expected[2] += 1
    assert d.picker.availability == expected
    assert p.has_count == 4
    again = snapshot(d)
    d.handle(1, Bitfield(bits), 5.0)
    d.handle(1, Have(2), 5.0)
    assert snapshot(d) == again
    # losing the peer removes exactly what it added
    d.peer_lost(1, 6.0)
    assert d.picker.availability == [0] * 7


def test_duplicated_pieces_are_counted_and_stored_once():
    layout, owned, s = two_owner_swarm()
    net = Pump(s)
    net.hook = lambda src, dst, m: [m, m] if isinstance(m, Piece) else [m]
    net.after = check_ledgers
    net.connect(0, 1)
    net.run()
    for pid, sess in s.items():
        other = 1 - pid
        n_blocks = sum(-(-layout.piece_length(i) // BS) for i in layout.owner_range(other))
        assert sess.complete
        assert sess.stats.duplicate_blocks == n_blocks == sess.peers[other].counters.duplicate_blocks
        assert sess.peers[other].counters.blocks_in == n_blocks
        assert sess.stats.unrequested_blocks == 0 and sess.stats.corrupt_pieces == 0
        assert dict(sess.storage.puts) == {(other, k): 1 for k in range(len(owned[other][1]))}
        assert_storage_verified(sess)
        assert all_zero(sess.record_counts())


def test_duplicated_piece_while_partial_is_not_copied_twice():
    layout, owned, d = _handshaken_owner0()
    r = next(iter(d.peers[1].inflight))  # a block in flight from peer 1
    index, begin = r
    data = piece_bytes(owned, layout, index)[begin:begin + BS]
    d.handle(1, Piece(index, begin, data), 5.0)
    before = snapshot(d)
    d.handle(1, Piece(index, begin, bytes(BS)), 5.0)  # a late, different copy
    after = snapshot(d)
    assert d.peers[1].counters.duplicate_blocks == 1 and d.stats.duplicate_blocks == 1
    assert after["partials"] == before["partials"]  # buffer untouched
    assert after["records"] == before["records"]


def test_cancel_for_unknown_block_is_harmless():
    layout, owned, d = _handshaken_owner0()
    before = snapshot(d)
    assert d.handle(1, Cancel(3, 48, BS), 5.0) == []
    assert d.handle(1, Cancel(6, 32, 11), 5.0) == []
    after = snapshot(d)
    assert after["peers"][1].pop("last_recv") == 5.0
    before["peers"][1].pop("last_recv")
    assert after == before


# ---------------------------------------------------------------------------
# credit
# ---------------------------------------------------------------------------

def sender_will_count(net: Pump, receiver: int, sender: int) -> tuple[int, int]:
    """What the sender counts against the receiver's credit as the messages
    on the way to it (queued or held, FIFO) arrive: served blocks that no
    Have or Cancel on the way clears, plus the requests on the way.
    Returns (the peak while they arrive, the count once all have)."""
    r = net.s.get(sender)
    if r is None or receiver not in r.peers:
        return 0, 0
    served = {k: n for k, (_, n) in r.peers[receiver].served.items()}
    pending = [m for s_, d_, m in list(net.q) + net.held if s_ == receiver and d_ == sender]
    if any(isinstance(m, Close) for m in pending):
        return 0, 0
    peak = sum(served.values())
    for m in pending:  # replay them in order
        if isinstance(m, Have):
            served = {k: n for k, n in served.items() if k[0] != m.index}
        elif isinstance(m, Cancel):
            served.pop((m.index, m.begin), None)
        elif isinstance(m, Request):
            served.setdefault((m.index, m.begin), m.length)
        peak = max(peak, sum(served.values()))
    return peak, sum(served.values())


def check_ledgers(net: Pump, seen: Optional[dict] = None) -> None:
    """The receive-side and send-side credit ledgers of every session."""
    for sess in net.s.values():
        c = sess.config
        pk = sess.picker
        for pid, p in sess.peers.items():
            # receive side: reservations within the credit we advertised
            assert 0 <= p.reserved_total <= c.credit_bytes
            assert p.reserved_total == sum(p.reserved.values())
            assert all(v > 0 for v in p.reserved.values())
            assert p.inflight_bytes == sum(pk.block_length(i, b) for i, b in p.inflight)
            assert 0 <= p.inflight_bytes <= p.reserved_total
            assert len(p.inflight) <= c.max_requests_per_peer
            assert p.duplicates <= set(p.inflight)
            for (i, b) in p.inflight:
                # a request is for a piece assigned to the peer, or an end-game copy
                assert (i, b) in p.duplicates or pk.partials[i].peer == pid
                assert pid in pk.outstanding[(i, b)]
            for i in pk.pieces_of(pid):
                # any piece assigned to a peer can be finished by that peer:
                # it holds the piece, and its whole length is reserved there
                assert p.has[i] and p.reserved.get(i, 0) >= sess.layout.piece_length(i), \
                    (sess.peer_id, pid, i, p.reserved)
            # send side: never past the credit the peer advertised
            assert p.served_bytes <= p.their_credit
            assert p.served_bytes == sum(n for _, n in p.served.values())
            # and a conformant receiver never asks past what it reserved here,
            # so the sender never finds a request past our credit
            peak, final = sender_will_count(net, sess.peer_id, pid)
            assert peak <= c.credit_bytes and final <= p.reserved_total, \
                (sess.peer_id, pid, dict(net.s[pid].peers[sess.peer_id].served), p.reserved)
            if seen is not None:
                seen["blocks"] = max(seen["blocks"], len(p.inflight))
                seen["bytes"] = max(seen["bytes"], p.reserved_total)
        for q in pk.assigned:
            assert not pk.assigned[q] or q in sess.peers


@pytest.mark.parametrize("kind", ["credit_bound", "pipeline_bound"])
def test_outstanding_requests_stay_within_credit_and_pipeline(kind):
    if kind == "credit_bound":
        config = cfg(credit_bytes=128, min_requests_per_peer=64, max_requests_per_peer=64)
    else:
        config = cfg(credit_bytes=4096, min_requests_per_peer=2, max_requests_per_peer=3)
    owned = {0: make(0, 6, 64), 1: make(1, 5, 64), 2: make(2, 4, 64)}
    layout = SwarmLayout(tuple(o[0] for o in owned.values()))
    s = {pid: SwarmSession(pid, layout, storage(owned[pid]), config) for pid in owned}
    net = Pump(s)
    seen = {"blocks": 0, "bytes": 0}
    net.after = lambda n: check_ledgers(n, seen)
    net.connect(0, 1)
    net.connect(0, 2)
    net.connect(1, 2)
    net.run(dt=0.001)  # time moves, so measured rates raise the pipeline depth
    for sess in s.values():
        assert sess.complete
        assert_storage_verified(sess)
        assert sess.stats.credit_violations == 0
        assert all(p.counters.credit_violations == p.counters.requests_refused == 0
                   for p in sess.peers.values())
        assert all_zero(sess.record_counts())
    if kind == "credit_bound":
        assert seen["bytes"] == 128  # the limit was reached, never passed
    else:
        assert seen["blocks"] == 3


def test_peer_flooding_requests_past_its_credit_is_refused():
    layout, owned, s = two_owner_swarm()
    d = s[0]
    d.handle(9, hs(layout, 9, credit=2 * BS), 0.0)  # a non-owner that accepts 2 blocks
    assert [type(m) for _, m in d.handle(9, Interested(), 0.0)] == [Unchoke]
    p = d.peers[9]
    outs = [d.handle(9, Request(0, b * BS, BS), 1.0) for b in range(4)]
    assert [len(o) for o in outs] == [1, 1, 0, 0]
    assert all(isinstance(m, Piece) for o in outs for _, m in o)
    assert p.counters.credit_violations == 2 and d.stats.credit_violations == 2
    assert p.served_bytes == 2 * BS and set(p.served) == {(0, 0), (0, BS)}
    assert p.counters.blocks_out == 2 and d.stats.bytes_up == 2 * BS
    # a repeat of a request already counted is served without new credit
    assert len(d.handle(9, Request(0, 0, BS), 1.0)) == 1
    assert p.counters.credit_violations == 2 and p.served_bytes == 2 * BS
    # its cancel frees credit: the next request fits
    d.handle(9, Cancel(0, 0, BS), 1.5)
    assert p.served_bytes == BS
    assert len(d.handle(9, Request(0, 2 * BS, BS), 2.0)) == 1
    assert len(d.handle(9, Request(1, 0, BS), 2.0)) == 0
    assert p.counters.credit_violations == 3
    # its have for the piece frees the rest
    d.handle(9, Have(0), 2.5)
    assert p.served_bytes == 0 and not p.served
    assert len(d.handle(9, Request(1, 0, BS), 3.0)) == 1
    # a lower credit advertised later is honoured
    d.handle(9, Credit(BS), 3.0)
    assert d.handle(9, Request(1, BS, BS), 3.0) == []
    assert p.counters.credit_violations == 4


def test_credit_below_one_block_is_refused_without_state_change():
    layout, owned, d = _handshaken_owner0()
    p = d.peers[1]
    for bad in (BS - 1, 0):
        before = snapshot(d)
        with pytest.raises(CreditExceeded) as exc:
            d.handle(1, Credit(bad), 5.0)
        assert exc.value.field == "credit" and isinstance(exc.value, ProtocolError)
        assert snapshot(d) == before and p.their_credit == 4096
    assert d.handle(1, Credit(BS), 5.0) == [] and p.their_credit == BS


def test_assigned_piece_can_always_be_finished_by_its_peer():
    """The old credit deadlock: a peer's credit full of half-received pieces
    that only it could finish.  Now a piece starts only where its whole
    length is reserved, so a peer can always finish what it was given."""
    # No first-copy plan: the test needs D to ask both A and B for A's pieces
    # from the start (the plan would keep D off A's first copies).
    config = cfg(credit_bytes=64, min_requests_per_peer=2, max_requests_per_peer=2,
                 request_timeout=10.0, first_copy_wait=0)
    layout, owned, s = relay_swarm(n_pieces=4, piece_size=64, config=config)
    net = Pump(s)
    net.after = check_ledgers
    net.hold = is_piece(1, 2)  # the relay's blocks never arrive
    net.connect(2, 0)
    net.connect(2, 1)
    net.run()
    d = s[2]
    # each peer holds one piece at most (its whole length fills the credit);
    # A finished every piece it was given, B's piece waits at B
    (b_piece,) = d.picker.pieces_of(1)
    assert d.peers[1].reserved == {b_piece: 64} and d.peers[1].reserved_total == 64
    assert set(d.picker.partials) == {b_piece}
    assert all(d.have[i] for i in range(4) if i != b_piece)
    # (A shares no open block of B's piece: that would leave less than a
    # whole piece of credit, and the piece could not be moved to A)
    assert not d.picker.pieces_of(0) and d.peers[0].reserved_total == 0
    assert d.stats.credit_violations == s[0].stats.credit_violations == 0
    d.peer_lost(1, 1.0)
    s[1].peer_lost(2, 1.0)
    net.held.clear()
    assert d.picker.unassigned == {b_piece}
    for t in range(1, 20):
        net.tick(t * 5.0)
        net.run()
    assert d.complete
    assert d.stats.timeouts == 0  # nothing had to be taken away
    assert s[0].stats.credit_violations == 0
    assert d.peers[0].counters.blocks_in == 4 * 4  # A finished all four pieces
    assert all_zero(d.record_counts())




def run_tight_credit_swarm(seed: int, end_game: bool) -> None:
    """Credit of one piece, three owners relaying to each other and to a
    fourth peer, one block in seven lost on the way: timeouts take pieces
    away and reassign them, and every ledger invariant holds after every
    delivery."""
    config = cfg(credit_bytes=64, min_requests_per_peer=2, max_requests_per_peer=4,
                 request_timeout=2.0, end_game_delay=0.5 if end_game else 1e9, max_retries=50)
    owned = {0: make(0, 3, 64), 1: make(1, 3, 64), 2: make(2, 2, 64)}
    layout = SwarmLayout(tuple(o[0] for o in owned.values()))
    s = {pid: SwarmSession(pid, layout, storage(owned[pid]), config) for pid in owned}
    s[3] = SwarmSession(3, layout, storage(), config)
    net = Pump(s)
    rnd = random.Random(seed)
    net.hook = lambda src, dst, m: [] if isinstance(m, Piece) and rnd.random() < 1 / 7 else [m]
    seen = {"blocks": 0, "bytes": 0}
    net.after = lambda n: check_ledgers(n, seen)
    for a, b in [(0, 1), (0, 2), (1, 2), (3, 0), (3, 1), (3, 2)]:
        net.connect(a, b)
    t = 0.0
    while not all(x.complete for x in s.values()):
        net.run(dt=0.01)
        t = net.now + 0.5
        net.tick(t)
        assert t < 200, {pid: x.completion() for pid, x in s.items()}
    net.run()
    assert seen["bytes"] == 64
    for sess in s.values():
        assert_storage_verified(sess)
        assert all(n == 1 for n in sess.storage.puts.values())
        assert sess.stats.credit_violations == 0
        assert all_zero(sess.record_counts()), sess.record_counts()
    assert sum(x.stats.timeouts for x in s.values()) > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_tight_credit_with_lost_blocks_keeps_ledgers_and_completes(seed):
    run_tight_credit_swarm(seed, end_game=False)


def test_tight_credit_with_end_game_copies_keeps_ledgers_and_completes():
    for seed in (1, 2, 3):
        run_tight_credit_swarm(seed, end_game=True)


def _dup_win_swarm():
    config = cfg(piece_size=32, credit_bytes=48, min_requests_per_peer=2,
                 max_requests_per_peer=2, end_game_delay=0.0)
    layout, owned, s = relay_swarm(n_pieces=2, piece_size=32, config=config)
    net = Pump(s)
    d = s[2]
    net.hold = lambda src, dst, m: dst == 2 and isinstance(m, Piece)
    net.connect(2, 0)
    net.connect(2, 1)
    net.run()
    # one piece per peer (credit 48 holds one 32-byte piece and one block)
    (a,) = d.picker.pieces_of(0)
    (x,) = d.picker.pieces_of(1)
    # A answers the first block of its piece: nearly idle, it duplicates
    # B's oldest block, and its copy arrives first
    net.release(lambda src, dst, m: src == 0 and m.index == a and m.begin == 0)
    net.run()
    assert d.peers[0].duplicates == {(x, 0)} and d.peers[0].reserved == {a: 32, x: BS}
    net.release(lambda src, dst, m: src == 0 and m.index == x)
    return net, s, a, x


def test_winning_end_game_copy_keeps_its_credit_until_the_piece_settles():
    net, s, a, x = _dup_win_swarm()
    d = s[2]
    net.after = check_ledgers
    net.run()
    assert s[0].stats.credit_violations == 0
    net.hold = None
    net.release()
    net.run()
    assert d.complete and d.stats.timeouts == 0


def test_end_game_copy_won_by_a_nearly_idle_peer_cancels_the_loser():
    """The part of the scenario above that works: the first copy wins, the
    other peer's request is cancelled, and the swarm completes."""
    net, s, a, x = _dup_win_swarm()
    d = s[2]
    net.step()  # A's copy of (x, 0) arrives
    assert d.picker.partials[x].block_from[0] == 0
    assert d.picker.partials[x].peer == 1  # a copy does not reassign the piece
    assert (x, 0) not in d.peers[1].inflight and (x, 0) not in d.peers[0].inflight
    assert list(net.q)[0] == (2, 1, Cancel(x, 0, BS))
    assert d.stats.cancels_sent == 1
    net.hold = None
    for t in (0.0, 11.0, 22.0):
        net.tick(t)
        net.release()
        net.run()
    assert d.complete and all_zero(d.record_counts())
    assert_storage_verified(d)


def test_requests_while_choked_or_for_missing_pieces_are_refused():
    # with upload slots, a peer starts choked and waits for its unchoke
    layout, owned, s = two_owner_swarm(cfg(max_upload_slots=1))
    d = s[0]
    assert Unchoke not in [type(m) for _, m in d.handle(9, hs(layout, 9), 0.0)]
    assert d.handle(9, Request(0, 0, BS), 0.0) == []  # still choked
    assert [type(m) for _, m in d.handle(9, Interested(), 0.0)] == [Unchoke]
    assert d.handle(9, Request(5, 0, BS), 0.0) == []  # owner 1's piece: we lack it
    assert d.peers[9].counters.requests_refused == 2
    assert not d.peers[9].served and d.stats.bytes_up == 0


def test_cooperative_swarm_unchokes_at_handshake():
    # no upload slots: nobody is ever choked, so requests may follow the
    # handshake at once, without a round trip for interest
    layout, owned, s = two_owner_swarm()
    d = s[0]
    out = d.handle(9, hs(layout, 9), 0.0)
    assert [type(m) for _, m in out] == [Handshake, Bitfield, Unchoke]
    assert not d.peers[9].am_choking and not d.peers[9].peer_interested
    assert [type(m) for _, m in d.handle(9, Request(0, 0, BS), 0.0)] == [Piece]
    assert d.handle(9, Request(5, 0, BS), 0.0) == []  # owner 1's piece: we lack it
    assert d.peers[9].counters.requests_refused == 1


# ---------------------------------------------------------------------------
# unrequested pieces
# ---------------------------------------------------------------------------

def test_unrequested_piece_is_refused_and_counted():
    layout, owned, s = two_owner_swarm()
    d = s[0]
    d.handle(1, hs(layout, 1), 0.0)  # peer 1 is owner 1; we are interested but choked
    before = snapshot(d)
    data = owned[1][1][0][:BS]
    assert d.handle(1, Piece(5, 0, data), 1.0) == []
    p = d.peers[1]
    assert p.counters.unrequested_blocks == 1 and d.stats.unrequested_blocks == 1
    assert p.counters.blocks_in == 0 and p.counters.duplicate_blocks == 0
    after = snapshot(d)
    for key in ("records", "partials", "outstanding", "unstarted", "missing", "stored", "have"):
        assert after[key] == before[key], key
    assert 5 not in d.picker.partials and not d.storage.puts
    # a whole unrequested piece is never stored either
    for b in range(4):
        d.handle(1, Piece(5, b * BS, owned[1][1][0][b * BS:(b + 1) * BS]), 1.0)
    assert not d.have[5] and not d.storage.puts and 5 not in d.picker.partials
    assert p.counters.unrequested_blocks == 5


def test_block_outstanding_at_another_peer_is_unrequested_from_this_one():
    layout, owned, s = two_owner_swarm()
    d = s[0]
    d.handle(1, hs(layout, 1), 0.0)
    d.handle(9, hs(layout, 9), 0.0)
    out = d.handle(1, Unchoke(), 0.0)
    index, begin = next(iter(d.peers[1].inflight))
    pp_before = bytes(d.picker.partials[index].buffer)
    assert d.handle(9, Piece(index, begin, bytes(BS)), 0.5) == []
    assert d.peers[9].counters.unrequested_blocks == 1
    assert bytes(d.picker.partials[index].buffer) == pp_before
    assert not d.picker.partials[index].received[begin // BS]
    assert d.picker.outstanding[(index, begin)] == {1}
    assert out  # sanity: requests did go to peer 1


# ---------------------------------------------------------------------------
# timeouts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("gave", [(), (0,), (0, 2), (1, 2)])
def test_timed_out_request_takes_the_whole_piece_to_another_holder(gave):
    config = cfg(end_game_delay=1000.0, request_timeout=10.0)
    layout, owned, s = relay_swarm(n_pieces=1, config=config)
    net = Pump(s)
    net.after = check_ledgers
    # A (0) is slow: its pieces are held.  B's unchoke is held at first so
    # that the piece is assigned to A.
    net.hold = lambda src, dst, m: dst == 2 and (isinstance(m, Piece) and src == 0
                                                or isinstance(m, Unchoke) and src == 1)
    net.connect(2, 0)
    net.connect(2, 1)
    net.run()
    d = s[2]
    assert sorted(d.peers[0].inflight) == [(0, 0), (0, 16), (0, 32), (0, 48)]
    assert d.picker.partials[0].peer == 0 and d.peers[0].reserved == {0: 64}
    # A gives some blocks
    net.release(lambda src, dst, m: src == 0 and m.begin // BS in gave)
    net.run()
    net.release(lambda src, dst, m: isinstance(m, Unchoke))
    net.run()
    assert not net.sent(2, 1, Request)  # the piece is A's (and no end game)
    asked = sorted((0, b * BS) for b in range(4) if b not in gave)
    assert sorted(d.peers[0].inflight) == asked
    assert sorted(s[0].peers[2].served) == [(0, b * BS) for b in range(4)]
    net.tick(9.99, 2)
    assert not net.q
    net.tick(10.0, 2)
    out = list(net.q)
    cancels = [m for src, dst, m in out if dst == 0 and isinstance(m, Cancel)]
    reissued = [m for src, dst, m in out if dst == 1 and isinstance(m, Request)]
    # Cancels for what A was asked and for what it already gave (so its
    # send ledger clears), once each
    assert sorted((m.index, m.begin) for m in cancels) == [(0, 0), (0, 16), (0, 32), (0, 48)]
    assert all(m.length == BS for m in cancels)
    # B gets the piece, resuming from the first missing offset
    missing = [b * BS for b in range(4) if b not in gave]
    assert [m.begin for m in reissued] == missing
    assert d.picker.partials[0].next_offset() == missing[0]
    assert not [m for src, dst, m in out if dst == 0 and isinstance(m, Request)]
    # one timeout takes the whole piece away: A's other requests go with it
    assert d.peers[0].counters.timeouts == 1 and d.stats.timeouts == 1
    assert d.peers[0].timeout_streak == 1 and not d.peers[0].inflight
    assert d.peers[0].reserved == {} and d.peers[0].reserved_total == 0
    assert d.picker.avoid[0] == {0}  # avoided for this piece: B can serve it
    assert d.picker.partials[0].peer == 1 and d.peers[1].reserved == {0: 64}
    assert d.picker.partials[0].received == [b in gave for b in range(4)]
    assert d.picker.outstanding == {(0, b): {1} for b in missing}
    net.run()
    assert s[0].peers[2].served == {} and s[0].peers[2].served_bytes == 0
    assert d.complete and d.storage.get(0, 0) == owned[0][1][0]
    # A's late blocks are duplicates, refused and not stored again
    net.hold = None
    net.release()
    net.run()
    assert d.peers[0].counters.duplicate_blocks == 4 - len(gave)
    assert d.peers[0].counters.blocks_in == len(gave) and d.storage.puts[(0, 0)] == 1
    assert d.peers[1].counters.blocks_in == 4 - len(gave)
    assert d.stats.credit_violations == s[0].stats.credit_violations == 0
    assert_storage_verified(d)
    for sess in s.values():
        assert all_zero(sess.record_counts()), sess.record_counts()


def test_timed_out_end_game_copy_is_just_cancelled():
    config = cfg(end_game_delay=0.5, request_timeout=10.0)
    layout, owned, s = relay_swarm(n_pieces=1, config=config)
    net = Pump(s)
    net.after = check_ledgers
    net.hold = lambda src, dst, m: dst == 2 and isinstance(m, Piece)
    d = s[2]
    net.connect(2, 0)
    net.run()
    assert d.picker.partials[0].peer == 0 and len(d.peers[0].inflight) == 4
    # B arrives later, nearly idle in end game: it duplicates A's old blocks
    net.now = 1.0
    net.connect(2, 1)
    net.run()
    p = d.peers[1]
    keys = {(0, b * BS) for b in range(4)}
    assert p.duplicates == keys == set(p.inflight)
    assert p.reserved == {0: 64} and not d.picker.pieces_of(1)
    assert all(v == {0, 1} for v in d.picker.outstanding.values())
    # A goes away: the piece is an orphan, B's copies stay outstanding
    d.peer_lost(0, 2.0)
    s[0].peer_lost(2, 2.0)
    net.held = [h for h in net.held if h[0] != 0]
    assert d.picker.unassigned == {0}
    assert all(v == {1} for v in d.picker.outstanding.values())
    net.tick(10.99, 2)
    assert not net.q
    net.tick(11.0, 2)
    out = [m for _, _, m in net.q]
    # every copy times out and is just cancelled: no piece taken away, no
    # avoidance; then B, idle, is given the orphan as its own piece
    assert out[:4] == [Cancel(0, b * BS, BS) for b in range(4)]
    assert out[4:] == [Request(0, b * BS, BS) for b in range(4)]
    assert p.counters.timeouts == 4 and p.timeout_streak == 1
    assert 0 not in d.picker.avoid
    assert not p.duplicates and p.reserved == {0: 64}
    assert d.picker.partials[0].peer == 1 and d.picker.pieces_of(1) == {0}
    net.run()
    net.hold = None
    net.release()
    net.run()
    assert d.complete and d.storage.puts[(0, 0)] == 1
    assert all_zero(d.record_counts())


@pytest.mark.parametrize("data_midway", [False, True])
def test_peer_dropped_after_max_retries_timeouts_in_a_row(data_midway):
    config = cfg(request_timeout=10.0, max_retries=2, min_requests_per_peer=2)
    layout, owned, s = relay_swarm(n_pieces=2, config=config)
    del s[1]
    net = Pump(s)
    net.hold = is_piece(0, 2)  # A never answers
    net.connect(2, 0)
    net.run()
    d = s[2]
    t = 0.0
    if data_midway:
        net.tick(10.0, 2)
        net.run()
        assert d.peers[0].timeout_streak == 1
        # one block arrives: the streak starts over
        net.hold = None
        net.release(lambda src, dst, m: m is next(mm for _, _, mm in net.held if mm.begin == 0))
        net.run()
        net.hold = is_piece(0, 2)
        assert d.peers[0].timeout_streak == 0
        t = 10.0
    for k in range(config.max_retries + 1):
        t += 10.0
        net.tick(t, 2)
        out = list(net.q)
        if k < config.max_retries:
            assert 0 in d.peers and d.peers[0].timeout_streak == k + 1
            assert any(isinstance(m, Cancel) for _, _, m in out)
            # retried with the only holder: not avoided when nobody else has it
            reqs = [m for _, _, m in out if isinstance(m, Request)]
            assert reqs
            (index,) = {m.index for m in reqs}
            assert reqs[0].begin == d.picker.partials[index].next_offset()
            assert d.picker.partials[index].peer == 0
            assert not any(isinstance(m, Close) for _, _, m in out)
        net.run()
    assert 0 not in d.peers
    assert [m for src, dst, m in net.log if src == 2 and dst == 0 and isinstance(m, Close)] \
        == [Close("unresponsive")]
    assert d.stats.timeouts >= config.max_retries + 1
    rc = d.record_counts()
    assert rc["inflight_requests"] == rc["outstanding_blocks"] == rc["request_times"] == 0
    assert rc["reservations"] == rc["assigned_pieces"] == 0
    assert rc["partials"] >= 1
    assert rc["unassigned_pieces"] == rc["partials"]  # partials stay, to resume elsewhere


# ---------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("got", [(0,), (0, 1), (0, 2), (1, 2, 3), (1,)])
def test_partial_piece_resumes_from_missing_offsets_with_another_peer(got):
    layout, owned, s = relay_swarm(n_pieces=1, config=cfg(min_requests_per_peer=4))
    net = Pump(s)
    net.hold = lambda src, dst, m: isinstance(m, Piece) and src == 0 and m.begin // BS not in got
    net.connect(2, 0)
    net.run()
    d = s[2]
    pp = d.picker.partials[0]
    assert pp.received == [b in got for b in range(4)]
    # the connection to A breaks
    d.peer_lost(0, 1.0)
    s[0].peer_lost(2, 1.0)
    net.held.clear()
    assert d.picker.partials[0].received == [b in got for b in range(4)]
    assert bytes(d.picker.partials[0].buffer[:BS]) == (owned[0][1][0][:BS] if 0 in got else bytes(BS))
    rc = d.record_counts()
    assert rc["partials"] == rc["unassigned_pieces"] == 1 and rc["assigned_pieces"] == 0
    assert rc["inflight_requests"] == rc["outstanding_blocks"] == rc["request_times"] == 0
    assert d.picker.partials[0].peer is None
    first_missing = min(b for b in range(4) if b not in got) * BS
    assert d.picker.partials[0].next_offset() == first_missing
    net.hold = None
    net.after = check_ledgers
    net.connect(2, 1)
    net.run()
    begins = [m.begin for m in net.sent(2, 1, Request)]
    assert begins[0] == first_missing
    assert begins == [b * BS for b in range(4) if b not in got]
    assert d.complete and d.storage.get(0, 0) == owned[0][1][0]
    assert d.peers[1].counters.blocks_in == 4 - len(got)
    assert d.stats.corrupt_pieces == 0 and d.stats.pieces_received == 1
    assert_storage_verified(d)
    assert all_zero(d.record_counts())


# ---------------------------------------------------------------------------
# corrupt data and bans
# ---------------------------------------------------------------------------

def corrupt(m: Piece) -> Piece:
    b = bytearray(bytes(m.block))
    b[0] ^= 0xFF
    return Piece(m.index, m.begin, bytes(b))


def test_corrupt_block_fails_piece_and_it_is_refetched_from_another_holder():
    config = cfg(min_requests_per_peer=2, max_requests_per_peer=2, max_corrupt_pieces=3)
    layout, owned, s = relay_swarm(n_pieces=3, piece_size=32, config=config)
    net = Pump(s)
    d = s[2]
    bad = {}

    def hook(src, dst, m):
        if src == 1 and dst == 2 and isinstance(m, Piece):
            bad.setdefault("index", m.index)
            if m.index == bad["index"] and m.begin == BS:
                return [corrupt(m)]
        return [m]

    net.hook = hook
    net.after = check_ledgers
    net.hold = lambda src, dst, m: src == 0 and dst == 2 and isinstance(m, Unchoke)
    net.connect(2, 1)
    net.connect(2, 0)
    net.run()
    x = bad["index"]
    # the bad piece failed and was not stored; the relay served the rest
    assert not d.have[x] and (0, x) not in d.storage.keys() and not d.storage.puts.get((0, x))
    assert d.stats.corrupt_pieces == 1
    assert d.peers[1].counters.corrupt_pieces == 1 and d.peers[0].counters.corrupt_pieces == 0
    assert 1 not in d.banned
    cancels = [m for m in net.sent(2, 1, Cancel)]
    assert sorted((m.index, m.begin) for m in cancels) == [(x, 0), (x, BS)]
    assert d.picker.avoid[x] == {1}
    assert x in d.picker.unstarted
    assert all(d.have[i] for i in range(3) if i != x)
    # the relay is not asked again for it while the owner can serve it
    n_req = len(net.sent(2, 1, Request))
    net.release()
    net.run()
    assert d.complete and d.storage.get(0, x) == owned[0][1][x]
    assert {(m.index, m.begin) for m in net.sent(2, 0, Request)} == {(x, 0), (x, BS)}
    assert len(net.sent(2, 1, Request)) == n_req
    assert d.stats.corrupt_pieces == 1 and d.peers[1].counters.corrupt_pieces == 1
    assert d.corrupt_by_peer == {1: 1}
    # the Cancels for the failed piece cleared the relay's send ledger
    assert not any(i == x for i, _ in s[1].peers[2].served)
    assert_storage_verified(d)
    assert all_zero(d.record_counts())


def test_peer_reaching_max_corrupt_pieces_is_banned_and_refused_later():
    config = cfg(min_requests_per_peer=2, max_requests_per_peer=2, max_corrupt_pieces=2)
    layout, owned, s = relay_swarm(n_pieces=4, piece_size=32, config=config)
    net = Pump(s)
    d = s[2]
    net.hook = lambda src, dst, m: [corrupt(m)] if src == 1 and isinstance(m, Piece) else [m]
    net.connect(2, 1)  # only the liar at first
    net.run()
    assert d.stats.corrupt_pieces == 2 and d.stats.bans == 1
    assert d.banned == {1} and 1 not in d.peers and d.corrupt_by_peer == {1: 2}
    assert [m for src, dst, m in net.log if src == 2 and dst == 1 and isinstance(m, Close)] \
        == [Close("served corrupt pieces")]
    assert not d.storage.puts
    assert_storage_verified(d)
    # the liar comes back: its handshake is answered with a Close, no record
    assert d.connect(1, 1.0) == []
    assert d.handle(1, hs(layout, 1), 2.0) == [(1, Close("banned"))]
    assert d.handle(1, Have(0), 2.0) == [(1, Close("banned"))]
    assert 1 not in d.peers
    s[1].peer_lost(2, 2.0)
    net.connect(1, 2)
    net.run()
    assert 1 not in d.peers
    assert net.log[-1] == (2, 1, Close("banned"))


def test_no_requests_to_a_peer_after_banning_it():
    config = cfg(min_requests_per_peer=2, max_requests_per_peer=2, max_corrupt_pieces=1,
                 end_game_delay=1000.0)
    layout, owned, s = relay_swarm(n_pieces=4, piece_size=32, config=config)
    net = Pump(s)
    d = s[2]
    net.hook = lambda src, dst, m: [corrupt(m)] if src == 1 and isinstance(m, Piece) else [m]
    net.connect(2, 1)
    net.run()
    assert d.banned == {1}
    to_liar = [m for src, dst, m in net.log + net.dropped if src == 2 and dst == 1]
    assert isinstance(to_liar[-1], Close), to_liar[-3:]
    assert to_liar[-1] == Close("served corrupt pieces")
    # nothing is left at the banned peer: no outstanding block, no piece
    assert not any(1 in peers for peers in d.picker.outstanding.values())
    assert not d.picker.pieces_of(1) and 1 not in d.peers
    assert not [x for x in net.dropped if x[0] == 2]  # nothing sent after the Close
    # the honest owner then serves everything, without needing end game
    net.connect(2, 0)
    net.run()
    assert d.complete
    assert all_zero(d.record_counts())


def test_split_hash_failure_blames_only_the_liar_once_piece_verifies():
    """A piece can be split between peers only when it is taken away (a
    timeout) or its peer leaves.  Then a hash failure names no one; the
    refetch goes to a single peer and, once the piece verifies, the giver
    whose blocks differ from the good bytes is blamed."""
    config = cfg(min_requests_per_peer=2, max_requests_per_peer=2, max_corrupt_pieces=3,
                 request_timeout=10.0, end_game_delay=1000.0)
    layout, owned, s = relay_swarm(n_pieces=1, piece_size=64, config=config)
    net = Pump(s)
    net.after = check_ledgers
    d = s[2]
    net.hook = lambda src, dst, m: [corrupt(m)] if src == 1 and isinstance(m, Piece) else [m]
    # the liar gets the piece, gives its first two blocks, then stalls
    net.hold = lambda src, dst, m: dst == 2 and (
        isinstance(m, Unchoke) and src == 0
        or isinstance(m, Piece) and src == 1 and m.begin >= 2 * BS)
    net.connect(2, 1)
    net.connect(2, 0)
    net.run()
    assert d.picker.partials[0].block_from == [1, 1, -1, -1]
    net.release(lambda src, dst, m: isinstance(m, Unchoke))
    net.run()
    # the liar times out: the owner finishes the piece from offset 32
    assert [m.begin for m in net.sent(2, 0, Request)] == []
    net.tick(10.0, 2)
    while net.q and d.stats.corrupt_pieces == 0:
        net.step()
    assert [m.begin for m in net.sent(2, 0, Request)][:2] == [2 * BS, 3 * BS]
    # the piece was split between the liar and the owner: nobody blamed yet
    assert d.stats.corrupt_pieces == 1 and not d.have[0]
    assert d.corrupt_by_peer == {} and not d.banned
    assert d.peers[0].counters.corrupt_pieces == d.peers[1].counters.corrupt_pieces == 0
    assert d.record_counts()["suspect_pieces"] == 1
    assert d.picker.avoid[0] == {0, 1}
    net.run()
    # the refetch went to a single peer (the owner, whose block completed the
    # failed piece), and verified: the liar is blamed, the owner is not
    assert d.complete and d.storage.get(0, 0) == owned[0][1][0]
    refetch = net.sent(2, 0, Request)[2:]
    assert [m.begin for m in refetch] == [0, BS, 2 * BS, 3 * BS]
    assert d.corrupt_by_peer == {1: 1}
    assert d.peers[1].counters.corrupt_pieces == 1 and d.peers[0].counters.corrupt_pieces == 0
    assert not d.banned
    net.held.clear()
    assert all_zero(d.record_counts())


def test_split_hash_failure_records_only_the_latest_suspects():
    """Two split failures in a row: each replaces the piece's suspects (the
    record stays bounded); blame settles from the latest once it verifies."""
    config = cfg(max_corrupt_pieces=3, request_timeout=10.0, end_game_delay=1000.0)
    owned = {0: make(0, 1, 64, short_last=False)}
    layout = SwarmLayout((owned[0][0],))
    good = owned[0][1][0]
    d = SwarmSession(2, layout, storage(), config)

    def join(pid, t):
        d.handle(pid, hs(layout, pid), t)
        if pid == 1:  # the relay says it holds the piece
            d.handle(pid, Bitfield(encode_bits([True], 1)), t)
        return d.handle(pid, Unchoke(), t)

    def give(pid, begin, t, lie=False):
        block = bytearray(good[begin:begin + BS])
        if lie:
            block[0] ^= 0xFF
        return d.handle(pid, Piece(0, begin, bytes(block)), t)

    def requests(out, pid):
        return [m.begin for q, m in out if q == pid and isinstance(m, Request)]

    assert requests(join(1, 0.0), 1) == [0, BS, 2 * BS, 3 * BS]  # the liar's piece
    assert requests(join(0, 0.0), 0) == []
    give(1, 0, 1.0, lie=True)
    give(1, BS, 1.0, lie=True)
    out = d.tick(10.0)          # the liar stalls: the owner takes over
    assert requests(out, 0) == [2 * BS, 3 * BS]
    give(0, 2 * BS, 11.0)
    out = give(0, 3 * BS, 11.0)
    assert d.stats.corrupt_pieces == 1 and len(d._suspects[0]) == 4
    assert [pid for pid, *_ in d._suspects[0]] == [1, 1, 0, 0]
    assert requests(out, 0) == [0, BS, 2 * BS, 3 * BS]  # refetch: one peer
    # second attempt: the owner gives two blocks and stalls; the liar
    # finishes, lying again
    give(0, 0, 12.0)
    give(0, BS, 12.0)
    out = d.tick(22.0)
    assert requests(out, 1) == [2 * BS, 3 * BS]
    give(1, 2 * BS, 23.0, lie=True)
    out = give(1, 3 * BS, 23.0, lie=True)
    assert d.stats.corrupt_pieces == 2 and d.corrupt_by_peer == {}
    assert len(d._suspects[0]) == 4  # replaced, not appended
    assert [pid for pid, *_ in d._suspects[0]] == [0, 0, 1, 1]
    # third attempt (the liar, whose block completed the failure), honest
    # this time: the piece verifies and blame settles from the latest failure
    assert requests(out, 1) == [0, BS, 2 * BS, 3 * BS]
    for b in range(4):
        give(1, b * BS, 24.0)
    assert d.complete and d.storage.get(0, 0) == good
    assert d.corrupt_by_peer == {1: 1} and not d._suspects
    assert d.peers[0].counters.corrupt_pieces == 0 and not d.banned
    assert all_zero(d.record_counts())


@pytest.mark.parametrize("first", [(0, 1), (1, 0)], ids=["owner_first", "liar_first"])
@pytest.mark.parametrize("delay", [0.0, 0.5])
@pytest.mark.parametrize("n_pieces", [1, 3])
def test_liar_sharing_pieces_with_honest_owner_does_not_livelock(first, delay, n_pieces):
    config = cfg(min_requests_per_peer=2, max_requests_per_peer=2, max_corrupt_pieces=3,
                 end_game_delay=delay)
    owned = {0: make(0, n_pieces, 64, short_last=False)}
    layout = SwarmLayout((owned[0][0],))
    s = {0: SwarmSession(0, layout, storage(owned[0]), config),
         1: SwarmSession(1, layout, storage(owned[0]), config),
         2: SwarmSession(2, layout, storage(), config)}
    net = Pump(s)
    d = s[2]
    net.hook = lambda src, dst, m: [corrupt(m)] if src == 1 and isinstance(m, Piece) else [m]

    def bounded(n):
        check_ledgers(n)
        for v in d._suspects.values():
            assert len(v) <= 4  # one entry per block of the latest failure
    net.after = bounded
    for pid in first:
        net.connect(2, pid)
    # the downloader's timer runs between deliveries, so both holders get work
    for _ in range(2000):
        if not net.q:
            break
        net.step()
        net.tick(net.now + 0.01, 2)
    assert d.complete
    assert_storage_verified(d)
    # blame is certain: every failed piece is counted against the liar, and
    # never against the owner
    assert d.corrupt_by_peer.get(0, 0) == 0
    assert d.corrupt_by_peer.get(1, 0) == d.stats.corrupt_pieces
    if first[0] == 1:
        assert d.stats.corrupt_pieces >= 1
    assert not d._suspects and all_zero(d.record_counts())


def test_corrupt_count_survives_reconnect():
    config = cfg(min_requests_per_peer=2, max_requests_per_peer=2, max_corrupt_pieces=2)
    layout, owned, s = relay_swarm(n_pieces=4, piece_size=32, config=config)
    d = s[2]
    net = Pump(s)
    net.hook = lambda src, dst, m: [corrupt(m)] if src == 1 and isinstance(m, Piece) else [m]
    fails = 0
    for _ in range(3):
        net.connect(2, 1)
        while net.q and d.stats.corrupt_pieces == fails:
            net.step()
        fails = d.stats.corrupt_pieces
        if 1 in d.banned:
            break
        # the liar drops the connection after each bad piece and comes back
        assert d.peers[1].counters.corrupt_pieces == 1  # per connection
        assert d.corrupt_by_peer == {1: fails}          # per session
        net.q.clear()
        d.peer_lost(1, net.now)
        s[1].peer_lost(2, net.now)
        assert d.corrupt_by_peer == {1: fails}
    assert d.stats.corrupt_pieces == config.max_corrupt_pieces  # all from peer 1, alone
    assert d.corrupt_by_peer == {1: config.max_corrupt_pieces}
    assert 1 in d.banned and 1 not in d.peers and d.stats.bans == 1
    assert any(m == Close("served corrupt pieces") for src, dst, m in net.q if dst == 1)


def test_liar_that_left_is_banned_when_blame_settles():
    """The liar gave one bad block and left; the owner finished the piece,
    which failed with two givers.  The refetch verifies, blame settles on
    the absent liar, and it is banned without a connection to close."""
    config = cfg(max_corrupt_pieces=1, request_timeout=10.0, end_game_delay=1000.0)
    owned = {0: make(0, 1, 64, short_last=False)}
    layout = SwarmLayout((owned[0][0],))
    good = owned[0][1][0]
    d = SwarmSession(2, layout, storage(), config)
    d.handle(1, hs(layout, 1), 0.0)
    d.handle(1, Bitfield(encode_bits([True], 1)), 0.0)
    out = d.handle(1, Unchoke(), 0.0)
    assert [m.begin for _, m in out if isinstance(m, Request)] == [0, BS, 2 * BS, 3 * BS]
    d.handle(1, Piece(0, 0, bytes([good[0] ^ 0xFF]) + good[1:BS]), 1.0)
    d.peer_lost(1, 2.0)
    assert d.picker.unassigned == {0} and d.picker.partials[0].block_from[0] == 1
    d.handle(0, hs(layout, 0), 3.0)
    out = d.handle(0, Unchoke(), 3.0)
    assert [m.begin for _, m in out if isinstance(m, Request)] == [BS, 2 * BS, 3 * BS]
    for b in (1, 2, 3):
        out = d.handle(0, Piece(0, b * BS, good[b * BS:(b + 1) * BS]), 4.0)
    assert d.stats.corrupt_pieces == 1 and not d.banned and d.corrupt_by_peer == {}
    assert [m.begin for _, m in out if isinstance(m, Request)] == [0, BS, 2 * BS, 3 * BS]
    for b in range(4):
        out = d.handle(0, Piece(0, b * BS, good[b * BS:(b + 1) * BS]), 5.0)
    assert d.complete
    assert d.corrupt_by_peer == {1: 1} and d.banned == {1} and d.stats.bans == 1
    assert not any(isinstance(m, Close) for _, m in out)  # nobody to close
    assert d.peers[0].counters.corrupt_pieces == 0
    # it comes back: refused
    assert d.connect(1, 6.0) == []
    assert d.handle(1, hs(layout, 1), 6.0) == [(1, Close("banned"))]
    assert 1 not in d.peers and all_zero(d.record_counts())


# ---------------------------------------------------------------------------
# deadline
# ---------------------------------------------------------------------------

def test_deadline_closes_everything_and_keeps_only_verified_pieces():
    config = cfg(min_requests_per_peer=2)
    owned = {0: make(0, 4, 64), 1: make(1, 4, 64)}
    layout = SwarmLayout((owned[0][0], owned[1][0]))
    s = {0: SwarmSession(0, layout, storage(owned[0]), config),
         1: SwarmSession(1, layout, storage(owned[1]), config),
         2: SwarmSession(2, layout, storage(), config)}
    net = Pump(s)
    net.after = check_ledgers
    # odd pieces of owner 1 never get their last block to 0; 0's uploads to 2 stall
    net.hold = lambda src, dst, m: isinstance(m, Piece) and (
        (src == 1 and dst == 0 and m.index % 2 and m.begin == 32) or (src == 0 and dst == 2))
    net.connect(0, 1)
    net.connect(2, 0)
    net.connect(2, 1)
    net.run()
    d = s[0]
    rc = d.record_counts()
    assert rc["partials"] > 0 and rc["inflight_requests"] > 0 and rc["served_blocks"] > 0
    assert rc["reservations"] > 0 and rc["outstanding_blocks"] > 0
    assert rc["assigned_pieces"] > 0 and rc["request_times"] > 0
    assert any(d.have[i] for i in layout.owner_range(1))  # some verified pieces
    stored_before = d.storage.keys()
    peers_before = set(d.peers)
    out = d.deadline(20.0)
    assert sorted(pid for pid, _ in out) == sorted(peers_before)
    assert all(m == Close("deadline") for _, m in out)
    assert d.closed and d.close_reason == "deadline"
    assert not d.peers
    assert all_zero(d.record_counts()), d.record_counts()
    assert d.storage.keys() == stored_before
    assert_storage_verified(d)
    # the partial pieces are missing again, not half-held
    assert d.picker.missing_blocks == sum(d.picker.blocks_in(i) for i in d.picker.unstarted)
    # a closed session ignores everything
    assert d.handle(1, Have(0), 21.0) == [] and d.tick(21.0) == []
    assert d.connect(1, 21.0) == [] and d.deadline(22.0) == []
    assert d.handle(9, hs(layout, 9), 21.0) == [] and not d.peers


# ---------------------------------------------------------------------------
# liveness: keep-alive and dead peers
# ---------------------------------------------------------------------------

def test_keepalive_after_silence_and_silent_peer_dropped():
    config = cfg(keepalive_interval=30.0, peer_timeout=120.0)
    layout, owned, s = two_owner_swarm(config)
    net = Pump(s)
    net.connect(0, 1)
    net.run()
    assert s[0].complete and s[1].complete
    net.tick(29.9)
    assert not net.q
    net.tick(30.0)
    assert sorted((src, dst, type(m)) for src, dst, m in net.q) == [(0, 1, KeepAlive), (1, 0, KeepAlive)]
    net.run()
    assert s[0].peers[1].last_recv == 30.0
    net.tick(59.0)
    assert not net.q  # the keep-alive reset the silence timer
    # from now on peer 1 says nothing
    net.tick(149.0, 0)
    assert [type(m) for _, _, m in net.q] == [KeepAlive] and 1 in s[0].peers
    net.q.clear()
    net.tick(150.5, 0)
    assert list(net.q) == [(0, 1, Close("peer timeout"))]
    assert 1 not in s[0].peers and all_zero(s[0].record_counts())


def test_unanswered_handshake_is_retried_then_peer_dropped():
    config = cfg(handshake_retry=5.0, peer_timeout=20.0)
    layout, owned, s = two_owner_swarm(config)
    d = s[0]
    assert [type(m) for _, m in d.connect(1, 0.0)] == [Handshake]
    assert d.tick(4.0) == []
    assert [type(m) for _, m in d.tick(5.0)] == [Handshake]
    assert d.tick(21.0) == [(1, Close("peer timeout"))]
    assert 1 not in d.peers


# ---------------------------------------------------------------------------
# choking
# ---------------------------------------------------------------------------

def test_one_upload_slot_rotates_every_unchoke_interval():
    config = cfg(max_upload_slots=1, unchoke_interval=10.0)
    owned = {0: make(0, 4, 64)}
    layout = SwarmLayout((owned[0][0],))
    s = {0: SwarmSession(0, layout, storage(owned[0]), config),
         1: SwarmSession(1, layout, storage(), config),
         2: SwarmSession(2, layout, storage(), config)}
    net = Pump(s)
    up = s[0]

    def unchoked():
        return sorted(pid for pid, p in up.peers.items() if not p.am_choking)

    def one_slot(n):
        assert len(unchoked()) <= 1
        check_ledgers(n)

    net.after = one_slot
    net.hold = lambda src, dst, m: src == 0 and isinstance(m, Piece)  # keep both interested
    net.connect(1, 0)
    net.connect(2, 0)
    net.run()
    assert unchoked() == [1]
    assert up.peers[2].peer_interested and up.peers[2].am_choking
    assert not s[2].peers[0].inflight and s[2].peers[0].peer_choking
    assert s[1].peers[0].inflight
    net.tick(9.9, 0)
    assert not net.q
    net.tick(10.0, 0)
    assert [(dst, type(m)) for _, dst, m in net.q] == [(1, Choke), (2, Unchoke)]
    net.run()
    assert unchoked() == [2]
    assert s[1].peers[0].peer_choking and not s[2].peers[0].peer_choking
    assert s[2].peers[0].inflight  # 2 now asks
    n_out = up.peers[1].counters.blocks_out
    # a choked peer's requests are refused
    assert up.handle(1, Request(0, 0, BS), 10.5) == []
    assert up.peers[1].counters.requests_refused >= 1
    assert up.peers[1].counters.blocks_out == n_out
    net.tick(20.0, 0)
    net.run()
    assert unchoked() == [1]
    net.tick(30.0, 0)
    net.run()
    assert unchoked() == [2]


def test_not_interested_frees_the_slot_for_a_waiting_peer():
    config = cfg(max_upload_slots=1, unchoke_interval=10.0)
    layout, owned, s = two_owner_swarm(config)
    d = s[0]
    d.handle(7, hs(layout, 7), 0.0)
    d.handle(8, hs(layout, 8), 0.0)
    assert [type(m) for _, m in d.handle(7, Interested(), 0.0)] == [Unchoke]
    assert d.handle(8, Interested(), 0.5) == []
    assert d.handle(7, NotInterested(), 1.0) == [(7, Choke()), (8, Unchoke())]
    assert not d.peers[8].am_choking and d.peers[7].am_choking


# ---------------------------------------------------------------------------
# hostile peers (issue 6): lies, replays, garbage
# ---------------------------------------------------------------------------

def _answer_liar(net: Pump, liar: int, victim: int, answered: set, block_for) -> int:
    """Play the fake peer ``liar``: answer each new request with ``block_for``."""
    n = 0
    for m in list(net.outbox[liar]):
        if isinstance(m, Request) and (m.index, m.begin) not in answered:
            answered.add((m.index, m.begin))
            net.post(liar, [(victim, Piece(m.index, m.begin, block_for(m)))])
            n += 1
    return n


@pytest.mark.parametrize("lie", ["bitfield", "have"])
@pytest.mark.parametrize("answer", ["silent", "garbage", "old_round"])
def test_peer_lying_about_pieces_is_refused_penalised_and_bypassed(lie, answer, caplog):
    """Peer 9 claims every piece (by bitfield or by haves) but holds none.
    Silent, it times out and is dropped; answering with garbage or with the
    same owner's bytes replayed from an earlier round, every piece it gives
    fails its hash, is counted, and it is banned.  Either way the honest
    owner serves the pieces and no byte from the liar is stored."""
    import logging
    caplog.set_level(logging.INFO, logger="fs_bittorrent.core.session")
    # FS runs in the same process may stop "fs_bittorrent" propagating to the root
    session_log = logging.getLogger("fs_bittorrent.core.session")
    session_log.addHandler(caplog.handler)
    try:
        _lying_peer(lie, answer, caplog)
    finally:
        session_log.removeHandler(caplog.handler)


def _lying_peer(lie, answer, caplog):
    config = cfg(request_timeout=10.0, max_retries=0, max_corrupt_pieces=2)
    owned = {0: make(0, 3, 64, rnd=1, seed=0, short_last=False)}
    old = make(0, 3, 64, rnd=0, seed=7, short_last=False)[1]   # round 0's model bytes
    layout = SwarmLayout((owned[0][0],))
    s = {0: SwarmSession(0, layout, storage(owned[0]), config),
         2: SwarmSession(2, layout, storage(), config)}
    d = s[2]
    net = Pump(s)
    # the liar's claims, before the honest owner is even connected
    net.post(9, [(2, hs(layout, 9)), (2, Unchoke())])
    if lie == "bitfield":
        net.post(9, [(2, Bitfield(encode_bits([True] * 3, 3)))])
    else:
        net.post(9, [(2, Have(i)) for i in range(3)])
    net.run()
    asked = {(m.index, m.begin) for m in net.outbox[9] if isinstance(m, Request)}
    assert asked and d.peers[9].has_count == 3          # believed, and asked
    answered: set = set()
    garbage = {"garbage": lambda m: b"\xa5" * m.length,
               "old_round": lambda m: old[m.index][m.begin:m.begin + m.length]}.get(answer)
    while garbage is not None and _answer_liar(net, 9, 2, answered, garbage):
        net.run()   # a failed piece goes back to the liar while it is the only "holder"
    net.connect(2, 0)
    t = 0.0
    for _ in range(20):
        net.run()
        if d.complete:
            break
        t += 10.0
        net.tick(t, 2)
        net.run()
    assert d.complete
    assert_storage_verified(d)
    assert all(d.storage.get(0, i) == owned[0][1][i] for i in range(3))
    assert 9 not in d.peers                             # disconnected
    closes = [m for src, dst, m in net.log if src == 2 and dst == 9 and isinstance(m, Close)]
    if answer == "silent":
        assert closes == [Close("unresponsive")] and d.stats.timeouts >= 1
        assert d.stats.corrupt_pieces == 0 and 9 not in d.banned
        assert "timed out" in caplog.text
    else:
        # blocks it had already sent arrive after the ban: each is answered by a Close
        assert closes[0] == Close("served corrupt pieces") and d.banned == {9}
        assert set(closes[1:]) <= {Close("banned")}
        assert d.corrupt_by_peer == {9: 2} and d.stats.corrupt_pieces == 2
        assert "failed its hash" in caplog.text and "banning peer 9" in caplog.text
        # the ban holds for the rest of the round
        assert d.handle(9, hs(layout, 9), t + 1) == [(9, Close("banned"))]
    # every piece stored came from the owner, once
    assert all(n == 1 for n in d.storage.puts.values()) and len(d.storage.puts) == 3
    d.close(t + 1)
    assert all_zero(d.record_counts())


def test_have_for_a_piece_outside_the_swarm_is_refused_without_state_change():
    """A lie that is also malformed (a have past the last piece, a bitfield
    with spare bits) is a protocol error before any state changes; the host
    then drops the connection."""
    layout, owned, d = _handshaken_owner0()
    n = layout.num_pieces
    for msg, err in ((Have(n), PieceIndexOutOfRange), (Have(2 ** 32 - 1), PieceIndexOutOfRange),
                     (Bitfield(b"\xff"), SpareBitsSet)):
        before = snapshot(d)
        with pytest.raises(err) as exc:
            d.handle(1, msg, 5.0)
        assert exc.value.field and snapshot(d) == before


def test_replayed_handshake_of_an_old_round_then_its_messages_are_refused():
    """A peer replaying round 0's handshake into round 1's swarm is refused
    (swarm id), and everything it sends next needs a handshake first."""
    m0 = make(0, 3, 64, rnd=0)[0]
    m1 = make(0, 3, 64, rnd=1)[0]
    old, new = SwarmLayout((m0,)), SwarmLayout((m1,))
    d = SwarmSession(2, new, storage(), cfg())
    before = snapshot(d)
    with pytest.raises(HandshakeRefused) as exc:
        d.handle(0, hs(old, 0), 1.0)
    assert exc.value.field == "swarm_id"
    for msg in (Bitfield(b"\xe0"), Have(0), Piece(0, 0, bytes(BS)), Request(0, 0, BS)):
        with pytest.raises(HandshakeRequired):
            d.handle(0, msg, 1.0)
    assert snapshot(d) == before and not d.storage.keys()


# ---------------------------------------------------------------------------
# leaders yield (SwarmConfig.lead_pieces / lead_requests)
# ---------------------------------------------------------------------------

def _lead_swarm(config: SwarmConfig):
    """Three peers; peer 0 already holds owner 2's pieces (18 pieces against
    its peers' 8 and 16: six ahead of their mean), peer 2 is behind it."""
    owned = {0: make(0, 2, 64, seed=1), 1: make(1, 8, 64, seed=2), 2: make(2, 16, 64, seed=3)}
    layout = SwarmLayout(tuple(o[0] for o in owned.values()))
    stores = {0: storage(owned[0], owned[2]), 1: storage(owned[1]), 2: storage(owned[2])}
    s = {pid: SwarmSession(pid, layout, stores[pid], config) for pid in owned}
    return owned, s


@pytest.mark.parametrize("lead_pieces, long_path, yields", [
    (1, False, True),    # ahead by more than 1: at most one request at each source
    (0, False, False),   # off: the usual floor of 4
    (1, True, False),    # one request cannot cover the path's round trip: no yielding
])
def test_a_peer_ahead_of_its_peers_keeps_a_short_queue_at_each_source(
        lead_pieces, long_path, yields):
    # first_copy_wait 0: equal links, no first-copy plan (where the rule acts)
    config = cfg(min_requests_per_peer=4, max_requests_per_peer=4, lead_pieces=lead_pieces,
                 lead_requests=1, first_copy_wait=0)
    owned, s = _lead_swarm(config)
    net = Pump(s)
    last = {0: 0, 2: 0}
    grew: dict[int, list] = {0: [], 2: []}   # (pieces ahead, requests at source 1) as they grew

    def watch(n: Pump) -> None:
        for pid in last:
            p = n.s[pid].peers.get(1)
            if p is None:
                continue
            if long_path and pid == 0:
                # a far source whose rate we know: one request in flight
                # would cover 16 of the 10 kB its round trip holds
                p.path_rtt, p.rate_in = 10.0, 1000.0
            cur = len(p.inflight)
            if cur > last[pid]:
                grew[pid].append((n.s[pid]._ahead_of_peers(), cur))
            last[pid] = cur

    net.after = watch
    net.connect(0, 1)
    net.connect(2, 1)
    net.connect(0, 2)
    net.run()   # no time passes: no rates, only the path decides
    leading = [cur for ahead, cur in grew[0] if ahead > 1]
    assert leading, "peer 0 never asked source 1 while ahead"
    if yields:
        assert max(leading) == 1
    else:
        assert max(leading) == 4
    assert max(cur for _, cur in grew[2]) == 4   # the peer behind asks as usual
    for sess in s.values():        # nobody is starved: everyone completes, verified
        assert sess.complete
        assert_storage_verified(sess)


@pytest.mark.parametrize("field, value", [("lead_pieces", -1), ("lead_requests", 0)])
def test_bad_lead_settings_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as ei:
        SwarmConfig(**{field: value})
    assert ei.value.field == field and ei.value.value == value
