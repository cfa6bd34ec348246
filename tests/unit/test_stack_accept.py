"""A released SYN whose handshake the kernel completes late: the stack must accept it.

Under load the TUN drops segments (its transmit queue overflows while the readers wait for a
CPU), and a released SYN's handshake can take its SYN-ACK retransmits to complete: 12 to 31 s
after the release was seen in soak runs. The stack gave it 10 s, then dropped the flow, and the
accept that followed found none and reset a connection the app had already seen established.
The rig's listener is a real kernel socket on 127.0.0.1: a socket bound to the flow's NAT slot
(F:p, an address at the top of 127/8) completes the handshake directly, as the app's late
segments would through the TUN."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tunio import wire
from tunio.testing.stackrig import WINDOW, stack_rig

LATE = 11.0  # seconds after the release: past the old 10 s, well inside the kernel's retries


def test_a_handshake_completed_late_is_accepted_not_reset(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40090, 91)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, WINDOW)
        syn = rig.read()  # the released SYN, F:p -> A:L
        time.sleep(LATE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as app:
            # another test's connection from this slot may linger in TIME_WAIT: a new listener
            # port makes a new 4-tuple, but bind() needs SO_REUSEADDR to share the address
            app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            app.bind((syn.src, syn.sport))
            app.settimeout(10)
            app.connect(("127.0.0.1", rig.stack.listen_port))
            app.sendall(b"late but fine")
            data = rig.recv()
            assert (data.cmd, data.flow) == (wire.Cmd.DATA, msg.flow), data
            assert data.payload == b"late but fine"
        assert rig.stack.stats()["flows_reset"] == 0
