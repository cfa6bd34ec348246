"""A lock file that names its holder: an flock on a file holding the holder's pid. The kernel
drops the lock when its holder dies, so a file left behind by a killed run is no lock at all;
its pid only says whose it was. Used for the device lock and the runtime directory's."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from tunio.errors import TunioError


def lock(path: Path, mode: int, busy: Callable[[int | None], str]) -> int:
    """`path` opened (made with `mode` if need be) and flocked; its descriptor. TunioError with
    `busy(pid of the holder)` if another process holds it; FileNotFoundError passes through."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise TunioError(busy(holder)) from exc
        raise TunioError(f"cannot lock {path}: {exc.strerror}") from exc
    return fd


def read_pid(fd: int) -> int | None:
    """The pid written in the lock file, if any."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def write_pid(fd: int) -> None:
    """Our pid, in place of whatever the file said."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
