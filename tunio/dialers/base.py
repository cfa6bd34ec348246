"""What a dialer is: given a flow's destination (and source), return a connected TCP socket."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Address:
    host: str  # an IP literal, or a domain name for dialers that take one
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@runtime_checkable
class Dialer(Protocol):
    async def dial(self, dst: Address, src: Address) -> socket.socket:
        """Return a connected, non-blocking TCP socket to `dst`.

        Raise OSError (or tunio.errors.DialError) whose errno is what the app should see:
        ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT, ...
        """
        ...


DialFunction = Callable[[Address, Address], Awaitable[socket.socket]]


class FunctionDialer:
    """A Dialer around an `async def f(dst, src) -> socket`."""

    def __init__(self, func: DialFunction) -> None:
        self.func = func

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        return await self.func(dst, src)

    def __repr__(self) -> str:
        return f"FunctionDialer({getattr(self.func, '__qualname__', self.func)!r})"
