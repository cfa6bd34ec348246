"""Run code and create sockets inside a named network namespace.

Python 3.11 has no ``os.setns``, so ``setns(2)`` is called through ctypes. A network namespace is
a per-thread attribute: each call here runs in a short-lived thread that enters the namespace,
does its work and ends, so the calling thread never changes namespace. A socket keeps the
namespace it was created in for its whole life, which is what lets a test create a socket "in the
app namespace" and then use it from the test thread as the app would.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["CLONE_NEWNET", "netns_path", "netns_socket", "run_in_netns", "setns"]

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add` bind-mounts named namespaces

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def netns_path(ns: str) -> str:
    """The file that names namespace `ns`: an absolute path is taken as it is."""
    if os.path.isabs(ns):
        return ns
    if not ns or "/" in ns or ns in {".", ".."}:
        msg = f"not a namespace name: {ns!r}"
        raise ValueError(msg)
    return os.path.join(NETNS_RUN_DIR, ns)


def setns(ns: str) -> None:
    """Move the *calling thread* into network namespace `ns` (use in a thread you own)."""
    path = netns_path(ns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call `fn()` in a fresh thread inside namespace `ns`; return its result or raise its error.

    The thread ends when `fn` returns, and the namespace it entered goes with it.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns(ns)
            result.append(fn())
        except BaseException as exc:  # handed to the caller, re-raised there
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns:{ns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netns_socket(
    ns: str,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A new socket that lives in namespace `ns` (its routes, addresses and devices)."""
    return run_in_netns(ns, lambda: socket.socket(family, type, proto))
