"""The NAT table's expiry when a reader's clock is a little ahead of the loop's: built from the C
sources with gcc and run (tests/unit/c/nat_clock.c says what it checks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    "tests/unit/c/nat_clock.c",
    "csrc/nat.c",
    "csrc/packet.c",
    "csrc/checksum.c",
    "csrc/log.c",
]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_sweep_takes_a_reader_stamp_after_its_now_as_fresh(tmp_path: Path) -> None:
    exe = tmp_path / "nat_clock"
    subprocess.run(
        [
            "gcc",
            "-std=c11",
            "-D_GNU_SOURCE",
            "-O1",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(exe),
            *SOURCES,
            "-lpthread",
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
