"""The stack names its threads (tunio-loop, tunio-rd<queue>) for top -H and per-thread profiles,
and gives the calling thread its own name back when run() returns."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path

from tunio.stack import Stack, StackConfig
from tunio.testing.stackrig import DEADLINE, stack_rig


def thread_names() -> dict[int, str]:
    names = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            names[int(task.name)] = (task / "comm").read_text().strip()
        except OSError:
            continue  # ended meanwhile
    return names


def wait_for_names(*wanted: str) -> dict[int, str]:
    end = time.monotonic() + DEADLINE
    while not set(wanted) <= set((names := thread_names()).values()):
        assert time.monotonic() < end, f"threads are {sorted(names.values())}"
        time.sleep(0.005)  # the stack names its threads as they start; the deadline bounds it
    return names


def test_loop_and_reader_threads_are_named(tmp_path: Path) -> None:
    before = set(thread_names())
    with stack_rig(tmp_path):
        names = wait_for_names("tunio-loop", "tunio-rd0")
        ours = {tid: name for tid, name in names.items() if tid not in before}
        assert sorted(n for n in ours.values() if n.startswith("tunio-")) == [
            "tunio-loop", "tunio-rd0"]  # fmt: skip
    assert "tunio-loop" not in thread_names().values()  # the rig's thread has ended


def test_caller_gets_its_name_back(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stack = Stack(StackConfig(
        tun_fds=(theirs.fileno(),), addresses=(ipaddress.IPv4Interface("127.0.0.1/8"),),
        endpoint=f"ipc://{tmp_path}/stack.sock", log_level="warning"))  # fmt: skip
    names: list[str] = []

    def caller() -> None:
        comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        comm.write_text("caller-thread")
        stack.run()
        names.append(comm.read_text().strip())

    thread = threading.Thread(target=caller)
    try:
        thread.start()
        wait_for_names("tunio-loop")
    finally:
        stack.stop()
        thread.join(DEADLINE)
        stack.close()
        ours.close()
        theirs.close()
    assert names == ["caller-thread"]
