"""--tcp-keepalive: a flow whose app or destination vanished without a word ends, where it held
its slot, its worker's connection and the other end's forever.

The app that vanishes is a guest behind the gateway: its handshake is written onto tun0 with
AF_PACKET from an address no namespace has, then it goes silent, as a VM switched off would.
The destination that vanishes is an address of the srv namespace that is taken away and
blackholed while its flow is idle.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from lab.netlab import SERVER_ADDRESS, TUN_NAME, Lab, LabError, TunioProcess
from lab.tuntap import ETH_P_IP, next_tcp, tun_tap

from tunio.testing import packets

GUEST = "10.77.0.6"
PORT = 47013
GONE = "198.18.4.10"  # the destination that vanishes: an address of srv's for this test alone
KEEPALIVE = ["--tcp-keepalive", "1,1,2"]  # a dead peer is found in about 3 s
DEADLINE = 20.0  # far past 3 s; without keepalive the flows would wait forever


@pytest.fixture(scope="module")
def tunio(lab: Lab) -> Iterator[TunioProcess]:
    proc = lab.start_tunio(KEEPALIVE)
    yield proc
    assert proc.stop() == 0, proc.log.text


def _drain(sock: socket.socket) -> None:
    while sock.recv(4096):
        pass


def _until_reset(sock: socket.socket) -> float:
    """Reads `sock` until its connection is reset (a FIN would fail the test); how long."""
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        _drain(sock)
    return time.monotonic() - started


def test_a_flow_whose_app_vanished_ends_and_its_destination_sees_it_end(
    lab: Lab, tunio: TunioProcess
) -> None:
    del tunio
    with (
        lab.open_socket(lab.srv) as listener,
        tun_tap(lab.app, TUN_NAME) as tap,
        lab.open_socket(family=socket.AF_PACKET, type=socket.SOCK_DGRAM) as inject,
    ):  # fmt: skip
        listener.bind((SERVER_ADDRESS, PORT))
        listener.listen(4)
        listener.settimeout(DEADLINE)
        sport = 41555
        syn = packets.tcp(GUEST, sport, SERVER_ADDRESS, PORT, flags=packets.SYN, seq=9000,
                          options=packets.SYN_OPTIONS)
        inject.sendto(syn, (TUN_NAME, ETH_P_IP))
        server, _ = listener.accept()  # the worker dialed the destination
        with server:
            synack = next_tcp(tap, SERVER_ADDRESS, GUEST, sport,
                              flags=packets.SYN | packets.ACK, timeout=DEADLINE)  # fmt: skip
            assert synack.ack == 9001
            ack = packets.tcp(GUEST, sport, SERVER_ADDRESS, PORT, flags=packets.ACK, seq=9001,
                              ack=synack.seq + 1, payload=b"hello")
            inject.sendto(ack, (TUN_NAME, ETH_P_IP))
            server.settimeout(DEADLINE)
            assert server.recv(5) == b"hello"  # the flow is open, end to end
            # ... and the guest is gone: the stack's probes to it go unanswered
            took = _until_reset(server)  # the destination's end is reset, not left open
    assert took < DEADLINE
    print(f"\nthe vanished app's flow ended after {took:.1f} s idle (keepalive 1,1,2)")


def test_a_flow_whose_destination_vanished_ends_and_its_app_sees_it_end(
    lab: Lab, tunio: TunioProcess
) -> None:
    del tunio
    lab.ip(lab.srv, "addr", "add", f"{GONE}/32", "dev", "lo")
    try:
        with lab.open_socket(lab.srv) as listener:
            listener.bind((GONE, PORT))
            listener.listen(4)
            listener.settimeout(DEADLINE)
            with lab.connect(PORT, GONE, timeout=DEADLINE) as app:
                server, _ = listener.accept()
                with server:
                    app.sendall(b"ping")
                    server.settimeout(DEADLINE)
                    assert server.recv(4) == b"ping"
                    # the destination vanishes while the flow is idle: nothing answers there
                    lab.ip(lab.srv, "addr", "del", f"{GONE}/32", "dev", "lo")
                    lab.ip(lab.srv, "route", "add", "blackhole", f"{GONE}/32")
                    took = _until_reset(app)
    finally:
        with contextlib.suppress(LabError):  # (not there if the test failed before)
            lab.ip(lab.srv, "route", "del", "blackhole", f"{GONE}/32")
        with contextlib.suppress(LabError):
            lab.ip(lab.srv, "addr", "del", f"{GONE}/32", "dev", "lo")
    assert took < DEADLINE
    print(f"\nthe vanished destination's flow ended after {took:.1f} s idle (keepalive 1,1,2)")
