"""What a worker counts: `WorkerStats`, logged when it stops, read by the tests, and sent to the
supervisor once a second (`snapshot()`) for the metrics (tunio.metrics)."""

from __future__ import annotations

import bisect
import errno
from dataclasses import asdict, dataclass, field
from typing import Any

from tunio.defaults import DIAL_BUCKETS


def errname(code: int) -> str:
    """ECONNREFUSED for 111: how errnos appear in logs and in the dial failure counts."""
    return errno.errorcode.get(code, str(code))


@dataclass
class Histogram:
    """Counts by upper bound (not cumulative: the metrics add them up), their sum and count."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DIAL_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(DIAL_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


@dataclass
class DialerStats:
    """One dialer's dials: how long the good ones took, the bad ones by errno name."""

    seconds: Histogram = field(default_factory=Histogram)
    failures: dict[str, int] = field(default_factory=dict)


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
    refused_by_policy: int = 0  # flows the policy refused (Reject)
    failovers: int = 0  # dials that failed and moved on to the next dialer of a list
    loop_stalls: int = 0  # times code that blocks held the loop up (tunio.worker.stall)
    routing_loops: int = 0  # OPENs of our own connections, routed back into the TUN
    dialers: dict[str, DialerStats] = field(default_factory=dict, repr=False)  # by label

    def _dialer(self, label: str) -> DialerStats:
        found = self.dialers.get(label)
        if found is None:
            found = self.dialers[label] = DialerStats()
        return found

    def dialed(self, label: str, seconds: float) -> None:
        """A TCP dial through dialer `label` connected after `seconds`."""
        self._dialer(label).seconds.observe(seconds)

    def attempt_failed(self, label: str, code: int) -> str:
        """A dial through dialer `label` failed (the flow may go on to another dialer)."""
        name = errname(code)
        failures = self._dialer(label).failures
        failures[name] = failures.get(name, 0) + 1
        return name

    def open_failed(self, code: int) -> str:
        """Counts a flow refused (OPEN_FAIL) under its errno; returns the errno's name."""
        self.open_fail += 1
        name = errname(code)
        self.dial_failures[name] = self.dial_failures.get(name, 0) + 1
        return name

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain data (what a status message to the supervisor can carry)."""
        return asdict(self)
