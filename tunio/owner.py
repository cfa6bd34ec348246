"""Who sent a flow: the app's socket in the kernel's table, from the flow's original 5-tuple.

One NETLINK_SOCK_DIAG request (sock_diag(7)) for exactly that tuple gives the socket's owner uid
and inode, at about the cost of a system call; the pid is the process holding a descriptor of
that inode, found in /proc/*/fd. Scanning /proc costs milliseconds on a busy host, so one scan
makes a map of every socket inode to its process, reused until it misses an inode (and then
made again at most every RESCAN seconds): the cost per flow stays bounded under a flood of new
flows. Nothing is found, and None returned, for flows that do not come from a socket of this
network namespace (a container, a VM or another host sending through the TUN): absent, never
wrong.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import time
from collections import OrderedDict
from pathlib import Path

from tunio.dialers.base import Address
from tunio.policy import Owner

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
RESCAN = 0.1  # seconds between two scans of all of /proc when inodes are missing
HOT_PROCESSES = 16  # processes whose new sockets are looked for first

_NLMSGHDR = struct.Struct("=IHHII")
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid
_REQ = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
# inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode
_MSG_HEAD = struct.Struct("=BBBB")
_MSG_TAIL = struct.Struct("=IIIII")
_SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def _packed(host: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return family, ip.packed.ljust(16, b"\0")


class OwnerLookup:
    """Looks up the owners of flows' sockets; one per worker (it keeps a netlink socket)."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = Path(proc)
        self._sock: socket.socket | None = None
        self._seq = 0
        self._pids: dict[int, int] = {}  # socket inode -> pid, from the last scan
        self._hot: OrderedDict[int, None] = OrderedDict()  # pids of recent flows, newest last
        self._scanned = 0.0
        self.lookups = 0  # for the bench and the tests
        self.scans = 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def owner(self, protocol: str, src: Address, dst: Address) -> Owner | None:
        """The owner of the app's socket `src` -> `dst`, or None if there is none here. Its
        process is looked for when it is first asked for."""
        found = self.socket_of(protocol, src, dst)
        if found is None:
            return None
        uid, inode = found

        def process() -> tuple[int | None, str | None]:
            pid = self.pid_of(inode) if inode else None
            return pid, self._comm(pid) if pid is not None else None

        return Owner(uid, resolve=process)

    def socket_of(self, protocol: str, src: Address, dst: Address) -> tuple[int, int] | None:
        """(uid, inode) of the socket with local address `src` and peer `dst`."""
        number = PROTOCOLS.get(protocol)
        if number is None:
            return None
        try:
            family, src_ip = _packed(src.host)
            family_dst, dst_ip = _packed(dst.host)
        except ValueError:
            return None  # a name: no socket has it as its address
        if family != family_dst:
            return None
        self.lookups += 1
        if number == socket.IPPROTO_UDP:
            # udp_diag looks the socket up as the receive path does, which takes the packet's
            # source (the peer) first: the other way round from tcp_diag's sockid
            src, dst, src_ip, dst_ip = dst, src, dst_ip, src_ip
        sockid = _SOCKID.pack(src.port, dst.port, src_ip, dst_ip) + _SOCKID_TAIL.pack(
            0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE
        )
        body = _REQ.pack(family, number, 0, 0, ALL_STATES) + sockid
        try:
            reply = self._ask(body)
        except OSError:
            return None
        return reply

    def _ask(self, body: bytes) -> tuple[int, int] | None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                       NETLINK_SOCK_DIAG)  # fmt: skip
            self._sock.settimeout(1.0)
        self._seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                                self._seq, 0)  # fmt: skip
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(65536)
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data)
            if seq != self._seq:
                continue  # an answer to a request that timed out before
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
                if code in (0, -errno.ENOENT):
                    return None
                raise OSError(-code, os.strerror(-code))
            at = _NLMSGHDR.size + _MSG_HEAD.size + _SOCKID_LEN
            if length < at + _MSG_TAIL.size:
                return None
            _exp, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, at)
            return uid, inode

    def pid_of(self, inode: int) -> int | None:
        """The process holding socket `inode`. Each new flow is a new socket, most often of a
        process that made flows before: those few are looked at first, then every process (at
        most every RESCAN seconds)."""
        pid = self._pids.get(inode)
        if pid is not None:
            return pid
        for hot in list(self._hot):
            if self._holds(hot, inode):
                self._hot.move_to_end(hot)
                return hot
        if time.monotonic() - self._scanned < RESCAN:
            return None
        self._scan()
        pid = self._pids.get(inode)
        if pid is not None:
            self._hot[pid] = None
            if len(self._hot) > HOT_PROCESSES:
                self._hot.popitem(last=False)
        return pid

    def _sockets_of(self, pid: str) -> dict[int, int]:
        found: dict[int, int] = {}
        with contextlib.suppress(OSError):
            for fd in os.scandir(self._proc / pid / "fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        found[int(target[8:-1])] = int(pid)
        return found

    def _holds(self, pid: int, inode: int) -> bool:
        held = self._sockets_of(str(pid))
        if not held:
            self._hot.pop(pid, None)  # gone
        self._pids.update(held)
        return inode in held

    def _scan(self) -> None:
        self.scans += 1
        self._scanned = time.monotonic()
        pids: dict[int, int] = {}
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._proc):
                if entry.name.isdigit():
                    for inode, pid in self._sockets_of(entry.name).items():
                        pids.setdefault(inode, pid)
        self._pids = pids

    def _comm(self, pid: int) -> str | None:
        try:
            return (self._proc / str(pid) / "comm").read_text().strip()
        except OSError:
            return None
