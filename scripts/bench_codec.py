"""Throughput of the wire codec on piece messages (the only bulk traffic).

Measures, for 16 KiB and 128 KiB blocks, GB/s of *block payload*:

* ``encode``       -- ``encode(Piece(...))``: header + one copy of the block;
* ``encode_parts`` -- header + memoryview of the block, no copy;
* ``decode``       -- a ``FrameDecoder`` fed the encoded stream in 256 KiB
  chunks, as a socket would deliver them, drained after each chunk.

Blocks are memoryview slices of one large buffer, as a sender serving from
a model's tensor bytes would have them.  Each figure is the best of several
repeats (the least disturbed by other processes).

Usage: python scripts/bench_codec.py [--mib 256] [--repeat 5] [--chunk-kib 256]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fs_bittorrent.core.codec import FrameDecoder, WireLimits, encode, encode_parts  # noqa: E402
from fs_bittorrent.core.messages import Piece  # noqa: E402

GB = 1e9


def blocks_of(data: memoryview, block_size: int) -> list[tuple[int, int, memoryview]]:
    """(index, begin, block) for every block of ``data``, 256 KiB pieces."""
    piece = max(256 * 1024, block_size)
    return [(off // piece, off % piece, data[off:off + block_size])
            for off in range(0, len(data), block_size)]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(block_size: int, total: int, repeat: int, chunk: int) -> dict[str, float]:
    data = memoryview(os.urandom(total))
    blocks = blocks_of(data, block_size)
    payload = len(blocks) * block_size
    limits = WireLimits(num_pieces=total // max(256 * 1024, block_size) + 1,
                        max_block_size=max(block_size, 16 * 1024))

    def run_encode() -> None:
        for i, b, blk in blocks:
            encode(Piece(i, b, blk))

    def run_parts() -> None:
        for i, b, blk in blocks:
            encode_parts(Piece(i, b, blk))

    stream = memoryview(b"".join(encode(Piece(i, b, blk)) for i, b, blk in blocks))
    chunks = [stream[o:o + chunk] for o in range(0, len(stream), chunk)]

    def run_decode() -> None:
        dec = FrameDecoder(limits, expect_handshake=False)
        n = 0
        for c in chunks:
            dec.feed(c)
            for _ in dec:
                n += 1
        assert n == len(blocks) and dec.buffered == 0

    # Correctness check once, outside the timing.
    dec = FrameDecoder(limits, expect_handshake=False)
    for c in chunks:
        dec.feed(c)
    first = dec.next_message()
    assert isinstance(first, Piece) and bytes(first.block) == bytes(blocks[0][2])

    secs = {name: best(fn, repeat) for name, fn in
            (("encode", run_encode), ("encode_parts", run_parts), ("decode", run_decode))}
    out = {name: payload / t / GB for name, t in secs.items()}
    out["encode+decode"] = payload / (secs["encode"] + secs["decode"]) / GB
    out["msgs/s decode"] = len(blocks) / secs["decode"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="block payload per run, MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-kib", type=int, default=256, help="socket read size fed to the decoder")
    args = ap.parse_args()

    print(f"machine: {platform.platform()}, {platform.machine()}, "
          f"{platform.processor() or 'cpu ?'}, cpu_count={os.cpu_count()}, "
          f"python {platform.python_version()}")
    print(f"payload {args.mib} MiB per run, best of {args.repeat}, "
          f"decoder fed {args.chunk_kib} KiB chunks\n")
    print("| block | encode GB/s | encode_parts GB/s | decode GB/s | encode+decode GB/s | decode msgs/s |")
    print("|------:|------------:|------------------:|------------:|-------------------:|--------------:|")
    for kib in (16, 128):
        r = bench(kib * 1024, args.mib * 1024 * 1024, args.repeat, args.chunk_kib * 1024)
        print(f"| {kib} KiB | {r['encode']:.2f} | {r['encode_parts']:.2f} | {r['decode']:.2f} "
              f"| {r['encode+decode']:.2f} | {r['msgs/s decode']:,.0f} |")


if __name__ == "__main__":
    main()
