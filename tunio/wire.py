"""Sans-I/O codec of the stack <-> worker protocol, version 2 (see docs/protocol.md).

NAME (16) and HELLO's feature flags are an extension of version 2 that a worker announces.

No sockets here: `encode` turns a `Message` into ZeroMQ frames and `decode` turns frames back into
a `Message`; `decode_flow` is decode's shortcut for the data path (DATA, CREDIT, FIN). Payload
frames are passed through untouched (a memoryview over a zmq.Frame stays a memoryview), so bulk
data is never copied by the codec.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, Union

if TYPE_CHECKING:
    import zmq

VERSION = 2

#: version, command, reserved, flow, arg
HEADER = struct.Struct(">BBHIQ")
#: command, flow, arg: what the data path reads of a header (`decode_flow` checks the version
#: apart and skips the reserved bytes)
_FLOW_FIELDS = struct.Struct(">xBxxIQ")
#: proto, version, src port, dst port, reserved, src address, dst address
ADDRESS = struct.Struct(">BBHHH16s16s")

MAX_FLOW = 0xFFFF_FFFF
MAX_ARG = 0xFFFF_FFFF_FFFF_FFFF
#: a worker's name in HELLO is at most this many bytes of UTF-8
MAX_NAME = 64
#: NAME's payload, a domain name (dotted, no final dot), is 1 to this many bytes
MAX_DNS_NAME = 253
#: HELLO's flags (the header's reserved field), w->s: the worker takes NAME (docs/protocol.md)
FEATURE_NAMES = 1

IPPROTO_TCP = 6
IPPROTO_UDP = 17

Payload: TypeAlias = bytes | memoryview
#: what `decode` accepts as one frame: anything exporting a byte buffer (a string names
#: zmq.Frame so that this module does not import zmq, hence Union)
Frame: TypeAlias = Union[bytes, bytearray, memoryview, "zmq.Frame"]


class Cmd(enum.IntEnum):
    HELLO = 1
    OPEN = 2
    OPEN_OK = 3
    OPEN_FAIL = 4
    DATA = 5
    CREDIT = 6
    FIN = 7
    RST = 8
    DGRAM = 9
    HEARTBEAT = 10
    BYE = 11
    DRAIN = 12
    DATA_FIN = 14
    CREDIT_FIN = 15
    NAME = 16


class ProtocolError(ValueError):
    """A message breaks the protocol. `rule` names the broken rule (see tests/golden)."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol."""


class VersionError(RemoteProtocolError):
    """The peer speaks another protocol version: answer BYE(EPROTONOSUPPORT), ignore the message."""

    def __init__(self, version: int) -> None:
        super().__init__("version", f"protocol version {version}, expected {VERSION}")
        self.version = version


class LocalProtocolError(ProtocolError):
    """We were asked to encode something that breaks the protocol."""


class _Body(enum.IntEnum):
    """What a command carries after its header."""

    NONE = 0  # no payload frame
    NAME = 1  # a payload frame of at most MAX_NAME bytes
    NONEMPTY = 2  # a payload frame of at least one byte
    ADDRESS = 3  # exactly one address block
    ADDRESS_PLUS = 4  # an address block followed by any number of bytes
    DNS_NAME = 5  # a payload frame of 1 to MAX_DNS_NAME bytes


_BODY: dict[int, _Body] = {
    Cmd.HELLO: _Body.NAME,
    Cmd.OPEN: _Body.ADDRESS,
    Cmd.OPEN_OK: _Body.NONE,
    Cmd.OPEN_FAIL: _Body.NONE,
    Cmd.DATA: _Body.NONEMPTY,
    Cmd.CREDIT: _Body.NONE,
    Cmd.FIN: _Body.NONE,
    Cmd.RST: _Body.NONE,
    Cmd.DGRAM: _Body.ADDRESS_PLUS,
    Cmd.HEARTBEAT: _Body.NONE,
    Cmd.BYE: _Body.NONE,
    Cmd.DRAIN: _Body.NONE,
    Cmd.DATA_FIN: _Body.NONEMPTY,
    Cmd.CREDIT_FIN: _Body.NONE,
    Cmd.NAME: _Body.DNS_NAME,
}
#: commands that are about the session, not a flow: their flow id is 0
_SESSION_CMDS = frozenset({Cmd.HELLO, Cmd.HEARTBEAT, Cmd.BYE, Cmd.DRAIN})
# Plain-int lookup for the hot path: IntEnum construction is slow and raises on unknown codes.
_CMD_BY_CODE: dict[int, Cmd] = {int(c): c for c in Cmd}


def _check(
    cmd: Cmd, flow: int, payload: Payload | None, error: type[ProtocolError]
) -> None:
    if (flow == 0) != (cmd in _SESSION_CMDS):
        raise error("flow", f"{cmd.name} on flow {flow}")
    body = _BODY[cmd]
    if body is _Body.NONE:
        if payload is not None:
            raise error("payload-extra", f"{cmd.name} carries no payload")
        return
    if payload is None:
        raise error("payload-missing", f"{cmd.name} needs a payload frame")
    size = len(payload)
    if body is _Body.NAME and size > MAX_NAME:
        raise error("payload-size", f"{cmd.name} name is {size} bytes, at most {MAX_NAME}")
    if body is _Body.NONEMPTY and size == 0:
        raise error("payload-size", f"{cmd.name} payload is never empty")
    if body is _Body.ADDRESS and size != ADDRESS.size:
        raise error("payload-size", f"{cmd.name} payload is {size} bytes, expected {ADDRESS.size}")
    if body is _Body.DNS_NAME and not 1 <= size <= MAX_DNS_NAME:
        raise error("payload-size", f"{cmd.name} name is {size} bytes, 1 to {MAX_DNS_NAME}")
    if body is _Body.ADDRESS_PLUS and size < ADDRESS.size:
        raise error("payload-size", f"{cmd.name} payload is {size} bytes, needs {ADDRESS.size}+")


@dataclass(frozen=True, slots=True)
class Message:
    cmd: Cmd
    flow: int = 0
    arg: int = 0
    payload: Payload | None = None
    flags: int = 0  # HELLO: the features its sender takes (FEATURE_*); else 0


def header(cmd: Cmd, flow: int, arg: int, flags: int = 0) -> bytes:
    """The 16-byte header frame; no checks beyond struct's own (for callers that know better)."""
    return HEADER.pack(VERSION, cmd, flags, flow, arg)


def encode(msg: Message) -> list[Payload]:
    """Frames for `msg`: the header, then the payload frame if the command has one."""
    if not 0 <= msg.flow <= MAX_FLOW:
        raise LocalProtocolError("range", f"flow {msg.flow} is not a u32")
    if not 0 <= msg.arg <= MAX_ARG:
        raise LocalProtocolError("range", f"arg {msg.arg} is not a u64")
    _check(msg.cmd, msg.flow, msg.payload, LocalProtocolError)
    if not 0 <= msg.flags <= 0xFFFF or (msg.flags and msg.cmd is not Cmd.HELLO):
        raise LocalProtocolError("flags", f"flags {msg.flags:#x} on {msg.cmd.name}")
    head = HEADER.pack(VERSION, msg.cmd, msg.flags, msg.flow, msg.arg)
    if msg.payload is None:
        return [head]
    return [head, msg.payload]


def _view(frame: Frame) -> Payload:
    if isinstance(frame, (bytes, memoryview)):
        return frame
    if isinstance(frame, bytearray):
        return memoryview(frame)
    return frame.buffer


def decode(frames: Sequence[Frame]) -> Message:
    """Parse one message (identity frame already stripped). Raises RemoteProtocolError."""
    count = len(frames)
    if count == 0 or count > 2:
        raise RemoteProtocolError("frame-count", f"{count} frames, expected 1 or 2")
    head = _view(frames[0])
    # The version is checked before the size so that a peer of another version, whose header
    # may be laid out differently, still gets BYE(EPROTONOSUPPORT).
    if len(head) and head[0] != VERSION:
        raise VersionError(head[0])
    if len(head) != HEADER.size:
        raise RemoteProtocolError("header-size", f"header is {len(head)} bytes, not 16")
    _version, code, flags, flow, arg = HEADER.unpack_from(head)
    cmd = _CMD_BY_CODE.get(code)
    if cmd is None:
        raise RemoteProtocolError("command", f"unknown command {code}")
    payload = _view(frames[1]) if count == 2 else None
    _check(cmd, flow, payload, RemoteProtocolError)
    # flags mean something on HELLO only; elsewhere they are ignored, as reserved bytes are
    return Message(cmd, flow, arg, payload, flags if cmd is Cmd.HELLO else 0)


_DATA, _CREDIT, _FIN = int(Cmd.DATA), int(Cmd.CREDIT), int(Cmd.FIN)
_DATA_FIN, _CREDIT_FIN = int(Cmd.DATA_FIN), int(Cmd.CREDIT_FIN)
_OPEN = int(Cmd.OPEN)


def decode_flow(head: Payload, payload: Payload | None) -> tuple[int, int, int] | None:
    """The data path's decode: (command, flow, arg) of a well-formed DATA, CREDIT, FIN,
    DATA_FIN, CREDIT_FIN or OPEN (one a connection); None for any other message.

    `head` is the header frame and `payload` the second frame, or None for a message of one frame
    (a message of more frames is not for this function). This runs once per message of bulk data,
    so it builds no Message and leaves the command a plain int (compare it with `int(Cmd.DATA)`).
    None only means "not the data path": `decode` then takes the message, with all its checks and
    errors. Whatever this accepts, `decode` accepts with the same fields.
    """
    if len(head) != HEADER.size or head[0] != VERSION:
        return None
    fields: tuple[int, int, int] = _FLOW_FIELDS.unpack_from(head)
    code, flow, _arg = fields
    if not flow:
        return None
    if payload is None:
        if code in (_CREDIT, _FIN, _CREDIT_FIN):
            return fields
    elif code in (_DATA, _DATA_FIN):
        if len(payload):
            return fields
    elif code == _OPEN and len(payload) == ADDRESS.size:
        return fields
    return None


def unfold(msg: Message) -> list[Message]:
    """A message as the plain ones it stands for: DATA_FIN is DATA and then FIN, CREDIT_FIN is
    CREDIT (none for 0) and then FIN; any other message is itself. For tests and tools that
    follow a flow message by message."""
    if msg.cmd is Cmd.DATA_FIN:
        return [Message(Cmd.DATA, msg.flow, msg.arg, msg.payload), Message(Cmd.FIN, msg.flow)]
    if msg.cmd is Cmd.CREDIT_FIN:
        fin = Message(Cmd.FIN, msg.flow)
        return [Message(Cmd.CREDIT, msg.flow, msg.arg), fin] if msg.arg else [fin]
    return [msg]


_AF_INET = socket.AF_INET


def unpack_endpoints(buf: Payload) -> tuple[int, str, int, str, int]:
    """(protocol, source host, source port, destination host, destination port) of an address
    block, the hosts as `str()` of their addresses: what `AddressBlock.unpack` gives, without
    the address objects (an IPv4 flow's OPEN costs a fifth of it)."""
    if len(buf) < ADDRESS.size:
        raise RemoteProtocolError("address", f"address block is {len(buf)} bytes, not 40")
    proto, version, src_port, dst_port, _reserved, src, dst = ADDRESS.unpack_from(buf)
    if version == 4:
        return proto, socket.inet_ntop(_AF_INET, src[:4]), src_port, \
            socket.inet_ntop(_AF_INET, dst[:4]), dst_port  # fmt: skip
    if version == 6:  # (ipaddress's spelling, which inet_ntop does not always share)
        return proto, str(ipaddress.IPv6Address(src)), src_port, \
            str(ipaddress.IPv6Address(dst)), dst_port  # fmt: skip
    raise RemoteProtocolError("address", f"IP version {version}, expected 4 or 6")


IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class AddressBlock:
    """The 40-byte address block of OPEN and DGRAM."""

    proto: int
    version: int
    src: IPAddress
    src_port: int
    dst: IPAddress
    dst_port: int

    def pack(self) -> bytes:
        if self.src.version != self.version or self.dst.version != self.version:
            raise LocalProtocolError("address", f"addresses are not all IPv{self.version}")
        try:
            return ADDRESS.pack(
                self.proto,
                self.version,
                self.src_port,
                self.dst_port,
                0,
                self.src.packed.ljust(16, b"\0"),
                self.dst.packed.ljust(16, b"\0"),
            )
        except struct.error as exc:
            raise LocalProtocolError("address", str(exc)) from exc

    @classmethod
    def unpack(cls, buf: Payload) -> AddressBlock:
        """Parse the first 40 bytes of `buf` (DGRAM has its datagram after them)."""
        if len(buf) < ADDRESS.size:
            raise RemoteProtocolError("address", f"address block is {len(buf)} bytes, not 40")
        proto, version, src_port, dst_port, _reserved, src, dst = ADDRESS.unpack_from(buf)
        if version == 4:
            return cls(
                proto,
                4,
                ipaddress.IPv4Address(src[:4]),
                src_port,
                ipaddress.IPv4Address(dst[:4]),
                dst_port,
            )
        if version == 6:
            return cls(
                proto, 6, ipaddress.IPv6Address(src), src_port, ipaddress.IPv6Address(dst), dst_port
            )
        raise RemoteProtocolError("address", f"IP version {version}, expected 4 or 6")
