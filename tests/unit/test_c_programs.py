"""C checks that need the stack's clock in their hands: each program in tests/unit/c is built
from the C sources it names with gcc and run; its first comment says what it checks, and it
exits 0 when every check holds, naming each failure on stderr."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = {
    # The NAT table's expiry when a reader's clock is a little ahead of the loop's.
    "nat_clock": ["csrc/nat.c", "csrc/packet.c", "csrc/checksum.c", "csrc/log.c"],
    # A warning a peer can cause at will: one line a period, every event counted.
    "log_repeat": ["csrc/log.c"],
}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_c_program(tmp_path: Path, program: str) -> None:
    exe = tmp_path / program
    subprocess.run(
        ["gcc", "-std=c11", "-D_GNU_SOURCE", "-O1", "-Wall", "-Wextra", "-Werror",
         "-o", str(exe), f"tests/unit/c/{program}.c", *PROGRAMS[program], "-lpthread"],
        cwd=ROOT, check=True, timeout=120,
    )  # fmt: skip
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
