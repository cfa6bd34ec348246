"""A C stack whose TUN queue is a SOCK_SEQPACKET socketpair and whose only worker is the test:
the whole packet path of the stack, driven and observed without privileges."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import zmq

from tunio import wire
from tunio.stack import Stack, StackConfig
from tunio.testing import packets

APP = "127.0.0.1"  # the app's source address is the TUN's own address, as with a real TUN
DST = "192.0.2.2"  # the destination the app asked for: only named to the worker, never reached
APP6 = "fd00:18::1"  # the TUN's IPv6 address (bound with freebind: no interface needs it)
DST6 = "fd00:99::2"
WINDOW = 65536
DEADLINE = 5.0


class Rig:
    def __init__(self, stack: Stack, tun: socket.socket, ctx: zmq.Context[zmq.Socket[bytes]],
                 endpoint: str, features: int = 0) -> None:
        self.stack = stack
        self.tun = tun  # our end of the "TUN queue"
        self.ctx = ctx
        self.endpoint = endpoint
        self.worker = self.connect_worker(features=features)

    def connect_worker(self, name: bytes = b"test-worker", features: int = 0
                       ) -> zmq.Socket[bytes]:  # fmt: skip
        """A worker of the test's; `features`: HELLO's flags (wire.FEATURE_NAMES)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        hello = wire.Message(wire.Cmd.HELLO, payload=name, flags=features)
        sock.send_multipart(wire.encode(hello))
        msg = self.recv(sock)
        assert msg.cmd is wire.Cmd.HELLO
        return sock

    def recv(self, sock: zmq.Socket[bytes] | None = None,
             skip: tuple[wire.Cmd, ...] = (wire.Cmd.HEARTBEAT,)) -> wire.Message:
        sock = sock or self.worker
        end = time.monotonic() + DEADLINE
        while True:
            left = end - time.monotonic()
            assert left > 0, "no message from the stack in time"
            if not sock.poll(int(left * 1000)):
                continue
            msg = wire.decode([bytes(f) for f in sock.recv_multipart()])
            if msg.cmd is wire.Cmd.HEARTBEAT:
                self.send(wire.Cmd.HEARTBEAT, sock=sock)  # stay alive while the test reads
            if msg.cmd not in skip:
                return msg

    def send(self, cmd: wire.Cmd, flow: int = 0, arg: int = 0, payload: bytes | None = None,
             sock: zmq.Socket[bytes] | None = None) -> None:
        (sock or self.worker).send_multipart(wire.encode(wire.Message(cmd, flow, arg, payload)))

    def write(self, pkt: bytes) -> None:
        self.tun.send(pkt)

    def read(self) -> packets.Parsed:
        self.tun.settimeout(DEADLINE)
        return packets.parse(self.tun.recv(65536))

    def wait_stat(self, name: str, value: int, deadline: float = DEADLINE) -> None:
        end = time.monotonic() + deadline
        while self.stack.stats()[name] != value:
            assert time.monotonic() < end, f"{name} is {self.stack.stats()[name]}, not {value}"
            time.sleep(0.005)  # polling a counter the C side updates; the deadline bounds it

    def syn(self, sport: int, dport: int = 8080, seq: int = 1000, *, app: str = APP,
            dst: str = DST) -> bytes:
        return packets.tcp(app, sport, dst, dport, flags=packets.SYN, seq=seq,
                           options=packets.SYN_OPTIONS)

    def open(self, sport: int, dport: int = 8080, seq: int = 1000, *, app: str = APP,
             dst: str = DST) -> wire.Message:
        """Writes a SYN and returns the OPEN it caused."""
        self.write(self.syn(sport, dport, seq, app=app, dst=dst))
        msg = self.recv()
        assert msg.cmd is wire.Cmd.OPEN
        return msg

    def probe(self) -> packets.Parsed:
        """Writes a stray ACK and returns the next packet the stack writes. The stray gets a RST
        from the reader thread, so whatever came out before it was written before it."""
        self.write(packets.tcp(APP, 9, DST, 9, flags=packets.ACK, seq=1, ack=777))
        return self.read()


@contextmanager
def stack_rig(tmp_path: Path, features: int = 0, **overrides: object) -> Iterator[Rig]:
    # The test's worker answers heartbeats only while it reads: a long interval keeps a loaded
    # machine from declaring it dead; the test of dead workers sets a short one.
    overrides.setdefault("heartbeat_interval", 30.0)
    overrides.setdefault("log_level", "warning")
    window = overrides.pop("window", WINDOW)
    assert isinstance(window, int)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.set_blocking(theirs.fileno(), False)
    endpoint = f"ipc://{tmp_path}/stack.sock"
    cfg = StackConfig(
        tun_fds=(theirs.fileno(),),
        addresses=(ipaddress.IPv4Interface("127.0.0.1/8"), ipaddress.IPv6Interface(f"{APP6}/64")),
        endpoint=endpoint,
        window=window,
        **overrides,  # type: ignore[arg-type]
    )
    stack = Stack(cfg)
    thread = threading.Thread(target=stack.run)
    thread.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield Rig(stack, ours, ctx, endpoint, features)
    finally:
        stack.stop()
        thread.join()
        stack.close()
        ctx.destroy(linger=0)
        ours.close()
        theirs.close()


def pool_of(stack_addr: str = "127.0.0.1/8") -> Callable[[str], bool]:
    """Whether an address is one of the stack's 16 NAT addresses at the top of the prefix."""
    net = ipaddress.ip_interface(stack_addr).network
    top = int(net.broadcast_address) - 1
    return lambda a: top - 16 < int(ipaddress.ip_address(a)) <= top
