"""The runtime directory of one tunio-run: its lock, its ipc socket, and its removal at exit."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from tunio import pidfile
from tunio.errors import ConfigError, TunioError

LOCK_NAME = "tunio.pid"
SOCKET_NAME = "stack.sock"


NETNS = "/proc/self/ns/net"
HOST_NETNS = "/proc/1/ns/net"
NAMED_NETNS = "/run/netns"  # where `ip netns add` pins the namespaces it names


def default_path(
    tun: str, netns: str = NETNS, host_netns: str = HOST_NETNS, named: str = NAMED_NETNS
) -> Path:
    """/run/tunio/<tun> for root; $XDG_RUNTIME_DIR/tunio/<tun> (or a per-user temp dir) else.

    A device is a name in a network namespace, and /run is the same in every namespace: a run
    in a namespace that `ip netns` named takes netns-<name>/<tun> under the same base, and one
    in another namespace not the host's (process 1's) net<inode>/<tun>, so `ip netns exec a
    tunio-run` and `ip netns exec b tunio-run` on tun0 each have a directory of their own.
    Where neither tells (process 1's namespace is not ours to look at), the path is the plain
    one."""
    if os.geteuid() == 0:
        base = Path("/run/tunio")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "tunio"
    else:
        base = Path(tempfile.gettempdir()) / f"tunio-{os.geteuid()}"
    own = _inode(netns)
    if own is None:
        return base / tun
    name = _named(own, named)
    if name is not None:
        return base / f"netns-{name}" / tun
    host = _inode(host_netns)
    if host is None or own == host:
        return base / tun
    return base / f"net{own}" / tun


def _inode(path: str) -> int | None:
    """The inode of a namespace file; None if it cannot be seen (another user's process)."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _named(inode: int, directory: str) -> str | None:
    """The name `ip netns` gave the namespace of `inode` (the first in order), if any."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if _inode(entry.path) == inode:
            return entry.name
    return None


class RuntimeDir:
    """A private (0700) directory holding the lock file and the stack's ipc socket.

    `acquire()` creates it (or adopts an existing one that we own), then takes an exclusive
    lock on the pid file, so a second tunio-run on the same TUN name fails at once.
    `release()` removes what `acquire()` created; it is safe to call at any point.
    """

    def __init__(self, path: Path, tun: str) -> None:
        self.path = path
        self.tun = tun
        self._created: list[Path] = []  # directories we made, deepest last
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def socket_path(self) -> Path:
        return self.path / SOCKET_NAME

    def fileno(self) -> int | None:
        """The lock's descriptor while held: forked children must close it."""
        return self._lock_fd

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    def acquire(self) -> None:
        self._make_dirs()
        self._check_private()
        self._lock()
        # A socket file left by a run that was killed: nobody else holds the lock, so it is stale.
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _make_dirs(self) -> None:
        missing: list[Path] = []
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                break
            missing.append(parent)
        for directory in reversed(missing):
            # Parents stay traversable (like /run/tunio); the leaf is private.
            mode = 0o700 if directory == self.path else 0o755
            try:
                directory.mkdir(mode=mode)
            except FileExistsError:
                continue
            except OSError as exc:
                raise TunioError(
                    f"cannot create runtime directory {directory}: {exc.strerror}"
                ) from exc
            self._created.append(directory)

    def _check_private(self) -> None:
        try:
            info = self.path.lstat()
        except OSError as exc:
            raise TunioError(f"runtime directory {self.path}: {exc.strerror}") from exc
        if not stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"runtime directory {self.path} is not a directory")
        if info.st_uid != os.geteuid():
            raise ConfigError(
                f"runtime directory {self.path} belongs to uid {info.st_uid}, not to us "
                f"(uid {os.geteuid()}): remove it or pass another --runtime-dir"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            # Never tighten a directory someone else relies on (think --runtime-dir /tmp).
            raise ConfigError(
                f"runtime directory {self.path} has mode {mode:04o}; it must be private (0700): "
                "pass a new --runtime-dir"
            )

    def _lock(self) -> None:
        def busy(holder: int | None) -> str:
            return (f"another tunio-run (pid {holder or '?'}) already runs on {self.tun} "
                    f"(lock {self.lock_path})")  # fmt: skip

        fd = pidfile.lock(self.lock_path, 0o600, busy)
        pidfile.write_pid(fd)
        self._lock_fd = fd

    def release(self) -> None:
        """Remove the socket file, the lock file and the directories we created."""
        if self._lock_fd is not None:
            # Only the holder of the lock may delete files: they belong to it.
            for path in (self.socket_path, self.lock_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
            if self.path not in self._created:
                # Left by an earlier run that was killed; ours now that we held its lock.
                with contextlib.suppress(OSError):
                    self.path.rmdir()
        while self._created:
            directory = self._created.pop()
            with contextlib.suppress(OSError):  # not empty: someone else put files there
                directory.rmdir()
