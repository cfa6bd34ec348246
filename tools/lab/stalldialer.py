"""A dialer for the invisible-retry test: in worker-0 the first dial never answers; every other
dial goes straight to the destination over the lab's marked way out.

    tunio-run ... --dialer lab.stalldialer:from_env    (with tools/ on PYTHONPATH)

STALL_MARKER names a file that must not exist yet: the dial that stalls creates it (with its
pid) and says ``stall-dialer: holding <dst> in pid <pid>`` on stderr, so the test knows when a
connect is held by worker-0 and whom to kill. The worker that replaces worker-0 finds the file
and dials normally.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

from tunio.dialers import Address, DirectDialer, FunctionDialer

STALLING_WORKER = "tunio-worker-0"


def _process_name() -> str:
    mp = sys.modules.get("multiprocess")
    return str(mp.current_process().name) if mp is not None else ""


def from_env() -> FunctionDialer:
    """The factory `--dialer lab.stalldialer:from_env` names (STALL_MARKER, STALL_MARK)."""
    marker = Path(os.environ["STALL_MARKER"])
    mark = os.environ.get("STALL_MARK")
    direct = DirectDialer(mark=int(mark, 0) if mark else None)

    async def dial(dst: Address, src: Address) -> socket.socket:
        if _process_name() == STALLING_WORKER:
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                print(f"stall-dialer: holding {dst} in pid {os.getpid()}", file=sys.stderr,
                      flush=True)
                await asyncio.Event().wait()  # never answers: the worker's timeout ends it
        return await direct.dial(dst, src)

    return FunctionDialer(dial)
