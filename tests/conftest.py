"""Test-suite wide rules: what makes a test a `vm` test, when those are skipped, leak checks."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import netlab, programs

VM_DIR = Path(__file__).resolve().parent / "vm"


def vm_unavailable_reason() -> str | None:
    """Why privileged end-to-end tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "vm tests need root (network namespaces, a TUN device): run `sudo make test`"
    if not os.path.exists("/dev/net/tun"):
        return "vm tests need /dev/net/tun (load the `tun` module)"
    if shutil.which("ip") is None:
        return "vm tests need `ip` from iproute2 on PATH"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = vm_unavailable_reason()
    # CI must run them: a skipped privileged suite would pass without testing the forwarder.
    required = os.environ.get("CI") == "true"
    for item in items:
        if not item.path.resolve().is_relative_to(VM_DIR):
            continue
        item.add_marker(pytest.mark.vm)
        if reason is None:
            continue
        if required:
            raise pytest.UsageError(f"CI=true but {reason}")
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `needs(...)` whose program is missing: skipped with the package to install,
    but failed under CI, where `make setup` has installed every listed package."""
    for mark in item.iter_markers("needs"):
        why = programs.missing(*mark.args)
        if why is None:
            continue
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="session", autouse=True)
def _no_lab_leftovers() -> Iterator[None]:
    """At the end of the session: no namespace and no process of any lab we made is left."""
    yield
    if vm_unavailable_reason() is not None:
        return
    ours = netlab.created_lab_ids()
    names = netlab.lab_namespaces()
    mine = [n for n in names if n.rsplit("-", 1)[-1] in ours]
    others = sorted(set(names) - set(mine))
    if others:
        warnings.warn(f"lab namespaces not made by this run exist: {others}", stacklevel=1)
    procs = netlab.leftover_processes(ours)
    assert not mine, f"lab namespaces left behind: {mine}"
    assert not procs, f"lab processes left behind: {procs}"
