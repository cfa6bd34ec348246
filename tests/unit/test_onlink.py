"""A way out through an `onlink` gateway (one no prefix of the device covers: cloud hosts,
networkd's GatewayOnLink) is copied with the flag, for the bypass and for --exclude: without it
the kernel refuses the copy ("Nexthop has invalid gateway")."""

from __future__ import annotations

from typing import Any

import pytest

from tunio import bypass, netplan, tundev

MAIN = [
    {"dst": "default", "gateway": "198.19.0.2", "dev": "eth0", "flags": ["onlink"]},
    {"dst": "10.7.0.0/16", "gateway": "10.0.0.1", "dev": "eth1", "flags": []},
]


@pytest.fixture
def ip_json(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(*args: str) -> list[dict[str, Any]]:
        if args[1:3] == ("route", "get"):
            way = MAIN[1] if args[3].startswith("10.7.") else MAIN[0]
            return [{"dst": args[3], "gateway": way["gateway"], "dev": way["dev"], "flags": []}]
        if args[1:3] == ("route", "show"):
            return [] if "exact" in args else MAIN
        raise AssertionError(args)

    monkeypatch.setattr(tundev, "_ip_json", fake)


def test_the_bypass_copies_an_onlink_default_route_with_the_flag() -> None:
    change = bypass._copy(MAIN[0], "-4", 7475)
    assert change.do == ("-4", "route", "add", "default", "via", "198.19.0.2", "dev", "eth0",
                         "onlink", "table", "7475")  # fmt: skip
    assert change.undo[-3:] == ("onlink", "table", "7475")
    plain = bypass._copy(MAIN[1], "-4", 7475)
    assert "onlink" not in plain.do


@pytest.mark.usefixtures("ip_json")
def test_an_excluded_network_behind_an_onlink_gateway_keeps_the_flag() -> None:
    assert tundev.route_to("192.0.2.0/24") == tundev.Route("198.19.0.2", "eth0", None, True)
    assert tundev.route_to("10.7.1.0/24") == tundev.Route("10.0.0.1", "eth1", None, False)
    [far, near] = netplan.exclude_changes("tun0", ["192.0.2.0/24", "10.7.1.0/24"])
    assert far.do == ("-4", "route", "add", "192.0.2.0/24", "via", "198.19.0.2", "dev", "eth0",
                      "onlink")  # fmt: skip
    assert near.do == ("-4", "route", "add", "10.7.1.0/24", "via", "10.0.0.1", "dev", "eth1")
