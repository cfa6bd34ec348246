"""The README's first command, `sudo make demo`, is tools/demo.py: it must carry its traffic
byte for byte, say so, exit 0, and leave no namespace of its lab behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lab.netlab import lab_namespaces

DEMO = Path(__file__).resolve().parents[2] / "tools" / "demo.py"


def test_the_demo_carries_its_traffic_and_cleans_up() -> None:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--connections", "40", "--bulk-mib", "8"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.rstrip().endswith("demo: OK"), out
    made = re.search(r"^lab \w+: namespaces (\S+) and (\S+)$", out, re.M)
    assert made, out
    # every connection ok, none failed
    assert re.search(r"^40 x echo 64 KiB\s+40\s+0\s", out, re.M), out
    assert re.search(r"^1 x sink 8 MiB\s+1\s+0\s", out, re.M), out
    assert not set(made.groups()) & set(lab_namespaces()), lab_namespaces()
