"""HTTP CONNECT (RFC 9110 §9.3.6) with basic authentication (RFC 7617).

A refusal comes back as a status code, and proxies say why, if at all, only in words. squid
answers a failed connect with `503` and the system's error text in its page ("(111) Connection
refused", "(113) No route to host"), so the head and body are searched for those texts first.
tinyproxy (1.11) answers every failed connect with `500 Unable to connect` and a page that does
not say why: refused, unreachable and timed out look the same, and all become ECONNREFUSED (the
commonest cause, a closed port), so the app sees a reset. With no words to go by, the status
code decides: 502 → ECONNREFUSED, 503 → EHOSTUNREACH, 504 → ETIMEDOUT (RFC 9110 §15.6).
Wrong credentials: 407, or 401 from tinyproxy; both and 403 become EACCES.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import socket

from tunio.dialers import _stream
from tunio.dialers.base import Address
from tunio.dialers.proxy import ProxyDialer, ProxyHandshake
from tunio.errors import DialError

HEAD_LIMIT = 16 * 1024
BODY_LIMIT = 64 * 1024
BODY_WAIT = 1.0  # seconds to wait for an error page: it only sharpens the errno

_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?\r\n")
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)

#: errors a proxy may report in words, in the order they are looked for
_WORDS = tuple(
    (code, os.strerror(code).lower())
    for code in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT)
)

#: the status code's meaning when the body names no error
STATUS_ERRNO = {
    401: errno.EACCES,  # tinyproxy's answer to wrong credentials
    403: errno.EACCES,  # the proxy's rules forbid this destination
    407: errno.EACCES,  # proxy authentication required (or failed)
    500: errno.ECONNABORTED,
    502: errno.ECONNREFUSED,  # bad gateway: the destination did not take the connection
    503: errno.EHOSTUNREACH,  # service unavailable: the destination cannot be reached
    504: errno.ETIMEDOUT,  # gateway timeout
}


def errno_for(status: int, text: bytes) -> int:
    """The errno the app should see for a failed CONNECT with this status and head+body."""
    if status in (401, 403, 407):
        return errno.EACCES
    lowered = text.lower().decode("latin-1")
    for code, words in _WORDS:
        if words in lowered:
            return code
    if "unable to connect" in lowered:  # tinyproxy's only words for any failed connect
        return errno.ECONNREFUSED
    return STATUS_ERRNO.get(status, errno.ECONNABORTED)


def connect_request(dst: Address, username: str | None, password: str | None) -> bytes:
    authority = str(dst)  # host:port, IPv6 in brackets
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if username is not None and password is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        lines.append(f"Proxy-Authorization: Basic {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HttpDialer(ProxyDialer):
    """`http://[user:pass@]host:port`: a tunnel by HTTP CONNECT (TCP only)."""

    scheme = "http"

    def machine(self, dst: Address) -> HttpHandshake:
        return HttpHandshake(self, dst)


class HttpHandshake(ProxyHandshake):
    """CONNECT, sent as soon as the connection is up; the answer's head is peeked at and
    consumed to its blank line and not one byte more (what the destination sent behind it
    stays in the socket). A refusal's body is read too, for a sharper errno, for at most
    BODY_WAIT seconds after its head."""

    def __init__(self, dialer: HttpDialer, dst: Address) -> None:
        super().__init__(dialer)
        self.dst = dst
        self.username = dialer.username
        self.request = connect_request(dst, dialer.username, dialer.password)
        self._head = b""  # head bytes consumed so far; the whole head once `_status` is set
        self._status = 0
        self._reason = ""
        self._body = bytearray()
        self._body_limit = 0

    def _advance(self, sock: socket.socket) -> bool:
        if self._status:
            return self._read_body(sock)
        while True:
            seen = self.peek(sock, HEAD_LIMIT - len(self._head))
            if seen is None:
                return False
            held = self._head
            # the blank line may straddle what we hold and what we peeked
            start = max(0, len(held) - len(_stream.HEAD_END) + 1)
            found = (held[start:] + seen).find(_stream.HEAD_END)
            if found < 0:
                self._head = held + sock.recv(len(seen))  # all head bytes: no blank line yet
                if len(self._head) >= HEAD_LIMIT:
                    raise DialError(
                        errno.EPROTO, f"{self.name} sent a head longer than {HEAD_LIMIT} bytes"
                    )
                continue
            take = start + found + len(_stream.HEAD_END) - len(held)
            head = held + sock.recv(take)
            self.leftover = len(seen) > take
            return self._on_head(head, sock)

    def _on_head(self, head: bytes, sock: socket.socket) -> bool:
        match = _STATUS.match(head)
        if match is None:
            line = head.split(b"\r\n", 1)[0][:80]
            raise DialError(errno.EPROTO, f"{self.name} answered no HTTP status line: {line!r}")
        status = int(match.group(1))
        if 200 <= status < 300:
            return True
        self._head = head
        self._status = status
        self._reason = (match.group(2) or b"").decode("latin-1").strip()
        length = _LENGTH.search(head)
        self._body_limit = min(int(length.group(1)), BODY_LIMIT) if length else BODY_LIMIT
        self.leftover = False
        return self._read_body(sock)

    def _read_body(self, sock: socket.socket) -> bool:
        """A refusal's body, as much as comes (the connection is given up after it): raises
        the failure once it is all there, or at its end; False while more may come."""
        body = self._body
        while len(body) < self._body_limit:
            try:
                chunk = sock.recv(self._body_limit - len(body))
            except (BlockingIOError, InterruptedError):
                self.patience = BODY_WAIT
                return False
            except OSError:
                break  # what came is all we use: it only makes the errno more precise
            if not chunk:
                break
            body += chunk
        self.expire()
        return False  # (expire raised)

    def expire(self) -> None:
        if not self._status:
            super().expire()
        status = self._status
        code = errno_for(status, self._head + bytes(self._body))
        if status in (401, 407):
            who = f"user {self.username}" if self.username is not None else "no credentials"
            raise DialError(code, f"{self.name}: proxy authentication failed ({who})")
        raise DialError(code, f"{self.name}: {self.dst}: {status} {self._reason}".rstrip())
