"""Log lines for machines (JSON) and for floods (one line a second)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tunio import logs


def test_json_lines_carry_the_event_fields() -> None:
    stream = io.StringIO()
    logs.setup("debug", stream, fmt="json")
    try:
        logging.getLogger("tunio.test").warning("dial %s failed", "x", extra={"flow": 12,
                                                 "errno": "ECONNREFUSED"})  # fmt: skip
    finally:
        logs.setup("info")
    line = json.loads(stream.getvalue())
    assert line["level"] == "warning"
    assert line["message"] == "dial x failed"
    assert line["logger"] == "tunio.test"
    assert (line["flow"], line["errno"]) == (12, "ECONNREFUSED")
    assert line["time"].endswith("Z")
    assert isinstance(line["pid"], int)
    assert "process" in line


def test_a_bad_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json"):
        logs.setup("info", fmt="xml")


def test_a_flood_makes_one_line_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tunio.test.flood")
    limited = logs.EverySecond(logger, logging.INFO, "failed dials", interval=3600.0)
    with caplog.at_level(logging.INFO, logger="tunio.test.flood"):
        for i in range(1000):
            limited.log("ECONNREFUSED" if i % 2 else "ETIMEDOUT", "flow %d: dial failed", i)
        limited.flush()
        limited.flush()  # nothing held: nothing said
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [
        "flow 0: dial failed",
        "999 more failed dials in the last 3600 s (ECONNREFUSED 500, ETIMEDOUT 499)",
    ]
