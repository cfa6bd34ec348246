"""One dial path for the worker's flows and sessions.

A dial starts one of two ways and ends one way. A dialer with `start_connect`
(tunio.dialers.base.StartConnect) hands back a socket whose connect is in flight: the caller
watches it (the TCP table keeps it in its epoll, where it stays once connected) and calls the
dial's `connect_done()` when it is writable. Any other dialer, and every datagram session, is
dialled by an asyncio task. Either way the dial ends in its `Dialing`'s one callback,
`done(key, result, errno, reason)`: the connected socket (or session) with errno 0, or None with
the errno the app should see; the connect timeout is one timer for both ways. A cancelled dial
(the flow was reset while dialing) ends without calling it, and leaves the destination a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Generic, TypeGuard, TypeVar, cast

from tunio.dialers.base import (
    Address,
    Dialer,
    Handshake,
    StartConnect,
    StartHandshake,
    connecting_to_proxy,
)
from tunio.dialers.routing import RoutingLoop
from tunio.errors import is_errno
from tunio.logs import EverySecond

log = logging.getLogger("tunio.worker")

K = TypeVar("K")
T = TypeVar("T")

#: how a dial ends: (key, result or None, errno or 0, the dialer's reason)
Done = Callable[[K, T | None, int, str], None]
DialFunction = Callable[[Address, Address], Awaitable[T]]

_LINGER_ABORT = struct.pack("ii", 1, 0)


def abort(sock: socket.socket) -> None:
    """Close so that the peer sees a reset (SO_LINGER 0), not an orderly end."""
    # a socket that is already dead may refuse the option; closing is all that is left then
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    sock.close()


def _no_connection(timeout: float) -> str:
    return f"no connection within {timeout:g} s"


def dial_failure(exc: BaseException, what: str, timeout: float) -> tuple[int, str]:
    """The errno the app sees for a failed dial (TCP or datagram), and the dialer's own words
    (which proxy, which credentials) for the log line."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return errno.ETIMEDOUT, _no_connection(timeout)
    if isinstance(exc, OSError):
        code = exc.errno
        # OSError takes any first argument as its errno: a name or a negative number would
        # fail the answer to the stack (struct.error) and leave the app with no answer at all
        if not is_errno(code):
            log.warning("%s: %r has no errno; answering ECONNABORTED", what, exc)
            return errno.ECONNABORTED, exc.strerror if isinstance(exc.strerror, str) else ""
        return code, exc.strerror or ""
    unexpected.log(type(exc).__name__, "%s failed unexpectedly; answering ECONNABORTED", what,
                   exc_info=exc)  # fmt: skip
    return errno.ECONNABORTED, ""


#: a dialer that raises what is not an OSError for every flow logs a traceback a second, not one
#: a flow (the worker calls `unexpected.flush()` on its report interval)
unexpected = EverySecond(log, logging.ERROR, "dials that failed unexpectedly")


class Dial(Generic[K, T]):
    """One dial in flight (a task, or a started connect) and its timeout. It ends once: in its
    Dialing's `done`, or by `cancel()`, which calls nothing."""

    __slots__ = ("_dialing", "_task", "_timer", "key", "started")

    def __init__(self, dialing: Dialing[K, T], key: K) -> None:
        self._dialing = dialing
        self.key = key
        self.started = dialing.loop.time()  # the loop's clock: time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = dialing.loop.call_later(
            dialing.timeout, self._timed_out
        )

    @property
    def live(self) -> bool:
        """Neither ended nor cancelled."""
        return self._timer is not None

    def cancel(self) -> None:
        """Stop dialing (the flow ended first)."""
        self._stop()

    def start_task(self, dial: DialFunction[T], dst: Address, src: Address) -> None:
        self._task = self._dialing.loop.create_task(self._run(dial, dst, src))

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _timed_out(self) -> None:
        self._timer = None
        unreached = self._proxy_unreached()
        if unreached is not None:
            self._end(None, errno.EHOSTUNREACH, unreached)
        else:
            self._end(None, errno.ETIMEDOUT, _no_connection(self._dialing.timeout))

    def _proxy_unreached(self) -> str | None:
        """Why, if the timeout finds the dial still connecting to its proxy
        (tunio.dialers.base.toward_proxy): the way out is down, and the app is told at once
        (EHOSTUNREACH), not left to the silence of ETIMEDOUT, which mirrors a destination that
        does not answer."""
        if self._task is not None and connecting_to_proxy(self._task):
            return f"no connection to the proxy within {self._dialing.timeout:g} s"
        return None

    def _end(self, result: T | None, code: int, why: str) -> None:
        self._stop()
        self._dialing.done(self.key, result, code, why)

    async def _run(self, dial: DialFunction[T], dst: Address, src: Address) -> None:
        dialing = self._dialing
        try:
            made = dial(dst, src)
            if not inspect.isawaitable(made):  # a dial written without `async`
                self._not_awaitable(made, dst)
                return
            result = await made
        except asyncio.CancelledError:
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # every failure becomes an errno for the app: a dialer's sys.exit() too, which
            # would otherwise end the worker's loop and every other flow with it
            if self.live:
                self._task = None  # it is ending: nothing to cancel
                if isinstance(exc, RoutingLoop) and dialing.looped is not None:
                    dialing.looped(self.key, exc)
                code, why = dial_failure(exc, f"{dialing.what} {dst}", dialing.timeout)
                self._end(None, code, why)
            return
        if result is None:  # a dialer that answers nothing has failed, in words of its own
            dialing.returned_none(dst)
            if self.live:
                self._task = None
                self._end(None, errno.ECONNABORTED, "the dialer returned None")
            return
        if not self.live:  # a dialer that ignored its cancel (timeout, reset): not wanted now
            dialing.discard(result)
            return
        self._task = None
        self._end(result, 0, "")


    def _not_awaitable(self, made: object, dst: Address) -> None:
        """The dialer's dial answered at once, not with an awaitable: a `def dial` where the
        protocol has `async def dial`. Said once for the dialer, with what to change; what it
        made is closed (a socket with a reset: the destination must not keep a connection
        nobody relays), and the flow fails with ECONNABORTED."""
        dialing = self._dialing
        if not dialing.said_sync:
            dialing.said_sync = True
            log.error("%s %s: the dialer's dial() returned %.80r, not an awaitable: write it "
                      "`async def dial(dst, src)`; its flows fail with ECONNABORTED",
                      dialing.what, dst, made)  # fmt: skip
        if made is not None:
            with contextlib.suppress(Exception):  # whatever it is, it is not kept
                dialing.discard(cast(T, made))
        if self.live:
            self._task = None
            self._end(None, errno.ECONNABORTED, "the dialer's dial() is not async")


class Connecting(Dial[K, socket.socket]):
    """A task-less dial: `sock`'s connect was started, and the caller watches it for
    writability (then calls `connect_done()`)."""

    __slots__ = ("_patience", "handshake", "handshaking", "sock")

    def __init__(
        self,
        dialing: Dialing[K, socket.socket],
        key: K,
        sock: socket.socket,
        handshake: Handshake | None = None,
    ) -> None:
        super().__init__(dialing, key)
        self.sock: socket.socket | None = sock
        self.handshake = handshake
        self.handshaking = False
        self._patience: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        """Stop dialing; the connect in flight is reset, so the destination sees a reset too."""
        super().cancel()
        sock = self.sock
        if sock is not None:
            self.sock = None
            abort(sock)

    def fail(self, code: int, why: str) -> None:
        """Ends the dial as failed with errno `code` (its socket is closed)."""
        self._end(None, code, why)

    def connect_done(self) -> None:
        """The socket became writable: connected, or failed (SO_ERROR)."""
        sock = self.sock
        assert sock is not None
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        hs = self.handshake
        if code:
            self._end(None, code, hs.failed_to_connect(code) if hs else os.strerror(code))
            return
        if hs is None:
            self.sock = None  # the caller's now
            self._end(sock, 0, "")
            return
        try:
            hs.begin(sock)
        except Exception as exc:  # every failure becomes an errno for the app
            self._end(None, *dial_failure(exc, f"dial {self.key}", self._dialing.timeout))
            return
        self.handshaking = True

    def readable(self) -> None:
        """Input (or an error) on a handshaking socket: the handshake reads what came."""
        sock, hs = self.sock, self.handshake
        assert sock is not None
        assert hs is not None
        try:
            done = hs.advance(sock)
        except Exception as exc:  # every failure becomes an errno for the app
            self._end(None, *dial_failure(exc, f"dial {self.key}", self._dialing.timeout))
            return
        if done:
            self.sock = None  # the caller's now
            self._end(sock, 0, "")
        elif hs.patience is not None and self._patience is None:
            self._patience = self._dialing.loop.call_later(hs.patience, self._impatient)

    def _proxy_unreached(self) -> str | None:
        hs = self.handshake
        if hs is not None and not self.handshaking:
            return f"{hs.failed_to_connect(errno.ETIMEDOUT)} ({self._dialing.timeout:g} s)"
        return None

    def _impatient(self) -> None:
        self._patience = None
        hs = self.handshake
        assert hs is not None
        try:
            hs.expire()
        except Exception as exc:
            self._end(None, *dial_failure(exc, f"dial {self.key}", self._dialing.timeout))
            return
        self._end(None, errno.ETIMEDOUT, _no_connection(self._dialing.timeout))

    def _stop(self) -> None:
        super()._stop()
        if self._patience is not None:
            self._patience.cancel()
            self._patience = None

    def _end(self, result: socket.socket | None, code: int, why: str) -> None:
        super()._end(result, code, why)
        if self.sock is not None:  # failed: closed after `done`, which forgets its fd first
            self.sock.close()
            self.sock = None


class Dialing(Generic[K, T]):
    """Dials of one kind (TCP sockets, or datagram sessions), all ending in `done`.

    `what` names them in log lines ("dial", "udp dial"); `discard` disposes of a result that
    came after its dial was given up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, done: Done[K, T], *,
                 what: str, discard: Callable[[T], object]) -> None:  # fmt: skip
        self.loop = loop
        self.timeout = timeout
        self.done = done
        self.what = what
        self.discard = discard
        self.said_none = False  # a dialer that returned None was logged
        self.said_sync = False  # a dialer whose dial is no coroutine was logged
        #: told of a dial that failed as a routing loop (tunio.dialers.routing), before `done`
        self.looped: Callable[[K, RoutingLoop], None] | None = None

    def returned_none(self, dst: Address) -> None:
        """The dialer answered None: a bug of its own, said once; its flows count as failed."""
        if not self.said_none:
            self.said_none = True
            log.error("%s %s: the dialer returned None, not a connection: its flows fail with "
                      "ECONNABORTED", self.what, dst)  # fmt: skip

    def task(self, key: K, dial: DialFunction[T], dst: Address, src: Address) -> Dial[K, T]:
        """Dials `await dial(dst, src)` in a task."""
        pending = Dial(self, key)
        pending.start_task(dial, dst, src)
        return pending


def open_socket(sock: object) -> TypeGuard[socket.socket]:
    """A dialer's answer that the relay can take: an open stream socket (a user's dialer may
    hand back anything: a UDP socket would take the app's bytes as datagrams, or fail them)."""
    return isinstance(sock, socket.socket) and sock.fileno() >= 0 and \
        sock.type == socket.SOCK_STREAM  # fmt: skip


def _literal(host: str) -> bool:
    return ":" in host or host.replace(".", "").isdigit()


class TcpDialing(Dialing[K, socket.socket]):
    """A dialer's TCP dials: by `start_connect` if it has it, else by `dial` in a task.

    `watch(key, sock)` is given a task-less dial's socket: the caller then calls the dial's
    `connect_done()` when the socket is writable (or in error)."""

    def __init__(
        self,
        dialer: Dialer,
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        done: Done[K, socket.socket],
        watch: Callable[[K, socket.socket], None],
    ) -> None:
        super().__init__(loop, timeout, done, what="dial", discard=abort)
        self.dialer = dialer
        self.watch = watch
        # checked once: isinstance() with a runtime_checkable Protocol is slow, and a dial is
        # most of what a short connection costs
        self._start: Callable[[Address, Address], socket.socket] | None = (
            dialer.start_connect if isinstance(dialer, StartConnect) else None
        )
        self._start_handshake: (
            Callable[[Address, Address], tuple[socket.socket, Handshake] | None] | None
        ) = dialer.start_handshake if isinstance(dialer, StartHandshake) else None

    def dial(self, key: K, dst: Address, src: Address) -> Dial[K, socket.socket] | None:
        """Starts dialing `dst`; None if the dial ended at once (`done` has been called)."""
        start = self._start
        if start is None or not _literal(dst.host):
            # a name (a fake-IP flow) is resolved first: that takes the dialer's own dial
            if self._start_handshake is not None:
                try:
                    made = self._start_handshake(dst, src)
                except Exception as exc:  # every failure becomes an errno for the app
                    self.done(key, None, *dial_failure(exc, f"dial {dst}", self.timeout))
                    return None
                if made is not None:
                    pending = Connecting(self, key, made[0], made[1])
                    self.watch(key, made[0])
                    return pending
            return self.task(key, self.dialer.dial, dst, src)
        try:
            sock: object = start(dst, src)
        except Exception as exc:  # every failure becomes an errno for the app
            self.done(key, None, *dial_failure(exc, f"dial {dst}", self.timeout))
            return None
        if not open_socket(sock):
            self._not_started(key, dst, sock)
            return None
        pending = Connecting(self, key, sock)
        self.watch(key, sock)
        return pending

    def _not_started(self, key: K, dst: Address, answer: object) -> None:
        """A user's start_connect answered what is not an open socket, as its dial may: the
        same ending, ECONNABORTED and one line for the dialer's bug."""
        if answer is None:
            self.returned_none(dst)
            self.done(key, None, errno.ECONNABORTED, "the dialer returned None")
        else:  # `done` says what it is (once per dialer), as it does for dial's answer
            self.done(key, cast(socket.socket, answer), 0, "")
