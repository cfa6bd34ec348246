"""tunio-run's options: what they are, their defaults, and the checks that turn them into a plan.

`Options` is what the library takes and what the command line builds; `validate()` checks every
option (ConfigError naming the first one that is wrong) and returns the `Plan` the supervisor
carries out. Everything here is pure but for the look at /sys/class/net for an egress interface.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunio import defaults, tundev
from tunio.errors import ConfigError, describe
from tunio.logs import FORMATS, LEVELS
from tunio.runtime import SOCKET_NAME, default_path
from tunio.settings import BY_FLAG

if TYPE_CHECKING:
    from tunio.dialers import Dialer
    from tunio.policy import Policy
    from tunio.rules import Rule

MAX_MARK = 0xFFFFFFFF
IFNAMSIZ = 16
SUN_PATH_MAX = 107  # sockaddr_un path bytes, without the terminating NUL
MAX_LIMIT = 1 << 24  # --max-flows and --max-pending: past the NAT table's 16 x 64,512 slots


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class Options:
    """Every option of tunio-run; the library takes a Dialer object where the CLI takes a spec."""

    tun: str = defaults.TUN
    # One IPv4 and/or one IPv6 address with its prefix (a string, or a tuple of them).
    address: str | tuple[str, ...] = defaults.ADDRESS
    mtu: int = defaults.MTU
    queues: int = field(default_factory=_cpu_count)
    workers: int = field(default_factory=_cpu_count)
    dialer: Dialer | str | tuple[str, ...] = "direct"  # a tuple is a chain, first hop first
    egress_mark: int | None = None
    egress_interface: str | None = None
    endpoint: str | None = None  # None: ipc://<runtime dir>/stack.sock
    runtime_dir: str | None = None  # None: runtime.default_path(tun)
    routes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()  # networks kept out of the TUN (routed as before)
    auto_bypass: bool = False  # mark the workers' sockets and route them by a table of our own
    connect_timeout: float = defaults.CONNECT_TIMEOUT
    udp_timeout: float = defaults.UDP_TIMEOUT
    offload: bool = True  # TSO and checksum offload on the TUN (virtio-net headers)
    # CURVE keys for a tcp:// endpoint; None: <runtime dir>/keys, made anew for each run.
    keys: str | None = None
    window: int = defaults.WINDOW
    txqueuelen: int = defaults.TXQUEUELEN
    log_level: str = defaults.LOG_LEVEL
    log_format: str = defaults.LOG_FORMAT
    max_flows: int = defaults.MAX_FLOWS
    max_pending: int = defaults.MAX_PENDING
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint
    drain_timeout: float = defaults.DRAIN_TIMEOUT  # a reload's old workers: their flows' time
    # Per-flow policy (tunio.policy): "module:attr" or the function itself; or the rules of a
    # configuration file (tunio.rules), with names for the dialers they use.
    policy: str | Policy | None = None
    dialers: Mapping[str, str | tuple[str, ...] | Dialer] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # Where settings came from when not from the command line or the library (field name ->
    # "FILE:LINE"): an error about one of them names its line (see explain()).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Plan:
    """Options checked and parsed: what the supervisor will set up."""

    addresses: tuple[Interface, ...]  # IPv4 first, then IPv6
    routes: tuple[str, ...]  # "default" (IPv4), "::/0" (IPv6) or a network in CIDR form
    runtime_dir: Path
    endpoint: str | None
    excludes: tuple[str, ...] = ()  # networks in CIDR form that keep the main table's route


# ---------------------------------------------------------------- validation (pure functions)

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def parse_address(text: str) -> Interface:
    """The TUN's address with its prefix; it needs spare addresses in the prefix for NAT."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(
            f"--address {text!r} is not an address with a prefix length (e.g. 198.18.0.1/24)"
        ) from None
    if isinstance(iface, ipaddress.IPv6Interface):
        if iface.network.prefixlen > 126:
            raise ConfigError(
                f"--address {text}: give a prefix of /126 or wider (e.g. /64): the stack uses "
                "other addresses of the prefix for address translation"
            )
        if iface.ip == iface.network.network_address:
            raise ConfigError(f"--address {text}: the prefix's first address cannot be used")
        return iface
    if "/" not in text or iface.network.prefixlen > 30:
        raise ConfigError(
            f"--address {text}: give a prefix of /30 or wider (e.g. /24): the stack uses the "
            "other addresses of the prefix for address translation"
        )
    if iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ConfigError(f"--address {text}: the network and broadcast addresses cannot be used")
    return iface


def parse_network(text: str, option: str, example: str = "10.0.0.0/8") -> str:
    """A network in CIDR form (`option` names the flag in the error)."""
    try:
        return str(ipaddress.ip_network(text))
    except ValueError:
        loose: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        with contextlib.suppress(ValueError):
            loose = ipaddress.ip_network(text, strict=False)
        hint = f": did you mean {loose}?" if loose is not None else f" (e.g. {example})"
        raise ConfigError(f"{option} {text!r} is not a network in CIDR form{hint}") from None


def parse_route(text: str) -> str:
    """'default' (every family the TUN has an address of) or a CIDR network routed into the TUN."""
    if text == "default":
        return text
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        parse_network(text, "--route", "10.0.0.0/8 or default")  # raises, with a hint
        raise
    if network.prefixlen == 0:
        return "default" if network.version == 4 else "::/0"
    return str(network)


def parse_addresses(spec: str | tuple[str, ...]) -> tuple[Interface, ...]:
    """At most one IPv4 and one IPv6 address, IPv4 first."""
    texts = (spec,) if isinstance(spec, str) else spec
    if not texts:
        raise ConfigError("--address is required (e.g. 198.18.0.1/24, and/or fd00:18::1/64)")
    parsed = [parse_address(t) for t in texts]
    for version in (4, 6):
        if sum(a.version == version for a in parsed) > 1:
            raise ConfigError(f"--address: give at most one IPv{version} address")
    return tuple(sorted(parsed, key=lambda a: a.version))


def expand_routes(routes: tuple[str, ...], addresses: tuple[Interface, ...]) -> tuple[str, ...]:
    """'default' means the default route of every family the TUN carries; a route of a family
    the TUN has no address of could never be answered."""
    versions = {a.version for a in addresses}
    out: list[str] = []
    for route in routes:
        if route == "default":
            out += [r for r, v in (("default", 4), ("::/0", 6)) if v in versions]
        elif tundev.route_version(route) not in versions:
            raise ConfigError(
                f"--route {route}: the TUN has no IPv{tundev.route_version(route)} address "
                "(add one with --address)"
            )
        else:
            out.append(route)
    return tuple(dict.fromkeys(out))


def check_ifname(name: str, option: str) -> None:
    """The kernel's rules for an interface name (dev_valid_name)."""
    if (
        not name
        or len(name) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:" or c.isspace() for c in name)
    ):
        raise ConfigError(
            f"{option} {name!r} is not a valid interface name (1-15 characters, no '/', ':' "
            "or spaces)"
        )


def validate(options: Options, sys_net: str = tundev.SYS_NET) -> Plan:
    """Check every option; ConfigError naming the first one that is wrong."""
    check_ifname(options.tun, "--tun")
    addresses = parse_addresses(options.address)
    routes = expand_routes(tuple(parse_route(route) for route in options.routes), addresses)
    if not 68 <= options.mtu <= 65535:
        raise ConfigError(f"--mtu {options.mtu} is out of range: use 68..65535")
    if not 1 <= options.queues <= defaults.MAX_QUEUES:
        raise ConfigError(
            f"--queues {options.queues} is out of range: use 1..{defaults.MAX_QUEUES}"
        )
    if not 0 <= options.workers <= defaults.MAX_WORKERS:
        raise ConfigError(
            f"--workers {options.workers} is out of range: use 0..{defaults.MAX_WORKERS} "
            "(0: remote workers only)"
        )
    if options.egress_mark is not None and not 0 < options.egress_mark <= MAX_MARK:
        raise ConfigError(
            f"--egress-mark {options.egress_mark:#x} is out of range: use 1..{MAX_MARK:#x}"
        )
    if options.egress_interface is not None:
        check_ifname(options.egress_interface, "--egress-interface")
        if options.egress_interface == options.tun:
            raise ConfigError(
                f"--egress-interface {options.egress_interface} is the TUN device itself: the "
                "workers' traffic would loop back into it"
            )
        if not tundev.link_exists(options.egress_interface, sys_net):
            raise ConfigError(
                f"--egress-interface {options.egress_interface}: no such network interface"
            )
    if not options.connect_timeout > 0:
        raise ConfigError(f"--connect-timeout {options.connect_timeout:g} must be above 0")
    if not options.drain_timeout > 0:
        raise ConfigError(f"--drain-timeout {options.drain_timeout:g} must be above 0")
    if not options.udp_timeout > 0:
        raise ConfigError(f"--udp-timeout {options.udp_timeout:g} must be above 0")
    if not 1024 <= options.window <= 1 << 30:
        raise ConfigError(f"--window {options.window} is out of range: use 1024..{1 << 30}")
    if not 1 <= options.txqueuelen <= 1 << 20:
        raise ConfigError(f"--txqueuelen {options.txqueuelen} is out of range: use 1..{1 << 20}")
    if options.log_level not in LEVELS:
        raise ConfigError(f"--log-level {options.log_level!r}: use one of {', '.join(LEVELS)}")
    if options.log_format not in FORMATS:
        raise ConfigError(f"--log-format {options.log_format!r}: use one of {', '.join(FORMATS)}")
    for name, value in (("--max-flows", options.max_flows), ("--max-pending", options.max_pending)):
        if not 1 <= value <= MAX_LIMIT:
            raise ConfigError(f"{name} {value} is out of range: use 1..{MAX_LIMIT}")
    if options.max_pending > options.max_flows:
        raise ConfigError(
            f"--max-pending {options.max_pending} is above --max-flows {options.max_flows}: "
            "a pending flow is a flow"
        )
    if options.endpoint is not None and not options.endpoint.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"--endpoint {options.endpoint!r}: use ipc://PATH or tcp://HOST:PORT")
    runtime_dir = Path(options.runtime_dir or default_path(options.tun)).absolute()
    if options.endpoint is None and len(os.fsencode(runtime_dir / SOCKET_NAME)) > SUN_PATH_MAX:
        raise ConfigError(
            f"--runtime-dir {runtime_dir} is too long for a unix socket path "
            f"({SUN_PATH_MAX} bytes at most with /{SOCKET_NAME}): pick a shorter one"
        )
    excludes = tuple(parse_network(text, "--exclude") for text in options.exclude)
    if options.metrics is not None:
        parse_host_port(options.metrics, "--metrics")
    if options.policy is not None and options.rules:
        raise ConfigError("--policy: give a policy or the rules of a configuration file, not both")
    return Plan(
        addresses=addresses,
        routes=routes,
        runtime_dir=runtime_dir,
        endpoint=options.endpoint,
        excludes=excludes,
    )


def parse_host_port(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT, an IPv6 host in brackets ([::1]:9184); the host an IP address."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host)
        number = int(port) if ip.version == 4 or bracketed else -1  # "::1:9" is ambiguous
    except ValueError:
        number = -1
    if not sep or not 0 < number < 65536:
        raise ConfigError(
            f"{option} {text!r}: give an IP address and a port, e.g. 127.0.0.1:9184 or [::1]:9184"
        )
    return host, number


def explain(exc: ConfigError, options: Options) -> str:
    """The error as one line; one about a setting read from a file names the file and line
    ("tunio.toml:3: mtu = 10 is out of range...") instead of the flag ("--mtu 10 is ...")."""
    text = describe(exc)
    flag, _, rest = text.partition(" ")
    if not flag.startswith("--"):
        return text
    flag = flag.rstrip(":")
    setting = BY_FLAG.get(flag[2:])
    where = options.origins.get(setting.field) if setting is not None else None
    if setting is None or where is None:
        return text
    separator = ":" if text[len(flag)] == ":" else " ="
    return f"{where}: {setting.key}{separator} {rest}"
