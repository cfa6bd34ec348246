"""Logging set-up shared by the supervisor, the stack and the workers: text lines (the default),
or one JSON object a line (`--log-format json`) for log collectors.

A JSON line holds `time` (RFC 3339, UTC), `level`, `process` (tunio-run, tunio-stack,
tunio-worker-N), `logger`, `message`, and the record's event fields: whatever a call passes in
`extra=` (for example `event="dial_failed"`, `flow=12`, `errno="ECONNREFUSED"`). The C stack
writes its lines in the same two shapes (csrc/log.c), so every process of one run logs alike.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(processName)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

# The attributes every LogRecord has: anything else on a record came in `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
}  # fmt: skip


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


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, process, logger, message, and the event fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": record.processName,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                plain = isinstance(value, (int, float, bool, type(None)))
                line[key] = value if plain else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def level_number(level: str) -> int:
    """The logging level for one of LEVELS; ValueError for anything else."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(LEVELS)}")
    return int(getattr(logging, level.upper()))


def setup(level: str = "info", stream: TextIO | None = None, fmt: str = "text") -> None:
    """Send every record at `level` or above to `stream` (stderr), as text or JSON lines.

    Replaces the root logger's handlers, so calling it again (in a child process, or with
    another level) never prints a line twice.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}: use one of {', '.join(FORMATS)}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    handler.addFilter(_ProcessNameFilter())
    root.addHandler(handler)
    root.setLevel(level_number(level))


class EverySecond:
    """Lines of one kind at most once an interval, so that a flood makes one line a second, not
    one a flow. The first line of an interval is logged as it comes; the rest are logged at
    debug only and counted (by `kind`, e.g. an errno name), and `flush()` (called at least once
    an interval) says how many there were in one line."""

    def __init__(
        self, logger: logging.Logger, level: int, what: str, interval: float = 1.0
    ) -> None:
        self._logger = logger
        self._level = level
        self._what = what  # "failed dials"
        self._interval = interval
        self._next = 0.0
        self._held: dict[str, int] = {}

    def log(
        self, kind: str, msg: str, *args: object, exc_info: BaseException | None = None
    ) -> None:
        """`exc_info`: its traceback goes with the line that is logged at `level`, and with the
        debug lines only at debug (a flood of one fault is one traceback a second)."""
        now = time.monotonic()
        if now >= self._next:
            self.flush()
            self._next = now + self._interval
            self._logger.log(self._level, msg, *args, exc_info=exc_info)
            return
        self._held[kind] = self._held.get(kind, 0) + 1
        self._logger.debug(msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, {}
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(held.items()))
        self._logger.log(
            self._level, "%d more %s in the last %g s (%s)", sum(held.values()), self._what,
            self._interval, kinds,
        )  # fmt: skip
