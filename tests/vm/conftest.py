"""Fixtures of the end-to-end tests: a lab, its servers, and tunio-run forwarding in it.

Tests that leave tunio-run as they found it share one lab per module (`lab`, `servers`,
`tunio`); tests that kill or stop it get their own (`fresh_lab`, `fresh_servers`).
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from lab.netlab import (
    BLACKHOLE_ADDRESS,
    BLACKHOLE_ADDRESS6,
    FLOOD_PORTS,
    PEER_PORTS,
    SERVER_ADDRESS,
    SERVER_ADDRESS6,
    UNREACHABLE_ADDRESS,
    UNREACHABLE_ADDRESS6,
    Lab,
    LineReader,
    TunioProcess,
)

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / "tools" / "lab" / "peers.py"
FLOOD = REPO / "tools" / "flood.py"

TEST_TIME_LIMIT = 240  # seconds: no single test may take longer, whatever hangs
CONNECT_TIMEOUT = 2.0  # tunio-run --connect-timeout in the shared lab (the dial-timeout test)


class TestTimeLimitError(Exception):
    """A test ran past TEST_TIME_LIMIT."""


@dataclass(frozen=True)
class Family:
    """One IP version of the lab: the addresses a test needs and the socket family."""

    name: str
    af: socket.AddressFamily
    server: str  # where the test servers listen (on the srv namespace's lo)
    blackhole: str  # dropped silently in the srv namespace: a dial times out
    unreachable: str  # unreachable for the workers: EHOSTUNREACH


IPV4 = Family("ipv4", socket.AF_INET, SERVER_ADDRESS, BLACKHOLE_ADDRESS, UNREACHABLE_ADDRESS)
IPV6 = Family("ipv6", socket.AF_INET6, SERVER_ADDRESS6, BLACKHOLE_ADDRESS6, UNREACHABLE_ADDRESS6)
FAMILIES = (IPV4, IPV6)


@pytest.fixture(params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request: pytest.FixtureRequest) -> Family:
    """Runs a test once over IPv4 and once over IPv6."""
    fam: Family = request.param
    return fam


@pytest.fixture(autouse=True)
def _time_limit(request: pytest.FixtureRequest) -> Iterator[None]:
    """Interrupt a test that hangs; its fixtures still tear the lab down. A test marked
    `time_limit(seconds)` gets that bound instead of TEST_TIME_LIMIT."""
    marker = request.node.get_closest_marker("time_limit")
    limit = int(marker.args[0]) if marker else TEST_TIME_LIMIT

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise TestTimeLimitError(f"test ran longer than {limit} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def start_servers(lab: Lab) -> dict[str, LineReader]:
    """Every peers.py mode on its port in the srv namespace, for both families at once: each
    listens on [::] with IPV6_V6ONLY off, so it serves SERVER_ADDRESS and SERVER_ADDRESS6 (TCP
    answers from the address it was reached at, whatever the listener is bound to)."""
    return {
        mode: lab.serve([sys.executable, str(PEERS), mode, "--listen", f"[::]:{port}"])
        for mode, port in PEER_PORTS.items()
    }


def start_flood_server(lab: Lab, mode: str, host: str = SERVER_ADDRESS) -> LineReader:
    port = FLOOD_PORTS[mode]
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return lab.serve([sys.executable, str(FLOOD), "--serve", endpoint, "--mode", mode])


def _close_lab(lab: Lab) -> None:
    lab.close()
    assert not lab.strays, f"processes of the lab outlived their parents: {lab.strays}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab
    _close_lab(the_lab)


@pytest.fixture(scope="module")
def servers(lab: Lab) -> dict[str, LineReader]:
    return start_servers(lab)


@pytest.fixture(scope="module")
def flood_echo(lab: Lab) -> LineReader:
    """The flood echo server on SERVER_ADDRESS and on SERVER_ADDRESS6 (the IPv4 one's log)."""
    start_flood_server(lab, "echo", SERVER_ADDRESS6)
    return start_flood_server(lab, "echo")


@pytest.fixture(scope="module")
def tunio(lab: Lab, servers: dict[str, LineReader]) -> Iterator[TunioProcess]:
    """tunio-run forwarding the lab's app namespace; must still exit 0 at the end."""
    del servers  # started first so that a failing server shows up as itself
    proc = lab.start_tunio(["--connect-timeout", str(CONNECT_TIMEOUT)])
    yield proc
    code = proc.stop()
    assert code == 0, f"tunio-run exited {code}; log:\n{proc.log.text}"


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab
    _close_lab(the_lab)


@pytest.fixture
def fresh_servers(fresh_lab: Lab) -> dict[str, LineReader]:
    return start_servers(fresh_lab)
