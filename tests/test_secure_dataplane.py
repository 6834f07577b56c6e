"""A data plane only the federation can use: mutual TLS 1.3 with pinned
certificates, membership, replay, takeover, eavesdropping, plaintext on the
wire, and floods -- all on real sockets on 127.0.0.1.

The attacker in these tests holds everything that crosses FS's gRPC (the
``bt_manifest`` and ``bt_start`` contents: addresses, certificates,
manifests, hence the swarm id) and can capture and replay any byte of the
data plane.  It never holds a member's private key.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl

import pytest
import torch

from fs_bittorrent.core.codec import encode
from fs_bittorrent.core.layout import make_auth
from fs_bittorrent.core.messages import Handshake
from fs_bittorrent.core.pieces import make_model_manifest
from fs_bittorrent.net.tls import LocalIdentity, fingerprint

from dataplane_helpers import (CFG, PIECE, SECRET, Peer, addresses, certificates, close_all,
                               started, ticking)
from swarm_helpers import blob_from_storage

pytest.importorskip("cryptography", reason="cryptography is needed for the TLS data plane")


# ---- helpers ------------------------------------------------------------------------
def model_owners(pids, rnd: int = 0):
    """Each peer's 'model': a real float32 tensor, serialized as the FS
    client does (safetensors), cut into pieces."""
    owners, tensors = {}, {}
    for pid in pids:
        g = torch.Generator().manual_seed(1000 * rnd + pid)
        sd = {"layer.weight": torch.randn(64, 96, generator=g)}
        owners[pid] = make_model_manifest(sd, owner=pid, round=rnd, sample_count=10 + pid,
                                          piece_size=PIECE)
        tensors[pid] = sd["layer.weight"].numpy().tobytes()
    return owners, tensors


def begin_all(peers, rnd, owners, table=None, certs=None):
    table = addresses(peers) if table is None else table
    certs = certificates(peers) if certs is None else certs
    for p in peers:
        p.begin(rnd, owners, table, certificates=certs or None)


def all_complete(peers):
    return lambda: all(p.session.complete for p in peers)


async def run_round(peers, rnd: int = 0):
    """Every peer swarms round ``rnd`` of its models to completion."""
    owners, _ = model_owners([p.pid for p in peers], rnd)
    begin_all(peers, rnd, owners)
    assert await ticking(peers, all_complete(peers), 15), \
        {p.pid: p.session.progress(0) for p in peers}
    return owners


def assert_bit_exact(peers, owners):
    for p in peers:
        assert p.storage.bad_puts == []
        for owner, (m, pieces) in owners.items():
            assert blob_from_storage(p.storage, m) == b"".join(pieces), (p.pid, owner)


def listen_on_package_logger(caplog):
    """An FS run earlier in the process may have turned propagation off."""
    pkg = logging.getLogger("fs_bittorrent")
    if not pkg.propagate:
        pkg.addHandler(caplog.handler)
        return lambda: pkg.removeHandler(caplog.handler)
    return lambda: None


def run_logged(caplog, main) -> None:
    """``asyncio.run(main())`` with the package's log records in ``caplog``."""
    stop = listen_on_package_logger(caplog)
    try:
        asyncio.run(main())
    finally:
        stop()


def warnings_about(caplog, *words):
    return [r.message for r in caplog.records if r.levelno >= logging.WARNING
            and all(w in r.message for w in words)]


class Relay:
    """A TCP relay on 127.0.0.1 that records both directions (a wiretap)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = bytearray()       # dialer -> listener
        self.down = bytearray()     # listener -> dialer
        self._tasks: set = set()
        self.server = None
        self.port = 0

    async def start(self) -> "Relay":
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on(self, r, w):
        tr, tw = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst, buf in ((r, tw, self.up), (tr, w, self.down)):
            t = asyncio.get_running_loop().create_task(self._pump(src, dst, buf))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pump(self, r, w, buf):
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                buf += data
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def close(self):
        self.server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def relayed_pair(tls: bool):
    """Peers 1 and 2; peer 1 reaches peer 2 only through a recording relay."""
    peers = await started(2, tls=tls)
    a, b = peers
    relay = await Relay(b.plane.port).start()
    owners, tensors = model_owners([1, 2])
    table = {1: ("127.0.0.1", a.plane.port), 2: ("127.0.0.1", relay.port)}
    begin_all(peers, 0, owners, table=table)
    assert await ticking(peers, all_complete(peers), 15)
    assert_bit_exact(peers, owners)
    return peers, relay, owners, tensors


async def send_and_read(reader, writer, data: bytes, timeout: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    got = bytearray()
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            got += chunk
    except (ConnectionError, OSError):
        pass
    writer.close()
    return bytes(got)


async def tls_dial(port: int, identity: LocalIdentity, trust: bytes):
    """An attacker's TLS client: its own identity, trusting ``trust``."""
    identity.trust([trust])
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=identity.client_context, server_hostname=""), 5.0)


# ---- tests ----------------------------------------------------------------------------
def test_tls_swarm_two_rounds_bit_exact_every_connection_pinned():
    async def main():
        peers = await started(3, tls=True)
        try:
            for rnd in range(2):
                owners = await run_round(peers, rnd)
                assert_bit_exact(peers, owners)
                for p in peers:
                    assert p.plane.connected_peers == sorted({1, 2, 3} - {p.pid})
                    for q, conn in p.plane._conns.items():
                        assert conn.fingerprint == peers[q - 1].identity.fingerprint
                        assert conn.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
            for p in peers:
                assert p.plane.stats.handshakes_refused == 0, list(p.plane.stats.errors)
                assert p.plane.stats.protocol_errors == 0
        finally:
            await close_all(peers)

    asyncio.run(main())


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_bytes_on_the_wire_hold_no_plaintext_of_the_model(tls):
    """A wiretap between two peers: with TLS no 64-byte run of either
    peer's tensor appears in either direction; in plaintext (the control)
    the same grep finds them, so the test can see what it looks for."""
    async def main():
        peers, relay, owners, tensors = await relayed_pair(tls)
        try:
            captured = bytes(relay.up) + bytes(relay.down)
            assert len(captured) > sum(m.total_size for m, _ in owners.values())
            probes = [t[off:off + 64] for t in tensors.values()
                      for off in range(0, len(t) - 64, len(t) // 8)]
            found = sum(p in captured for p in probes)
            if tls:
                assert found == 0
                assert captured[:1] == b"\x16"             # a TLS handshake record
            else:
                assert found == len(probes)
        finally:
            await relay.close()
            await close_all(peers)

    asyncio.run(main())


def test_replayed_handshake_from_a_captured_connection_is_refused(caplog):
    async def main():
        peers, relay, owners, _ = await relayed_pair(tls=True)
        b = peers[1]
        try:
            live = dict(b.plane._conns)
            refused = b.plane.stats.handshakes_refused
            with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
                # Everything peer 1 ever sent to peer 2, replayed on a new connection.
                r, w = await asyncio.open_connection("127.0.0.1", b.plane.port)
                reply = await send_and_read(r, w, bytes(relay.up))
                assert await ticking([], lambda: b.plane.stats.handshakes_refused > refused, 3)
                b.plane.alarms.flush()
            assert b.plane.stats.tls_failures == 1
            assert b.plane._conns == live                  # the real connection untouched
            assert b.session.stats.protocol_errors == 0
            assert "tls" in b.plane.stats.errors[-1]
            # Whatever came back is TLS records of the new handshake, no model bytes.
            assert owners[2][1][0][200:264] not in reply
            assert warnings_about(caplog, "refused", "tls")
        finally:
            await relay.close()
            await close_all(peers)

    run_logged(caplog, main)


def test_peer_ids_outside_the_membership_are_refused(caplog):
    """Round 1's table drops client 3.  Client 3 (whose certificate peer 1
    trusted in round 0, and which knows round 1's swarm id from bt_start)
    is refused as a non-member; so is a stranger with a fresh key claiming
    id 77, at TLS already; and with encryption off, id 77 with the right
    swarm id and HMAC is refused as a non-member too."""
    async def main():
        peers = await started(3, tls=True)
        p1, p2, p3 = peers
        try:
            await run_round(peers, 0)
            owners1 = await run_round([p1, p2], 1)
            p3.begin(1, owners1, addresses(peers), connect=False,
                     certificates=certificates(peers))    # p3 eavesdropped the table
            held = set(p1.storage.keys())
            swarm = p1.session.layout.swarm_id
            with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
                # Client 3, with its own real key.
                r, w = await tls_dial(p1.plane.port, p3.identity, p1.identity.cert_der)
                assert await send_and_read(r, w, encode(Handshake(swarm, 3, 1 << 20))) == b""
                assert "not a member" in p1.plane.stats.errors[-1]
                # A stranger with a fresh key, claiming 77.
                stranger = LocalIdentity.generate()
                try:
                    r, w = await tls_dial(p1.plane.port, stranger, p1.identity.cert_der)
                    reply = await send_and_read(r, w, encode(Handshake(swarm, 77, 1 << 20)))
                except (ssl.SSLError, ConnectionError):
                    reply = b""
                assert reply == b""
                assert await ticking([], lambda: p1.plane.stats.tls_failures == 1, 3)
                p1.plane.alarms.flush()
            assert p1.plane.stats.handshakes_refused == 2
            assert p1.plane.connected_peers == [2]
            assert set(p1.storage.keys()) == held and set(p1.session.peers) == {2}
            assert warnings_about(caplog, "refused")
        finally:
            await close_all(peers)

        # Encryption off: no proof of identity, but membership still holds.
        plain = await started(2)
        q1, q2 = plain
        try:
            await run_round(plain)
            swarm = q1.session.layout.swarm_id
            r, w = await asyncio.open_connection("127.0.0.1", q1.plane.port)
            hs = Handshake(swarm, 77, 1 << 20, make_auth(SECRET, swarm, 77))
            assert await send_and_read(r, w, encode(hs)) == b""
            assert "not a member" in q1.plane.stats.errors[-1]
            assert q1.plane.connected_peers == [2] and set(q1.session.peers) == {2}
        finally:
            await close_all(plain)

    run_logged(caplog, main)


def test_second_connection_for_a_connected_id_does_not_take_over(caplog):
    async def main():
        peers = await started(3, tls=True)
        p1, p2, p3 = peers
        try:
            await run_round(peers)
            live = p1.plane._conns[2]
            swarm = p1.session.layout.swarm_id
            with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
                # Member 3, with its own key, claims to be 2: its certificate
                # is not the one published for 2.
                r, w = await tls_dial(p1.plane.port, p3.identity, p1.identity.cert_der)
                assert await send_and_read(r, w, encode(Handshake(swarm, 2, 1 << 20))) == b""
                assert "is not the one published for peer 2" in p1.plane.stats.errors[-1]
                # Peer 2 itself opens a second connection: the live one stays.
                r, w = await tls_dial(p1.plane.port, p2.identity, p1.identity.cert_der)
                assert await send_and_read(r, w, encode(Handshake(swarm, 2, 1 << 20)),
                                           timeout=2.0) == b""
                p1.plane.alarms.flush()
            assert p1.plane._conns[2] is live and not live.closed
            assert p1.plane.stats.duplicate_connections == 1
            assert warnings_about(caplog, "duplicate", "second connection for peer 2",
                                  "stays")
            assert warnings_about(caplog, "refused (peer_id)")
            # The swarm is unharmed: 1 and 2 still talk on the live connection.
            assert set(p1.session.peers) == {2, 3} and p1.plane.connected_peers == [2, 3]
        finally:
            await close_all(peers)

    run_logged(caplog, main)


def test_eavesdropper_holding_everything_sent_over_grpc_cannot_handshake():
    wire = pytest.importorskip("fs_bittorrent.fs.wire", exc_type=ImportError,
                               reason="FederatedScope is not installed: control messages skipped")

    async def main():
        peers = await started(2, tls=True)
        p1, p2 = peers
        attacker = None
        try:
            owners, _ = model_owners([1, 2], 0)
            table = {p.pid: f"127.0.0.1:{p.plane.port}" for p in peers}
            certs = {p.pid: wire.certificate_to_text(p.identity.cert_der) for p in peers}
            # Everything the control channel carries this round.
            grpc = [wire.pack_manifest(0, owners[p.pid][0], table[p.pid], certs[p.pid])
                    for p in peers]
            grpc.append(wire.pack_start(0, tuple(m for m, _ in owners.values()),
                                        {1: [2], 2: [1]}, 30.0, table, certs))
            text = json.dumps(grpc)
            assert "secret" not in text
            for p in peers:     # no private key material, in any encoding
                assert p.identity._key_pem.decode() not in text
            start = grpc[-1]
            got_certs = wire.unpack_start(start).certificates
            begin_all(peers, 0, owners)
            swarm_id = p1.session.layout.swarm_id
            # 1) Its own key, claiming peer 2: refused at TLS.
            own = LocalIdentity.generate()
            try:
                r, w = await tls_dial(p1.plane.port, own, got_certs[1])
                reply = await send_and_read(r, w, encode(Handshake(swarm_id, 2, 1 << 20)))
            except (ssl.SSLError, ConnectionError):
                reply = b""
            assert reply == b""
            assert await ticking([], lambda: p1.plane.stats.tls_failures >= 1, 3)
            # 2) Peer 2's certificate with its own key: TLS will not even load it.
            with pytest.raises(ssl.SSLError):
                LocalIdentity(got_certs[2], own._key_pem)
            # 3) Posing as peer 2's listener (a hijacked address): peer 1's dial
            #    fails the pin and nothing is sent to it.
            attacker = await asyncio.start_server(
                lambda r, w: asyncio.ensure_future(_serve_tls(r, w, own, got_certs[1])),
                "127.0.0.1", 0)
            fake = attacker.sockets[0].getsockname()[1]
            hijacked = Peer(1, identity=p1.identity)
            hijacked.plane.peer_id = 1
            await hijacked.plane.start()
            hijacked.plane.dial_attempts = 1
            hijacked.begin(0, owners, {1: ("127.0.0.1", hijacked.plane.port),
                                       2: ("127.0.0.1", fake)},
                           certificates={1: p1.identity.cert_der, 2: got_certs[2]})
            assert await ticking([hijacked], lambda: (2, 0) in hijacked.lost, 10)
            assert hijacked.plane.connected_peers == []
            assert hijacked.session.stats.bytes_down == 0
            await close_all([hijacked])
            # The real pair still completes.
            assert await ticking(peers, all_complete(peers), 15)
            assert_bit_exact(peers, owners)
        finally:
            if attacker is not None:
                attacker.close()
            await close_all(peers)

    asyncio.run(main())


async def _serve_tls(reader, writer, identity: LocalIdentity, trust: bytes):
    """The attacker's listener: TLS with its own key, then silence."""
    identity.trust([trust])
    try:
        await asyncio.wait_for(writer.start_tls(identity.server_context), 5.0)
        await asyncio.wait_for(reader.read(), 5.0)
    except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError):
        pass
    writer.close()


def _loopback_alias_works(addr: str) -> bool:
    s = socket.socket()
    try:
        s.bind((addr, 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


FLOOD_SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.mark.skipif(not all(_loopback_alias_works(a) for a in FLOOD_SOURCES),
                    reason="cannot bind 127.0.0.2-4 as source addresses")
def test_flood_of_unauthenticated_connections_is_capped_and_logged_while_the_swarm_completes(
        caplog):
    """Silent connections from three other source addresses keep coming for
    the whole exchange (slowloris: they never speak).  Unauthenticated
    connections stay within the caps, the refusals and timeouts show in the
    log *during* the flood, and the swarm ends with exactly the clean
    run's bytes."""
    max_pending, per_address, hs_timeout = 6, 3, 0.5

    async def flood(port: int, stop_at: float, counts: dict) -> None:
        loop = asyncio.get_running_loop()
        open_socks: list = []
        k = 0
        while loop.time() < stop_at:
            src = FLOOD_SOURCES[k % len(FLOOD_SOURCES)]
            k += 1
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(src, 0)), 1.0)
                open_socks.append(w)
                counts["opened"] += 1
            except (OSError, asyncio.TimeoutError):
                counts["failed"] += 1
            if len(open_socks) > 40:
                open_socks.pop(0).close()
            await asyncio.sleep(0.005)
        for w in open_socks:
            w.close()

    async def main():
        peers = await started(3, tls=True, handshake_timeout=hs_timeout,
                              max_pending=max_pending, max_pending_per_address=per_address)
        for p in peers:
            p.plane.alarms.interval = 0.5          # several warnings within the test's flood
        fds_before = len(os.listdir("/proc/self/fd"))
        try:
            owners, _ = model_owners([1, 2, 3], 0)
            loop = asyncio.get_running_loop()
            counts = {"opened": 0, "failed": 0}
            with caplog.at_level(logging.WARNING, logger="fs_bittorrent"):
                stop_at = loop.time() + 2.5
                flooders = [loop.create_task(flood(p.plane.port, stop_at, counts))
                            for p in peers]
                await asyncio.sleep(0.6)           # the flood is on before the round begins
                warned_before_round = len(warnings_about(caplog, "refused"))
                begin_all(peers, 0, owners)
                ok = await ticking(peers, all_complete(peers), 20)
                during = len(warnings_about(caplog, "refused"))
                await asyncio.gather(*flooders)
            assert ok, {p.pid: p.session.progress(0) for p in peers}
            assert_bit_exact(peers, owners)        # identical to a clean run
            assert counts["opened"] > 3 * (max_pending + per_address)
            for p in peers:
                st = p.plane.stats
                assert st.connections_capped > 0, st
                assert st.handshake_timeouts > 0, st
                assert st.pending_peak <= max_pending + per_address, st   # strangers + members
                assert st.protocol_errors == 0
                assert p.plane.connected_peers == sorted({1, 2, 3} - {p.pid})
            assert warned_before_round >= 1 and during >= warned_before_round
            assert warnings_about(caplog, "cap")
            assert warnings_about(caplog, "handshake timeout")
        finally:
            await close_all(peers)
        # Every flood socket is gone again (closed transports go on the next turns).
        await asyncio.sleep(0.2)
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2

    run_logged(caplog, main)
