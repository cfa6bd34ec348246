"""Fixtures shared by the unit tests: an ipc endpoint and the fake stack bound to it (the
worker's tests), and the supervisor's fake world (tests/unit/supervisorworld.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests.unit.supervisorworld import logwatch, stop_left_supervisors, world  # noqa: F401
from tunio.testing.fakestack import FakeStack


@pytest.fixture
def endpoint() -> Iterator[str]:
    # ipc paths are limited to ~107 bytes, so not under pytest's long tmp_path
    directory = tempfile.mkdtemp(prefix="tunio-w")
    yield f"ipc://{directory}/stack.sock"
    shutil.rmtree(directory)


@pytest.fixture
def stack(endpoint: str) -> Iterator[FakeStack]:
    fake = FakeStack(endpoint)
    yield fake
    fake.close()
