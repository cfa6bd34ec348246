"""One tunio-run per TUN device and network namespace, whatever its runtime directory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunio.devicelock import DeviceLock, lock_path
from tunio.errors import TunioError


def test_a_second_run_on_the_same_device_is_refused_naming_the_first(tmp_path: Path) -> None:
    first = DeviceLock(tmp_path, "tun0")
    first.acquire()
    second = DeviceLock(tmp_path, "tun0")
    with pytest.raises(TunioError, match=rf"another tunio-run \(pid {os.getpid()}\) already runs"):
        second.acquire()
    assert second.fileno() is None
    first.release()
    assert not first.path.exists()
    second.acquire()  # free again once the first let go
    second.release()


def test_another_device_or_namespace_is_free(tmp_path: Path) -> None:
    other_ns = tmp_path / "other-netns"  # any file: its inode stands for another namespace
    other_ns.touch()
    locks = [
        DeviceLock(tmp_path, "tun0"),
        DeviceLock(tmp_path, "tun1"),
        DeviceLock(tmp_path, "tun0", netns=str(other_ns)),
    ]
    for lock in locks:
        lock.acquire()
    assert len({lock.path for lock in locks}) == 3
    assert lock_path(tmp_path, "tun0") == locks[0].path
    assert f"net{os.stat('/proc/self/ns/net').st_ino}-tun0" in locks[0].path.name
    for lock in locks:
        lock.release()


def test_the_lock_of_a_dead_run_is_taken_over_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a run that took the lock and was killed: its file stays, its flock went with it
    holder = subprocess.run(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from tunio.devicelock import DeviceLock; "
         "DeviceLock(Path(sys.argv[1]), 'tun0').acquire(); print(__import__('os').getpid())",
         str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    dead = int(holder.stdout)
    lock = DeviceLock(tmp_path, "tun0")
    assert lock.path.read_text() == f"{dead}\n"
    with caplog.at_level(logging.WARNING, logger="tunio.devicelock"):
        lock.acquire()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"taking over the lock of TUN device tun0 from a run that is gone (pid {dead}): "
        f"{lock.path}"
    ]
    assert lock.path.read_text() == f"{os.getpid()}\n"
    lock.release()


def test_a_forked_child_that_closes_the_lock_does_not_hold_it(tmp_path: Path) -> None:
    """What the supervisor's children do (tunio.process.reset_child closes the lock's fd): the
    lock then ends with its holder, not with the last child."""
    lock = DeviceLock(tmp_path, "tun0")
    lock.acquire()
    fd = lock.fileno()
    assert fd is not None
    go_r, go_w = os.pipe()  # parent -> child: exit now
    done_r, done_w = os.pipe()  # child -> parent: the lock's fd is closed
    pid = os.fork()
    if pid == 0:  # the child: close the lock as reset_child does, then wait to be told to exit
        os.close(fd)
        os.write(done_w, b"x")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(done_r, 1) == b"x"
        # the holder goes (its descriptor closes) while the child lives on
        os.close(fd)
        lock._fd = None
        again = DeviceLock(tmp_path, "tun0")
        again.acquire()
        again.release()
    finally:
        os.write(go_w, b"x")
        os.waitpid(pid, 0)
        for end in (go_r, go_w, done_r, done_w):
            os.close(end)
