"""The ZeroMQ endpoint a stack binds and its workers connect to: ipc://PATH or tcp://HOST:PORT.

Checked here, before ZeroMQ sees it, because ZeroMQ's own answers mislead: a port above 65535
is taken modulo 65536 (tcp://127.0.0.1:99999 binds port 34463 without a word), and a host that is
no address (tcp://300.1.1.1:5) fails as "No such device".
"""

from __future__ import annotations

import ipaddress
import os
import re

from tunio.errors import ConfigError

SUN_PATH_MAX = 107  # sockaddr_un path bytes, without the terminating NUL
SCHEMES = ("ipc://", "tcp://")
# A host of digits and dots is meant as an IPv4 address: it must be one.
DOTTED = re.compile(r"[0-9.]+")
# An interface or host name as ZeroMQ takes it: letters, digits, '-', '_' and '.'
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_endpoint(text: str, option: str = "--endpoint") -> str:
    """`text` if it is an endpoint tunio can use, else ConfigError naming `option` and the fault."""
    if not text.startswith(SCHEMES):
        raise ConfigError(f"{option} {text!r}: use ipc://PATH or tcp://HOST:PORT")
    scheme, _, rest = text.partition("://")
    if scheme == "ipc":
        if not rest:
            raise ConfigError(f"{option} {text!r}: give a path after ipc://")
        if len(os.fsencode(rest)) > SUN_PATH_MAX:
            raise ConfigError(
                f"{option} {text!r}: the path is too long for a unix socket "
                f"({SUN_PATH_MAX} bytes at most)"
            )
        return text
    _check_tcp(text, rest, option)
    return text


def _check_tcp(text: str, rest: str, option: str) -> None:
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{option} {text!r}: use tcp://HOST:PORT, e.g. tcp://192.0.2.1:5555")
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{option} {text!r}: the port must be a number in 1..65535")
    if host == "*":
        return
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1].split("%", 1)[0])
        except ValueError:
            raise ConfigError(f"{option} {text!r}: {host} is no IPv6 address") from None
        return
    if ":" in host:
        raise ConfigError(f"{option} {text!r}: put an IPv6 address in brackets, tcp://[::1]:5555")
    if DOTTED.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{option} {text!r}: {host} is no IPv4 address") from None
        return
    if not NAME.fullmatch(host):
        raise ConfigError(f"{option} {text!r}: {host!r} is no address, interface or host name")
