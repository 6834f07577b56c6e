"""The asyncio TCP data plane: real sockets on 127.0.0.1, one event loop."""
from __future__ import annotations

import asyncio

from fs_bittorrent.core.config import SwarmConfig
from fs_bittorrent.core.layout import SwarmLayout
from fs_bittorrent.core.session import SwarmSession
from fs_bittorrent.core.storage import ContentPool
from fs_bittorrent.net.dataplane import DataPlanePeer, connect_mesh

from swarm_helpers import (CheckingStorage, assert_bit_exact, blob_from_storage, expected_hashes,
                           random_owners)

PIECE = 64 * 1024
CFG = SwarmConfig(piece_size=PIECE, block_size=16 * 1024, request_timeout=2.0,
                  handshake_retry=1.0, interest_retry=1.0, credit_bytes=1024 * 1024)
SECRET = b"experiment secret"


def make_peers(owners, ids, secrets=None, layout=None, tick=0.05):
    layout = layout or SwarmLayout(tuple(m for m, _ in owners.values()))
    hashes = expected_hashes(owners)
    peers, storages = {}, {}
    for pid in ids:
        st = CheckingStorage(hashes, ContentPool())
        if pid in owners:
            m, pieces = owners[pid]
            for k, data in enumerate(pieces):
                st.put(pid, k, m.piece_hashes[k], data)
        secret = (secrets or {}).get(pid, SECRET)
        session = SwarmSession(pid, layout, st, CFG, secret=secret)
        peers[pid] = DataPlanePeer(session, tick_interval=tick)
        storages[pid] = st
    return peers, storages


async def wait_for(pred, timeout: float, step: float = 0.02) -> bool:
    end = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return pred()


def drained(peer: DataPlanePeer) -> bool:
    return all(v == 0 for v in peer.session.record_counts().values())


async def run_mesh(peers: dict, limit: float) -> dict:
    """Start ``peers``, connect them all and run until each completes
    (within ``limit`` s); then wait for the send-side ledgers to clear
    (they do when the peer's have arrives) and return every session's
    record counts."""
    for p in peers.values():
        await p.start()
    await connect_mesh(list(peers.values()))
    ok = await asyncio.wait_for(asyncio.gather(
        *(p.run_until_complete(limit) for p in peers.values())), limit + 2.0)
    assert all(ok), {pid: p.session.progress(0) for pid, p in peers.items()}
    await wait_for(lambda: all(drained(p) for p in peers.values()), 3.0)
    return {pid: p.session.record_counts() for pid, p in peers.items()}


def test_four_peers_full_mesh_all_gather_bit_exact():
    owners, blobs = random_owners({i: 8 for i in range(4)}, PIECE, seed=3)

    async def main():
        peers, storages = make_peers(owners, range(4))
        try:
            counts = await run_mesh(peers, 10.0)
            for pid, p in peers.items():
                assert p.connected_peers == sorted(set(range(4)) - {pid})
                assert p.stats.protocol_errors == 0, list(p.stats.errors)
                assert p.stats.handshakes_refused == 0
                assert p.stats.duplicate_connections == 0
                assert p.session.stats.protocol_errors == 0
                assert p.session.stats.corrupt_pieces == 0
                assert p.session.stats.unrequested_blocks == 0
        finally:
            for p in peers.values():
                await p.close()
        assert_bit_exact(storages, owners, blobs)
        for pid, p in peers.items():
            assert all(v == 0 for v in p.session.record_counts().values()), pid
        return counts

    counts = asyncio.run(main())
    # Drained before close, not only because close released everything.
    assert all(v == 0 for c in counts.values() for v in c.values()), counts


def test_wrong_secret_is_refused_and_nothing_stored():
    # Owner 3 is in the layout but has the wrong secret: the honest peers
    # complete owners 0-2 and store nothing of 3's.
    owners, blobs = random_owners({i: 3 for i in range(4)}, PIECE, seed=7)

    async def main():
        peers, storages = make_peers(owners, range(4), secrets={3: b"wrong"})
        honest = [peers[i] for i in range(3)]
        rogue = peers[3]
        try:
            for p in peers.values():
                await p.start()
            await connect_mesh(honest)
            # Rogue dials every honest peer; honest peer 0 also dials the rogue.
            for p in honest:
                await rogue.connect_to(p.peer_id, "127.0.0.1", p.port)
            await peers[0].connect_to(3, "127.0.0.1", rogue.port)

            def honest_done():
                return all(p.session.held_by_owner()[o] == set(range(3))
                           for p in honest for o in range(3))
            assert await wait_for(honest_done, 10.0)
            assert await wait_for(lambda: all(3 not in p.connected_peers for p in honest)
                                  and not rogue.connected_peers, 3.0)
            for p in honest:
                assert p.stats.handshakes_refused >= 1, (p.peer_id, p.stats)
                assert any("auth" in e for e in p.stats.errors)
                assert 3 not in p.session.peers
                assert p.stats.protocol_errors == 0
            # The rogue refused the honest dial too (it checks with its own secret).
            assert rogue.stats.handshakes_refused >= 1
            assert rogue.session.pieces_have == 3
        finally:
            for p in peers.values():
                await p.close()
        for pid in range(3):
            st = storages[pid]
            assert not any(src == 3 for src, _ in st.keys()), pid
            assert st.bad_puts == []
            for owner in range(3):
                assert blob_from_storage(st, owners[owner][0]) == blobs[owner]
        assert set(storages[3].keys()) == {(3, k) for k in range(3)}

    asyncio.run(main())


def test_crossed_dials_keep_one_connection_per_pair():
    owners, blobs = random_owners({i: 4 for i in range(3)}, PIECE, seed=9)

    async def main():
        peers, storages = make_peers(owners, range(3))
        try:
            for p in peers.values():
                await p.start()
            # Everyone dials everyone, at once.
            await asyncio.gather(*(a.connect_to(b.peer_id, "127.0.0.1", b.port)
                                   for a in peers.values() for b in peers.values()
                                   if a is not b))
            ok = await asyncio.gather(*(p.run_until_complete(10.0) for p in peers.values()))
            assert all(ok)
            assert sum(p.stats.duplicate_connections for p in peers.values()) >= 1
            for pid, p in peers.items():
                assert p.connected_peers == sorted(set(range(3)) - {pid})
                assert p.stats.protocol_errors == 0, list(p.stats.errors)
                # The surviving connection is the one the lower id dialed.
                for q, conn in p._conns.items():
                    assert conn.dialer == min(pid, q)
        finally:
            for p in peers.values():
                await p.close()
        for st in storages.values():
            for owner, (m, _) in owners.items():
                assert blob_from_storage(st, m) == blobs[owner]

    asyncio.run(main())


def test_garbage_and_silent_connections_are_dropped_without_crashing():
    owners, _ = random_owners({0: 1, 1: 1}, PIECE, seed=1)

    async def main():
        peers, _ = make_peers(owners, range(2))
        p = peers[0]
        p.handshake_timeout = 0.3
        try:
            await p.start()
            r, w = await asyncio.open_connection("127.0.0.1", p.port)
            w.write(b"GET / HTTP/1.1\r\n\r\n")
            await w.drain()
            assert await asyncio.wait_for(r.read(), 2.0) == b""   # closed by the peer
            w.close()
            r2, w2 = await asyncio.open_connection("127.0.0.1", p.port)  # says nothing
            assert await asyncio.wait_for(r2.read(), 2.0) == b""
            w2.close()
            assert p.stats.handshakes_refused == 1
            assert p.stats.handshake_timeouts == 1
            assert p.session.peers == {}
        finally:
            await p.close()
            await peers[1].close()

    asyncio.run(main())


def test_close_leaves_no_tasks_behind():
    owners, _ = random_owners({i: 2 for i in range(3)}, PIECE, seed=2)

    async def main():
        peers, _ = make_peers(owners, range(3))
        for p in peers.values():
            await p.start()
        await connect_mesh(list(peers.values()))
        await asyncio.sleep(0.05)             # mid-exchange
        for p in peers.values():
            await p.close()
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        for p in peers.values():
            assert p._tasks == set() and p._conns == {}
            assert p.session.closed

    asyncio.run(main())


def test_protocol_error_after_handshake_and_session_close():
    from fs_bittorrent.core.codec import HANDSHAKE_LEN, FrameDecoder, WireLimits, encode
    from fs_bittorrent.core.layout import make_auth
    from fs_bittorrent.core.messages import Handshake, Have, Unchoke
    from fs_bittorrent.net.dataplane import now

    owners, _ = random_owners({0: 2, 1: 2}, PIECE, seed=4)

    async def main():
        peers, _ = make_peers(owners, range(2))
        p = peers[0]
        layout = p.session.layout
        hs = Handshake(layout.swarm_id, 1, CFG.credit_bytes, make_auth(SECRET, layout.swarm_id, 1))
        try:
            await p.start()
            # 1) valid handshake, then a have for a piece the swarm lacks.
            r, w = await asyncio.open_connection("127.0.0.1", p.port)
            w.write(encode(hs) + encode(Have(layout.num_pieces + 5)))
            await w.drain()
            # Dropped at once (what was queued for it is discarded): EOF.
            await asyncio.wait_for(r.read(), 2.0)
            w.close()
            assert p.stats.protocol_errors == 1 and p.stats.handshakes_refused == 0
            assert "PieceIndexOutOfRange" in p.stats.errors[-1]
            assert p.session.peers == {} and p.connected_peers == []
            # 2) the session closes a peer (a ban): queued messages are flushed first.
            r, w = await asyncio.open_connection("127.0.0.1", p.port)
            w.write(encode(hs))
            await w.drain()
            assert await wait_for(lambda: p.connected_peers == [1], 2.0)
            # A message queued in the same batch as the Close still goes out.
            p._route([(1, Unchoke())] + p.session.ban(1, now(), "test ban"))
            got = await asyncio.wait_for(r.read(), 2.0)
            dec = FrameDecoder(WireLimits(num_pieces=layout.num_pieces))
            dec.feed(got)
            kinds = [type(m).__name__ for m in dec]
            assert got[:HANDSHAKE_LEN] == encode(p.session._handshake())
            assert kinds[:2] == ["Handshake", "Bitfield"], kinds
            assert kinds[-1] == "Unchoke", kinds
            w.close()
            assert p.stats.closes_by_session == 1 and p.connected_peers == []
            assert 1 in p.session.banned
            # 3) a banned peer's new handshake is refused before the session sees it.
            r, w = await asyncio.open_connection("127.0.0.1", p.port)
            w.write(encode(hs))
            assert await asyncio.wait_for(r.read(), 2.0) == b""
            w.close()
            assert p.stats.handshakes_refused == 1
        finally:
            for q in peers.values():
                await q.close()

    asyncio.run(main())
