"""`--metrics HOST:PORT` under load: scraped while flows move, the numbers move as they must."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from lab.netlab import FLOOD_PORTS, PEER_PORTS, SERVER_ADDRESS, Lab, LineReader

from tests.vm.conftest import FLOOD, start_flood_server

METRICS = "127.0.0.1:9184"  # in the app namespace
FLOWS = 300
HELD = 10
BYTES = 64 * 1024
REPORT_DEADLINE = 15.0  # children report once a second; leave room for a loaded machine
_SAMPLE = re.compile(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$")


def scrape(lab: Lab) -> dict[str, float]:
    """GET /metrics from inside the app namespace; every sample by "name{labels}"."""
    with lab.open_socket() as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", 9184))
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, line
            out[match[1]] = float(match[2])
    return out


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k == prefix or k.startswith(prefix + "{"))


def wait_for(lab: Lab, ok: object, what: str) -> dict[str, float]:
    """Scrapes until `ok(samples)` holds (the reports come once a second)."""
    deadline = time.monotonic() + REPORT_DEADLINE
    while True:
        samples = scrape(lab)
        if ok(samples):  # type: ignore[operator]
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"metrics never showed {what}: {json.dumps(samples, indent=1)}")
        time.sleep(0.2)  # the next report is what we wait for: there is no event to wait on


def test_metrics_move_with_the_traffic(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    start_flood_server(lab, "echo")
    tunio = lab.start_tunio(["--metrics", METRICS])
    first = wait_for(lab, lambda s: s.get('tunio_workers{state="alive"}') == 2, "two workers")
    assert total(first, "tunio_flows_total") == 0

    # flows held open: counted as active, by the stack and by the workers that carry them
    held = [lab.connect(PEER_PORTS["echo"]) for _ in range(HELD)]
    for sock in held:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    wait_for(lab, lambda s: s.get('tunio_flows_active{kind="tcp"}') == HELD
             and total(s, "tunio_worker_flows") == HELD, f"{HELD} flows active")  # fmt: skip
    client = lab.popen(
        lab.app,
        [sys.executable, str(FLOOD), "--connect", f"{SERVER_ADDRESS}:{FLOOD_PORTS['echo']}",
         "--mode", "echo", "--connections", str(FLOWS), "--concurrency", "20", "--bytes",
         str(BYTES), "--timeout", "120", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = client.communicate(timeout=180)
    for sock in held:
        sock.close()
    result = json.loads(out)
    assert result["ok"] == FLOWS, (result, err)
    # one refused dial (a closed port of the server): counted by errno
    with pytest.raises(ConnectionRefusedError), lab.connect(1, SERVER_ADDRESS):
        pass

    def settled(s: dict[str, float]) -> bool:
        dials = total(s, "tunio_dial_duration_seconds_count")
        return (s.get('tunio_flows_total{kind="tcp"}') == FLOWS + HELD + 1
                and dials == FLOWS + HELD and total(s, "tunio_dial_errors_total") == 1)  # fmt: skip

    after = wait_for(lab, settled, f"{FLOWS + HELD} good dials and one refused")
    assert after['tunio_transferred_bytes_total{direction="to_destination"}'] >= FLOWS * BYTES
    assert after['tunio_transferred_bytes_total{direction="to_app"}'] >= FLOWS * BYTES
    assert after["tunio_failed_dials_total"] == 1
    refused = [k for k in after if k.startswith("tunio_dial_errors_total")]
    assert len(refused) == 1
    assert 'errno="ECONNREFUSED"' in refused[0]
    assert 'dialer="direct"' in refused[0]
    # the dials' histogram is whole: +Inf holds every good dial of each worker
    inf = sum(v for k, v in after.items() if k.startswith("tunio_dial_duration_seconds_bucket")
              and 'le="+Inf"' in k)  # fmt: skip
    assert inf == FLOWS + HELD
    assert total(after, "tunio_worker_dials_total") == FLOWS + HELD + 1
    assert after["tunio_nat_entries"] >= FLOWS  # slots rest after their flows
    # nothing left open: the flows all ended
    ended = wait_for(lab, lambda s: s.get('tunio_flows_active{kind="tcp"}') == 0, "no flows")
    assert total(ended, "tunio_worker_flows") == 0
    with lab.connect(PEER_PORTS["echo"]) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    assert tunio.stop() == 0, tunio.log.text
