"""What SOCKS5 and HTTP CONNECT dialers share: reaching the proxy, and their URLs.

A proxy dialer reaches its proxy through another dialer, `via`: by default a direct dialer with
the egress mark and interface (the proxy connection must not loop back into the TUN either), or
the previous proxy of a chain.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from tunio.dialers import _stream
from tunio.dialers.base import Address, Dialer, Handshake, toward_proxy
from tunio.dialers.direct import DirectDialer
from tunio.dialers.routing import RoutingLoop
from tunio.errors import ConfigError, DialError


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ProxyURL:
    scheme: str  # "socks5" or "http"
    host: str
    port: int
    username: str | None = None
    password: str | None = None


def _unquoted(spec: str, text: str | None, what: str) -> str | None:
    """A %-encoded user name or password; a % that is not followed by two hex digits is a
    mistake (unquote would keep it as it is, and the proxy would refuse the credentials)."""
    if text is None:
        return None
    if re.search(r"%(?![0-9A-Fa-f]{2})", text):
        raise ConfigError(f"dialer {_hidden(spec)!r}: the {what} has a % that is not %XX: write "
                          "%25 for a % itself")  # fmt: skip
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"dialer {_hidden(spec)!r}: the {what} is not UTF-8 once "
                          "%-decoded") from None


def _hidden(spec: str) -> str:
    """`spec` with its password replaced by ***, for error messages."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", spec)


def parse_proxy_url(spec: str, schemes: tuple[str, ...]) -> ProxyURL:
    """`scheme://[user:pass@]host:port` (IPv6 hosts in brackets; user and password %-encoded)."""
    shown = _hidden(spec)  # errors never show the password
    try:
        url = urlsplit(spec)
        port = url.port
    except ValueError as exc:
        raise ConfigError(f"dialer {shown!r}: {exc}") from None
    if url.scheme not in schemes:
        raise ConfigError(f"dialer {shown!r}: the scheme must be one of {', '.join(schemes)}")
    if not url.hostname or port is None:
        raise ConfigError(f"dialer {shown!r}: give the proxy as {url.scheme}://host:port")
    if port == 0:
        raise ConfigError(f"dialer {shown!r}: port 0 is no proxy's port: use 1..65535")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ConfigError(f"dialer {shown!r}: a proxy URL has no path, query or fragment")
    username = _unquoted(spec, url.username, "user name")
    password = _unquoted(spec, url.password, "password")
    if username is not None and password is None:
        raise ConfigError(f"dialer {shown!r}: give the password too (user:password@)")
    return ProxyURL(url.scheme, url.hostname, port, username, password)


class ProxyHandshake:
    """What the proxies' handshakes (tunio.dialers.base.Handshake) share: the request sent in
    one write once the connection is up, peeking at the answer, and the proxy's name in every
    failure. Subclasses set `request` and parse in `_advance`."""

    request = b""

    def __init__(self, dialer: ProxyDialer) -> None:
        self.dialer = dialer
        self.name = dialer.name
        self.leftover = False
        self.patience: float | None = None

    def begin(self, sock: socket.socket) -> None:
        try:
            sent = sock.send(self.request)
        except OSError as exc:
            raise self.dialer.error(exc) from exc
        if sent != len(self.request):  # a fresh connection's buffer holds far more
            raise DialError(errno.ECONNABORTED, f"{self.name}: the request did not fit in a write")

    def advance(self, sock: socket.socket) -> bool:
        try:
            return self._advance(sock)
        except DialError:
            raise
        except OSError as exc:
            raise self.dialer.error(exc) from exc

    def _advance(self, sock: socket.socket) -> bool:
        raise NotImplementedError

    def expire(self) -> None:
        raise DialError(errno.ETIMEDOUT, f"{self.name}: no complete answer")

    def failed_to_connect(self, code: int) -> str:
        return f"{self.name}: cannot reach it: {os.strerror(code)}"

    def peek(self, sock: socket.socket, size: int) -> bytes | None:
        """What has arrived (up to `size` bytes, left in the socket); None if nothing has;
        DialError(ECONNRESET) if the proxy closed the connection."""
        try:
            seen = sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        if not seen:
            raise DialError(errno.ECONNRESET, f"{self.name} closed the connection in the handshake")
        return seen


class ProxyDialer:
    """Base of the proxy dialers: subclasses speak their handshake on the proxy connection.

    A subclass gives its handshake as a `machine` (a tunio.dialers.base.Handshake): `dial`
    drives it from a coroutine, and `start_handshake` hands it to the worker, which drives it
    from its own epoll without a task when the proxy is reached directly by address. A subclass
    may instead override the coroutine `handshake`; it is then always dialled by a task."""

    scheme: ClassVar[str]

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        via: Dialer | None = None,
        mark: int | None = None,
        interface: str | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ConfigError(f"{self.scheme} proxy {host}:{port}: give both username and password")
        self.proxy = Address(host, port)
        self.username = username
        self.password = password
        self.via: Dialer = via if via is not None else DirectDialer(mark=mark, interface=interface)
        self.name = f"{self.scheme} proxy {self.proxy}"

    @classmethod
    def from_url(
        cls,
        spec: str,
        *,
        via: Dialer | None = None,
        mark: int | None = None,
        interface: str | None = None,
    ) -> ProxyDialer:
        url = parse_proxy_url(spec, (cls.scheme,))
        return cls(
            url.host,
            url.port,
            username=url.username,
            password=url.password,
            via=via,
            mark=mark,
            interface=interface,
        )

    def __repr__(self) -> str:
        user = f"{self.username}:***@" if self.username is not None else ""
        return f"{type(self).__name__}({self.scheme}://{user}{self.proxy}, via={self.via!r})"

    def machine(self, dst: Address) -> Handshake:
        """The handshake asking the proxy for a tunnel to `dst` (DialError if it cannot be
        asked: a name too long, say)."""
        raise NotImplementedError

    async def handshake(self, sock: socket.socket, dst: Address) -> None:
        """Ask the proxy, over `sock`, for a tunnel to `dst`; DialError if it says no."""
        await _stream.drive(self.machine(dst), sock)

    def start_handshake(self, dst: Address, src: Address) -> tuple[socket.socket, Handshake] | None:
        """tunio.dialers.base.StartHandshake: the connect to the proxy started, and the
        handshake to speak once it is up; None if this dialer must dial with `dial` (a chain,
        a proxy given by name, or a subclass with a `handshake` of its own)."""
        via = self.via
        if (
            type(via) is not DirectDialer
            or type(self).handshake is not ProxyDialer.handshake
            or not is_ip(self.proxy.host)
        ):
            return None
        hs = self.machine(dst)
        try:
            sock = via.start_connect(self.proxy, src)
        except OSError as exc:
            raise self.error(exc, "cannot reach it: ") from exc
        return sock, hs

    async def dial(self, dst: Address, src: Address) -> socket.socket:
        sock = await self.connect_proxy(src)
        try:
            await self.handshake(sock, dst)
        except OSError as exc:
            sock.close()
            raise self.error(exc) from exc
        except BaseException:
            sock.close()  # cancelled (flow reset, timeout): the proxy connection must not leak
            raise
        return sock

    async def connect_proxy(self, src: Address) -> socket.socket:
        """A connection to the proxy itself, made by `via` (its name looked up first, if it
        has one); a timeout in here is the way out's failure (see `toward_proxy`)."""
        with toward_proxy():
            target = self.proxy
            if isinstance(self.via, DirectDialer) and not is_ip(target.host):
                target = await self._resolve(target)
            try:
                return await self.via.dial(target, src)
            except OSError as exc:
                raise self.error(exc, "cannot reach it: ") from exc

    async def _resolve(self, target: Address) -> Address:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise DialError(
                errno.EHOSTUNREACH, f"{self.name}: cannot resolve {target.host!r}: {exc}"
            ) from exc
        return Address(str(infos[0][4][0]), target.port)

    def error(self, exc: OSError, prefix: str = "") -> DialError:
        """`exc` as a DialError whose message names this proxy (once)."""
        code = exc.errno if exc.errno is not None else errno.ECONNABORTED
        text = exc.strerror or str(exc)
        if isinstance(exc, DialError) and text.startswith(self.name):
            return exc
        if isinstance(exc, RoutingLoop):  # (the worker tells a loop by its kind)
            return RoutingLoop(exc.to, f"{self.name}: {prefix}{text}")
        return DialError(code, f"{self.name}: {prefix}{text}")
