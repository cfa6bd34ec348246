"""Noticing a worker's loop held up by code that blocks it.

Every flow of a worker shares one asyncio loop: a dialer or a policy that blocks (time.sleep, a
blocking connect or DNS lookup) stalls them all, and the heartbeat too, so that past the
stack's liveness the worker is taken for dead and its flows reset. Nothing else would say why;
a timer of its own does: when it fires late, the loop was held for that long.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("tunio.worker")

#: seconds between the watch's looks at the clock: a hold of TICK + STALL is always seen
TICK = 0.25
#: a look this late (seconds) means the loop was held up: far above a busy loop's lateness
STALL = 0.5
#: seconds between two warnings of held-up loops (the first comes at once)
REPEAT = 60.0


class StallWatch:
    """Counts the times the loop was held up (`stalls`, `longest`) and warns of them, at once
    the first time, then once a REPEAT with the count."""

    def __init__(self, name: str, silence: float) -> None:
        self._name = name
        self._silence = silence  # the stack's liveness, in seconds: what a stall risks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._next_warning = 0.0
        self._unsaid = 0  # stalls since the last warning
        self.stalls = 0
        self.longest = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + TICK
        self._timer = self._loop.call_at(self._due, self._look)

    def _look(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - self._due  # how long past its time this look came
        self._schedule()
        if late >= STALL:
            self._held(late, now)

    def _held(self, late: float, now: float) -> None:
        self.stalls += 1
        self._unsaid += 1
        self.longest = max(self.longest, late)
        if now < self._next_warning:
            return
        self._next_warning = now + REPEAT
        more = f" ({self._unsaid - 1} more since the last warning)" if self._unsaid > 1 else ""
        self._unsaid = 0
        log.warning(
            "worker %s: its loop was held up for %.1f s%s: code that blocks it (a dialer or "
            "policy calling time.sleep, or a blocking socket or DNS call) stalls every flow of "
            "this worker, and after %g s of silence the stack takes it for dead; use asyncio "
            "(await loop.sock_connect, asyncio.to_thread) instead",
            self._name, late, more, self._silence,
        )  # fmt: skip
