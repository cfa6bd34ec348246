"""Real proxy servers from Debian's packages, started in a lab's srv namespace.

`start_dante` runs danted (SOCKS5, optionally with username/password and UDP ASSOCIATE) and
`start_tinyproxy` runs tinyproxy (HTTP CONNECT, optionally with basic auth), each from a
configuration file written to a directory the caller owns, and returns once the proxy accepts
connections. The lab stops them at teardown. danted may run in another of the lab's namespaces
than srv (`ns`; the gateway of tools/lab/chain.py) and listen on more than one port.

danted checks usernames against the system's password database. The test user lives only in a
private mount namespace of the proxy's own (`unshare --mount`), where a generated passwd and
shadow are bind-mounted over /etc's: the host's files are never touched.

Run as a script, this module is also a UDP echo server::

    python tools/lab/proxies.py udp-echo --listen HOST:PORT
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.netlab import Lab, LineReader

PROXY_ADDRESS = "198.18.0.11"  # on srv's lo, next to the servers' 198.18.0.10
DANTE_PORT = 1080
DANTE_AUTH_PORT = 1081
TINYPROXY_PORT = 8888
TINYPROXY_AUTH_PORT = 8889
USER = "tunio"
# A test user's password, for the lab's own proxies; tinyproxy takes only [a-z0-9._-] in BasicAuth
PASSWORD = "s3cret-pw"  # noqa: S105
UDP_ECHO_PORT = 5300
READY_TIMEOUT = 15.0
POLL = 0.05  # seconds between connection attempts while a proxy starts


@dataclass
class Proxy:
    host: str
    port: int
    process: subprocess.Popen[str]
    log: LineReader
    username: str | None = None
    password: str | None = None

    def url(self, scheme: str, *, username: str | None = None, password: str | None = None) -> str:
        from urllib.parse import quote  # noqa: PLC0415

        user = username if username is not None else self.username
        pw = password if password is not None else self.password
        auth = ""
        if user is not None and pw is not None:
            auth = f"{quote(user, safe='')}:{quote(pw, safe='')}@"
        return f"{scheme}://{auth}{self.host}:{self.port}"


def add_proxy_address(lab: Lab) -> None:
    """PROXY_ADDRESS on srv's lo, and an unreachable route the proxies' dials fail on."""
    lab.ip(lab.srv, "addr", "add", f"{PROXY_ADDRESS}/32", "dev", "lo")
    # Without it the proxies' packets for 198.18.9.0/24 would follow srv's default route into
    # the app namespace and the TUN; with it they fail as the workers' own dials do.
    lab.ip(lab.srv, "route", "add", "unreachable", "198.18.9.0/24")


def wait_listening(
    lab: Lab, proxy: Proxy, timeout: float = READY_TIMEOUT, ns: str | None = None
) -> None:
    """Return once `proxy` accepts a TCP connection in `ns` (srv by default); RuntimeError if
    it exits or never does."""
    deadline = time.monotonic() + timeout
    while True:
        with lab.open_socket(ns or lab.srv) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect((proxy.host, proxy.port))
            except OSError:
                pass
            else:
                return
        if proxy.process.poll() is not None or time.monotonic() > deadline:
            # the reader may still be collecting the last lines of a process that just exited
            proxy.log.join(2.0)
            state = f"exited with {proxy.process.returncode}" if proxy.process.poll() else "silent"
            msg = f"proxy on {proxy.host}:{proxy.port} did not start ({state}):\n{proxy.log.text}"
            raise RuntimeError(msg)
        time.sleep(POLL)  # a connection attempt is the only readiness signal they give


def _start(
    lab: Lab, argv: list[str], proxy_args: dict[str, object], ns: str | None = None
) -> Proxy:
    where = ns or lab.srv
    proc = lab.popen(where, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    proxy = Proxy(process=proc, log=LineReader(proc.stdout, argv[0]), **proxy_args)  # type: ignore[arg-type]
    wait_listening(lab, proxy, ns=where)
    return proxy


def _dante_users(workdir: Path, password: str) -> tuple[Path, Path]:
    """A passwd and shadow with root, nobody and the test user, for danted's private /etc."""
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    passwd = workdir / "passwd"
    shadow = workdir / "shadow"
    passwd.write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        f"{USER}:x:4242:4242::/nonexistent:/usr/sbin/nologin\n"
    )
    shadow.write_text(f"root:*:19000:0:99999:7:::\n{USER}:{hashed}:19000:0:99999:7:::\n")
    shadow.chmod(0o600)
    return passwd, shadow


def start_dante(
    lab: Lab,
    workdir: Path,
    *,
    auth: bool,
    port: int | None = None,
    ns: str | None = None,
    more_ports: Sequence[int] = (),
    log: str = "error",
) -> Proxy:
    """danted on PROXY_ADDRESS in `ns` (srv by default): CONNECT and UDP ASSOCIATE, with
    username/password if `auth`; on `port` and on each of `more_ports` (one process for all:
    a benchmark gives each configuration its own port, so that the TIME_WAIT sockets one
    leaves behind do not slow the next one's connects). `log` is its rules' log setting:
    "connect error" logs each destination as the client named it (a name stays a name)."""
    port = port or (DANTE_AUTH_PORT if auth else DANTE_PORT)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"danted-{port}.conf"
    method = "username" if auth else "none"
    internal = "\n".join(f"internal: {PROXY_ADDRESS} port = {p}" for p in (port, *more_ports))
    conf.write_text(
        f"""\
logoutput: stderr
{internal}
external: {PROXY_ADDRESS}
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
timeout.negotiate: 10
timeout.io: 0
client pass {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
}}
socks pass {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    command: connect udpassociate
    log: {log}
}}
socks pass {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    command: udpreply
    log: error
}}
"""
    )
    argv = ["danted", "-f", str(conf), "-N", "2", "-p", str(workdir / f"danted-{port}.pid")]
    if auth:
        etc = workdir / f"etc-{port}"
        etc.mkdir(exist_ok=True)
        passwd, shadow = _dante_users(etc, PASSWORD)
        script = (
            'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/shadow && shift 2 && exec "$@"'
        )
        argv = [
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", str(passwd), str(shadow), *argv,
        ]  # fmt: skip
    user = {"username": USER, "password": PASSWORD} if auth else {}
    return _start(lab, argv, {"host": PROXY_ADDRESS, "port": port, **user}, ns)


def start_tinyproxy(lab: Lab, workdir: Path, *, auth: bool, port: int | None = None) -> Proxy:
    """tinyproxy on PROXY_ADDRESS, CONNECT to any port, with basic auth if `auth`."""
    port = port or (TINYPROXY_AUTH_PORT if auth else TINYPROXY_PORT)
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"tinyproxy-{port}.conf"
    lines = [
        "User nobody",
        "Group nogroup",
        f"Port {port}",
        f"Listen {PROXY_ADDRESS}",
        "Timeout 60",
        "MaxClients 256",
        "LogLevel Info",
        "DisableViaHeader Yes",
        f'PidFile "{workdir / f"tinyproxy-{port}.pid"}"',
    ]
    if auth:
        lines.append(f"BasicAuth {USER} {PASSWORD}")
    conf.write_text("\n".join(lines) + "\n")
    user = {"username": USER, "password": PASSWORD} if auth else {}
    return _start(
        lab, ["tinyproxy", "-d", "-c", str(conf)], {"host": PROXY_ADDRESS, "port": port, **user}
    )


# ---------------------------------------------------------------- a UDP echo server


def udp_echo(listen: str) -> int:
    host, _, port = listen.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, int(port)))
        print(f"listening {host}:{port}", flush=True)
        while True:
            data, peer = sock.recvfrom(65535)
            with contextlib.suppress(OSError):
                sock.sendto(data, peer)


def main() -> int:
    ap = argparse.ArgumentParser(description="test servers for the dialer tests")
    ap.add_argument("mode", choices=["udp-echo"])
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return udp_echo(args.listen)


if __name__ == "__main__":
    sys.exit(main())
