"""Paced uploads for a TCP host: when the uplink has room, and how much.

Why: a data-plane host that answers every request at once hands the bytes
to asyncio and the kernel, which send them first in, first out.  On a slow
uplink megabytes of relays then sit in the transports' and the kernel's
send buffers ahead of the host's own unique pieces, which only its uplink
can give (issue 12).  With ``SwarmSession(..., paced_uploads=True)`` the
session holds accepted requests and chooses what leaves next
(``upload_ready``); the host only has to say when its uplink has room.

The signal: bytes queued for the uplink, summed over *all* of the peer's
connections (one uplink, one budget) -- blocks still in a connection's
sender queue, the transport's write buffer, and the kernel's **not yet
sent** bytes (``SIOCOUTQNSD``).  Bytes sent but not yet acknowledged are
left out on purpose: they have left the socket's queue, and with TCP
small queues at most a few KB per socket wait in the local qdisc; the rest
is on the wire or queued at the *receiver's* downlink, which is not our
uplink (counting them would throttle a fast uplink to the slowest
receiver's pace).  The host releases blocks while that backlog is below a
low-water mark of 20 ms of the uplink's rate (at least two
blocks, the simulator's mark, sim/network.py ``_pump``; the 20 ms cover
the event loop's timer slack on a loaded host), so the uplink never idles
and at most that much is committed in FIFO order that the session could
still reorder.
"""
from __future__ import annotations

from typing import Any

from .uplink import kernel_unsent

__all__ = ["SIOCOUTQNSD", "kernel_not_sent", "low_water_mark", "poll_interval"]

#: linux/sockios.h: bytes in a TCP socket's send queue not yet sent.
SIOCOUTQNSD = 0x894B

#: Low-water mark: this much of the uplink's rate, at least MIN_BLOCKS blocks.
MARK_SECONDS = 0.02
MIN_BLOCKS = 2
#: Re-check a draining backlog at most this often / at least this often.
MIN_POLL = 0.001
MAX_POLL = 0.02


def kernel_not_sent(writer: Any) -> int:
    """Bytes written to ``writer`` still waiting to be sent: the
    transport's buffer plus the kernel's not-yet-sent bytes (unacknowledged
    bytes excluded; 0 where unknown)."""
    return kernel_unsent(writer, SIOCOUTQNSD)


def low_water_mark(rate: float, block: int) -> int:
    """Backlog (bytes) below which the uplink gets more: ``MARK_SECONDS``
    of ``rate`` (bytes/s; 0 unknown), at least ``MIN_BLOCKS`` blocks."""
    return max(MIN_BLOCKS * block, int(rate * MARK_SECONDS)) if rate > 0 \
        else 2 * MIN_BLOCKS * block


def poll_interval(rate: float, mark: int) -> float:
    """How soon to look again while blocks wait: about the time half the
    mark takes to drain, within [MIN_POLL, MAX_POLL] (bounded, no busy loop)."""
    if rate <= 0:
        return 0.005
    return min(MAX_POLL, max(MIN_POLL, mark / 2 / rate))
