"""Local ports used up in the workers' namespace: the app's connect is refused at once, and the
log says which settings to change (tunio.ports)."""

from __future__ import annotations

import contextlib
import errno
import socket

from lab.netlab import PEER_PORTS, SERVER_ADDRESS, Lab, LineReader

# Four ports for the workers' connections: connect() may use all or only the even ones
# (kernels keep odd ones for bind()), so at most four flows get one.
PORT_RANGE = (40000, 40003)
APP_PORT = 50000  # the app binds its own ports from here, outside that range


def test_used_up_local_ports_refuse_and_name_the_knobs(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    lab = fresh_lab
    del fresh_servers
    # tunio-run and its workers run in the app namespace (the lab routes their egress out of
    # the TUN); the range applies to them there
    low, high = PORT_RANGE
    lab.run(lab.app, ["sh", "-c", f"echo '{low} {high}' > /proc/sys/net/ipv4/ip_local_port_range"])
    tunio = lab.start_tunio(["--workers", "1"])
    try:
        with contextlib.ExitStack() as stack:
            held: list[socket.socket] = []
            refused = None
            for port in range(APP_PORT, APP_PORT + PORT_RANGE[1] - PORT_RANGE[0] + 2):
                sock = stack.enter_context(lab.open_socket())
                sock.bind(("", port))
                sock.settimeout(10.0)
                try:
                    sock.connect((SERVER_ADDRESS, PEER_PORTS["echo"]))
                except ConnectionRefusedError as exc:
                    refused = exc
                    break
                sock.sendall(b"hold")
                assert sock.recv(4) == b"hold"
                held.append(sock)
            assert refused is not None, f"{len(held)} flows and no port ran out"
            assert refused.errno == errno.ECONNREFUSED
            assert 1 <= len(held) <= 4
            line = tunio.log.wait_for(r"no local port free", 10.0)
            assert f"ip_local_port_range {low}-{high} (4 ports)" in line
            assert "tcp_tw_reuse" in line
            for sock in held:  # the flows that got a port still carry bytes
                sock.sendall(b"still")
                assert sock.recv(5) == b"still"
    finally:
        assert tunio.stop() == 0
