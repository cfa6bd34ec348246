"""What a flow holds in the C stack, and when the stack gives freed memory back.

A DATA partly written to a slow app keeps all of its buffer: its credit goes back to the worker
only once the whole of it is written, so a stalled flow holds one window, not one window plus the
written part of the DATA at its head. After trim_idle without flows the freed heap goes back to
the system (malloc_trim), once until flows come and go again."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from pathlib import Path

from lab.netlab import recv_exact

from tunio import wire
from tunio.testing.stackrig import stack_rig

BIG = 8 * 1024 * 1024  # more than a loopback socket's send buffer and the app's receive buffer
IDLE = 0.2  # trim_idle of the rigs below, s


def test_credit_for_a_data_comes_back_once_all_of_it_is_written(tmp_path: Path) -> None:
    with stack_rig(tmp_path, window=BIG) as rig:
        msg = rig.open(40100, 92)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, BIG)
        syn = rig.read()  # the released SYN, F:p -> A:L: we complete it as the app
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as app:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # a small receive buffer: the stack's first write takes a part of the DATA only
            app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            app.bind((syn.src, syn.sport))
            app.settimeout(10)
            app.connect(("127.0.0.1", rig.stack.listen_port))
            payload = os.urandom(BIG)
            rig.send(wire.Cmd.DATA, msg.flow, 0, payload)  # the whole window in one DATA
            assert recv_exact(app, BIG) == payload
            credit = rig.recv()
            # Byte by byte, the first CREDIT would have come at a quarter of the window written,
            # while the rest of the DATA still held its buffer here.
            assert (credit.cmd, credit.flow, credit.arg) == (wire.Cmd.CREDIT, msg.flow, BIG)
        assert rig.stack.stats()["protocol_errors"] == 0


def test_an_app_that_resets_a_flow_without_credit_ends_it(tmp_path: Path) -> None:
    with stack_rig(tmp_path) as rig:
        msg = rig.open(40102, 94)
        rig.send(wire.Cmd.OPEN_OK, msg.flow, 0)  # no credit: nothing is read from the app
        syn = rig.read()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as app:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            app.bind((syn.src, syn.sport))
            app.settimeout(10)
            app.connect(("127.0.0.1", rig.stack.listen_port))
            app.sendall(b"waiting for credit")
            rig.wait_stat("flows_active", 1)
            app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The flow would have stayed until credit came, which a destination that takes nothing
        # never sends: the app's reset must end it (and the window its worker holds).
        reset = rig.recv()
        assert (reset.cmd, reset.flow, reset.arg) == (wire.Cmd.RST, msg.flow, errno.ECONNRESET)
        rig.wait_stat("flows_active", 0)


def test_freed_heap_goes_back_once_no_flow_has_run_for_a_while(tmp_path: Path) -> None:
    with stack_rig(tmp_path, trim_idle=IDLE) as rig:
        rig.wait_stat("memory_trims", 1)  # none since the start
        msg = rig.open(40101, 93)  # a held flow
        # A bounded wait for what must not happen: no trim while a flow is there, however long.
        time.sleep(4 * IDLE)
        assert rig.stack.stats()["memory_trims"] == 1
        rig.send(wire.Cmd.OPEN_FAIL, msg.flow, errno.ECONNREFUSED)
        rst = rig.read()  # the app's SYN refused: the flow is gone
        assert rst.flags & 0x04
        rig.wait_stat("memory_trims", 2)  # re-armed by the flow, once more after it
        time.sleep(4 * IDLE)
        assert rig.stack.stats()["memory_trims"] == 2  # once per idle spell
