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


def default_path(tun: str) -> Path:
    """/run/tunio/<tun> for root; $XDG_RUNTIME_DIR/tunio/<tun> (or a per-user temp dir) else."""
    if os.geteuid() == 0:
        return Path("/run/tunio") / tun
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "tunio" / tun
    return Path(tempfile.gettempdir()) / f"tunio-{os.geteuid()}" / tun


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
