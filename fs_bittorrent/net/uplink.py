"""How fast this host's uplink is, measured while it had a backlog to send.

Why this estimator: a client's uplink is what the upload-aware picker needs
to know (issue 12), and only the client itself can see it well.  Bytes sent
over a round divided by the round's length under-estimates it (a peer is
idle while nobody asks it for anything); bytes written to sockets divided by
the time our send queues were non-empty over-estimates it, because the
kernel takes megabytes into its send buffers at memory speed (and measured
that way on shaped links the figures of equal uplinks spread 4x).  So the
meter is sampled at a fixed period while a round runs and counts what *left
the host* -- bytes written minus what still sits in the transports' buffers
and the kernel's send queues (``TIOCOUTQ``: unsent plus unacknowledged) --
over the sampling windows that had a backlog at both ends (the uplink was
kept busy throughout, as far as one can tell from outside the kernel).
Windows where the host ran dry are left out, bytes and time together, so the
ratio is the rate at which the path takes bytes when it has them.

Limits: when the receivers (their downlinks or credit), not our uplink, are
the bottleneck, the meter reports what they took; it is a measured rate, not
a capacity.  The host reports it per round; the coordinator relays it.
"""
from __future__ import annotations

import array
import fcntl
import math
import termios
from typing import Any

__all__ = ["UplinkEstimate", "UplinkMeter", "kernel_unsent", "MIN_BYTES", "MIN_SECONDS"]

#: Below these a round's measurement says nothing (handshakes, a few blocks).
MIN_BYTES = 256 * 1024
MIN_SECONDS = 0.005


class UplinkMeter:
    """Bytes that left the host over the sampling windows it was backlogged."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes = 0
        self.seconds = 0.0
        self._last: tuple[float, int, int] | None = None   # (time, sent, backlog)

    def sample(self, now: float, sent: int, backlog: int) -> None:
        """``sent``: the host's running count of bytes that have left it;
        ``backlog``: bytes (or queued messages) still waiting to leave; the
        uplink counts as busy between two samples that both have some."""
        last = self._last
        if last is not None and last[2] > 0 and backlog > 0 and now > last[0]:
            self.seconds += now - last[0]
            self.bytes += max(0, sent - last[1])
        self._last = (now, sent, backlog)

    def rate(self) -> float:
        """Bytes/s while backlogged, or 0.0 when too little was sent to tell."""
        if self.bytes < MIN_BYTES or self.seconds < MIN_SECONDS:
            return 0.0
        r = self.bytes / self.seconds
        return r if math.isfinite(r) else 0.0


class UplinkEstimate:
    """The uplink to report: the highest of the last ``window`` rounds'
    measured rates (0: none measured).

    Why a windowed maximum (as BBR estimates a path's bottleneck bandwidth):
    a measured rate is a lower bound on the capacity -- a host cannot send
    faster than its link -- and on a shared machine one round's figure can
    fall to half or a quarter when the process is starved of CPU (measured
    in shaped namespaces: 10-11 MB/s for the same 12.5 MB/s links, then
    2.3-9.7 in a round with a CPU burst).  Reported as is, such a round made
    uniform links look heterogeneous and switched the first-copy plan on
    for the next round (and the latency rules off), which slowed that round
    and the next measurement too.  A real drop in capacity is followed
    after ``window`` rounds."""

    def __init__(self, window: int = 4) -> None:
        if window < 1:
            raise ValueError(f"window: {window!r} must be >= 1")
        self.window = window
        self._rates: list[float] = []

    def add(self, rate: float) -> float:
        """Record one round's measured rate (0: nothing measured, not
        recorded); returns the estimate."""
        if rate > 0 and math.isfinite(rate):
            self._rates = (self._rates + [float(rate)])[-self.window:]
        return self.value

    @property
    def value(self) -> float:
        return max(self._rates, default=0.0)


def kernel_unsent(writer: Any, request: int = termios.TIOCOUTQ) -> int:
    """Bytes written to ``writer`` that have not left the host: the
    transport's buffer plus the kernel's send queue (0 where unknown).

    ``request``: the ioctl that reads the kernel's part -- ``TIOCOUTQ``
    (unsent plus unacknowledged, the default: what the meter needs), or
    ``pacing.SIOCOUTQNSD`` (not yet sent only: what paced uploads wait on);
    where it fails, ``TIOCOUTQ``."""
    if writer is None:
        return 0
    n = 0
    transport = getattr(writer, "transport", None)
    if transport is not None and not transport.is_closing():
        try:
            n += transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):  # pragma: no cover
            pass
    sock = writer.get_extra_info("socket")
    if sock is not None:
        buf = array.array("i", [0])
        for req in (request, termios.TIOCOUTQ) if request != termios.TIOCOUTQ else (request,):
            try:
                fcntl.ioctl(sock.fileno(), req, buf, True)
            except (OSError, ValueError):    # closed socket, not a TCP socket
                continue
            n += buf[0]
            break
    return n
