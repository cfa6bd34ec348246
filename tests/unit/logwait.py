"""Waiting for a line of the stack's log, for the tests of what it says and how often."""

from __future__ import annotations

import time

import pytest


def wait_for_line(capfd: pytest.CaptureFixture[str], seen: list[str], needle: str,
                  deadline: float) -> str:
    """The first log line holding `needle`, read as the stack writes it; every line read is kept
    in `seen`. The stack writes a period's line from its 250 ms tick: `deadline` bounds it."""
    end = time.monotonic() + deadline
    while True:
        seen.extend(capfd.readouterr().err.splitlines())
        found = [line for line in seen if needle in line]
        if found:
            return found[0]
        assert time.monotonic() < end, f"no line with {needle!r} in {seen[-5:]}"
        time.sleep(0.1)  # the line comes from the stack's tick; the deadline bounds the wait
