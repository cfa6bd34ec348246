"""A small async stub resolver for the workers, and happy eyeballs (RFC 8305) over its answers.

A flow to a fake-IP address reaches the worker with its name (docs/protocol.md: NAME). A proxy
dialer hands the name on to its proxy; the direct dialer resolves it here: A and AAAA asked at
once of one server (--dns-upstream), directly over UDP (TCP when the answer is truncated), from
sockets with the egress mark and interface. So the lookup never enters the TUN, and never reaches
the stack's own fake-IP DNS (which would answer a fake address again: a loop). Answers are kept
for their TTL (at most CACHE_SIZE names).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from tunio.errors import DialError

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
RCODE_NXDOMAIN = 3
#: seconds one try waits for an answer; tries per query
TIMEOUT = 2.0
TRIES = 2
CACHE_SIZE = 1024
#: an answer is kept at most this long, whatever its TTL (seconds)
MAX_TTL = 300
#: RFC 8305 §5: the Connection Attempt Delay between two attempts (seconds)
ATTEMPT_DELAY = 0.25
#: RFC 8305 §3: the Resolution Delay, how long one family's addresses wait for the other's
#: answer (seconds): a resolver that drops AAAA queries costs a connect this, not its timeout
RESOLUTION_DELAY = 0.05
RESOLV_CONF = Path("/etc/resolv.conf")


def first_nameserver(path: Path = RESOLV_CONF) -> str | None:
    """The first `nameserver` of a resolv.conf, or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                return str(ipaddress.ip_address(parts[1].split("%", 1)[0]))
            except ValueError:
                continue
    return None


def query(name: str, qtype: int, qid: int) -> bytes:
    """A query (recursion desired) of `qtype` for `name`."""
    labels = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna")
        if not 1 <= len(raw) <= 63:
            raise DialError(errno.EHOSTUNREACH, f"{name!r} is not a domain name")
        labels += bytes([len(raw)]) + raw
    return (
        struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack(">HH", qtype, CLASS_IN)
    )


def _skip_name(msg: bytes, off: int) -> int:
    for _ in range(128):  # a name has at most 127 labels
        if off >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[off]
        if length & 0xC0 == 0xC0:
            return off + 2
        if length & 0xC0:
            raise ValueError("unknown label type")
        off += 1 + length
        if length == 0:
            return off
    raise ValueError("name too long")


def parse_answer(msg: bytes, qid: int, qtype: int) -> tuple[int, list[str], int, bool]:
    """(rcode, addresses of `qtype`, the smallest TTL, truncated) of the answer to query `qid`."""
    if len(msg) < 12:
        raise ValueError("short answer")
    rid, flags, qd, an, _ns, _ar = struct.unpack_from(">HHHHHH", msg)
    if rid != qid or not flags & 0x8000:
        raise ValueError("not the answer to our query")
    truncated = bool(flags & 0x0200)
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    found: list[str] = []
    ttl = MAX_TTL
    for _ in range(an):
        off = _skip_name(msg, off)
        if off + 10 > len(msg):
            raise ValueError("record runs past the message")
        rtype, rclass, rttl, rdlen = struct.unpack_from(">HHIH", msg, off)
        off += 10
        data = msg[off : off + rdlen]
        off += rdlen
        if len(data) != rdlen:
            raise ValueError("record data runs past the message")
        size = 4 if qtype == TYPE_A else 16
        if rtype == qtype and rclass == CLASS_IN and rdlen == size:
            found.append(str(ipaddress.ip_address(data)))
            ttl = min(ttl, rttl)
    return flags & 0xF, found, ttl, truncated


class Resolver:
    """Asks `server` (an IP address) on `port`, from sockets with `mark` and `interface`."""

    def __init__(
        self,
        server: str,
        port: int = 53,
        *,
        mark: int | None = None,
        interface: str | None = None,
        timeout: float = TIMEOUT,
        tries: int = TRIES,
    ) -> None:
        self.server = str(ipaddress.ip_address(server))
        self.port = port
        self.mark = mark
        self.interface = interface
        self.timeout = timeout
        self.tries = tries
        self._cache: OrderedDict[tuple[str, int], tuple[float, list[str]]] = OrderedDict()
        self.queries = 0  # sent, for tests and logs
        # lookups on their way, by (name, type): connects to one name at once share one query,
        # and one that stopped waiting (RESOLUTION_DELAY) leaves its lookup to fill the cache
        self._inflight: dict[tuple[str, int], asyncio.Task[list[str]]] = {}

    def __repr__(self) -> str:
        return f"Resolver({self.server}:{self.port}, mark={self.mark!r})"

    def _socket(self, kind: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.server else socket.AF_INET
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            if self.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.interface.encode())
        except OSError:
            sock.close()
            raise
        return sock

    async def _ask_udp(self, msg: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        with self._socket(socket.SOCK_DGRAM) as sock:
            await loop.sock_connect(sock, (self.server, self.port))
            await loop.sock_sendall(sock, msg)
            self.queries += 1
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), self.timeout)

    async def _ask_tcp(self, msg: bytes) -> bytes:
        loop = asyncio.get_running_loop()

        async def exchange(sock: socket.socket) -> bytes:
            await loop.sock_connect(sock, (self.server, self.port))
            await loop.sock_sendall(sock, struct.pack(">H", len(msg)) + msg)
            self.queries += 1
            got = b""
            while len(got) < 2 or len(got) < 2 + struct.unpack_from(">H", got)[0]:
                chunk = await loop.sock_recv(sock, 65537)
                if not chunk:
                    raise ConnectionResetError("the resolver closed the connection")
                got += chunk
            return got[2 : 2 + struct.unpack_from(">H", got)[0]]

        with self._socket(socket.SOCK_STREAM) as sock:
            return await asyncio.wait_for(exchange(sock), self.timeout)

    async def lookup(self, name: str, qtype: int) -> list[str]:
        """The addresses of `qtype` of `name` (empty: none, or NXDOMAIN)."""
        # shielded: one waiter cancelled (its flow's dial timeout) does not cancel the others'
        return await asyncio.shield(self._lookup(name, qtype))

    def _lookup(self, name: str, qtype: int) -> asyncio.Future[list[str]]:
        """The cached answer as a finished future, else the lookup on its way (started if none)."""
        key = (name.lower(), qtype)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(key)
            answer: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
            answer.set_result(cached[1])
            return answer
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(name, qtype))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._landed, key))
        return task

    def _landed(self, key: tuple[str, int], task: asyncio.Task[list[str]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # marked seen: a lookup nobody waits for any more fails quietly

    async def _ask(self, name: str, qtype: int) -> list[str]:
        """Asks the server (tries times), keeps the answer for its TTL."""
        key = (name.lower(), qtype)
        now = time.monotonic()
        last: Exception | None = None
        for _ in range(self.tries):
            qid = secrets.randbelow(0x10000)
            msg = query(name, qtype, qid)
            try:
                rcode, found, ttl, truncated = parse_answer(await self._ask_udp(msg), qid, qtype)
                if truncated:
                    rcode, found, ttl, _ = parse_answer(await self._ask_tcp(msg), qid, qtype)
            except (OSError, ValueError, TimeoutError) as exc:
                last = exc
                continue
            if rcode not in (0, RCODE_NXDOMAIN):
                last = OSError(errno.EHOSTUNREACH, f"the resolver answered rcode {rcode}")
                continue
            self._cache[key] = (now + max(0, min(ttl, MAX_TTL)), found)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return found
        why = os.strerror(last.errno) if isinstance(last, OSError) and last.errno else last
        raise DialError(
            errno.EHOSTUNREACH,
            f"{name}: no answer from {self.server}:{self.port} ({why or 'timeout'})",
        )

    async def resolve(
        self, name: str, delay: float = RESOLUTION_DELAY
    ) -> tuple[list[str], list[str]]:
        """(IPv6 addresses, IPv4 addresses) of `name`, asked at once. Once one family has
        addresses, the other's answer is waited for at most `delay` (RFC 8305 §3) and left to
        finish alone (it still fills the cache for the next connect). A name with neither is
        EHOSTUNREACH (DialError), as a connect to no address would be."""
        six, four = self._lookup(name, TYPE_AAAA), self._lookup(name, TYPE_A)
        # waited on, never cancelled here: a lookup may be shared with other connects
        done, pending = await asyncio.wait((six, four), return_when=asyncio.FIRST_COMPLETED)
        if pending and _addresses_of(done.pop()):
            await asyncio.wait(pending, timeout=delay)
        elif pending:
            await asyncio.wait(pending)  # the first had nothing: the other is all there is
        v6, v4 = _addresses_of(six), _addresses_of(four)
        if not v6 and not v4:
            for failed in (four, six):
                exc = failed.exception() if failed.done() and not failed.cancelled() else None
                if isinstance(exc, DialError):
                    raise exc
            raise DialError(errno.EHOSTUNREACH, f"{name}: the name has no address")
        return v6, v4


def _addresses_of(task: asyncio.Future[list[str]]) -> list[str]:
    """A finished lookup's addresses; none for one not finished, failed or cancelled."""
    if not task.done() or task.cancelled() or task.exception() is not None:
        return []
    return task.result()


def interleave(v6: Sequence[str], v4: Sequence[str]) -> list[str]:
    """RFC 8305 §4: the families alternate, IPv6 first."""
    out: list[str] = []
    for i in range(max(len(v6), len(v4))):
        out += [a[i] for a in (v6, v4) if i < len(a)]
    return out


async def happy_eyeballs(
    addresses: Sequence[str],
    connect: Callable[[str], Awaitable[socket.socket]],
    delay: float = ATTEMPT_DELAY,
) -> socket.socket:
    """RFC 8305 §5: one attempt after another, each `delay` after the last began (at once after
    one fails), the first to connect wins and the others are aborted. The last error if none
    connects. Cancelling it (a flow's dial timeout) cancels every attempt."""
    if not addresses:
        raise DialError(errno.EHOSTUNREACH, "no address to connect to")
    pending: set[asyncio.Task[socket.socket]] = set()
    errors: list[BaseException] = []
    winner: socket.socket | None = None
    started = 0
    try:
        while winner is None:
            if started < len(addresses):
                pending.add(asyncio.ensure_future(connect(addresses[started])))
                started += 1
            if not pending:
                break
            more = started < len(addresses)
            done, _ = await asyncio.wait(
                pending, timeout=delay if more else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                pending.discard(task)
                exc = task.exception()
                if exc is not None:
                    errors.append(exc)
                elif winner is None:
                    winner = task.result()
                else:
                    task.result().close()
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            # an attempt that connected while the winner was being picked is closed, not leaked
            with contextlib.suppress(BaseException):  # cancelled or failed: nothing to close
                (await task).close()
    if winner is not None:
        return winner
    raise errors[-1] if errors else DialError(errno.EHOSTUNREACH, "no address connected")
