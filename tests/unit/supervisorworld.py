"""The fake world the supervisor's tests run in, without privileges: a fake stack and fake
workers (loaded in place of tunio.stack and tunio.worker), a fake `ip` on PATH, fake /sys/class/net,
/proc and /dev/net/tun; the supervisor made and run in a thread (`_start`), its log watched
(`LogWatch`), or tunio-run run as a process on the same fakes (`_bootstrap`).

The fixtures (`world`, `logwatch`, `stop_left_supervisors`) reach the test modules through
tests/unit/conftest.py."""

from __future__ import annotations

import importlib.util
import logging
import os
import selectors
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tunio.config import Options
from tunio.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
TUN = "tunit0"

# A stack that listens on the endpoint's unix socket: its exit closes the workers' connections,
# which is how the fake workers learn that it is gone (the real stack says BYE).
FAKE_STACK = """
import os, signal, socket, threading
from dataclasses import dataclass
from pathlib import Path

STATE = Path(os.environ["FAKE_STATE"])

@dataclass(frozen=True)
class StackConfig:
    tun_fds: tuple
    addresses: tuple
    endpoint: str
    window: int = 256 * 1024
    worker_backlog: int = 0
    pending_timeout: float = 15.0
    log_level: str = "info"
    udp_timeout: float = 60.0
    keepalive: object = None
    offload: bool = False
    curve_secret: object = None
    curve_clients: tuple = ()
    nat_region_fd: int = -1
    max_flows: int = 0
    max_pending: int = 0
    log_json: bool = False

def create_nat_region(config):
    fd = os.memfd_create("fake-nat")
    os.ftruncate(fd, 4096)
    return fd

def open_tun(name, queues, offload=False):
    from tunio.errors import TunError, check
    code = int(os.environ.get("FAKE_TUN_ERRNO", "0"))
    check(-code, TunError, f"cannot open TUN device {name}", "tun", name=name, queues=queues)
    return [os.open(STATE / f"queue{i}", os.O_RDWR | os.O_CREAT, 0o600) for i in range(queues)]

def stack_main(config, status):
    if os.environ.get("FAKE_STACK_ERROR"):
        status.put(("stack-error", os.environ["FAKE_STACK_ERROR"]))
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    path = config.endpoint.removeprefix("ipc://")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    peers = []
    def accept():
        while True:
            peers.append(listener.accept()[0])
    threading.Thread(target=accept, daemon=True).start()
    with open(STATE / "stack.pids", "a") as f:
        f.write(f"{os.getpid()} {len(config.tun_fds)} {config.addresses[0]}\\n")
    status.put(("stack-ready", os.getpid()))
    # FAKE_STACK_TICKS: it reports as the real one does, once a second (here ten), with loop
    # ticks that move ("moving") or that stay put, as a hung loop's do ("stuck")
    ticks = os.environ.get("FAKE_STACK_TICKS")
    if ticks:
        def report():
            n = 0
            while True:
                n += ticks == "moving"
                status.put(("stats", {"loop_ticks": n, "flows_active": 0}))
                threading.Event().wait(0.1)
        threading.Thread(target=report, daemon=True).start()
    # SIGUSR2 (after READY): the stack reports an error and exits, as one that lost its queues
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    got = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGUSR2})
    if got == signal.SIGUSR2 and os.environ.get("FAKE_STACK_GONE"):
        status.put(("tun-gone", "every TUN queue failed"))  # as the real one on ENODEV
    elif got == signal.SIGUSR2:
        status.put(("stack-error", "lost the TUN queues"))
    os.unlink(path)
"""

# The fake worker: it says ready and waits; on demand (by its name in an environment variable):
# one that ignores SIGTERM, SIGUSR1 and the stack's going (a worker stuck in a dialer's code);
# one that outlives the stack's going and waits for the next, as the real one does; one that
# reports counters once it is ready (and then falls silent, as a hung one does); and one that
# exits 0 at once while a file named after it
# exists in the state directory (a crash loop).
FAKE_WORKER = """
import os, select, signal, socket
from pathlib import Path

STATE = Path(os.environ["FAKE_STATE"])

def _named(var, name):
    return name in os.environ.get(var, "").split(",")

def run_worker(endpoint, dialer, *, name, capacity=0, window=0, connect_timeout=0.0, ready=None,
               keys=None, report=None, policy=None, keepalive=None):
    if name in os.environ.get("FAKE_WORKER_FAIL", "").split(","):
        return 3
    if (STATE / f"{name}.crash").exists():
        with open(STATE / f"{name}.pids", "a") as f:
            f.write(f"{os.getpid()}\\n")
        return 0
    stubborn = _named("FAKE_WORKER_STUBBORN", name)
    wake_r, wake_w = os.pipe()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if not stubborn:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: os.write(wake_w, b"x"))
        signal.signal(signal.SIGUSR1, lambda *_: os.write(wake_w, b"d"))
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    survive = _named("FAKE_WORKER_SURVIVE", name)  # as the real one: it outlives a stack
    for _ in range(500 if survive else 1):
        try:
            conn.connect(endpoint.removeprefix("ipc://"))
            break
        except OSError:
            if not survive:
                raise
            select.select([wake_r], [], [], 0.02)
    with open(STATE / f"{name}.pids", "a") as f:
        f.write(f"{os.getpid()}\\n")
    if _named("FAKE_WORKER_HOLD", name):
        gate = os.open(STATE / "gate", os.O_RDWR | os.O_NONBLOCK)
        if gate not in select.select([gate, wake_r], [], [])[0]:
            return 0
        os.read(gate, 1)
    ready()
    if _named("FAKE_WORKER_REPORT", name):
        report({"flows_active": 1, "opens": 7})
    if stubborn:
        while True:
            select.select([], [], [])
    select.select([wake_r] if survive else [conn, wake_r], [], [])
    return 0
"""

FAKE_IP = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_STATE/ip.log"
if [ -n "$FAKE_IP_FAIL" ] && [ "$*" = "$FAKE_IP_FAIL" ]; then
    echo "RTNETLINK answers: File exists" >&2
    exit 2
fi
# FAKE_IP_KILL: the command after which tunio-run is killed (kill -9 of its parent, the way an
# OOM kill or an operator's kill -9 lands between two steps)
if [ -n "$FAKE_IP_KILL" ] && [ "$*" = "$FAKE_IP_KILL" ]; then
    kill -9 "$PPID"
fi
if [ "$*" = "-o -4 addr show" ] && [ -n "$FAKE_IP_ADDRS" ]; then
    printf '%s\\n' "$FAKE_IP_ADDRS"
fi
exit 0
"""


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class World:
    """Fakes for one test: state dir, fake `ip`, fake /sys/class/net, /proc and /dev/net/tun."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.bin = root / "bin"
        self.sys_net = root / "sys-net"
        self.proc = root / "proc"
        self.runtime = root / "run" / TUN
        self.locks = root / "locks"
        for d in (self.state, self.bin, self.sys_net, self.proc):
            d.mkdir()
        (root / "fakes").mkdir()
        (root / "fakes" / "fake_stack.py").write_text(FAKE_STACK)
        (root / "fakes" / "fake_worker.py").write_text(FAKE_WORKER)
        (self.bin / "ip").write_text(FAKE_IP)
        (self.bin / "ip").chmod(0o755)
        self.tun_path = root / "dev-net-tun"
        self.tun_path.touch()

    def env(self) -> dict[str, str]:
        return {"FAKE_STATE": str(self.state), "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def ip_calls(self) -> list[str]:
        path = self.state / "ip.log"
        return path.read_text().splitlines() if path.exists() else []

    def pids(self, name: str) -> list[int]:
        path = self.state / f"{name}.pids"
        lines = path.read_text().splitlines() if path.exists() else []
        return [int(line.split()[0]) for line in lines]

    def set_rp_filter(self, interface: str, value: int) -> None:
        d = self.proc / "sys/net/ipv4/conf" / interface
        d.mkdir(parents=True, exist_ok=True)
        (d / "rp_filter").write_text(f"{value}\n")

    def open_queue_files(self) -> list[str]:
        """Fake TUN queues still open in this process."""
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(self.state / "queue")):
                found.append(target)
        return found


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    w = World(tmp_path)
    for key, value in w.env().items():
        monkeypatch.setenv(key, value)
    for key in ("FAKE_IP_FAIL", "FAKE_IP_ADDRS", "FAKE_TUN_ERRNO", "FAKE_STACK_ERROR",
                "FAKE_WORKER_HOLD", "FAKE_WORKER_STUBBORN", "FAKE_WORKER_REPORT",
                "FAKE_WORKER_FAIL", "FAKE_WORKER_SURVIVE", "FAKE_IP_KILL",
                "FAKE_STACK_TICKS", "FAKE_STACK_GONE"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(
        sys.modules, "tunio.stack", _load("fake_stack", tmp_path / "fakes/fake_stack.py")
    )
    monkeypatch.setitem(
        sys.modules, "tunio.worker", _load("fake_worker", tmp_path / "fakes/fake_worker.py")
    )
    return w


def _options(world: World, **changes: object) -> Options:
    base: dict[str, object] = {
        "tun": TUN,
        "address": "198.18.255.1/24",
        "queues": 2,
        "workers": 2,
        "egress_mark": 1,
        "runtime_dir": str(world.runtime),
        "routes": ("default",),
        # the fakes do not report once a second as the real ones do: no watch for a hang,
        # but where a test asks for one
        "hang_timeout": 0.0,
    }
    base.update(changes)
    return Options(**base)  # type: ignore[arg-type]


def _supervisor(world: World, options: Options, *, startup_deadline: float = 10.0,
                stop_deadline: float = 3.0) -> Supervisor:  # fmt: skip
    return Supervisor(
        options,
        startup_deadline=startup_deadline,
        stop_deadline=stop_deadline,
        proc=str(world.proc),
        sys_net=str(world.sys_net),
        tun_path=str(world.tun_path),
        lock_dir=world.locks,
    )


class LogWatch(logging.Handler):
    """Collects the supervisor's messages and lets a test wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.lines.append((record.levelname, record.getMessage()))
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        with self._changed:
            found: list[str] = []

            def seen() -> bool:
                found[:] = [m for _, m in self.lines if predicate(m)]
                return bool(found)

            assert self._changed.wait_for(seen, timeout), f"no such log line in {self.lines}"
            return found[0]

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lv, m in self.lines if level is None or lv == level]


@pytest.fixture
def logwatch() -> Iterator[LogWatch]:
    watch = LogWatch()
    logger = logging.getLogger("tunio")
    old_level = logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.DEBUG)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(old_level)


class Running:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name="supervisor")

    def _run(self) -> None:
        self.code = self.supervisor.run()

    def stop(self) -> int | None:
        self.supervisor.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.code


_STARTED: list[Running] = []


def _start(supervisor: Supervisor) -> Running:
    running = Running(supervisor)
    running.thread.start()
    _STARTED.append(running)
    return running


@pytest.fixture
def stop_left_supervisors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that fails before its own stop() must not leave a supervisor (and its children)
    running into the next test, nor keep pytest from exiting. It asks for monkeypatch so that
    it is torn down first: the supervisor it stops still finds the fake `ip` on PATH, never
    the real one."""
    del monkeypatch
    yield
    while _STARTED:
        running = _STARTED.pop()
        if running.thread.is_alive():
            running.supervisor.stop()
            running.thread.join(30)


def _assert_dead(pids: list[int]) -> None:
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------- pure functions


# ---- tunio-run as a process


BOOTSTRAP = """
import sys
import importlib.util

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

sys.modules["tunio.stack"] = load("fake_stack", sys.argv[1])
sys.modules["tunio.worker"] = load("fake_worker", sys.argv[2])
import pathlib
import tunio.devicelock
import tunio.tundev
tunio.tundev.check_tun_device = lambda path=None: None
tunio.devicelock.default_directory = lambda: pathlib.Path(sys.argv[1]).parent / "locks"
from tunio.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stderr is not None
    seen = b""
    end = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while needle not in seen:
            remaining = end - time.monotonic()
            assert remaining > 0, seen.decode()
            if sel.select(remaining):
                chunk = os.read(proc.stderr.fileno(), 4096)
                assert chunk, seen.decode()
                seen += chunk
    return seen


def _bootstrap(world: World, *extra: str) -> list[str]:
    script = world.root / "bootstrap.py"
    script.write_text(textwrap.dedent(BOOTSTRAP))
    return [
        sys.executable, str(script),
        str(world.root / "fakes/fake_stack.py"), str(world.root / "fakes/fake_worker.py"),
        "--tun", TUN, "--address", "198.18.255.1/24", "--queues", "2", "--workers", "2",
        "--route", "default", "--egress-mark", "0x1", "--runtime-dir", str(world.runtime),
        "--hang-timeout", "0", *extra,
    ]  # fmt: skip
