"""Which of a name's answers a flow may be dialed to (tunio.dialers.hostlocal), and the
martian addresses behind it (tunio.martians)."""

from __future__ import annotations

import errno
import ipaddress

import pytest

from tunio.dialers import hostlocal
from tunio.errors import DialError
from tunio.martians import martian

GUEST = "192.0.2.77"  # no address of this host


@pytest.mark.parametrize(
    ("ip", "why"),
    [
        ("127.0.0.1", "a loopback address"), ("127.255.0.9", "a loopback address"),
        ("::1", "a loopback address"), ("224.0.0.251", "a multicast address"),
        ("ff02::fb", "a multicast address"), ("0.0.0.0", "an address of 0.0.0.0/8"),
        ("0.1.2.3", "an address of 0.0.0.0/8"), ("::", "the unspecified address"),
        ("255.255.255.255", "the limited broadcast address"),
        ("::ffff:198.18.0.1", "an IPv4-mapped address"),
        ("198.18.0.1", None), ("192.0.2.1", None), ("fd00::1", None), ("2001:db8::1", None),
        ("169.254.1.1", None), ("fe80::1", None), ("240.0.0.1", None),
    ],
)  # fmt: skip
def test_martian_names_each_kind(ip: str, why: str | None) -> None:
    assert martian(ipaddress.ip_address(ip)) == why


@pytest.mark.parametrize("nonlocal_bind", [False, True])
def test_this_hosts_addresses_are_told_from_others(
    nonlocal_bind: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By a bind, or (net.ipv4.ip_nonlocal_bind set: any bind goes) by a connect's source."""
    monkeypatch.setattr(hostlocal, "_nonlocal_bind", lambda family: nonlocal_bind)
    assert hostlocal.from_this_host("127.0.0.1")
    assert hostlocal.from_this_host("::1")
    assert not hostlocal.from_this_host(GUEST)
    assert not hostlocal.from_this_host("2001:db8::77")
    # 127.0.0.2 is ours, but a connect to it leaves from 127.0.0.1 (the route's source)
    assert hostlocal.from_this_host("127.0.0.2") is not nonlocal_bind


def test_answers_of_this_host_are_dropped_for_a_guest_and_kept_for_this_host() -> None:
    v6, v4 = ["::1", "2001:db8::5"], ["0.0.0.0", "192.0.2.9", "127.0.0.1"]
    assert hostlocal.for_flow_from(GUEST, "mixed.test", v6, v4) == (["2001:db8::5"],
                                                                     ["192.0.2.9"])  # fmt: skip
    assert hostlocal.for_flow_from("127.0.0.1", "mixed.test", v6, v4) == (v6, v4)
    with pytest.raises(DialError) as info:
        hostlocal.for_flow_from(GUEST, "blocked.test", ["::"], ["0.0.0.0"])
    assert info.value.errno == errno.ECONNREFUSED
    assert str(info.value) == (
        "[Errno 111] blocked.test: the name answers ::, the unspecified address: from here, "
        f"this host and its LAN, not the app's own; the flow is from {GUEST}, another host: "
        "refused")  # fmt: skip


def test_ordinary_answers_need_no_look_at_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(src: str) -> bool:
        raise AssertionError(f"looked at {src}")

    monkeypatch.setattr(hostlocal, "from_this_host", never)
    assert hostlocal.for_flow_from(GUEST, "x.test", ["2001:db8::1"], ["192.0.2.1"]) == (
        ["2001:db8::1"], ["192.0.2.1"])  # fmt: skip
