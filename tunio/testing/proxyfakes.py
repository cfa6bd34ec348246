"""In-process fake proxies for the dialer unit tests: a scripted server on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
T = TypeVar("T")
TIMEOUT = 10.0


async def with_server(handler: Handler, client: Callable[[int], Awaitable[T]]) -> T:
    """Run `client(port)` against a one-shot server on 127.0.0.1 whose connections `handler`
    serves; the handler's own failures are raised too (after the client's result)."""
    errors: list[BaseException] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client gave up: what the test checks is the client's side
        except BaseException as exc:
            errors.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await asyncio.wait_for(client(port), TIMEOUT)
    finally:
        server.close()
        await server.wait_closed()
    if errors:
        raise errors[0]
    return result


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def read_all(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from a non-blocking socket the dialer returned."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < size:
        chunk = await loop.sock_recv(sock, size - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)
