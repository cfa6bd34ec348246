"""The hint a worker logs when it has no local port left."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunio import ports


def fake_proc(tmp_path: Path, *, sockstat: str, port_range: str = "32768\t60999\n",
              reuse: str = "2\n") -> Path:  # fmt: skip
    (tmp_path / "sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "net").mkdir()
    (tmp_path / "sys/net/ipv4/ip_local_port_range").write_text(port_range)
    (tmp_path / "sys/net/ipv4/tcp_tw_reuse").write_text(reuse)
    (tmp_path / "net/sockstat").write_text(sockstat)
    return tmp_path


SOCKSTAT = (
    "sockets: used 130\n"
    "TCP: inuse 5 orphan 0 tw 28229 alloc 7 mem 1\n"
    "UDP: inuse 2 mem 0\n"
)


def test_hint_names_the_figures_and_the_knobs(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, sockstat=SOCKSTAT)
    assert ports.time_wait_sockets(proc) == 28229
    assert ports.port_range(proc) == (32768, 60999)
    assert ports.tw_reuse(proc) == 2
    hint = ports.no_port_hint(proc)
    assert "EADDRNOTAVAIL" in hint
    assert "28229 sockets in TIME_WAIT" in hint
    assert "32768-60999 (28232 ports)" in hint
    assert "net.ipv4.tcp_tw_reuse=2" in hint
    assert hint.endswith("in the workers' network namespace")


def test_hint_without_proc_still_gives_the_advice(tmp_path: Path) -> None:
    hint = ports.no_port_hint(tmp_path)  # nothing readable there
    assert hint == ("no local port free for a new outgoing connection (EADDRNOTAVAIL): set "
                    "net.ipv4.tcp_tw_reuse=1 or widen net.ipv4.ip_local_port_range in the "
                    "workers' network namespace")  # fmt: skip


@pytest.mark.parametrize("line", ["TCP: inuse 5", "TCP: inuse 5 tw many", "UDP: inuse 1 tw 3"])
def test_unreadable_counts_are_none(tmp_path: Path, line: str) -> None:
    assert ports.time_wait_sockets(fake_proc(tmp_path, sockstat=line + "\n")) is None


def test_this_machine_has_the_files() -> None:
    assert ports.port_range() is not None
    assert ports.tw_reuse() is not None
    assert ports.time_wait_sockets() is not None


@pytest.mark.parametrize(("reuse", "span", "rate"), [("0", "32768\t60999", 470),
                                                     ("2", "1024\t65535", 1075)])
def test_one_proxy_note_says_the_rate_the_ports_allow(tmp_path: Path, reuse: str, span: str,
                                                       rate: int) -> None:  # fmt: skip
    proc = fake_proc(tmp_path, sockstat=SOCKSTAT, port_range=span + "\n", reuse=reuse + "\n")
    note = ports.one_proxy_note(proc)
    assert note is not None
    assert f"net.ipv4.tcp_tw_reuse={reuse}" in note
    assert f"about {rate} new connections a second" in note
    assert "set net.ipv4.tcp_tw_reuse=1" in note


def test_one_proxy_note_is_silent_with_reuse_or_unknown_settings(tmp_path: Path) -> None:
    assert ports.one_proxy_note(fake_proc(tmp_path, sockstat=SOCKSTAT, reuse="1\n")) is None
    assert ports.one_proxy_note(tmp_path / "nothing") is None
