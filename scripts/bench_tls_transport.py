"""CPU per 100 MiB through TLS on loopback: asyncio's streams against a lean transport.

Why: the FS CNN's exchange is CPU-bound on the 2-vCPU benchmark machine
(docs/benchmarks.md, ninth session), and a client's data plane reads and
writes through asyncio's TLS transport (``sslproto``) and ``StreamReader``.
Before anyone rewrites that path, this measures what a leaner one would
save, in one process, side by side, as a ratio:

* ``streams-plain``: ``asyncio.open_connection`` without TLS, the data
  plane's plaintext path (``bittorrent.encryption False``);
* ``streams-tls``: the same with ``start_tls`` (mutual TLS 1.3 with the
  data plane's own contexts, ``net/tls.LocalIdentity``): the default path;
* ``lean-tls``: an ``asyncio.BufferedProtocol`` straight on the socket
  transport that runs TLS itself through ``ssl.SSLObject`` and memory BIOs:
  the kernel reads into one preallocated buffer, records are decrypted into
  another (``SSLObject.read(n, buffer)``: no allocation per record), and
  each batch of frames is encrypted with one ``write`` (one run of full
  records, not one record per part).  Not a data plane: it moves bytes and
  counts them, enough to price the transport.

The sender writes frames of a 13-byte header and a 64 KiB block (a
``piece`` message) in slices of ``--slice`` bytes with a yield between
them, so the receiver's socket reads are about as small as on shaped
links (15 KB on average, measured with ``/proc/<pid>/io`` in the FS CNN).
Both ends run in this process, so CPU is ``time.process_time()`` for both;
figures are medians of ``--repeat`` runs, modes interleaved.

    python scripts/bench_tls_transport.py [--mib 200] [--slice 16384] [--repeat 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from fs_bittorrent.net.tls import LocalIdentity  # noqa: E402

MIB = 1 << 20
BLOCK = 64 * 1024
HEADER = b"\0" * 13
HANDSHAKE_TIMEOUT = 10.0
RUN_TIMEOUT = 300.0            # a run that stalls ends with TimeoutError, not a hang


class _Counter:
    """What the receiving end saw."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.got = 0
        self.reads = 0
        self.done = asyncio.get_running_loop().create_future()

    def add(self, n: int) -> None:
        self.got += n
        if self.got >= self.total and not self.done.done():
            self.done.set_result(None)


class LeanTLS(asyncio.BufferedProtocol):
    """TLS over a socket transport with SSLObject and memory BIOs."""

    def __init__(self, ctx: ssl.SSLContext, server: bool, counter: Optional[_Counter]) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server,
                                server_hostname=None)
        self.counter = counter
        self.inbuf = bytearray(256 * 1024)
        self.inview = memoryview(self.inbuf)
        self.plain = bytearray(256 * 1024)
        self.handshaken = asyncio.get_running_loop().create_future()
        self.transport: Optional[asyncio.Transport] = None
        self._writable: Optional[asyncio.Future] = None    # set while the transport is paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport                       # type: ignore[assignment]
        self._handshake()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())

    def _handshake(self) -> None:
        try:
            self.ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        self._flush()
        if not self.handshaken.done():
            self.handshaken.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.inview

    def buffer_updated(self, nbytes: int) -> None:
        self.incoming.write(self.inview[:nbytes])
        if not self.handshaken.done():
            self._handshake()
            if not self.handshaken.done():
                return
        counter = self.counter
        if counter is not None:
            counter.reads += 1
        while True:
            try:
                n = self.ssl.read(len(self.plain), self.plain)
            except ssl.SSLWantReadError:
                break
            if not n:
                break
            if counter is not None:
                counter.add(n)
        self._flush()                                    # e.g. post-handshake messages

    def write(self, parts: list) -> None:
        self.ssl.write(b"".join(parts))
        self._flush()

    # flow control, as asyncio's streams have it: the transport pauses us
    # above its high-water mark and resumes us below the low one
    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable

    def connection_lost(self, exc: Optional[Exception]) -> None:
        pass


async def _paced_send(write, drain, total: int, slice_: int) -> None:
    block = os.urandom(BLOCK)
    frame = HEADER + block
    sent = 0
    while sent < total:
        for lo in range(0, len(frame), slice_):
            write([frame[lo:lo + slice_]])
            await drain()
            await asyncio.sleep(0)
        sent += BLOCK


async def run_streams(tls: bool, total: int, slice_: int, ident: LocalIdentity) -> tuple:
    counter = _Counter(total)

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if tls:
            await writer.start_tls(ident.server_context)
        while counter.got < total:
            data = await reader.read(256 * 1024)
            if not data:
                break
            counter.reads += 1
            counter.add(len(data))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if tls:
        await writer.start_tls(ident.client_context, server_hostname="")
    t0 = time.process_time()
    await _paced_send(writer.writelines, writer.drain, total, slice_)
    await asyncio.wait_for(counter.done, RUN_TIMEOUT)
    cpu = time.process_time() - t0
    writer.close()
    server.close()
    return cpu, counter.reads


async def run_lean(total: int, slice_: int, ident: LocalIdentity) -> tuple:
    loop = asyncio.get_running_loop()
    counter = _Counter(total)
    accepted: list[LeanTLS] = []

    def factory() -> LeanTLS:
        proto = LeanTLS(ident.server_context, True, counter)
        accepted.append(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: LeanTLS(ident.client_context, False, None), "127.0.0.1", port)
    # the client's handshake ends after the server's protocol read its hello
    await asyncio.wait_for(client.handshaken, HANDSHAKE_TIMEOUT)
    await asyncio.wait_for(accepted[0].handshaken, HANDSHAKE_TIMEOUT)
    t0 = time.process_time()
    await _paced_send(client.write, client.drain, total, slice_)
    await asyncio.wait_for(counter.done, RUN_TIMEOUT)
    cpu = time.process_time() - t0
    client.transport.close()
    server.close()
    return cpu, counter.reads


MODES = ("streams-plain", "streams-tls", "lean-tls")


async def one(mode: str, total: int, slice_: int, ident: LocalIdentity) -> tuple:
    if mode == "lean-tls":
        return await run_lean(total, slice_, ident)
    return await run_streams(mode == "streams-tls", total, slice_, ident)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=200, help="MiB of blocks per run")
    ap.add_argument("--slice", type=int, default=16384,
                    help="bytes per write, with a yield between (small socket reads)")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    for name, value in (("--mib", a.mib), ("--slice", a.slice), ("--repeat", a.repeat)):
        if value <= 0:
            ap.error(f"{name}: {value} must be > 0")
    ident = LocalIdentity.generate()
    ident.trust([ident.cert_der])
    total = a.mib * MIB
    cpu: dict = {m: [] for m in MODES}
    reads: dict = {m: [] for m in MODES}
    for _ in range(a.repeat):
        for mode in MODES:
            c, r = asyncio.run(one(mode, total, a.slice, ident))
            cpu[mode].append(c / a.mib * 100)
            reads[mode].append(r)
    base = statistics.median(cpu["streams-tls"])
    print(f"{a.mib} MiB of 64 KiB blocks, written in {a.slice}-byte slices; "
          f"median of {a.repeat}, both ends in one process")
    print("\n| mode | CPU s per 100 MiB | vs streams-tls | reads at the receiver |")
    print("|---|---:|---:|---:|")
    for mode in MODES:
        med = statistics.median(cpu[mode])
        print(f"| {mode} | {med:.3f} | {med / base:.2f} | {int(statistics.median(reads[mode]))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
