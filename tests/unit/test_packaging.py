"""`pip install .` builds the C stack into the wheel, and the wheel says what it is."""

from __future__ import annotations

import configparser
import email.parser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    [built] = out.glob("tunio-*.whl")
    return built


def test_the_wheel_carries_the_built_stack_and_every_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("tunio/_stack") and n.endswith(".so") for n in names), names
    for module in ("tunio/config.py", "tunio/dialers/socks5.py", "tunio/testing/stackrig.py",
                   "tunio/py.typed"):  # fmt: skip
        assert module in names
    assert not any(n.startswith(("tests/", "tools/")) for n in names)


def test_the_wheel_metadata_is_complete(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        [meta_name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
        [ep_name] = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(ep_name).decode())
    assert meta["Name"] == "tunio"
    assert meta["Version"]
    assert meta["Summary"]
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Author"]
    assert "tun2socks" in meta["Keywords"]
    assert "Operating System :: POSIX :: Linux" in meta.get_all("Classifier", [])
    requires = " ".join(meta.get_all("Requires-Dist", []))
    for dependency in ("cffi", "pyzmq", "multiprocess"):
        assert dependency in requires
    assert str(meta.get_payload()).startswith("# tunio")  # the README is the description
    assert dict(entry_points["console_scripts"]) == {
        "tunio-run": "tunio.cli:main",
        "tunio-worker": "tunio.cli:worker_main",
    }


def test_the_service_unit_is_notify_and_reloads_with_sighup() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(REPO / "examples" / "tunio.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"].endswith("kill -HUP $MAINPID")
    assert "tunio-run --config /etc/tunio/tunio.toml" in service["ExecStart"]
    assert service["ExecStopPost"].endswith("--cleanup")
    assert unit["Install"]["WantedBy"] == "multi-user.target"
