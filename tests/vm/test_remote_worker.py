"""A worker on another host: the stack serves a tcp:// endpoint with CURVE, and tunio-worker runs
in the server namespace, reaching the stack over the veth with the worker keys tunio-run wrote."""

from __future__ import annotations

import sys

from lab.netlab import (
    APP_ADDRESS,
    PEER_PORTS,
    SERVER_ADDRESS,
    SRV_ADDRESS,
    Lab,
    LineReader,
)

PORT = 5555


def test_worker_in_another_namespace_carries_flows(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    lab = fresh_lab
    # The worker host's own address is reachable from the gateway (the servers stay behind the
    # TUN): the stack's replies to the worker must not be routed into the TUN.
    lab.ip(lab.app, "route", "add", f"{SRV_ADDRESS}/32", "dev", lab.veth_app)
    keys = lab.runtime_dir.parent / f"tunio-lab-{lab.id}-keys"
    tunio = lab.start_tunio(["--workers", "0", "--endpoint", f"tcp://{APP_ADDRESS}:{PORT}",
                             "--keys", str(keys)])
    try:
        worker_keys = keys.with_name(keys.name + ".worker")
        assert worker_keys.exists()
        worker = lab.serve(
            [sys.executable, "-c", "import sys; from tunio.cli import worker_main; "
             "sys.exit(worker_main())", "--endpoint", f"tcp://{APP_ADDRESS}:{PORT}",
             "--keys", str(worker_keys), "--name", "far-away"],
            ready=r"answered HELLO",
        )
        tunio.log.wait_for(r"worker far-away joined", 10.0)
        payload = bytes(range(256)) * 64
        with lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS, timeout=10.0) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                assert chunk, "the echo ended early"
                got += chunk
        assert got == payload
        del worker
    finally:
        assert tunio.stop() == 0
        for path in (keys, keys.with_name(keys.name + ".worker")):
            path.unlink(missing_ok=True)
