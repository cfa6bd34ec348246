"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), for TCP and UDP.

The proxy's reply codes become the errno a direct connection would have given the app, so that
the stack answers the app as the destination would have: refused, unreachable, timed out.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct

from tunio.dialers import _stream
from tunio.dialers.base import Address
from tunio.dialers.direct import SO_BINDTODEVICE, SO_MARK, DirectDialer
from tunio.dialers.proxy import ProxyDialer, ProxyHandshake
from tunio.dialers.udp import send_or_drop
from tunio.errors import DialError

log = logging.getLogger("tunio.dialers.socks5")

VERSION = 5
AUTH_VERSION = 1  # RFC 1929's sub-negotiation
METHOD_NONE = 0x00
METHOD_USERPASS = 0x02
METHOD_REFUSED = 0xFF
CMD_CONNECT = 0x01
CMD_UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

#: REP codes of RFC 1928 §6, as the errno the app should see and the RFC's words
REPLIES: dict[int, tuple[int, str]] = {
    0x01: (errno.ECONNABORTED, "general SOCKS server failure"),
    0x02: (errno.EACCES, "connection not allowed by ruleset"),
    0x03: (errno.ENETUNREACH, "network unreachable"),
    0x04: (errno.EHOSTUNREACH, "host unreachable"),
    0x05: (errno.ECONNREFUSED, "connection refused"),
    0x06: (errno.ETIMEDOUT, "TTL expired"),
    0x07: (errno.EPROTONOSUPPORT, "command not supported"),
    0x08: (errno.EAFNOSUPPORT, "address type not supported"),
}

#: a UDP datagram's payload at most, plus the largest header (a 255-byte domain name)
MAX_DATAGRAM = 65535
MAX_UDP_HEADER = 4 + 1 + 255 + 2


def encode_address(addr: Address) -> bytes:
    """ATYP, address and port of RFC 1928 §4/§7 (a name that is no IP literal goes as a name)."""
    try:
        ip = ipaddress.ip_address(addr.host)
    except ValueError:
        name = addr.host.encode("idna")
        if not 0 < len(name) <= 255:
            raise DialError(errno.EINVAL, f"{addr.host!r}: a SOCKS5 name has 1-255 bytes") from None
        return bytes([ATYP_DOMAIN, len(name)]) + name + struct.pack("!H", addr.port)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([atyp]) + ip.packed + struct.pack("!H", addr.port)


def decode_address(data: bytes, offset: int) -> tuple[Address, int]:
    """The address at `offset` of `data` and the offset after it; ValueError if cut short."""
    if offset >= len(data):
        raise ValueError("no address type")
    atyp = data[offset]
    if atyp == ATYP_IPV4:
        start, end = offset + 1, offset + 5
    elif atyp == ATYP_IPV6:
        start, end = offset + 1, offset + 17
    elif atyp == ATYP_DOMAIN and offset + 1 < len(data):
        start, end = offset + 2, offset + 2 + data[offset + 1]
    else:
        raise ValueError(f"address type {atyp:#x}")
    if end + 2 > len(data):
        raise ValueError("address cut short")
    raw = data[start:end]
    host = raw.decode("idna") if atyp == ATYP_DOMAIN else str(ipaddress.ip_address(raw))
    (port,) = struct.unpack_from("!H", data, end)
    return Address(host, port), end + 2


def _address_size(atyp: int, first: int) -> int:
    """Bytes of address and port after ATYP, given the first byte after it."""
    if atyp == ATYP_IPV4:
        return 4 + 2
    if atyp == ATYP_IPV6:
        return 16 + 2
    if atyp == ATYP_DOMAIN:
        return 1 + first + 2
    raise DialError(errno.EPROTO, f"address type {atyp:#x} in the reply")


class Socks5Dialer(ProxyDialer):
    """`socks5://[user:pass@]host:port`: TCP by CONNECT, UDP by UDP ASSOCIATE.

    Destinations go as IPv4, IPv6 or (for names) domain addresses; the proxy resolves names.
    """

    scheme = "socks5"

    def machine(self, dst: Address) -> Socks5Handshake:
        return Socks5Handshake(self, dst)

    async def negotiate(self, sock: socket.socket) -> None:
        """Method selection and, if the proxy picks it, username/password authentication."""
        methods = [METHOD_NONE] if self.username is None else [METHOD_NONE, METHOD_USERPASS]
        await _stream.send_all(sock, bytes([VERSION, len(methods), *methods]))
        version, method = await _stream.recv_exact(sock, 2, self.name)
        if version != VERSION:
            raise DialError(errno.EPROTO, f"{self.name} is not a SOCKS5 server (version {version})")
        if method == METHOD_NONE:
            return
        if method == METHOD_USERPASS and self.username is not None:
            await self._authenticate(sock)
            return
        if method == METHOD_REFUSED:
            hint = (
                "it requires authentication: give user:password@ in the URL"
                if self.username is None
                else "offered: none, username/password"
            )
            raise DialError(
                errno.EACCES, f"{self.name} accepts none of our authentication methods ({hint})"
            )
        raise DialError(errno.EPROTO, f"{self.name} chose a method we did not offer ({method:#x})")

    def credentials(self) -> bytes:
        """RFC 1929's username/password request."""
        assert self.username is not None
        assert self.password is not None
        user = self.username.encode()
        password = self.password.encode()
        if not (0 < len(user) <= 255 and 0 < len(password) <= 255):
            raise DialError(errno.EINVAL, f"{self.name}: user and password must have 1-255 bytes")
        return bytes([AUTH_VERSION, len(user)]) + user + bytes([len(password)]) + password

    async def _authenticate(self, sock: socket.socket) -> None:
        await _stream.send_all(sock, self.credentials())
        _version, status = await _stream.recv_exact(sock, 2, self.name)
        if status != 0:
            raise DialError(
                errno.EACCES, f"{self.name} refused the credentials for user {self.username}"
            )

    async def request(self, sock: socket.socket, command: int, dst: Address) -> Address:
        """Send a request; the bound address of a success reply, DialError for a failure."""
        await _stream.send_all(sock, bytes([VERSION, command, 0]) + encode_address(dst))
        version, reply, _rsv, atyp = await _stream.recv_exact(sock, 4, self.name)
        if version != VERSION:
            raise DialError(errno.EPROTO, f"{self.name} answered with version {version}")
        if reply != 0:
            code, text = REPLIES.get(reply, (errno.ECONNABORTED, "unknown reply"))
            raise DialError(code, f"{self.name}: {dst}: {text} (reply {reply:#x})")
        # read the bound address exactly: anything after it is the destination's
        first = await _stream.recv_exact(sock, 1, self.name)
        rest = await _stream.recv_exact(sock, _address_size(atyp, first[0]) - 1, self.name)
        try:
            bound, _ = decode_address(bytes([atyp]) + first + rest, 0)
        except (ValueError, UnicodeError) as exc:
            raise DialError(errno.EPROTO, f"{self.name}: bad bound address: {exc}") from None
        return bound

    async def dial_udp(self, dst: Address, src: Address) -> Socks5Session:
        """A UDP association: the control connection stays open while the session lives."""
        if not isinstance(self.via, DirectDialer):
            raise DialError(
                errno.EPROTONOSUPPORT, f"{self.name}: UDP cannot pass through a chain of proxies"
            )
        control = await self.connect_proxy(src)
        relay: socket.socket | None = None
        try:
            await self.negotiate(control)
            relay = self._udp_socket(control)
            # RFC 1928 §7: the address we will send from, so the proxy can tell our datagrams
            local = control.getsockname()
            relay.bind((local[0], 0))
            bound = await self.request(
                control, CMD_UDP_ASSOCIATE, Address(local[0], relay.getsockname()[1])
            )
            if ipaddress.ip_address(bound.host).is_unspecified:
                bound = Address(control.getpeername()[0], bound.port)  # "same host as me"
            relay.connect((bound.host, bound.port))
        except OSError as exc:
            control.close()
            if relay is not None:
                relay.close()
            raise self.error(exc) from exc
        except BaseException:
            control.close()
            if relay is not None:
                relay.close()
            raise
        return Socks5Session(control, relay, dst, self.name)

    def _udp_socket(self, control: socket.socket) -> socket.socket:
        via = self.via
        assert isinstance(via, DirectDialer)
        sock = socket.socket(control.family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if via.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, via.mark)
            if via.interface is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, via.interface.encode())
        except BaseException:
            sock.close()
            raise
        return sock


#: the longest answer to a CONNECT: method selection, authentication, a reply with a name
MAX_ANSWER = 2 + 2 + 4 + 1 + 255 + 2


class Socks5Handshake(ProxyHandshake):
    """CONNECT in one round trip: the method is known before the proxy answers (no
    authentication without credentials, username/password with them), so the greeting, the
    credentials and the request go in one write, and the answers come back together. Peeks at
    them and consumes exactly their bytes: what the destination sent behind them stays in the
    socket."""

    def __init__(self, dialer: Socks5Dialer, dst: Address) -> None:
        super().__init__(dialer)
        self.dst = dst
        self.username = dialer.username
        if dialer.username is None:
            self.method = METHOD_NONE
            auth = b""
        else:
            self.method = METHOD_USERPASS
            auth = dialer.credentials()
        request = bytes([VERSION, CMD_CONNECT, 0]) + encode_address(dst)
        self.request = bytes([VERSION, 1, self.method]) + auth + request
        self._got = b""  # answer bytes consumed so far (all of them the handshake's)

    def _advance(self, sock: socket.socket) -> bool:
        while True:
            seen = self.peek(sock, MAX_ANSWER - len(self._got))
            if seen is None:
                return False
            data = self._got + seen
            end = self._answer_end(data)
            if end is None:  # all of it is the answer's, which is not complete yet
                sock.recv(len(seen))
                self._got = data
                continue
            sock.recv(end - len(self._got))
            self.leftover = len(data) > end
            return True

    def _answer_end(self, data: bytes) -> int | None:
        """Where the whole answer ends in `data` (None: not all there); DialError if it says
        no."""
        if len(data) < 2:
            return None
        version, method = data[0], data[1]
        if version != VERSION:
            raise DialError(errno.EPROTO, f"{self.name} is not a SOCKS5 server (version {version})")
        if method == METHOD_REFUSED:
            hint = (
                "it requires authentication: give user:password@ in the URL"
                if self.username is None
                else "offered: username/password"
            )
            raise DialError(
                errno.EACCES, f"{self.name} accepts none of our authentication methods ({hint})"
            )
        if method != self.method:
            raise DialError(
                errno.EPROTO, f"{self.name} chose a method we did not offer ({method:#x})"
            )
        at = 2
        if method == METHOD_USERPASS:
            if len(data) < 4:
                return None
            if data[3] != 0:
                raise DialError(
                    errno.EACCES, f"{self.name} refused the credentials for user {self.username}"
                )
            at = 4
        if len(data) < at + 4:
            return None
        version, reply, _rsv, atyp = data[at : at + 4]
        if version != VERSION:
            raise DialError(errno.EPROTO, f"{self.name} answered with version {version}")
        if reply != 0:
            code, text = REPLIES.get(reply, (errno.ECONNABORTED, "unknown reply"))
            raise DialError(code, f"{self.name}: {self.dst}: {text} (reply {reply:#x})")
        if len(data) < at + 5:
            return None
        end = at + 4 + _address_size(atyp, data[at + 4])
        if len(data) < end:
            return None
        try:
            decode_address(data[:end], at + 3)
        except (ValueError, UnicodeError) as exc:
            raise DialError(errno.EPROTO, f"{self.name}: bad bound address: {exc}") from None
        return end


class Socks5Session:
    """A `DatagramSession` through a SOCKS5 UDP relay (RFC 1928 §7).

    Each datagram to the relay carries a header naming `dst`; each from the relay carries the
    address it came from, which `recv` returns. Fragments (FRAG != 0) are dropped: no proxy we
    know sends them, and reassembly is optional in the RFC. The association lives as long as
    the control connection: when the proxy closes it, `recv` raises ECONNRESET.
    """

    __slots__ = ("control", "dropped", "dst", "header", "name", "sock")

    def __init__(
        self, control: socket.socket, sock: socket.socket, dst: Address, name: str
    ) -> None:
        self.control = control
        self.sock = sock
        self.dst = dst
        self.name = name
        self.header = b"\0\0\0" + encode_address(dst)  # RSV, FRAG 0, destination
        self.dropped = 0  # datagrams from the relay we could not use

    def __repr__(self) -> str:
        return f"Socks5Session({self.name}, dst={self.dst})"

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes | memoryview) -> bool:
        return send_or_drop(lambda: self.sock.sendmsg([self.header, data]))

    def recv(self) -> tuple[bytes, Address] | None:
        while True:
            try:
                data = self.sock.recv(MAX_DATAGRAM + MAX_UDP_HEADER)
            except (BlockingIOError, InterruptedError):
                self._check_control()
                return None
            if len(data) < 4 or data[2] != 0:
                self.dropped += 1  # too short, or a fragment
                continue
            try:
                source, offset = decode_address(data, 3)
            except (ValueError, UnicodeError):
                self.dropped += 1
                continue
            return data[offset:], source

    def _check_control(self) -> None:
        """Raise ECONNRESET if the proxy has ended the association (closed the control)."""
        try:
            alive = self.control.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        if not alive:
            raise ConnectionResetError(errno.ECONNRESET, f"{self.name} ended the UDP association")

    def close(self) -> None:
        self.sock.close()
        self.control.close()
