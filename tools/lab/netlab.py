"""The two-namespace lab that end-to-end tests, the demo and the benchmarks run tunio in.

Topology (every address lives inside the lab's own namespaces)::

    tunio-app-<id>                                        tunio-srv-<id>
      tun0 198.18.255.1/24  (made by tunio-run)             lo  198.18.0.10/32 (the servers)
      tva<id> 198.19.0.1/24 noprefixroute  ====veth====   tvs<id> 198.19.0.2/24
      main table: default dev tun0 (added by tunio-run)     default via 198.19.0.1
      fwmark 0x1 -> table 100:                              blackhole 198.18.3.0/24
        198.19.0.0/24 dev tva<id>                           ip_forward=1
        198.18.0.0/16 via 198.19.0.2
        unreachable 198.18.9.0/24
        unreachable default

IPv6 runs in parallel, every address a ULA inside the lab::

      tun0 fd00:18:255::1/64 (tunio-run)                    lo  fd00:18::10/128
      tva<id> fd00:19::1/64 noprefixroute nodad  ==veth==   tvs<id> fd00:19::2/64 nodad
      main table: default dev tun0 (tunio-run)              default via fd00:19::1
      fwmark 0x1 -> table 100:                              blackhole fd00:18:3::/48
        fd00:19::/64 dev tva<id>                            forwarding=1
        fd00:18::/32 via fd00:19::2
        unreachable fd00:18:9::/48
        unreachable default

The app's own traffic can only leave through the TUN (the veth address has no prefix route);
the workers mark theirs (``--egress-mark 0x1``) and leave over the veth. ``198.18.3.1`` drops
silently (a dial timeout), ``198.18.9.1`` is unreachable for the workers (EHOSTUNREACH);
``fd00:18:3::1`` and ``fd00:18:9::1`` are their IPv6 twins. Duplicate address detection is off on
the veths (the addresses are usable at once, nothing waits for a tentative address to settle),
and ``net.ipv4.ping_group_range`` in the app namespace lets the workers use ping sockets.

`Lab` tears everything down on exit, also when the body raised or was interrupted: the
processes it started (and any process that inherited its ``TUNIO_LAB`` marker), then both
namespaces, which takes the veth pair and the TUN device with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from lab import programs
from lab.netns import netns_socket

__all__ = [
    "APP_ADDRESS",
    "APP_ADDRESS6",
    "BLACKHOLE_ADDRESS",
    "BLACKHOLE_ADDRESS6",
    "DNS_PORT",
    "EGRESS_MARK",
    "EGRESS_TABLE",
    "FLOOD_PORTS",
    "LAB_ENV",
    "PEER_PORTS",
    "SERVER_ADDRESS",
    "SERVER_ADDRESS6",
    "SRV_ADDRESS",
    "SRV_ADDRESS6",
    "TUN_ADDRESS",
    "TUN_ADDRESS6",
    "TUN_NAME",
    "UDP_ECHO_PORT",
    "UNREACHABLE_ADDRESS",
    "UNREACHABLE_ADDRESS6",
    "Lab",
    "LabError",
    "LineReader",
    "TunioProcess",
    "alive",
    "created_lab_ids",
    "descendants",
    "dns_query",
    "dnsmasq_argv",
    "family_of",
    "lab_namespaces",
    "leftover_processes",
    "pattern",
    "pattern_sha256",
    "process_title",
    "recv_all",
    "recv_exact",
]

TUN_NAME = "tun0"
TUN_ADDRESS = "198.18.255.1/24"
APP_ADDRESS = "198.19.0.1"
SRV_ADDRESS = "198.19.0.2"
SERVER_ADDRESS = "198.18.0.10"
BLACKHOLE_ADDRESS = "198.18.3.1"
UNREACHABLE_ADDRESS = "198.18.9.1"
TUN_ADDRESS6 = "fd00:18:255::1/64"
APP_ADDRESS6 = "fd00:19::1"
SRV_ADDRESS6 = "fd00:19::2"
SERVER_ADDRESS6 = "fd00:18::10"
BLACKHOLE_ADDRESS6 = "fd00:18:3::1"
UNREACHABLE_ADDRESS6 = "fd00:18:9::1"
# every group may open ping sockets in the app namespace (the workers' ICMP echo path)
PING_GROUP_RANGE = "0 2147483647"
EGRESS_MARK = 0x1
EGRESS_TABLE = 100
LAB_ENV = "TUNIO_LAB"  # inherited by every process a lab starts: how leftovers are found
# `ip netns exec NS` bind-mounts each file of /etc/netns/NS/ over its namesake in /etc, so a
# program run that way reads e.g. the namespace's own resolv.conf.
NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")  # where `ip netns add` keeps the namespaces' bind mounts
TOOLS = Path(__file__).resolve().parents[1]
REPO = TOOLS.parent

# Where the test servers listen on SERVER_ADDRESS (tools/lab/peers.py and tools/flood.py).
PEER_PORTS = {"echo": 7, "sink-hash": 9, "source": 19, "rst": 5001, "halfclose": 5002}
FLOOD_PORTS = {"echo": 7000, "sink": 7001, "source": 7002}
UDP_ECHO_PORT = 7000  # tools/flood.py --mode udp-echo (UDP; the TCP echo shares the number)
DNS_PORT = 53
PATTERN_SEED = b"tunio test pattern"
RECV_CHUNK = 256 * 1024

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
TERM_GRACE = 10.0

_READY = re.compile(r"\bready\b")
_created: list[str] = []  # ids of every lab made in this process, for leak checks


class LabError(RuntimeError):
    """The lab could not be built or torn down, or a process did not behave."""


def created_lab_ids() -> list[str]:
    """Ids of all labs this process has created (torn down or not)."""
    return list(_created)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        msg = f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}"
        raise LabError(msg)
    return proc


def lab_namespaces() -> list[str]:
    """Names of all namespaces that look like a lab's (``tunio-app-*``, ``tunio-srv-*``)."""
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(("tunio-app-", "tunio-srv-"))]


# ---------------------------------------------------------------- test data


def pattern(n: int) -> bytes:
    """`n` deterministic bytes with no short period (so reordering or loss shows in a hash)."""
    return hashlib.shake_128(PATTERN_SEED).digest(n)


def pattern_sha256(n: int) -> str:
    return hashlib.sha256(pattern(n)).hexdigest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(RECV_CHUNK, n - len(buf)))
        if not chunk:
            msg = f"EOF after {len(buf)} of {n} bytes"
            raise EOFError(msg)
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    """Everything up to EOF."""
    buf = bytearray()
    while chunk := sock.recv(RECV_CHUNK):
        buf += chunk
    return bytes(buf)


# ---------------------------------------------------------------- DNS


def dns_query(name: str, qid: int = 0x7475) -> bytes:
    """A DNS query (recursion desired) for the A record of `name`."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def dnsmasq_argv(
    *records: str,
    port: int = DNS_PORT,
    addresses: Sequence[str] = (SERVER_ADDRESS, SERVER_ADDRESS6),
) -> list[str]:
    """dnsmasq (Debian: dnsmasq-base) serving only `records` (its options, e.g.
    ``--address=/a.test/192.0.2.1``) on `addresses` (SERVER_ADDRESS and SERVER_ADDRESS6), in the
    foreground, logging to stderr (its ``started`` line says it is up), reading no
    configuration, hosts or resolv.conf."""
    return [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file",
        "--no-resolv", "--no-hosts", "--log-facility=-", "--user=root", "--group=root",
        *(f"--listen-address={a}" for a in addresses), "--bind-interfaces", f"--port={port}",
        *records,
    ]  # fmt: skip


def family_of(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal (it has a colon), AF_INET otherwise."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# ---------------------------------------------------------------- processes via /proc


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of `pid`, or None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    st = _proc_stat(pid)
    return st is not None and st[1] not in {"Z", "X"}


def descendants(pid: int) -> list[int]:
    """Living descendants of `pid` (children first), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st is not None and st[1] not in {"Z", "X"}:
            children.setdefault(st[0], []).append(p)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def process_title(pid: int) -> str:
    """The process's comm and command line, joined: what `ps` would show to a person."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
    return f"{comm} {cmdline}".strip()


def leftover_processes(lab_ids: Sequence[str]) -> dict[int, str]:
    """Living processes whose environment carries one of `lab_ids` as ``TUNIO_LAB``."""
    wanted = {f"{LAB_ENV}={i}".encode() for i in lab_ids}
    found: dict[int, str] = {}
    if not wanted:
        return found
    me = os.getpid()
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(env) and alive(pid):
            found[pid] = process_title(pid)
    return found


# ---------------------------------------------------------------- output capture


class LineReader:
    """Reads a text pipe on a thread and keeps every line, so tests can wait for one."""

    def __init__(self, stream: IO[str], name: str) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._run, name=f"reader:{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in self._stream:
                with self._cond:
                    self._lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        except ValueError:  # the pipe was closed under us at teardown
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, start: int = 0) -> str:
        """The first line (from index `start`) matching `pattern`; LabError at EOF or timeout."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "output ended" if self._eof else f"no match within {timeout:.0f} s"
                    msg = f"waiting for /{rx.pattern}/: {why}; output was:\n" + "\n".join(
                        self._lines
                    )
                    raise LabError(msg)
                self._cond.wait(left)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# ---------------------------------------------------------------- tunio-run


class TunioProcess:
    """One `tunio-run` started in the lab's app namespace, with its stderr captured."""

    def __init__(self, proc: subprocess.Popen[str], argv: list[str], runtime_dir: Path) -> None:
        self.proc = proc
        self.argv = argv
        self.runtime_dir = runtime_dir
        assert proc.stderr is not None
        self.log = LineReader(proc.stderr, "tunio-run")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "stack.sock"

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        """Wait for the line saying tunio forwards; LabError with the whole log otherwise."""
        try:
            return self.log.wait_for(_READY, timeout)
        except LabError as exc:
            code = self.proc.poll()
            state = f"exited with {code}" if code is not None else "still running"
            msg = f"tunio-run did not get ready ({state}): {exc}"
            raise LabError(msg) from None

    def children(self) -> list[int]:
        """Living descendants of tunio-run: the stack, the workers and their helpers."""
        return descendants(self.pid)

    def workers(self) -> list[int]:
        """Descendants whose process title names a worker (``tunio-worker-*``)."""
        return [p for p in self.children() if "tunio-worker" in process_title(p)]

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM tunio-run and wait for it; its exit code. LabError if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            msg = f"tunio-run did not exit within {timeout:.0f} s of SIGTERM; log:\n{self.log.text}"
            raise LabError(msg) from None
        self.log.join(5.0)
        return code


# ---------------------------------------------------------------- the lab


class Lab:
    """Build the app/srv namespaces on enter, remove every trace of them on exit."""

    def __init__(self, lab_id: str | None = None, *, uplink: bool = False) -> None:
        """`uplink`: the app namespace routes like a host with one uplink (the veth's prefix and
        a default route via srv in the main table, strict reverse-path filtering on the veth)
        and has no rule or table for tunio's workers: --auto-bypass must make its own."""
        self.id = lab_id or secrets.token_hex(3)
        self.uplink = uplink
        if not re.fullmatch(r"[0-9a-z]{1,8}", self.id):
            msg = f"lab id must be 1-8 lowercase letters/digits: {self.id!r}"
            raise ValueError(msg)
        self.app = f"tunio-app-{self.id}"
        self.srv = f"tunio-srv-{self.id}"
        self.veth_app = f"tva{self.id}"
        self.veth_srv = f"tvs{self.id}"
        self.runtime_dir = Path(f"/run/tunio-lab-{self.id}")
        self.processes: list[subprocess.Popen[Any]] = []
        self.strays: dict[int, str] = {}  # processes of this lab still alive at teardown
        self._tunio: TunioProcess | None = None
        self._closed = False

    # -- building

    def __enter__(self) -> Lab:
        _created.append(self.id)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self) -> None:
        app, srv, va, vs = self.app, self.srv, self.veth_app, self.veth_srv
        _ip("netns", "add", app)
        _ip("netns", "add", srv)
        # Made directly inside the namespaces: the host never sees the veth pair.
        _ip("-n", app, "link", "add", va, "type", "veth", "peer", "name", vs, "netns", srv)
        for ns, dev in ((app, va), (srv, vs)):
            # before the link is up: no address of it (link-local included) is ever tentative
            self._sysctl(ns, f"net.ipv6.conf.{dev}.accept_dad=0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

        # app: no prefix route for the veth, so only marked traffic (table 100) may use it.
        _ip("-n", app, "addr", "add", f"{APP_ADDRESS}/24", "dev", va, "noprefixroute")
        mark, table = f"{EGRESS_MARK:#x}", str(EGRESS_TABLE)
        _ip("-n", app, "rule", "add", "fwmark", mark, "lookup", table, "pref", table)
        _ip("-n", app, "route", "add", "198.19.0.0/24", "dev", va, "table", table)
        _ip("-n", app, "route", "add", "198.18.0.0/16", "via", SRV_ADDRESS, "dev", va,
            "table", table)  # fmt: skip
        _ip("-n", app, "route", "add", "unreachable", "198.18.9.0/24", "table", table)
        # Marked traffic never falls back into the TUN.
        _ip("-n", app, "route", "add", "unreachable", "default", "table", table)
        # Replies to marked traffic arrive on the veth while the main table points into the TUN.
        self._sysctl(app, "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{va}.rp_filter=0")

        _ip("-n", srv, "addr", "add", f"{SRV_ADDRESS}/24", "dev", vs)
        _ip("-n", srv, "addr", "add", f"{SERVER_ADDRESS}/32", "dev", "lo")
        _ip("-n", srv, "route", "add", "default", "via", APP_ADDRESS)
        _ip("-n", srv, "route", "add", "blackhole", "198.18.3.0/24")
        self._sysctl(srv, "net.ipv4.ip_forward=1")
        self._build_ipv6()
        if self.uplink:
            self._route_like_a_host()

    def _route_like_a_host(self) -> None:
        """The app namespace as a host with one uplink: what --auto-bypass finds and works with."""
        app, va = self.app, self.veth_app
        for family in ("-4", "-6"):
            _ip("-n", app, family, "rule", "del", "fwmark", f"{EGRESS_MARK:#x}", "lookup",
                str(EGRESS_TABLE), "pref", str(EGRESS_TABLE))  # fmt: skip
            _ip("-n", app, family, "route", "flush", "table", str(EGRESS_TABLE))
        _ip("-n", app, "route", "add", "198.19.0.0/24", "dev", va, "src", APP_ADDRESS)
        _ip("-n", app, "route", "add", "default", "via", SRV_ADDRESS, "dev", va)
        _ip("-n", app, "-6", "route", "add", "fd00:19::/64", "dev", va)
        _ip("-n", app, "-6", "route", "add", "default", "via", SRV_ADDRESS6, "dev", va)
        self._sysctl(app, f"net.ipv4.conf.{va}.rp_filter=1")

    def _build_ipv6(self) -> None:
        """The IPv6 twin of the IPv4 set-up above (see the module's docstring)."""
        app, srv, va, vs = self.app, self.srv, self.veth_app, self.veth_srv
        _ip("-n", app, "-6", "addr", "add", f"{APP_ADDRESS6}/64", "dev", va,
            "noprefixroute", "nodad")  # fmt: skip
        mark, table = f"{EGRESS_MARK:#x}", str(EGRESS_TABLE)
        _ip("-n", app, "-6", "rule", "add", "fwmark", mark, "lookup", table, "pref", table)
        _ip("-n", app, "-6", "route", "add", "fd00:19::/64", "dev", va, "table", table)
        _ip("-n", app, "-6", "route", "add", "fd00:18::/32", "via", SRV_ADDRESS6, "dev", va,
            "table", table)  # fmt: skip
        _ip("-n", app, "-6", "route", "add", "unreachable", "fd00:18:9::/48", "table", table)
        _ip("-n", app, "-6", "route", "add", "unreachable", "default", "table", table)
        self._sysctl(app, f"net.ipv4.ping_group_range={PING_GROUP_RANGE}")

        _ip("-n", srv, "-6", "addr", "add", f"{SRV_ADDRESS6}/64", "dev", vs, "nodad")
        _ip("-n", srv, "-6", "addr", "add", f"{SERVER_ADDRESS6}/128", "dev", "lo")
        _ip("-n", srv, "-6", "route", "add", "default", "via", APP_ADDRESS6)
        _ip("-n", srv, "-6", "route", "add", "blackhole", "fd00:18:3::/48")
        self._sysctl(srv, "net.ipv6.conf.all.forwarding=1")

    def _sysctl(self, ns: str, *settings: str) -> None:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        if proc.returncode != 0:
            msg = f"sysctl {settings} in {ns}: {proc.stderr.strip()}"
            raise LabError(msg)

    # -- running things

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Our environment plus the lab marker and the path of the tunio we were loaded from."""
        env = dict(os.environ)
        env[LAB_ENV] = self.id
        # the checkout's tunio, and tools/ for the lab's own modules (peers.py, proxies.py)
        ours = [str(REPO), str(TOOLS)]
        paths = [*ours, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        if extra:
            env.update(extra)
        return env

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` in namespace `ns` (``ip netns exec`` execs it: the pid is argv's own).

        Keyword arguments go to `subprocess.Popen`; ``env`` entries are added to `env()`.
        The process is stopped at teardown.
        """
        if self._closed:
            msg = "the lab is closed"
            raise LabError(msg)
        extra = kw.pop("env", None)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)  # a signal to the test's group leaves it alone
        env = self.env(extra)
        if argv[0] != sys.executable:
            if not os.path.isabs(argv[0]):
                # Every program a lab runs is in tools/programs.txt, which `make setup`
                # installs: a missing one names its package instead of failing to exec.
                try:
                    programs.require(argv[0])
                except programs.ProgramError as exc:
                    raise LabError(str(exc)) from None
            # A sanitizer runtime preloaded for the tests (make asan) is for our own Python,
            # which loads the instrumented stack; other programs (dnsmasq, iperf3, the
            # proxies) run as they are.
            env.pop("LD_PRELOAD", None)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], env=env, **kw
        )
        self.processes.append(proc)
        return proc

    def run(self, ns: str, argv: Sequence[str], timeout: float = 60.0) -> str:
        """Run `argv` in `ns` to completion; its stdout. LabError on failure or timeout."""
        proc = self.popen(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            msg = f"{' '.join(argv)} in {ns}: no exit within {timeout:.0f} s\n{out}\n{err}"
            raise LabError(msg) from None
        if proc.returncode != 0:
            msg = f"{' '.join(argv)} in {ns}: exit {proc.returncode}\n{out}\n{err}"
            raise LabError(msg)
        return str(out)

    @contextlib.contextmanager
    def etc_file(self, ns: str, name: str, text: str) -> Iterator[Path]:
        """`text` as /etc/`name` for programs started in `ns` from now on (e.g. resolv.conf).

        Removed when the block ends (and at teardown at the latest).
        """
        if ns not in (self.app, self.srv) or "/" in name:
            msg = f"not a file of this lab's namespaces: {ns}/{name}"
            raise LabError(msg)
        directory = NETNS_ETC / ns
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_text(text)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # other files of the namespace may remain
                directory.rmdir()

    def wait_for_dns(self, name: str, port: int = DNS_PORT, timeout: float = 15.0) -> None:
        """Until a DNS server on SERVER_ADDRESS:`port` answers a query for `name`, asked over
        the veth (a marked socket in the app namespace), so tunio need not be running."""
        deadline = time.monotonic() + timeout
        query = dns_query(name)
        with self.open_socket(type=socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, EGRESS_MARK)
            sock.connect((SERVER_ADDRESS, port))
            while True:
                # each try waits for an answer (a real event); tries repeat until the deadline
                sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
                sock.send(query)
                try:
                    answer = sock.recv(512)
                except (TimeoutError, ConnectionRefusedError):
                    answer = b""
                if answer[:2] == query[:2]:
                    return
                if time.monotonic() >= deadline:
                    msg = f"no DNS answer from {SERVER_ADDRESS}:{port} within {timeout:.0f} s"
                    raise LabError(msg)

    def ip(self, ns: str, *args: str) -> str:
        """`ip -n ns args…`; its stdout (failures raise LabError)."""
        return _ip("-n", ns, *args).stdout

    def open_socket(
        self,
        ns: str | None = None,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket in namespace `ns` (the app's by default), usable from this thread."""
        return netns_socket(ns or self.app, family, type, proto)

    def connect(
        self,
        port: int,
        host: str = SERVER_ADDRESS,
        *,
        timeout: float = 10.0,
        mark: int | None = None,
        ns: str | None = None,
    ) -> socket.socket:
        """A TCP connection made from `ns` (the app's by default), as the app would make it.

        `timeout` stays set on the returned socket; `mark` sets SO_MARK before connecting.
        An IPv6 `host` (one with a colon) gets an IPv6 socket.
        """
        sock = self.open_socket(ns, family_of(host))
        try:
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def serve(
        self,
        argv: Sequence[str],
        *,
        ns: str | None = None,
        ready: str = r"^listening ",
        timeout: float = 15.0,
    ) -> LineReader:
        """Start a server in `ns` (the srv namespace by default) and wait for its ready line.

        Returns the reader of its stdout (stderr merged), so a test can wait for later lines.
        """
        proc = self.popen(
            ns or self.srv, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        reader = LineReader(proc.stdout, os.path.basename(argv[-1]))
        try:
            reader.wait_for(ready, timeout)
        except LabError as exc:
            msg = f"server {' '.join(argv)} did not start: {exc}"
            raise LabError(msg) from None
        return reader

    def tunio_argv(self, extra_args: Sequence[str] = ()) -> list[str]:
        """tunio-run as the tests run it. In an `uplink` lab the TUN takes the halves of each
        address space (the main table's default route stays) and the bypass is automatic."""
        if self.uplink:
            ways = ["--route", "0.0.0.0/1", "--route", "128.0.0.0/1", "--route", "::/1",
                    "--route", "8000::/1", "--auto-bypass"]  # fmt: skip
        else:
            ways = ["--route", "default", "--egress-mark", f"{EGRESS_MARK:#x}"]
        return [
            sys.executable, "-m", "tunio.cli",
            "--tun", TUN_NAME,
            "--address", TUN_ADDRESS,
            "--address", TUN_ADDRESS6,
            *ways,
            "--queues", "2",
            "--workers", "2",
            "--runtime-dir", str(self.runtime_dir),
            *extra_args,
        ]  # fmt: skip

    def start_tunio(
        self, extra_args: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT
    ) -> TunioProcess:
        """Start tunio-run in the app namespace and wait until it says it is ready."""
        argv = self.tunio_argv(extra_args)
        proc = self.popen(
            self.app, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        tunio = TunioProcess(proc, argv, self.runtime_dir)
        self._tunio = tunio
        tunio.wait_ready(ready_timeout)
        return tunio

    # -- teardown

    def close(self) -> None:
        """Stop our processes, delete both namespaces, and check that nothing is left."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        # Teardown must finish even if Ctrl-C arrives again while it runs.
        with _sigint_deferred():
            self._stop_processes()
            self._remove_device_locks()
            for ns in (self.app, self.srv):
                if ns in lab_namespaces():
                    proc = _ip("netns", "delete", ns, check=False)
                    if proc.returncode != 0:
                        errors.append(f"ip netns delete {ns}: {proc.stderr.strip()}")
            if self.runtime_dir.exists():
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
            for ns in (self.app, self.srv):
                shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
            left = [ns for ns in (self.app, self.srv) if ns in lab_namespaces()]
            if left:
                errors.append(f"namespaces left behind: {left}")
        if errors:
            raise LabError("; ".join(errors))

    def _remove_device_locks(self) -> None:
        """Lock files a tunio-run of ours left in the host's lock directory (one that was
        killed leaves its file; its lock went with it), and the directories if they are empty."""
        from tunio import devicelock  # noqa: PLC0415 - the lab needs tunio only here

        directory = devicelock.default_directory()
        for ns in (self.app, self.srv):
            try:
                inode = os.stat(NETNS_RUN / ns).st_ino
            except OSError:
                continue
            for path in directory.glob(f"net{inode}-*.lock"):
                path.unlink(missing_ok=True)
        for empty in (directory, directory.parent):
            with contextlib.suppress(OSError):
                empty.rmdir()

    def _stop_processes(self) -> None:
        running = [p for p in self.processes if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        for p in running:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5.0)
        for p in self.processes:
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        # Anything still carrying our marker (e.g. a worker orphaned by a killed tunio-run).
        self.strays = leftover_processes([self.id])
        for pid in self.strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while any(alive(pid) for pid in self.strays) and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for SIGKILL to take effect: no event to wait on


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back until the block ends (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, _frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt
