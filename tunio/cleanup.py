"""tunio-run --cleanup: take back what a run that could not (it was killed) left on the host.

A run notes every change it makes in the journal of its runtime directory (tunio.netplan); a
clean exit takes them all back and removes the journal. After a kill -9, the rules and routes
of the bypass, the routes that keep networks out, a device something made persistent, the
runtime directory (its socket, its keys) and the lock file stay. This reads the journal and
takes back each change in reverse order, then removes the rest, and says what it removed. It
refuses while a run still holds the device.
"""

from __future__ import annotations

import errno
from pathlib import Path

from tunio import tundev
from tunio.devicelock import DeviceLock
from tunio.errors import TunError, TunioError
from tunio.keys import key_files
from tunio.netplan import Journal
from tunio.runtime import SOCKET_NAME, RuntimeDir

#: errnos of an undo whose object is already gone (it went with the device, or by hand)
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}


def cleanup(
    tun: str, runtime_dir: Path, lock_dir: Path, sys_net: str = tundev.SYS_NET
) -> list[str]:
    """Removes what a run on `tun` left; one line for each thing removed. TunioError if a run
    holds the device or the runtime directory now."""
    lock = DeviceLock(lock_dir, tun)
    lock.acquire()  # raises, naming the pid, while a run is alive
    removed: list[str] = []
    try:
        if runtime_dir.exists():
            left = [p for p in (runtime_dir / SOCKET_NAME, *key_files(runtime_dir / "keys"))
                    if p.exists()]  # fmt: skip
            rundir = RuntimeDir(runtime_dir, tun)
            rundir.acquire()  # a run of another device may use this directory
            try:
                removed += _undo_journal(Journal(runtime_dir), tun, sys_net)
                for path in left:
                    path.unlink(missing_ok=True)  # (acquire() took a stale socket already)
                    removed.append(str(path))
            finally:
                rundir.release()
            if not runtime_dir.exists():
                removed.append(f"runtime directory {runtime_dir}")
    finally:
        stale = lock.path.exists()
        lock.release()
        if stale and removed:
            removed.append(f"lock file {lock.path}")
    return removed


def _undo_journal(journal: Journal, tun: str, sys_net: str) -> list[str]:
    removed = []
    for change in reversed(journal.read()):
        if not change.undo:
            continue  # it went with the device
        if change.undo[:2] == ("link", "del") and not tundev.link_exists(tun, sys_net):
            continue  # the device went with its last queue
        try:
            tundev.run(*change.undo)
        except TunError as exc:
            text = exc.strerror or ""
            if exc.errno in _GONE or "No such" in text or "Cannot find device" in text:
                continue  # already gone
            raise TunioError(f"could not take back {change.what}: {exc.strerror}") from exc
        removed.append(change.what)
    journal.remove()
    return removed

