"""Housekeeping of tunio's processes: descriptor limit, heap, name, and a forked child's clean
start. Used by the supervisor, by its children, and by tunio-worker on its own."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
from collections.abc import Callable, Iterable

PR_SET_PDEATHSIG = 1  # prctl(2)
PR_SET_NAME = 15


def raise_fd_limit() -> None:
    """Each flow holds a descriptor in the stack and one in a worker: take the hard limit, so a
    default soft limit of 1,024 does not cap the flows far below what the host allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# mallopt(3) parameters (glibc)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_FREED = 32 * 1024 * 1024  # freed heap kept for reuse, per process
LARGE_BLOCK = 4 * 1024 * 1024  # below this, blocks come from the heap, not from mmap


def keep_freed_memory() -> bool:
    """Keep freed heap for reuse instead of giving it back to the kernel at once.

    The data path allocates a block per message of up to half a window (the stack's reads of
    the app, the workers' ZeroMQ receives). With glibc's defaults such blocks are mapped fresh
    and unmapped again, and every 4 KiB page of them costs a page fault and a clearing: about a
    sixth of a page per byte forwarded. Also one_arena(), so that what is kept can be given
    back. Returns False where mallopt is missing (not glibc)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return (
        bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
        and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED))
        and one_arena()
    )


def one_arena() -> bool:
    """Every thread allocates from the main arena (M_ARENA_MAX 1), so give_back_freed_memory()
    can give all of the free heap back: malloc_trim releases the free top of the main arena
    only, and a thread's own arena (the stack's loop thread, ZeroMQ's I/O threads) kept its top,
    up to the trim threshold, for good. Measured with 100 stalled uploads: after the idle trim
    the stack came back to 26 MB (its idle RSS) instead of 36, the workers to 27 MB instead of
    37-40; throughput and peak RSS the same. Call it before the threads start: a thread arena
    that exists (one a fork inherits among them) stays in use. False where mallopt is missing."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def give_back_freed_memory() -> bool:
    """Hands the freed heap of every arena back to the system (glibc's malloc_trim(0)): what
    keep_freed_memory() keeps, and what free() can never unmap because it lies below the top of
    its arena. Returns False where malloc_trim is missing (not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(0)
    return True


class IdleTrim:
    """Gives the freed heap back once a process has had no flows for `after` seconds, and not
    again until flows have come and gone: `tick(now, flows)` from a periodic timer. Sans I/O but
    for the `trim` it calls (give_back_freed_memory by default)."""

    def __init__(self, after: float, now: float, trim: Callable[[], bool] | None = None) -> None:
        self.after = after
        self.trims = 0
        self._trim = trim or give_back_freed_memory
        self._idle_since = now
        self._trimmed = False

    def tick(self, now: float, flows: int) -> bool:
        """True if the heap was trimmed now."""
        if flows:
            self._idle_since = now
            self._trimmed = False
            return False
        if self._trimmed or now - self._idle_since < self.after:
            return False
        self._trimmed = True
        if not self._trim():
            return False
        self.trims += 1
        return True


def set_process_name(name: str) -> None:
    """Names the process in `ps`, `top` and /proc/PID/comm, so operators (and tests) can tell the
    stack from the workers: forked children otherwise all show tunio-run's command line."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def die_with_parent(parent: int) -> None:
    """In a forked child: get SIGTERM when the parent dies, so nothing outlives tunio-run (the
    stack then resets its flows, a worker says BYE). A parent that died before the request was
    made cannot signal any more: exit at once if it is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # not Linux: nothing more to do
    if os.getppid() != parent:
        os._exit(1)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a stack or a worker: SIGTERM, and SIGINT unless it is ignored (a
    supervisor's child ignores it, see reset_child; a shell's background job too)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


def reset_child(close_fds: Iterable[int], name: str, parent: int | None = None) -> None:
    """In a forked child: die with `parent`, drop the supervisor's signal handlers and the fds it
    has no use for (its locks among them: they must go when tunio-run goes)."""
    if parent is not None:
        die_with_parent(parent)
    set_process_name(name)
    keep_freed_memory()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # A terminal's Ctrl-C reaches the whole process group: a stop is the supervisor's business
    # as a reload is (it stops its children itself). A child that took SIGINT would end on its
    # own, and a supervisor run in a thread of a program that carries on after its
    # KeyboardInterrupt would restart the stack, resetting every flow.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's business
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
