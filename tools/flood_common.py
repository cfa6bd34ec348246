"""What the flood client and server share: addresses, the test stream, limits, error names."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import resource
import signal
import socket
import struct

# Large enough that a bulk transfer costs few syscalls, small enough to stay in cache.
CHUNK = 256 * 1024
DIGEST_SIZE = 32  # SHA-256, the sink server's answer
REQUEST = struct.Struct(">QQ")  # source mode: the client asks for (seed, length)
LABEL = struct.Struct(">QQ")  # every chunk of a stream starts with (seed, chunk index)
MODES = ("echo", "sink", "source")
# Reads or writes one connection may do before the loop serves the others (edge-triggered epoll
# would otherwise let one busy flow starve the rest).
TURN = 16


class Yield(Exception):
    """Raised by a connection that used up its turn; the loop steps it again soon."""

# One random pattern shared by both ends; every stream is a rotation of it, chosen by its seed,
# so a stream costs a memcpy to build instead of a pseudo-random generator per byte.
_PATTERN = random.Random(0x7475_6E69_6F).randbytes(CHUNK)


class Stream:
    """The deterministic bytes of one connection: `length` bytes named by `seed`.

    Chunk i is CHUNK bytes (the last one may be shorter) whose first 16 bytes are (seed, i) and
    whose rest is the shared pattern rotated by `seed`. A lost, repeated, reordered or misrouted
    chunk changes the label; a shifted byte changes the rotation.
    """

    __slots__ = ("_buf", "_index", "_view", "length", "seed")

    def __init__(self, seed: int, length: int) -> None:
        self.seed = seed
        self.length = length
        size = min(length, CHUNK)
        rot = seed % CHUNK
        if rot + size <= CHUNK:
            self._buf = bytearray(_PATTERN[rot : rot + size])
        else:
            self._buf = bytearray(_PATTERN[rot:] + _PATTERN[: size - (CHUNK - rot)])
        self._view = memoryview(self._buf)
        self._index = -1
        self._label(0)

    def _label(self, index: int) -> None:
        if index != self._index:
            label = LABEL.pack(self.seed, index)
            n = min(len(label), len(self._buf))
            self._buf[:n] = label[:n]
            self._index = index

    def chunk(self, index: int) -> memoryview:
        """Chunk `index` as a view valid until the next call (the buffer is reused)."""
        self._label(index)
        start = index * CHUNK
        return self._view[: min(CHUNK, self.length - start)]

    def matches(self, offset: int, data: memoryview) -> bool:
        """True if `data` equals the stream's bytes at `offset` (and does not run past its end)."""
        if offset + len(data) > self.length:
            return False
        pos = 0
        while pos < len(data):
            index, inner = divmod(offset + pos, CHUNK)
            expected = self.chunk(index)
            take = min(len(data) - pos, len(expected) - inner)
            # bytearray == memoryview is a memcmp; memoryview == memoryview compares per item.
            if bytearray(data[pos : pos + take]) != expected[inner : inner + take]:
                return False
            pos += take
        return True


def parse_endpoint(text: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); raises ValueError with a one-line reason."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"bad address {text!r}: expected HOST:PORT or [IPV6]:PORT")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    """The first TCP address for host:port, as (family, sockaddr without flow info)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (thousands of sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def error_name(exc: BaseException) -> str:
    """ECONNREFUSED, ETIMEDOUT, ... for an OSError; the exception's class name otherwise."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return errno.errorcode.get(code, f"errno{code}")
    return type(exc).__name__


# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s; tcpi_last_ack_recv is the 13th
# u32 and tcpi_total_retrans the 24th.
_TCP_INFO = struct.Struct("56xI40xI")
_TCP_INFO_LEN = 104


def handshake_age(sock: socket.socket) -> tuple[int, int]:
    """(ms since the kernel last got an ACK, segments retransmitted) for a TCP socket.

    Asked as soon as a connect is seen done, before anything is sent, the ACK is the SYN-ACK and
    the retransmits are SYNs: the handshake as the kernel lived it, whatever the client's own
    loop lagged in noticing it."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    last_ack_ms, total_retrans = _TCP_INFO.unpack_from(info)
    return last_ack_ms, total_retrans


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Called first in a forked process: it must not outlive the flood that started it (a
    parent killed with SIGKILL cannot end its children itself)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent went before the prctl took hold
        os._exit(1)
