"""Where every benchmark puts its results: `<out>/<name>-<stamp>.json` (figures, arguments,
duration) and `.txt` (the table as printed). Returns the path stem for further files."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def write_report(args: argparse.Namespace, name: str, started: float, text: str,
                 **fields: Any) -> Path:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = {
        "started": started,
        "seconds": time.time() - started,
        "args": {k: str(v) for k, v in vars(args).items()},
        **fields,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".txt").write_text(text + "\n")
    return stem
