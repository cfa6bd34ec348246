"""What a worker counts: `WorkerStats`, logged when it stops (and read by the tests)."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field


def errname(code: int) -> str:
    """ECONNREFUSED for 111: how errnos appear in logs and in the dial failure counts."""
    return errno.errorcode.get(code, str(code))


@dataclass
class WorkerStats:
    opens: int = 0
    open_ok: int = 0
    open_fail: int = 0
    bytes_to_stack: int = 0
    bytes_to_destination: int = 0
    resets_sent: int = 0
    resets_received: int = 0
    protocol_errors: int = 0
    sessions: int = 0
    dial_failures: dict[str, int] = field(default_factory=dict)  # failed dials by errno name
    udp_opens: int = 0  # UDP sessions opened (first DGRAM of a flow id)
    udp_open_fail: int = 0
    datagrams_to_stack: int = 0
    datagrams_to_destination: int = 0
    # datagrams dropped: replies without credit from the stack, DGRAMs beyond our window (or
    # beyond the queue while dialing), and datagrams the destination socket would not take
    datagrams_dropped_credit: int = 0
    datagrams_dropped_window: int = 0
    datagrams_dropped_send: int = 0

    def open_failed(self, code: int) -> str:
        """Counts a failed TCP dial (OPEN_FAIL) under its errno; returns the errno's name."""
        self.open_fail += 1
        name = errname(code)
        self.dial_failures[name] = self.dial_failures.get(name, 0) + 1
        return name
