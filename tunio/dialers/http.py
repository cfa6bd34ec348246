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
from tunio.dialers.proxy import ProxyDialer
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

    async def handshake(self, sock: socket.socket, dst: Address) -> None:
        await _stream.send_all(sock, connect_request(dst, self.username, self.password))
        head = await _stream.recv_head(sock, HEAD_LIMIT, self.name)
        match = _STATUS.match(head)
        if match is None:
            line = head.split(b"\r\n", 1)[0][:80]
            raise DialError(errno.EPROTO, f"{self.name} answered no HTTP status line: {line!r}")
        status = int(match.group(1))
        if 200 <= status < 300:
            return
        reason = (match.group(2) or b"").decode("latin-1").strip()
        body = await self._error_body(sock, head)
        code = errno_for(status, head + body)
        if status in (401, 407):
            who = f"user {self.username}" if self.username is not None else "no credentials"
            raise DialError(code, f"{self.name}: proxy authentication failed ({who})")
        raise DialError(code, f"{self.name}: {dst}: {status} {reason}".rstrip())

    async def _error_body(self, sock: socket.socket, head: bytes) -> bytes:
        match = _LENGTH.search(head)
        limit = min(int(match.group(1)), BODY_LIMIT) if match else BODY_LIMIT
        if limit == 0:
            return b""
        return await _stream.recv_some(sock, limit, BODY_WAIT)
