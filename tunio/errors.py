"""Exceptions raised by tunio, and the one place where an errno becomes one of them.

Each exception names the layer that failed. `from_errno` (and `check`, for C's 0-or--errno
results) turns an errno into that layer's exception with what to do about it, from one table of
hints by operation: every boundary that meets an errno (the C stack, the TUN device) asks here.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from typing import TypeGuard

#: Linux's largest errno (MAX_ERRNO in the kernel): what a dialer or a policy answers beyond it,
#: or below 1, is no errno the app could be shown
MAX_ERRNO = 4095


def is_errno(code: object) -> TypeGuard[int]:
    """Whether `code` is an errno number (OSError takes anything as its errno: a name, -1)."""
    return isinstance(code, int) and not isinstance(code, bool) and 0 < code <= MAX_ERRNO


class TunioError(Exception):
    """Base class of every error tunio raises on purpose."""


class TunError(TunioError, OSError):
    """The TUN device could not be opened or configured (errno set)."""


class StackError(TunioError, OSError):
    """The C stack could not be created or failed while running (errno set)."""


class ConfigError(TunioError, ValueError):
    """A setting or specification given by the user is not acceptable."""


class DialError(TunioError, OSError):
    """A dialer could not reach the destination; errno is what the app will see."""


_CAP_NET_ADMIN = "needs CAP_NET_ADMIN: run as root or grant the capability"

#: What to do about an errno, by the operation that met it. `{name}`-style fields are filled in
#: from the facts the caller passes (a missing fact leaves the hint out rather than fail).
HINTS: Mapping[str, Mapping[int, str]] = {
    "tun": {
        errno.EPERM: _CAP_NET_ADMIN,
        errno.EACCES: _CAP_NET_ADMIN,
        errno.ENOENT: "no /dev/net/tun: load the tun module (modprobe tun)",
        errno.EINVAL: "an existing {name} must be a multi-queue TUN device that can take "
        "{queues} queue(s): delete it (ip link del {name}) or pick another --tun",
        errno.EBUSY: "another program holds the queues of the multi-queue TUN device {name}: "
        "stop it, or pick another --tun",
    },
    "stack": {
        errno.EADDRINUSE: "is another tunio-run using this endpoint or address?",
        # ZeroMQ's answer to a tcp:// host that is no address or interface of this host
        errno.ENODEV: "{endpoint}: its host is no address or interface of this host",
        errno.EADDRNOTAVAIL: "{addresses}: not an address of this host yet: is the TUN up?",
    },
}


def from_errno(
    cls: type[OSError], err: int, what: str, operation: str = "", **facts: object
) -> OSError:
    """`cls(err, "what: strerror (hint)")`, the hint from HINTS[operation] if there is one."""
    text = f"{what}: {os.strerror(err)}"
    hint = HINTS.get(operation, {}).get(err)
    if hint is not None:
        with contextlib.suppress(KeyError, IndexError):
            text += f" ({hint.format(**facts)})"
    return cls(err, text)


def check(rc: int, cls: type[OSError], what: str, operation: str = "", **facts: object) -> int:
    """C's convention: a count or 0 passes through; -errno raises from_errno(...)."""
    if rc < 0:
        raise from_errno(cls, -rc, what, operation, **facts)
    return rc


def describe(exc: BaseException) -> str:
    """An exception as one line, without the "[Errno N]" prefix."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())
