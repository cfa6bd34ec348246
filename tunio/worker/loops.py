"""Routing loops: a worker's own connection routed into the TUN again.

A way out that does not keep the workers' connections out of the TUN (an --egress-mark whose
routing table has no route for the destination, say) sends a dial's packets into the TUN, where
they come back as a new flow, whose dial comes back as the next. A TCP connect goes on, hop after
hop, until the stack's share of held connections for the destination runs out and every app
times out; a UDP datagram circles for good, a new session each hop. The tell is cheap and certain:
such a connection leaves with the address of the app it is for (the TUN's, which is what the app's
own packets had), which a connection that leaves by another interface never does.
"""

from __future__ import annotations

import logging
import time

from tunio.dialers.base import Address
from tunio.worker.stats import WorkerStats

log = logging.getLogger("tunio.worker")

#: seconds between two lines about loops of one IP version (a loop comes in floods)
WARNING_INTERVAL = 60.0
#: seconds a destination whose TCP dial looped is refused at once (the hops of the loop already
#: under way come back within milliseconds; a fixed route is used a second later)
MEMORY = 1.0


class RoutingLoops:
    """Counts the loops a worker finds and says so (a line a minute per IP version at most),
    and remembers for a while where an app's connections loop (`hold`, `held`)."""

    def __init__(self, stats: WorkerStats, worker: str) -> None:
        self.stats = stats
        self.worker = worker
        self._next_warning: dict[int, float] = {}
        # (app address, destination host) -> until when a connection there is known to loop
        self._held: dict[tuple[str, str], float] = {}

    def hold(self, app: str, dst_host: str) -> None:
        """A connection of app `app` to `dst_host` looped: its next ones are `held` a while."""
        self._held[(app, dst_host)] = time.monotonic() + MEMORY

    def held(self, app: str, dst_host: str) -> bool:
        """Whether a new flow from `app` to `dst_host` is a hop of a loop under way (counted):
        it is to be refused, not dialed."""
        if not self._held:  # (every flow asks: no loop, no lookup)
            return False
        until = self._held.get((app, dst_host))
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._held[(app, dst_host)]
            return False
        self.stats.routing_loops += 1
        return True

    def found(self, what: str, dst: Address, via: str, app: str) -> None:
        """A `what` ("connection", "udp session") to `dst` through dialer `via` left with the
        address `app` of the app it is for."""
        self.stats.routing_loops += 1
        now = time.monotonic()
        version = 6 if ":" in dst.host else 4  # (each has routes of its own)
        if now < self._next_warning.get(version, 0.0):
            return
        self._next_warning[version] = now + WARNING_INTERVAL
        log.error(
            "worker %s: routing loop: its %s to %s via %s left from %s, the address of the app "
            "it is for, so it was routed into the TUN again: the workers' way out must keep "
            "their connections out of the TUN (--auto-bypass, --egress-interface, or "
            "--egress-mark with a routing table that routes %s elsewhere); these flows fail "
            "with ENETUNREACH",
            self.worker, what, dst, via, app, dst.host,
        )  # fmt: skip
