"""One tunio-run per TUN device: a lock named after the network namespace and the device.

A device is a name inside a network namespace, so the lock file is named after both: the inode
of the namespace (/proc/self/ns/net) and the device's name. It lives in one directory per host
(`default_directory()`), whatever runtime directory a run uses, so two runs with different
runtime directories can never share (and split the queues of) one device, while the same name
in another namespace, another device, is free. The lock is an flock: the kernel drops it when
its holder dies, so a lock file left by a run that was killed is taken over (with one log line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from tunio import pidfile
from tunio.errors import TunioError

log = logging.getLogger("tunio.devicelock")

NETNS = "/proc/self/ns/net"


def default_directory() -> Path:
    """/run/tunio/locks for root; $XDG_RUNTIME_DIR/tunio/locks (or a per-user temp dir) else."""
    if os.geteuid() == 0:
        return Path("/run/tunio/locks")
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "tunio" / "locks"
    return Path(tempfile.gettempdir()) / f"tunio-{os.geteuid()}" / "locks"


def lock_path(directory: Path, tun: str, netns: str = NETNS) -> Path:
    """The lock file of device `tun` in the network namespace `netns` refers to."""
    return directory / f"net{os.stat(netns).st_ino}-{tun}.lock"


class DeviceLock:
    """`acquire()` takes the device's lock or raises TunioError naming the holder's pid;
    `release()` removes the lock file (only the holder does) and is safe to call at any point."""

    def __init__(self, directory: Path, tun: str, netns: str = NETNS) -> None:
        self.tun = tun
        self.directory = directory
        self.path = lock_path(directory, tun, netns)
        self._fd: int | None = None

    def fileno(self) -> int | None:
        """The lock's descriptor while held: forked children must close it."""
        return self._fd

    def acquire(self) -> None:
        while True:
            fd = self._lock_file()
            # The holder unlinks the file before it lets go: a lock taken on a file that is no
            # longer at the path guards nothing, so try again with the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = pidfile.read_pid(fd)
        if previous is not None and previous != os.getpid():
            log.warning(
                "taking over the lock of TUN device %s from a run that is gone (pid %d): %s",
                self.tun, previous, self.path,
            )  # fmt: skip
        pidfile.write_pid(fd)
        self._fd = fd

    def _lock_file(self) -> int:
        """The lock file, open and flocked; TunioError naming the holder if it is taken."""
        for _ in range(3):  # the directory may be removed under us by a cleanup once it is empty
            try:
                self.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
                return pidfile.lock(self.path, 0o644, self._busy)
            except FileNotFoundError:
                continue
            except OSError as exc:
                msg = f"cannot open the device lock {self.path}: {exc.strerror}"
                raise TunioError(msg) from exc
        raise TunioError(f"cannot open the device lock {self.path}: its directory vanished")

    def _busy(self, holder: int | None) -> str:
        return (f"another tunio-run (pid {holder or '?'}) already runs on TUN device {self.tun} "
                f"in this network namespace (lock {self.path})")  # fmt: skip

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before the unlock: a newcomer then makes a fresh file
        os.close(self._fd)
        self._fd = None

