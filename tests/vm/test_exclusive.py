"""One tunio-run per TUN device: the lock belongs to the device (its name in its network
namespace), not to a runtime directory; nothing outlives a killed tunio-run; and a run leaves no
secret behind. Each test has its own lab."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from lab.netlab import PEER_PORTS, SERVER_ADDRESS, TUN_NAME, Lab, LineReader, pattern, recv_exact

EXIT_TIMEOUT = 30.0
CHILD_EXIT = 10.0  # seconds for the stack and the workers to follow a killed tunio-run
MESSAGE = pattern(1000)


def _echo(lab: Lab) -> None:
    with lab.connect(PEER_PORTS["echo"], SERVER_ADDRESS) as sock:
        sock.sendall(MESSAGE)
        assert recv_exact(sock, len(MESSAGE)) == MESSAGE


def _run_to_exit(lab: Lab, ns: str, argv: list[str]) -> tuple[int, str]:
    proc = lab.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=EXIT_TIMEOUT)
    return proc.returncode, err


def test_a_second_run_on_the_device_is_refused_whatever_its_runtime_dir(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    first = lab.start_tunio()
    other_dir = lab.runtime_dir / "second"
    code, err = _run_to_exit(lab, lab.app, lab.tunio_argv(["--runtime-dir", str(other_dir)]))
    assert code == 1, err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err
    assert f"another tunio-run (pid {first.pid}) already runs on TUN device {TUN_NAME}" in (
        errors[0]
    )
    assert not other_dir.exists()
    _echo(lab)  # the first run kept every queue of its device
    assert first.stop() == 0, first.log.text


def _default_runtime_dir(ns: str) -> Path:
    """Where a root tunio-run in namespace `ns` keeps its socket when given no --runtime-dir."""
    return Path(f"/run/tunio/netns-{ns}/{TUN_NAME}")


def test_the_same_name_in_another_namespace_is_another_device(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    # neither run is given a runtime directory: /run is shared by the namespaces, so each
    # default must be its own namespace's for both to run
    del fresh_servers
    lab = fresh_lab
    first_argv = lab.tunio_argv()
    at = first_argv.index("--runtime-dir")
    del first_argv[at : at + 2]
    second_argv = [
        sys.executable, "-m", "tunio.cli", "--tun", TUN_NAME, "--address", "10.77.0.1/24",
        "--queues", "1", "--workers", "1",
    ]  # fmt: skip
    dirs = [_default_runtime_dir(lab.app), _default_runtime_dir(lab.srv)]
    assert dirs[0] != dirs[1]
    runs: list[tuple[subprocess.Popen[str], LineReader]] = []
    try:
        for ns, argv in ((lab.app, first_argv), (lab.srv, second_argv)):
            proc = lab.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            assert proc.stderr is not None
            log = LineReader(proc.stderr, f"tunio-run-{ns}")
            runs.append((proc, log))
            log.wait_for(r"\bready\b", 30.0)
        assert TUN_NAME in lab.ip(lab.srv, "link", "show")
        assert [(d / "stack.sock").is_socket() for d in dirs] == [True, True]
        _echo(lab)
        for proc, log in reversed(runs):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(EXIT_TIMEOUT) == 0, log.text
        assert [d.exists() for d in dirs] == [False, False]  # each run removed its own
    finally:
        for proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(EXIT_TIMEOUT)
        for d in dirs:
            shutil.rmtree(d.parent, ignore_errors=True)


def test_a_killed_tunio_run_takes_its_children_and_device_with_it(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    tunio = lab.start_tunio()
    children = tunio.children()
    assert len(children) >= 3, children  # the stack and two workers
    pidfds = [os.pidfd_open(pid) for pid in children]
    try:
        os.kill(tunio.pid, signal.SIGKILL)
        tunio.proc.wait(EXIT_TIMEOUT)
        for pid, fd in zip(children, pidfds, strict=True):
            ended, _, _ = select.select([fd], [], [], CHILD_EXIT)  # readable once it has ended
            assert ended, f"child {pid} outlived the killed tunio-run"
    finally:
        for fd in pidfds:
            os.close(fd)
    # the last queue went with the stack: a device tunio-run made is gone, and its routes
    assert TUN_NAME not in lab.ip(lab.app, "link", "show")
    # the next run takes the device over, saying once whose lock it was
    again = lab.start_tunio()
    takeovers = [line for line in again.log.lines if "taking over the lock" in line]
    assert len(takeovers) == 1, again.log.text
    assert f"from a run that is gone (pid {tunio.pid})" in takeovers[0]
    _echo(lab)
    assert again.stop() == 0, again.log.text


def test_keys_made_for_a_run_are_removed_at_its_end(
    fresh_lab: Lab, fresh_servers: dict[str, LineReader]
) -> None:
    del fresh_servers
    lab = fresh_lab
    tunio = lab.start_tunio(["--endpoint", "tcp://127.0.0.1:5557"])
    keys = tunio.runtime_dir / "keys"
    assert keys.exists()
    assert keys.with_name("keys.worker").exists()
    _echo(lab)  # the local workers got in with the run's own keys
    assert tunio.stop() == 0, tunio.log.text
    assert not keys.exists()
    assert not keys.with_name("keys.worker").exists()
    assert not tunio.runtime_dir.exists()
