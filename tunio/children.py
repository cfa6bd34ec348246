"""The entry points of the processes the supervisor forks: the stack and the local workers.

Each runs in a fresh child of tunio-run: it drops the supervisor's signal handlers and the
descriptors it has no use for, names itself, and reports on its status channel.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

from tunio.process import reset_child

if TYPE_CHECKING:
    from multiprocess.connection import Connection

    from tunio import defaults
    from tunio.dialers import Dialer
    from tunio.dialers.resolve import Resolver
    from tunio.keys import WorkerKeys
    from tunio.policy import Policy
    from tunio.stack import StackConfig


class StatusChannel:
    """What one child tells the supervisor ("stack-ready", "stack-error", "worker-ready"): a pipe
    of its own, so the supervisor knows who spoke and waits on it with the children's exits."""

    def __init__(self, ctx: Any) -> None:
        self.reader: Connection
        self._writer: Connection | None
        self.reader, self._writer = ctx.Pipe(duplex=False)

    def put(self, message: tuple[str, Any]) -> None:
        """In the child: send one message."""
        assert self._writer is not None, "put() after the parent closed its end"
        self._writer.send(message)

    def started(self) -> None:
        """In the parent, once the child runs: only the child writes, so a dead child reads as
        the end of the channel."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def received(self) -> list[tuple[str, Any]]:
        """In the parent: every message waiting now (none once the child is gone)."""
        out: list[tuple[str, Any]] = []
        with contextlib.suppress(EOFError, OSError):
            while self.reader.poll():
                out.append(self.reader.recv())
        return out

    def close(self) -> None:
        self.started()
        self.reader.close()


def stack_entry(
    config: StackConfig, status: Any, close_fds: tuple[int, ...], parent: int | None = None
) -> None:
    """Process target of the stack: tunio.stack.stack_main with a clean signal state."""
    reset_child(close_fds, "tunio-stack", parent)
    from tunio.stack import stack_main  # noqa: PLC0415 - the cffi extension loads where it runs

    stack_main(config, status)


def worker_entry(
    *,
    endpoint: str,
    dialer: Dialer,
    name: str,
    window: int,
    connect_timeout: float,
    status: Any,
    close_fds: tuple[int, ...],
    keys: WorkerKeys | None = None,
    parent: int | None = None,
    policy: Policy | None = None,
    egress: tuple[int | None, str | None, Resolver | None] = (None, None, None),
    keepalive: defaults.Keepalive | None = None,
) -> None:
    """Process target of a local worker: serve flows until the stack says BYE. `egress` is the
    run's way out, for DirectDialers the user's code made without one."""
    reset_child(close_fds, f"tunio-{name}", parent)
    from tunio.dialers.direct import use_run_egress  # noqa: PLC0415
    from tunio.worker import run_worker  # noqa: PLC0415 - only workers need zmq

    use_run_egress(*egress)
    code = run_worker(
        endpoint,
        dialer,
        name=name,
        window=window,
        connect_timeout=connect_timeout,
        ready=lambda: status.put(("worker-ready", name)),
        keys=keys,
        report=lambda snapshot: status.put(("stats", snapshot)),
        policy=policy,
        keepalive=keepalive,
    )
    sys.exit(code)
