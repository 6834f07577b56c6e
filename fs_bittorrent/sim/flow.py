"""Flow-level simulation of one exchange round: pieces as fluid flows.

The block-level simulator (``sim/network.py`` driving ``SwarmSession``)
moves every 16 KiB block and every ``have`` as an event: its cost grows with
clients² × blocks, so 50 clients × 45 MB take longer to simulate than the
network would take to move them.  This level keeps the decisions that shape
the exchange time and drops the per-message grain:

* **Unit of transfer: a piece.**  Client ``c`` fetches piece ``i`` from one
  peer ``p`` (one peer per piece, as ``PiecePicker`` assigns them), one
  piece at a time per (p -> c) pair, the next one picked when the previous
  leaves ``p``'s uplink, so a busy pair never idles.
* **Which piece: the engine's policy.**  Resumed partial pieces first, then
  rarest first among the pieces ``c`` knows ``p`` holds, with the very
  tie-break order ``PiecePicker`` draws for that peer and seed (availability
  counted over ``c``'s neighbours, updated one latency after a piece lands,
  as a ``have`` would be).
* **Upload-aware sources** where the uplinks differ by more than 2x (as
  ``build_swarm`` gates them): ``PiecePicker.pick``'s first-copy plan
  (capacity-aware from the configured uplinks, ``first_copy_plan``) and
  source rules, sources judged by the pair's last max-min rate; sharing open
  blocks (a block-grain rule) and the sessions' paced serving order
  (``SwarmSession.upload_ready``: an uplink's share goes to one piece at a
  time, not max-min across its pairs) are not modelled.
* **Timing: max-min fair bandwidth sharing (a fluid model).**  Every active
  pair is a flow through ``p``'s uplink and ``c``'s downlink; a pair's rate is
  also capped by what the request window allows over its round trip
  (``max_requests_per_peer`` blocks per RTT).  Rates are recomputed only when
  a pair starts or stops (progressive filling over the n x n pair matrix,
  vectorized), not per piece.  Link bytes include the per-block frame
  header.  A piece lands at ``c`` one latency of ``p`` after it left ``p``'s
  uplink.  Connections come up after the handshake round trips.
* **End game**, as gated in the engine: once every missing piece of ``c`` is
  assigned, an idle pair may duplicate the rest of a piece outstanding for at
  least ``end_game_delay`` (two copies at most); the first copy to finish
  wins and the other is cancelled (its bytes count as wasted).
* **Deadline and partial completion**: at the deadline the run stops; what
  landed by then is held, partial pieces are dropped.
* **Crashes** (``faults.crash_*``): the client's transfers stop, pieces it
  was sending resume elsewhere from the bytes already received.

Not modelled (the runner keeps the block level for them): per-message
faults (drop, duplicate, reorder, corrupt, delay, disconnect), capped upload
slots (choking), request timeouts.  Piece *contents* are not touched here:
the result says who holds which piece when; the host stores the owners'
verified bytes for them, so aggregation is exact.
"""
from __future__ import annotations

import heapq
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from ..core.config import SwarmConfig
from ..core.layout import SwarmLayout
from ..core.manifest import Manifest
from ..core.picker import first_copy_plan, plan_where_uplinks_differ
from ..core.session import SessionStats
from ..errors import ConfigError
from .network import LinkProfile

log = logging.getLogger(__name__)

__all__ = ["FlowSwarm", "FlowResult", "FlowSessionView", "FRAME_OVERHEAD"]

FRAME_OVERHEAD = 13        # bytes of a piece message's header (length, id, index, begin)
_INF = math.inf
# heap event kinds
_PAIR_UP, _RECEIVE, _VISIBLE, _END_GAME, _CRASH, _WINDOW = range(6)


@dataclass
class FlowResult:
    """Who holds which piece when, and what each client sent and received."""

    peers: list[int]
    start: float
    end_time: float
    arrival: np.ndarray                        # [peer row, global piece] -> time held (inf: never)
    completed_at: dict[int, Optional[float]]
    completion: dict[int, float]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    first_piece_at: dict[int, Optional[float]]
    duplicate_bytes: dict[int, int]
    up_at_completion: dict[int, int]           # bytes_up when the client completed
    down_at_completion: dict[int, int]
    crashed: dict[int, float]
    events: int = 0
    rate_updates: int = 0
    row: dict[int, int] = field(default_factory=dict)
    block_size: int = 16384

    def pieces_have(self, peer: int, t: float) -> int:
        return int(np.count_nonzero(self.arrival[self.row[peer]] <= t))

    def held(self, peer: int, t: float) -> np.ndarray:
        """Global indices of the pieces ``peer`` holds at time ``t``."""
        return np.flatnonzero(self.arrival[self.row[peer]] <= t)


class FlowSwarm:
    """One round's exchange at flow level.  ``manifests`` give the pieces
    (laid end to end by owner, as ``SwarmLayout`` does); ``links`` one
    ``LinkProfile`` per peer; ``neighbours`` the topology (full mesh if None);
    ``peers`` the participants (default: the owners); ``crashes`` peer ->
    time its exchange dies."""

    def __init__(self, manifests: Sequence[Manifest], links: Mapping[int, LinkProfile],
                 config: SwarmConfig = SwarmConfig(), seed: int = 0,
                 neighbours: Optional[Mapping[int, Sequence[int]]] = None,
                 peers: Optional[Sequence[int]] = None,
                 crashes: Optional[Mapping[int, float]] = None, start: float = 0.0) -> None:
        ms = sorted(manifests, key=lambda m: m.owner)
        if not ms:
            raise ConfigError("manifests", [], "a swarm needs at least one manifest")
        self.config = config
        self.start = start
        ids = sorted(peers) if peers is not None else [m.owner for m in ms]
        missing = [m.owner for m in ms if m.owner not in ids]
        if missing:
            raise ConfigError("peers", ids, f"owners {missing} are not among the peers")
        lost = [p for p in ids if p not in links]
        if lost:
            raise ConfigError("links", sorted(links), f"no link for peers {lost}")
        self.ids = ids
        self.row = {p: r for r, p in enumerate(ids)}
        n = self.n = len(ids)
        lengths = [m.piece_length(k) for m in ms for k in range(m.num_pieces)]
        P = self.P = len(lengths)
        self.length = np.asarray(lengths, dtype=np.float64)
        owner_row = np.asarray([self.row[m.owner] for m in ms for _ in range(m.num_pieces)],
                               dtype=np.int64)
        bs = config.block_size
        # link bytes per payload byte: every block travels in a framed message
        self.wire = (bs + FRAME_OVERHEAD) / bs
        prof = [links[p] for p in ids]
        self.up = np.asarray([l.up for l in prof], dtype=np.float64)
        self.down = np.asarray([l.down for l in prof], dtype=np.float64)
        self.lat = np.asarray([l.latency for l in prof], dtype=np.float64)
        # adjacency: nbr[a, b] -- a and b are connected
        if neighbours is None:
            self.nbr = ~np.eye(n, dtype=bool)
        else:
            self.nbr = np.zeros((n, n), dtype=bool)
            for a, bs_ in neighbours.items():
                if a not in self.row:
                    continue
                for b in bs_:
                    if b in self.row and b != a:
                        self.nbr[self.row[a], self.row[b]] = self.nbr[self.row[b], self.row[a]] = True
        # Request window per pair, as PeerState sizes it: min_requests blocks at
        # first, doubling per round trip in slow start until a queue builds
        # (the pair's rate is set by a link, not by its window), then
        # rate x (RTT + request_queue_time), at most max_requests blocks.  A
        # pair's rate is capped at window / RTT.  rtt[p, c]: request c -> p,
        # one block back, without queueing.
        block_wire = bs * self.wire
        self.rtt = (self.lat[:, None] + self.lat[None, :] + block_wire / self.up[:, None]
                    + block_wire / self.down[None, :])
        self.window = np.full((n, n), config.min_requests_per_peer * block_wire)
        self.max_window = config.max_requests_per_peer * block_wire
        self.slow_start = np.ones((n, n), dtype=bool)
        self.window_at = np.full((n, n), start)   # when each window last grew
        self.window_tick = _INF                   # next pending window update
        # holdings
        self.have = np.zeros((n, P), dtype=bool)
        self.have[owner_row, np.arange(P)] = True
        self.vis = self.have.copy()              # what the neighbours know each peer holds
        self.need = ~self.have                   # missing and not being fetched
        self.arrival = np.full((n, P), _INF)
        self.arrival[self.have] = start
        self.missing = (~self.have).sum(axis=1)
        self.unfinished = int(np.count_nonzero(self.missing))   # live peers still missing
        # rarest-first keys: availability among neighbours * P + the picker's tie-break rank
        avail = self.nbr.astype(np.int64) @ self.have.astype(np.int64)
        tiebreak = np.empty((n, P), dtype=np.int64)
        for r, pid in enumerate(ids):
            order = list(range(P))
            random.Random((config.seed * 1_000_003 + pid) & 0xFFFFFFFF).shuffle(order)
            tiebreak[r, order] = np.arange(P)
        # keys of pieces not needed (held or being fetched) carry BIG on top, so a
        # pick is one masked argmin; BIG leaves room for every availability bump
        self.big = np.int64(1 << 62)
        self.key = avail * P + tiebreak + np.where(self.need, 0, self.big)
        self.full_mesh = neighbours is None
        # Upload-aware source choice (PiecePicker.pick's rules, at piece
        # grain), where the uplinks differ as build_swarm gates it: the
        # first-copy plan, owners with first copies left give only those,
        # slow sources give only what nobody else holds, owners not known
        # to be fast are spared their pieces that have copies elsewhere.
        self.owner_row = owner_row
        self.upload_aware = plan_where_uplinks_differ(config, self.up).first_copy_wait > 0
        if self.upload_aware:
            # capacity-aware, as build_swarm gives its sessions the known uplinks
            plan = first_copy_plan(SwarmLayout(tuple(ms)), {m.owner: links[m.owner].up
                                                            for m in ms})
            self.designee = np.asarray([self.row.get(d, -1) if d >= 0 else -1 for d in plan],
                                       dtype=np.int64)
        self.max_piece = float(self.length.max())
        self.seen_rate = np.zeros((n, n))          # last rate of each pair (0: never ran)
        self.nbr_rows = [np.flatnonzero(self.nbr[h]) for h in range(n)]
        # pairs [sender row, receiver row]
        self.connected = np.zeros((n, n), dtype=bool)
        self.active = np.zeros((n, n), dtype=bool)
        # connected, idle pairs to live receivers still missing pieces: the
        # ones a new ``have`` may put to work
        self.waiting = np.zeros((n, n), dtype=bool)
        self.rate = np.zeros((n, n))
        self.done_at = np.full((n, n), _INF)
        self.left = np.zeros((n, n))             # payload bytes left (valid when rate is 0)
        self.cur = np.full((n, n), -1, dtype=np.int64)
        self.cur_bytes = np.zeros((n, n))       # payload bytes of the current transfer
        self.started = np.zeros((n, n))         # when the current transfer started
        self.dirty = False
        self.alive = np.ones(n, dtype=bool)
        self.serving: list[dict[int, list[int]]] = [dict() for _ in range(n)]  # c: i -> senders
        self.assigned_at: list[dict[int, float]] = [dict() for _ in range(n)]
        self.partial: list[dict[int, float]] = [dict() for _ in range(n)]    # i -> bytes left
        self.eg_check: list[float] = [_INF] * n
        self.bytes_up = np.zeros(n)
        self.bytes_down = np.zeros(n)
        self.dup_bytes = np.zeros(n)
        self.completed_at: list[Optional[float]] = [start if m == 0 else None
                                                    for m in self.missing]
        self.first_piece: list[Optional[float]] = [None] * n
        self.snap_up = np.zeros(n)
        self.snap_down = np.zeros(n)
        self.crashed: dict[int, float] = {}
        self.now = start
        self.heap: list = []
        self.seq = 0
        self.events = 0
        self.rate_updates = 0
        self.rate_iterations = 0
        for a in range(n):
            for b in range(a + 1, n):
                if self.nbr[a, b]:
                    # a (lower id) sends its handshake; b answers with handshake,
                    # bitfield and unchoke; a's bitfield follows; requests cross.
                    la, lb = self.lat[a], self.lat[b]
                    self._push(start + 2 * la + lb, _PAIR_UP, b, a)        # a fetches from b
                    self._push(start + 2 * la + 2 * lb, _PAIR_UP, a, b)    # b fetches from a
        for pid, at in (crashes or {}).items():
            if pid in self.row:
                self._push(max(at, start), _CRASH, self.row[pid], -1)

    # ---- event plumbing -------------------------------------------------------
    def _push(self, at: float, kind: int, a: int, b: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, a, b))

    # ---- picking --------------------------------------------------------------
    def _pick(self, c: int, p: int) -> int:
        """The piece receiver ``c`` asks sender ``p`` for next, or -1."""
        partial = self.partial[c]
        if partial:
            vis = self.vis[p]
            best, best_key = -1, None
            for i in partial:
                if vis[i] and self.need[c, i]:
                    k = self.key[c, i]
                    if best_key is None or k < best_key:
                        best, best_key = i, k
            if best >= 0:
                return best
        keys = np.where(self.vis[p], self.key[c], self.big)
        if self.upload_aware:
            keys = self._spare_sources(c, p, keys)
        j = int(keys.argmin())
        return j if keys[j] < self.big else -1

    def _spare_sources(self, c: int, p: int, keys: np.ndarray) -> np.ndarray:
        """Mask the pieces ``PiecePicker.pick`` would not ask ``p`` for.

        The engine judges a source by its measured rate to ``c``; here the
        pair's last max-min rate stands for it (0: never measured)."""
        big, P = self.big, self.P
        avail = (self.key[c] & (big - 1)) // P       # holders among c's neighbours
        own = self.owner_row == p
        rate = self.seen_rate[p, c]
        best = float(self.seen_rate[:, c].max())
        fast = rate > 0 and 2 * rate >= best
        slow = False
        if rate > 0:
            inflow = float(self.rate[:, c].sum())
            left = (self.missing[c] * self.max_piece / inflow) if inflow > 0 else _INF
            if best > 0:
                left = max(left, 2 * self.max_piece / best)
            slow = rate * left < self.max_piece
        mask = np.zeros(P, dtype=bool)
        solo = avail <= 1
        if not fast and np.any(own & solo & ~self.have[c]):
            mask |= ~(own & solo)          # first copies left: only those
        if slow:
            mask |= ~solo                  # a slow source: only what nobody else holds
        elif not (rate > 0):
            mask |= own & ~solo            # an owner not known fast: spare its uplink
        else:
            pass
        d = self.designee
        live = (d >= 0) & (d != c)
        live[live] = self.alive[d[live]] & self.nbr[c, d[live]]
        mask |= own & solo & live          # the owner's first copy goes to its designee
        return np.where(mask, big, keys)

    def _begin(self, p: int, c: int, i: int, nbytes: float) -> None:
        """Pair p -> c starts sending ``nbytes`` of piece i (rate set later
        if the pair was idle)."""
        now = self.now
        self.cur[p, c] = i
        self.cur_bytes[p, c] = nbytes
        self.started[p, c] = now
        self.serving[c].setdefault(i, []).append(p)
        if self.active[p, c] and self.rate[p, c] > 0:
            self.done_at[p, c] = now + nbytes * self.wire / self.rate[p, c]
        else:
            if not self.active[p, c]:
                self.window_at[p, c] = now
            self.active[p, c] = True
            self.waiting[p, c] = False
            self.left[p, c] = nbytes
            self.done_at[p, c] = _INF
            self.dirty = True

    def _assign(self, p: int, c: int) -> bool:
        """Give idle (or just freed) pair p -> c its next piece; False if none."""
        i = self._pick(c, p)
        if i < 0:
            return self._end_game(p, c)
        self.need[c, i] = False
        self.key[c, i] += self.big
        self.assigned_at[c][i] = self.now
        nbytes = self.partial[c].pop(i, None)
        self._begin(p, c, i, self.length[i] if nbytes is None else nbytes)
        return True

    def _stop(self, p: int, c: int) -> None:
        if self.active[p, c]:
            self.active[p, c] = False
            self.rate[p, c] = 0.0
            self.done_at[p, c] = _INF
            self.cur[p, c] = -1
            self.dirty = True
        self.waiting[p, c] = bool(self.connected[p, c] and self.alive[c] and self.missing[c])

    def _end_game(self, p: int, c: int) -> bool:
        """Pair p -> c has nothing new: duplicate an old outstanding piece."""
        if self.need[c].any() or self.missing[c] == 0 or not self.serving[c]:
            self._stop(p, c)
            return False
        now, delay = self.now, self.config.end_game_delay
        vis = self.vis[p]
        best, best_at, soonest = -1, _INF, _INF
        for i, senders in self.serving[c].items():
            if len(senders) >= 2 or p in senders or not vis[i]:
                continue
            at = self.assigned_at[c][i]
            if at <= now - delay:
                if at < best_at:
                    best, best_at = i, at
            elif at + delay < soonest:
                soonest = at + delay
        if best < 0:
            self._stop(p, c)
            if soonest < self.eg_check[c]:
                self.eg_check[c] = soonest
                self._push(soonest, _END_GAME, c, -1)
            return False
        q = self.serving[c][best][0]
        self._begin(p, c, best, self._bytes_left(q, c))
        return True

    def _bytes_left(self, q: int, c: int) -> float:
        if self.rate[q, c] > 0:
            return max(0.0, (self.done_at[q, c] - self.now) * self.rate[q, c] / self.wire)
        return self.left[q, c]

    def _sent_so_far(self, q: int, c: int) -> float:
        return max(0.0, self.cur_bytes[q, c] - self._bytes_left(q, c))

    # ---- rates ----------------------------------------------------------------
    def _update_rates(self) -> None:
        """Max-min fair rates of the active pairs (progressive filling)."""
        self.dirty = False
        self.rate_updates += 1
        now = self.now
        act = self.active
        old = self.rate
        # payload bytes left of pairs that were running
        running = act & (old > 0)
        left = self.left
        left[running] = (self.done_at[running] - now) * old[running] / self.wire
        rate = np.zeros_like(old)
        free = act.copy()
        rem_up, rem_dn = self.up.copy(), self.down.copy()
        cap = np.minimum(self.window, self.max_window) / self.rtt
        # Links whose fair share is within 0.1 % of the bottleneck level
        # saturate together: far fewer rounds, rates within 0.1 % of exact.
        iterations = 0
        while True:
            cu = np.count_nonzero(free, axis=1)
            if not cu.any():
                break
            cd = np.count_nonzero(free, axis=0)
            iterations += 1
            with np.errstate(divide="ignore", invalid="ignore"):
                su = np.where(cu > 0, rem_up / cu, _INF)
                sd = np.where(cd > 0, rem_dn / cd, _INF)
            capleft = np.where(free, cap - rate, _INF)
            level = max(min(su.min(), sd.min(), capleft.min()), 0.0)
            thr = level * (1 + 1e-3)
            rate += level * free
            rem_up -= level * cu
            rem_dn -= level * cd
            free &= ~(su <= thr)[:, None]
            free &= ~(sd <= thr)[None, :]
            free &= capleft > thr
        self.rate_iterations += iterations
        self.rate = rate
        if self.upload_aware:
            self.seen_rate = np.where(act & (rate > 0), rate, self.seen_rate)
        # a pair held back by a link (not by its window) leaves slow start and
        # sizes its window from its rate; a pair held back by its window grows it
        limited = act & (rate >= cap * (1 - 1e-9))
        linked = act & ~limited
        if linked.any():
            self.slow_start &= ~linked
            self.window[linked] = np.minimum(
                self.max_window, np.maximum(self.window[linked], rate[linked] * (
                    self.rtt[linked] + self.config.request_queue_time)))
        if limited.any() and self.window_tick == _INF:
            self.window_tick = now + float(self.rtt[limited].min())
            self._push(self.window_tick, _WINDOW, -1, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.done_at = np.where(act & (rate > 0), now + left * self.wire / rate, _INF)

    # ---- events ---------------------------------------------------------------
    def _sent(self, p: int, c: int) -> None:
        """Pair p -> c finished sending its piece."""
        i = int(self.cur[p, c])
        nbytes = self.cur_bytes[p, c]
        self.bytes_up[p] += nbytes
        self.bytes_down[c] += nbytes
        senders = self.serving[c].pop(i, [])
        for q in senders:
            if q != p and self.cur[q, c] == i:
                # end game: the other copy loses, its bytes are wasted
                wasted = self._sent_so_far(q, c)
                self.bytes_up[q] += wasted
                self.bytes_down[c] += wasted
                self.dup_bytes[c] += wasted
                self.cur[q, c] = -1
                self._stop(q, c)
                self._reassign_later(q, c)
        self.assigned_at[c].pop(i, None)
        self._push(self.now + self.lat[p], _RECEIVE, c, i)
        self.cur[p, c] = -1
        if not self._assign(p, c):
            self._stop(p, c)

    def _reassign_later(self, q: int, c: int) -> None:
        if self.alive[q] and self.alive[c] and self.connected[q, c]:
            self._assign(q, c)

    def _receive(self, c: int, i: int) -> None:
        if not self.alive[c] or self.have[c, i]:
            return
        now = self.now
        self.have[c, i] = True
        self.arrival[c, i] = now
        self.missing[c] -= 1
        if self.first_piece[c] is None:
            self.first_piece[c] = now
        if self.missing[c] == 0:
            self.unfinished -= 1
            self.waiting[:, c] = False
            self.completed_at[c] = now
            self.snap_up[c] = self.bytes_up[c]
            self.snap_down[c] = self.bytes_down[c]
        lat = self.lat[c]
        if lat > 0:
            self._push(now + lat, _VISIBLE, c, i)
        else:
            self._visible(c, i)

    def _visible(self, h: int, i: int) -> None:
        """Peer h's neighbours learn that it holds piece i (its ``have``)."""
        if not self.alive[h]:
            return
        self.vis[h, i] = True
        if self.full_mesh:
            self.key[:, i] += self.P      # h's own row too: it holds i, never picks it
        else:
            self.key[self.nbr_rows[h], i] += self.P
        waiting = self.waiting[h]
        if waiting.any():
            for c in np.flatnonzero(waiting & self.need[:, i]):
                self._assign(h, int(c))

    def _pair_up(self, c: int, p: int) -> None:
        """Receiver c may now request from sender p."""
        if not (self.alive[c] and self.alive[p]):
            return
        self.connected[p, c] = True
        if self.missing[c]:
            self._assign(p, c)

    def _crash(self, k: int) -> None:
        """Peer k's exchange dies: its transfers stop; what it was sending
        resumes elsewhere from the bytes already received."""
        if not self.alive[k]:
            return
        self.alive[k] = False
        if self.missing[k]:
            self.unfinished -= 1
        self.crashed[self.ids[k]] = self.now
        for c in np.flatnonzero(self.active[k]):
            c = int(c)
            i = int(self.cur[k, c])
            left = self._bytes_left(k, c)
            sent = self.cur_bytes[k, c] - left
            self.bytes_up[k] += sent
            self.bytes_down[c] += sent
            senders = self.serving[c].get(i, [])
            if k in senders:
                senders.remove(k)
            if not senders:
                self.serving[c].pop(i, None)
                self.assigned_at[c].pop(i, None)
                self.need[c, i] = True
                self.key[c, i] -= self.big
                self.partial[c][i] = left
            self._stop(k, c)
        for p in np.flatnonzero(self.active[:, k]):
            self._stop(int(p), k)
        self.connected[k, :] = False
        self.connected[:, k] = False
        self.waiting[k, :] = False
        self.waiting[:, k] = False
        self.key[self.nbr_rows[k]] -= self.P * self.vis[k]
        self.serving[k].clear()
        # the peers that lost a sender look for other work
        for c in range(self.n):
            if self.alive[c] and self.missing[c]:
                for p in np.flatnonzero(self.connected[:, c] & ~self.active[:, c]):
                    self._assign(int(p), c)

    def _grow_windows(self) -> None:
        """Window-limited pairs grow their windows for the time since the last
        growth: doubling per RTT in slow start, else by (RTT + queue time) / RTT."""
        self.window_tick = _INF
        now = self.now
        act = self.active
        cap = np.minimum(self.window, self.max_window) / self.rtt
        limited = act & (self.rate >= cap * (1 - 1e-9)) & (self.window < self.max_window)
        if not limited.any():
            return
        rtt = self.rtt[limited]
        steps = (now - self.window_at[limited]) / rtt
        growth = np.where(self.slow_start[limited], 2.0,
                          1.0 + self.config.request_queue_time / rtt)
        self.window[limited] = np.minimum(self.max_window, self.window[limited] * growth ** steps)
        self.window_at[limited] = now
        self.dirty = True

    def _end_game_check(self, c: int) -> None:
        self.eg_check[c] = _INF
        if not self.alive[c] or not self.missing[c]:
            return
        for p in np.flatnonzero(self.connected[:, c] & ~self.active[:, c]):
            self._end_game(int(p), c)

    # ---- running ----------------------------------------------------------------
    def _finished(self) -> bool:
        return self.unfinished == 0

    def run(self, deadline: Optional[float] = None) -> FlowResult:
        """Run until every live peer holds every piece, nothing can move any
        more, or the ``deadline`` (absolute virtual time)."""
        limit = _INF if deadline is None else deadline
        heap = self.heap
        handlers = {_PAIR_UP: lambda a, b: self._pair_up(a, b),
                    _RECEIVE: lambda a, b: self._receive(a, b),
                    _VISIBLE: lambda a, b: self._visible(a, b),
                    _END_GAME: lambda a, b: self._end_game_check(a),
                    _CRASH: lambda a, b: self._crash(a),
                    _WINDOW: lambda a, b: self._grow_windows()}
        end = self.now
        while not self._finished():
            if self.dirty:
                self._update_rates()
            flat = int(self.done_at.argmin())
            t_pair = self.done_at.flat[flat]
            t_heap = heap[0][0] if heap else _INF
            t = min(t_pair, t_heap)
            if t == _INF or t > limit:
                end = limit if t > limit and limit < _INF else self.now
                break
            self.now = end = t
            while heap and heap[0][0] <= t:
                _, _, kind, a, b = heapq.heappop(heap)
                self.events += 1
                handlers[kind](a, b)
            # every pair due now, before the rates change (one update for all)
            done_at, n = self.done_at, self.n
            while t_pair <= t:
                p, c = divmod(flat, n)
                self.events += 1
                self._sent(p, c)
                flat = int(done_at.argmin())
                t_pair = done_at.flat[flat]
        return self._result(end, deadline)

    def _result(self, end: float, deadline: Optional[float]) -> FlowResult:
        if deadline is not None:
            self.arrival[self.arrival > deadline] = _INF
        ids = self.ids
        total = self.P
        held = np.isfinite(self.arrival).sum(axis=1)
        done = {pid: self.completed_at[r] for r, pid in enumerate(ids)}
        return FlowResult(
            peers=list(ids), start=self.start, end_time=end, arrival=self.arrival,
            completed_at=done,
            completion={pid: float(held[r]) / total if total else 1.0 for r, pid in enumerate(ids)},
            bytes_up={pid: int(self.bytes_up[r]) for r, pid in enumerate(ids)},
            bytes_down={pid: int(self.bytes_down[r]) for r, pid in enumerate(ids)},
            first_piece_at={pid: self.first_piece[r] for r, pid in enumerate(ids)},
            duplicate_bytes={pid: int(self.dup_bytes[r]) for r, pid in enumerate(ids)},
            up_at_completion={pid: int(self.snap_up[r]) for r, pid in enumerate(ids)},
            down_at_completion={pid: int(self.snap_down[r]) for r, pid in enumerate(ids)},
            crashed=dict(self.crashed), events=self.events, rate_updates=self.rate_updates,
            row=dict(self.row), block_size=self.config.block_size)


class FlowSessionView:
    """What the FS client manager needs of a ``SwarmSession``, read from a
    precomputed ``FlowResult`` at the host's virtual time.

    The manager calls the same methods as on a real session (``connect``,
    ``tick``, ``deadline``, ``close`` return no messages: nothing travels
    as messages at this level), and reads ``complete``, ``pieces_have``,
    ``completion()``, ``held_by_owner()`` and ``stats`` as of ``clock()``.
    """

    def __init__(self, result: FlowResult, peer_id: int, layout, clock,
                 offset: float = 0.0) -> None:
        self.result = result
        self.peer_id = peer_id
        self.layout = layout
        self.clock = clock            # the host's clock; the result's times are relative
        self.offset = offset          # to ``offset`` (the round's start on that clock)
        self.closed = False
        self.close_reason = ""
        self.closed_at = _INF
        self.peers: dict = {}

    def _t(self) -> float:
        return min(self.clock(), self.closed_at) - self.offset

    @property
    def complete(self) -> bool:
        done = self.result.completed_at.get(self.peer_id)
        return done is not None and done <= self._t()

    @property
    def pieces_have(self) -> int:
        return self.result.pieces_have(self.peer_id, self._t())

    def completion(self) -> float:
        n = self.layout.num_pieces
        return self.pieces_have / n if n else 1.0

    def held_by_owner(self) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {o: set() for o in self.layout.owners}
        for g in self.result.held(self.peer_id, self._t()):
            owner, local = self.layout.to_local(int(g))
            out[owner].add(local)
        return out

    @property
    def stats(self) -> SessionStats:
        r, pid = self.result, self.peer_id
        done = r.completed_at.get(pid)
        t = self._t()
        if done is not None and done <= t < r.end_time:
            up, down = r.up_at_completion[pid], r.down_at_completion[pid]
        else:
            up, down = r.bytes_up[pid], r.bytes_down[pid]
        received = self.pieces_have - len(self.layout.owner_range(pid)) \
            if pid in self.layout.owners else self.pieces_have
        first = r.first_piece_at.get(pid)
        return SessionStats(
            pieces_received=received, bytes_down=down, bytes_up=up,
            first_piece_at=first + self.offset if first is not None and first <= t else None,
            completed_at=done + self.offset if done is not None and done <= t else None,
            duplicate_blocks=r.duplicate_bytes[pid] // r.block_size)

    def connect(self, peer: int, now: float, path_rtt: float = 0.0) -> list:
        return []

    def path_rtts(self) -> dict[int, float]:
        return {}          # no connections: nothing carries over

    def tick(self, now: float) -> list:
        return []

    def peer_lost(self, peer: int, now: float) -> None:
        pass

    def handle(self, peer: int, msg, now: float) -> list:
        return []

    def deadline(self, now: float) -> list:
        return self.close(now, "deadline")

    def close(self, now: float, reason: str = "closed") -> list:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            self.closed_at = now
        return []

    def record_counts(self) -> dict[str, int]:
        return {}
