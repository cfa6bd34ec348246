"""Handshake I/O for proxy dialers: whole messages over a non-blocking socket, from the event loop.

A proxy dialer returns the very socket it spoke the handshake on, and the worker relays that
socket's bytes from then on. So nothing here may read past the end of the proxy's answer: a byte
of the destination's that we swallowed would be lost to the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

from tunio.dialers.base import Handshake
from tunio.errors import DialError

HEAD_END = b"\r\n\r\n"


def closed_error(what: str, got: int, wanted: int) -> DialError:
    return DialError(
        errno.ECONNRESET,
        f"{what} closed the connection in the handshake (after {got} of {wanted} bytes)",
    )


async def send_all(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    """Exactly `size` bytes; DialError(ECONNRESET) naming `what` if the peer closes first."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < size:
        chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            raise closed_error(what, len(buf), size)
        buf += chunk
    return bytes(buf)


async def wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def recv_head(sock: socket.socket, limit: int, what: str) -> bytes:
    """An HTTP head: the bytes up to and including the first blank line, and not one byte more.

    Peeks at what has arrived and consumes only the head, so data the destination sent right
    behind the proxy's answer stays in the socket for the worker.
    """
    buf = bytearray()
    while True:
        try:
            seen = sock.recv(limit - len(buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await wait_readable(sock)
            continue
        if not seen:
            raise DialError(
                errno.ECONNRESET,
                f"{what} closed the connection before it answered ({len(buf)} bytes of head)",
            )
        # the blank line may straddle what we hold and what we peeked
        start = max(0, len(buf) - len(HEAD_END) + 1)
        end = (bytes(buf[start:]) + seen).find(HEAD_END)
        if end >= 0:
            take = start + end + len(HEAD_END) - len(buf)
            buf += sock.recv(take)
            return bytes(buf)
        buf += sock.recv(len(seen))  # all head bytes: no blank line among them yet
        if len(buf) >= limit:
            raise DialError(errno.EPROTO, f"{what} sent a head longer than {limit} bytes")


async def recv_some(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """Up to `limit` bytes that arrive within `timeout` seconds, until EOF (for error bodies)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()

    async def read() -> None:
        while len(buf) < limit:
            chunk = await loop.sock_recv(sock, limit - len(buf))
            if not chunk:
                return
            buf.extend(chunk)

    # what arrived in time is all we use: it only makes an error more precise
    with contextlib.suppress(asyncio.TimeoutError, TimeoutError, OSError):
        await asyncio.wait_for(read(), timeout)
    return bytes(buf)


async def drive(hs: Handshake, sock: socket.socket) -> None:
    """Speak a handshake (tunio.dialers.base.Handshake) from a coroutine: what the worker does
    from its epoll without a task, for a dial made by a task (chains, tests, libraries)."""
    hs.begin(sock)
    while not hs.advance(sock):
        if hs.patience is None:
            await wait_readable(sock)
            continue
        try:
            await asyncio.wait_for(wait_readable(sock), hs.patience)
        except TimeoutError:
            hs.expire()
            raise  # expire() raises the failure; this is for a handshake that did not
