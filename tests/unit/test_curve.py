"""Workers over tcp:// with CURVE: only a worker holding the stack's worker key is let in, and
the key files are private."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.unit.logwait import wait_for_line
from tunio import keys, wire
from tunio.dialers import DirectDialer
from tunio.errors import ConfigError
from tunio.stack import Stack, StackConfig
from tunio.worker import Worker, run_worker
from tunio.worker.link import Timing


def _free_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# Workers reach a stack over IPv4 and over IPv6 (an IPv6 host goes in brackets).
@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                ids=["ipv4", "ipv6"])
def curve_stack(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Stack, str, keys.StackKeys]]:
    family, host = request.param
    k = keys.load_or_create(tmp_path / "keys")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    os.set_blocking(b.fileno(), False)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    endpoint = f"tcp://{shown}:{_free_port(family, host)}"
    stack = Stack(StackConfig(
        tun_fds=(b.fileno(),), addresses=(ipaddress.IPv4Interface("127.0.0.1/8"),),
        endpoint=endpoint, log_level="warning", heartbeat_interval=30.0,
        curve_secret=k.secret, curve_clients=(k.worker.public,),
    ))  # fmt: skip
    thread = threading.Thread(target=stack.run)
    thread.start()
    try:
        yield stack, endpoint, k
    finally:
        stack.stop()
        thread.join()
        stack.close()
        a.close()
        b.close()


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
            client: tuple[bytes, bytes] | None, server_public: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.ipv6 = True
    if client is not None:
        sock.curve_serverkey = server_public.encode()
        sock.curve_publickey, sock.curve_secretkey = client
    sock.connect(endpoint)
    sock.send_multipart(wire.encode(wire.Message(wire.Cmd.HELLO, payload=b"w")))
    return sock


def test_only_the_worker_key_gets_in(curve_stack: tuple[Stack, str, keys.StackKeys]) -> None:
    stack, endpoint, k = curve_stack
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        stranger = _dealer(ctx, endpoint, zmq.curve_keypair(), k.public)
        plain = _dealer(ctx, endpoint, None, k.public)
        good = _dealer(ctx, endpoint, (k.worker.public.encode(), k.worker.secret.encode()),
                       k.public)
        assert good.poll(5000), "the worker with the worker key got no answer"
        assert wire.decode(good.recv_multipart()).cmd is wire.Cmd.HELLO
        # The others' handshakes started first and were refused; nothing reached them.
        assert not stranger.poll(500)
        assert not plain.poll(10)
        assert stack.stats()["workers"] == 1
    finally:
        ctx.destroy(linger=0)


def test_refused_keys_cost_the_log_a_line_a_period(
    curve_stack: tuple[Stack, str, keys.StackKeys], capfd: pytest.CaptureFixture[str]
) -> None:
    """Five refused handshakes (whoever reaches the endpoint can offer a key each time it
    connects): the first is logged at once, the other four in one line when the period ends."""
    stack, endpoint, k = curve_stack
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for _ in range(5):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.ipv6 = True
            sock.curve_serverkey = k.public.encode()
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.connect(endpoint)
            assert monitor.poll(5000), "the stale key was not refused"
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
        seen: list[str] = []
        first = wait_for_line(capfd, seen, "refused a worker from", 5)
        assert first.endswith("its key is not a tunio worker key of this stack"), first
        period = wait_for_line(capfd, seen, "more workers", 15)
        assert "refused 4 more workers in the last 10 s, the last from " in period, period
        assert sum("refused" in line for line in seen) == 2
        assert stack.stats()["workers"] == 0
    finally:
        ctx.destroy(linger=0)


def test_tunio_worker_serves_a_curve_stack(curve_stack: tuple[Stack, str, keys.StackKeys]) -> None:
    stack, endpoint, k = curve_stack
    ready = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_worker(
        endpoint, DirectDialer(), name="remote", ready=ready.set, keys=k.worker)))
    thread.start()
    try:
        assert ready.wait(10), "the worker was not let in"
        assert stack.stats()["workers"] == 1
    finally:
        stack.stop()  # the stack says BYE: the worker returns
        thread.join(10)
    assert result == [0]


def test_a_worker_whose_key_is_refused_says_so_and_exits_1(
    curve_stack: tuple[Stack, str, keys.StackKeys], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ZeroMQ never connects again after a refused key: the worker stops with the reason
    instead of waiting for good with "no stack answers"."""
    _, endpoint, k = curve_stack
    stale = keys.load_or_create(tmp_path / "other-keys").worker
    stale = dataclasses.replace(stale, stack_public=k.public)  # the right stack, a foreign key
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_worker(
        endpoint, DirectDialer(), name="stale", keys=stale)), daemon=True)  # a hang fails only this
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the refused worker went on waiting"
    assert result == [1]
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"the stack at {endpoint} refused this worker's key (ZAP status 400)" in m
               for m in said), said  # fmt: skip


def test_a_wrong_stack_key_is_named_in_the_unanswered_warning(
    curve_stack: tuple[Stack, str, keys.StackKeys], caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker holding another stack's public key: the stack cuts every handshake off without
    a word, and ZeroMQ tries again; the worker's warning says what to check."""
    stack, endpoint, k = curve_stack
    wrong = dataclasses.replace(k.worker, stack_public=zmq.curve_keypair()[0].decode())
    worker = Worker(endpoint, DirectDialer(), name="wrong-stack-key",
                    timing=Timing(heartbeat=0.05, liveness=2))  # fmt: skip
    worker.keys = wrong
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 10
        while not any("handshakes cut off by the other end" in r.getMessage()
                      for r in caplog.records):  # fmt: skip
            assert time.monotonic() < end, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)  # the worker's warning comes from its heartbeat timer
        assert stack.stats()["workers"] == 0
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_key_files_are_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    first = keys.load_or_create(path)
    worker_file = tmp_path / "keys.worker"
    for p in (path, worker_file):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert "stack-secret" not in worker_file.read_text()
    assert first.secret not in worker_file.read_text()
    assert keys.load_or_create(path) == first
    assert keys.load_worker(worker_file) == first.worker
    worker_file.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keys.load_worker(worker_file)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(range(128, 256)))
    garbage.chmod(0o600)
    for load in (keys.load_worker, keys.load_or_create):
        with pytest.raises(ConfigError, match="not a key file"):
            load(garbage)
    with pytest.raises(ConfigError, match="cannot create it"):
        keys.load_or_create(tmp_path / "no-such-dir" / "keys")
