"""Logging set-up shared by the supervisor, the stack and the workers."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(processName)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")


class _ProcessNameFilter(logging.Filter):
    """Name records after the `multiprocess` process that made them.

    logging fills `processName` from the standard `multiprocessing` module, which in a child
    started by `multiprocess` still says "MainProcess" (the name it inherited at fork).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        mp = sys.modules.get("multiprocess")
        if mp is not None:
            record.processName = mp.current_process().name
        return True


def level_number(level: str) -> int:
    """The logging level for one of LEVELS; ValueError for anything else."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    return int(getattr(logging, level.upper()))


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every record at `level` or above to `stream` (stderr) in the common format.

    Replaces the root logger's handlers, so calling it again (in a child process, or with
    another level) never prints a line twice.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_ProcessNameFilter())
    root.addHandler(handler)
    root.setLevel(level_number(level))
