"""flood's SOCKS5 client: the CONNECT handshake (RFC 1928, no authentication) that puts a flood
connection through a SOCKS5 proxy before its test stream starts.

`Handshake` advances on a non-blocking socket as far as the socket allows, so the epoll client
keeps all its connections going while some of them still negotiate; `connect` runs it to the
end on a blocking socket (rr mode). The client waits for the proxy's method choice before it
sends its request, as SOCKS clients do: those two round trips are part of what a SOCKS path
costs, so they are part of what flood measures through one.
"""

from __future__ import annotations

import socket

VERSION = 5
NO_AUTH = 0
CONNECT = 1
GREETING = bytes([VERSION, 1, NO_AUTH])
ATYP_IPV4, ATYP_NAME, ATYP_IPV6 = 1, 3, 4
_ADDRESS_SIZE = {ATYP_IPV4: 4, ATYP_IPV6: 16}

# What the handshake waits for next.
_METHOD, _REPLY, _NAME_LENGTH, _BOUND, _DONE = range(5)


class SocksError(Exception):
    """The proxy refused or spoke out of turn; str() is the name flood counts the failure by
    (socks-method, socks-rep5, socks-eof, socks-reply)."""


def request(target: tuple[str, int]) -> bytes:
    """A CONNECT request for an IPv4 or IPv6 literal and port."""
    host, port = target
    family, atyp = (socket.AF_INET6, ATYP_IPV6) if ":" in host else (socket.AF_INET, ATYP_IPV4)
    address = socket.inet_pton(family, host)
    return bytes([VERSION, CONNECT, 0, atyp]) + address + port.to_bytes(2, "big")


class Handshake:
    """The client side of one CONNECT, step by step; `target` is where the proxy should go."""

    __slots__ = ("_got", "_need", "_out", "_request", "_stage")

    def __init__(self, target: tuple[str, int]) -> None:
        self._request = request(target)
        self._out = GREETING  # bytes still to send
        self._stage = _METHOD
        self._got = bytearray()
        self._need = 2  # VER METHOD

    @property
    def done(self) -> bool:
        return self._stage == _DONE

    def step(self, sock: socket.socket) -> None:
        """Advance until the proxy has connected us; BlockingIOError when the socket has to
        wait, SocksError when the proxy refuses, OSError from the socket itself. Reads only
        the reply's own bytes, so whatever follows it stays in the socket for the test."""
        while not self.done:
            if self._out:
                sent = sock.send(self._out)
                self._out = self._out[sent:]
                continue
            chunk = sock.recv(self._need - len(self._got))
            if not chunk:
                raise SocksError("socks-eof")
            self._got += chunk
            if len(self._got) == self._need:
                self._next(bytes(self._got))
                self._got.clear()

    def _next(self, got: bytes) -> None:
        if self._stage == _METHOD:
            if got != bytes([VERSION, NO_AUTH]):
                raise SocksError("socks-method")
            self._out, self._stage, self._need = self._request, _REPLY, 4
        elif self._stage == _REPLY:  # VER REP RSV ATYP
            if got[0] != VERSION:
                raise SocksError("socks-reply")
            if got[1] != 0:
                raise SocksError(f"socks-rep{got[1]}")
            if got[3] == ATYP_NAME:
                self._stage, self._need = _NAME_LENGTH, 1
            elif got[3] in _ADDRESS_SIZE:
                self._stage, self._need = _BOUND, _ADDRESS_SIZE[got[3]] + 2
            else:
                raise SocksError("socks-reply")
        elif self._stage == _NAME_LENGTH:
            self._stage, self._need = _BOUND, got[0] + 2
        else:  # the bound address and port: nothing in them that the client needs
            self._stage = _DONE


def connect(sock: socket.socket, target: tuple[str, int]) -> None:
    """The whole handshake on a connected blocking socket (its timeout bounds each step)."""
    Handshake(target).step(sock)
