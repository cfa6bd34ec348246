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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunio import defaults, tundev
from tunio.endpoints import SUN_PATH_MAX, check_endpoint
from tunio.errors import ConfigError, describe
from tunio.logs import FORMATS, LEVELS
from tunio.martians import martian
from tunio.runtime import SOCKET_NAME, default_path
from tunio.settings import BY_FLAG, SETTINGS, Setting

if TYPE_CHECKING:
    from tunio.dialers import Dialer
    from tunio.policy import Policy
    from tunio.rules import Rule

MAX_MARK = 0xFFFFFFFF
IFNAMSIZ = 16
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
    tcp_keepalive: str = defaults.TCP_KEEPALIVE  # "IDLE,INTERVAL,COUNT" or "off"
    offload: bool = True  # TSO and checksum offload on the TUN (virtio-net headers)
    # CURVE keys for a tcp:// endpoint; None: <runtime dir>/keys, made anew for each run.
    keys: str | None = None
    window: int = defaults.WINDOW
    worker_backlog: int = defaults.WORKER_BACKLOG
    txqueuelen: int = defaults.TXQUEUELEN
    log_level: str = defaults.LOG_LEVEL
    log_format: str = defaults.LOG_FORMAT
    max_flows: int = defaults.MAX_FLOWS
    max_pending: int | None = None  # None: defaults.MAX_PENDING, or max_flows if lower
    metrics: str | None = None  # HOST:PORT of the Prometheus endpoint
    # DNS answered by the stack: None (off), "fake-ip[:CIDR[,CIDR6]]" or "hijack"
    dns: str | None = None
    dns_address: str | tuple[str, ...] = ()  # fake-ip: where it answers (default: .2 of each)
    dns_upstream: str | None = None  # IP[:PORT]; None: the host's first nameserver
    dns_ttl: int = defaults.DNS_TTL
    dns_hold: float = defaults.DNS_HOLD
    drain_timeout: float = defaults.DRAIN_TIMEOUT  # a reload's old workers: their flows' time
    hang_timeout: float = defaults.HANG_TIMEOUT  # a child silent this long is killed (0: never)
    # Per-flow policy (tunio.policy): "module:attr" or the function itself; or the rules of a
    # configuration file (tunio.rules), with names for the dialers they use.
    policy: str | Policy | None = None
    dialers: Mapping[str, str | tuple[str, ...] | Dialer] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # Where settings came from when not from the command line or the library (field name ->
    # "FILE:LINE"): an error about one of them names its line (see explain()).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DnsPlan:
    """--dns checked: what the stack answers and where other queries go."""

    mode: str  # "fake-ip" or "hijack"
    upstream: tuple[Address, int]
    pools: tuple[Network, ...] = ()  # fake-ip: IPv4 first, then IPv6 (only families the TUN has)
    addresses: tuple[Address, ...] = ()  # fake-ip: where it answers, IPv4 first
    ttl: int = defaults.DNS_TTL
    hold: float = defaults.DNS_HOLD

    def stack_fields(self) -> dict[str, Any]:
        """tunio.stack.StackConfig's DNS fields for this plan."""
        return {
            "dns_mode": self.mode,
            "dns_pools": self.pools,
            "dns_addresses": self.addresses,
            "dns_upstream": self.upstream,
            "dns_ttl": self.ttl,
            "dns_hold": self.hold,
        }


@dataclass(frozen=True)
class Plan:
    """Options checked and parsed: what the supervisor will set up."""

    addresses: tuple[Interface, ...]  # IPv4 first, then IPv6
    routes: tuple[str, ...]  # "default" (IPv4), "::/0" (IPv6) or a network in CIDR form
    runtime_dir: Path
    endpoint: str | None
    excludes: tuple[str, ...] = ()  # networks in CIDR form that keep the main table's route
    dns: DnsPlan | None = None


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
    why = martian(iface.ip)
    if why:
        raise ConfigError(f"--address {text}: {why} is never routed into a TUN")
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


#: the longest of the time settings, in seconds: each becomes a 32-bit count of milliseconds
#: in the stack's configuration (49 days at most); a day is more than any of them needs
MAX_SECONDS = 86400.0


def check_seconds(value: float, flag: str) -> None:
    # `not 0 < value` also catches NaN
    if not 0 < value <= MAX_SECONDS:
        raise ConfigError(f"--{flag} {value:g} is out of range: use above 0 up to {MAX_SECONDS:g}")


def check_window(window: int) -> None:
    if not 1024 <= window <= 1 << 30:
        raise ConfigError(f"--window {window} is out of range: use 1024..{1 << 30}")


def parse_keepalive(text: str) -> defaults.Keepalive | None:
    """--tcp-keepalive: (idle s, interval s, probes), or None for "off"."""
    if text.strip().lower() == "off":
        return None
    parts = text.split(",")
    try:
        idle, interval, count = (int(p) for p in parts) if len(parts) == 3 else (0, 0, 0)
    except ValueError:
        idle = 0
    if not (1 <= idle <= 32767 and 1 <= interval <= 32767 and 1 <= count <= 127):
        raise ConfigError(
            f"--tcp-keepalive {text!r}: give IDLE,INTERVAL,COUNT (seconds idle before the first "
            "probe 1..32767, seconds between probes 1..32767, probes 1..127), or off"
        )
    return idle, interval, count


def _check_timeouts_and_sizes(options: Options) -> None:
    check_seconds(options.connect_timeout, "connect-timeout")
    check_seconds(options.drain_timeout, "drain-timeout")
    check_seconds(options.udp_timeout, "udp-timeout")
    parse_keepalive(options.tcp_keepalive)
    if options.hang_timeout != 0:  # (0: no watch)
        check_seconds(options.hang_timeout, "hang-timeout")
    check_window(options.window)
    if not options.window <= options.worker_backlog <= 1 << 40:
        raise ConfigError(f"--worker-backlog {options.worker_backlog} is out of range: use "
                          f"--window ({options.window})..{1 << 40}")
    if not 1 <= options.txqueuelen <= 1 << 20:
        raise ConfigError(f"--txqueuelen {options.txqueuelen} is out of range: use 1..{1 << 20}")


def pending_limit(options: Options) -> int:
    """The SYNs held at once: --max-pending, or by default defaults.MAX_PENDING capped at
    --max-flows (a pending flow is a flow)."""
    if options.max_pending is not None:
        return options.max_pending
    return min(defaults.MAX_PENDING, options.max_flows)


#: the settings that may be left unset (None), and the repeatable ones that also take one value
#: alone (Options(address="198.18.0.1/24")); a lone string elsewhere would be read letter by
#: letter (routes="default" as the routes "d", "e", ...)
_UNSET_ALLOWED = frozenset(f.name for f in fields(Options) if f.default is None)
_ONE_ALLOWED = frozenset({"address", "dns_address"})
#: what each kind of setting takes, in the words of an error (only a library's Options can
#: hold a value of the wrong kind: the command line and the file convert and check their own)
_KIND_WORDS = {"str": "a string", "choice": "a string", "int": "an integer",
               "mark": "an integer", "float": "a number", "bool": "True or False"}  # fmt: skip


def _of_kind(setting: Setting, value: object) -> bool:
    kind = setting.kind
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # True is an int to Python, not a count or a time to us
        return False
    if kind in ("int", "mark"):
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    # a path may be a Path as well (--runtime-dir, --keys)
    return isinstance(value, str) or (setting.metavar in ("DIR", "FILE")
                                      and isinstance(value, os.PathLike))  # fmt: skip


def check_kinds(options: Options) -> None:
    """Each setting holds a value of its kind: a library's Options(workers="4") or
    Options(routes="default") is a ConfigError naming the setting, not a TypeError from deep
    inside a check, nor a start with the wrong settings. The dialer and the policy may be
    objects: tunio.wayout checks those."""
    for setting in SETTINGS:
        name = setting.field
        value = getattr(options, name)
        if name in ("dialer", "policy") or (value is None and name in _UNSET_ALLOWED):
            continue
        words = _KIND_WORDS[setting.kind]
        where = f"--{setting.flag}: {name}={value!r}"
        if setting.repeat and not (isinstance(value, str) and name in _ONE_ALLOWED):
            if isinstance(value, str):
                raise ConfigError(f"{where} is one string: give a tuple, {name}=({value!r},)")
            if not isinstance(value, (tuple, list)):
                what = "a tuple of strings"
                if name in _ONE_ALLOWED:
                    what = "a string or a tuple of them"
                raise ConfigError(f"{where} is of type {type(value).__name__}: give {what}")
            items: tuple[object, ...] = tuple(value)
        else:
            items = (value,)
        for item in items:
            if not _of_kind(setting, item):
                shown = where if item is value else f"{where} holds {item!r}, which"
                raise ConfigError(f"{shown} is of type {type(item).__name__}: give {words}")
    # the tables of a configuration file, which a library gives as objects (tunio.wayout checks
    # what they hold)
    if not isinstance(options.dialers, Mapping):
        raise ConfigError(f"dialers={options.dialers!r:.60} is of type "
                          f"{type(options.dialers).__name__}: give a mapping of names to "
                          "dialers, e.g. {'office': 'socks5://10.0.0.5:1080'}")  # fmt: skip
    if not isinstance(options.rules, (tuple, list)):
        raise ConfigError(f"rules={options.rules!r:.60} is of type "
                          f"{type(options.rules).__name__}: give a tuple of tunio.rules.Rule")


def validate(options: Options, sys_net: str = tundev.SYS_NET) -> Plan:
    """Check every option; ConfigError naming the first one that is wrong."""
    check_kinds(options)
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
    _check_timeouts_and_sizes(options)
    if options.log_level not in LEVELS:
        raise ConfigError(f"--log-level {options.log_level!r}: use one of {', '.join(LEVELS)}")
    if options.log_format not in FORMATS:
        raise ConfigError(f"--log-format {options.log_format!r}: use one of {', '.join(FORMATS)}")
    for name, value in (("--max-flows", options.max_flows), ("--max-pending", options.max_pending)):
        if value is not None and not 1 <= value <= MAX_LIMIT:
            raise ConfigError(f"{name} {value} is out of range: use 1..{MAX_LIMIT}")
    # the default is capped at --max-flows; a --max-pending given above it is a mistake
    if options.max_pending is not None and options.max_pending > options.max_flows:
        raise ConfigError(
            f"--max-pending {options.max_pending} is above --max-flows {options.max_flows}: "
            "a pending flow is a flow"
        )
    if options.endpoint is not None:
        check_endpoint(options.endpoint)
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
    dns = parse_dns(options, addresses)
    if dns is not None:
        routes = pool_routes(routes, dns.pools)
    return Plan(
        addresses=addresses,
        dns=dns,
        routes=routes,
        runtime_dir=runtime_dir,
        endpoint=options.endpoint,
        excludes=excludes,
    )


def parse_upstream(text: str) -> tuple[Address, int]:
    """--dns-upstream IP[:PORT] (an IPv6 address with a port in brackets)."""
    try:
        return ipaddress.ip_address(text), 53
    except ValueError:
        pass
    try:
        host, port = parse_host_port(text, "--dns-upstream")
    except ConfigError:
        raise ConfigError(f"--dns-upstream {text!r}: give an IP address, and a port if not 53: "
                          "e.g. 192.0.2.53, 192.0.2.53:5353 or [2001:db8::53]:5353") from None
    return ipaddress.ip_address(host), port


def _pool(text: str, version: int) -> Network:
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        raise ConfigError(f"--dns fake-ip:{text}: not a network in CIDR form "
                          "(e.g. fake-ip:198.18.0.0/15)") from None  # fmt: skip
    if net.version != version:
        raise ConfigError(f"--dns fake-ip:{text}: give the IPv4 pool first, then the IPv6 one")
    if version == 4 and not 8 <= net.prefixlen <= 30:
        raise ConfigError(f"--dns fake-ip:{text}: an IPv4 pool is /8 to /30")
    if version == 6 and not 96 <= net.prefixlen <= 126:
        raise ConfigError(f"--dns fake-ip:{text}: an IPv6 pool is /96 to /126")
    return net


def dns_upstream(options: Options) -> tuple[Address, int]:
    """--dns-upstream, or the host's first nameserver (port 53)."""
    from tunio.dialers.resolve import first_nameserver  # noqa: PLC0415 - a small module

    if options.dns_upstream is not None:
        return parse_upstream(options.dns_upstream)
    host = first_nameserver()
    if host is None:
        raise ConfigError("--dns: /etc/resolv.conf names no nameserver: give --dns-upstream")
    return ipaddress.ip_address(host), 53


def dns_enabled(options: Options) -> bool:
    """Whether --dns asks the stack to answer DNS (fake-ip or hijack), not off."""
    return options.dns not in (None, "", "off")


def parse_dns(options: Options, addresses: tuple[Interface, ...]) -> DnsPlan | None:
    """--dns and its settings: None when off. The upstream defaults to the host's first
    nameserver; fake-ip's pools to DNS_POOL (less the TUN's prefix, which the stack leaves out)
    and DNS_POOL6, each only where the TUN has an address of its family; its addresses to the
    second address of each TUN prefix."""
    # The DNS settings are checked whether --dns is on or not: a mistake in them must not wait
    # for the day --dns is turned on (or a reload turns it on) to be said.
    if not 0 <= options.dns_ttl <= 86400:
        raise ConfigError(f"--dns-ttl {options.dns_ttl} is out of range: use 0..86400")
    if not 0 <= options.dns_hold <= 86400:
        raise ConfigError(f"--dns-hold {options.dns_hold:g} is out of range: use 0..86400")
    if options.dns_upstream is not None:
        parse_upstream(options.dns_upstream)
    given = _dns_addresses(options)
    spec = options.dns
    if spec is None or not dns_enabled(options):  # spec: str from here on
        return None
    mode, _, arg = spec.partition(":")
    if mode not in ("fake-ip", "hijack") or (mode == "hijack" and arg):
        raise ConfigError(f"--dns {spec!r}: use fake-ip[:CIDR[,CIDR6]], hijack or off")
    upstream = dns_upstream(options)
    if mode == "hijack":
        return DnsPlan(mode, upstream, ttl=options.dns_ttl, hold=options.dns_hold)
    texts = [t for t in arg.split(",") if t] if arg else []
    if len(texts) > 2:
        raise ConfigError(f"--dns {spec!r}: at most an IPv4 and an IPv6 pool")
    given4 = _pool(texts[0], 4) if texts else None
    given6 = _pool(texts[1], 6) if len(texts) > 1 else None
    versions = {a.version for a in addresses}
    pools: list[Network] = []
    if 4 in versions:
        pools.append(given4 or ipaddress.ip_network(defaults.DNS_POOL))
    if 6 in versions:
        pools.append(given6 or ipaddress.ip_network(defaults.DNS_POOL6))
    for pool in pools:
        for iface in addresses:
            net = iface.network
            if net.version == pool.version and pool.subnet_of(net):  # type: ignore[arg-type]
                raise ConfigError(f"--dns: the pool {pool} lies inside the TUN's prefix {net}")
            if net.version == 6 == pool.version and net.overlaps(pool):
                raise ConfigError(f"--dns: the pool {pool} overlaps the TUN's prefix {net}")
    where: dict[int, Address] = {}
    for ip in given:
        if ip.version in where:
            raise ConfigError(f"--dns-address: give at most one IPv{ip.version} address")
        where[ip.version] = ip
    for iface in addresses:
        where.setdefault(iface.version, iface.network.network_address + 2)
    for ip in where.values():
        if any(ip == a.ip for a in addresses):
            raise ConfigError(f"--dns-address {ip} is the TUN's own address")
        in_tun = any(ip in a.network for a in addresses)  # the pools leave the TUN's prefix out
        if not in_tun and any(ip in pool for pool in pools):
            raise ConfigError(f"--dns-address {ip} lies in the fake-IP pool")
    return DnsPlan(
        "fake-ip", upstream, tuple(pools), tuple(where[v] for v in sorted(where)),
        options.dns_ttl, options.dns_hold,
    )  # fmt: skip


def _dns_addresses(options: Options) -> list[Address]:
    """--dns-address's addresses, each one a packet can be sent to through the TUN."""
    given = (options.dns_address,) if isinstance(options.dns_address, str) else options.dns_address
    out: list[Address] = []
    for text in given:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"--dns-address {text!r} is not an IP address") from None
        why = martian(ip)
        if why:
            raise ConfigError(f"--dns-address {ip}: {why} is never routed into a TUN")
        out.append(ip)
    return out


def pool_routes(routes: tuple[str, ...], pools: tuple[Network, ...]) -> tuple[str, ...]:
    """The routes, and a route into the TUN for each fake-IP pool that none of them covers."""
    out = list(routes)
    for pool in pools:
        covered = False
        for route in routes:
            if route in tundev.DEFAULT_ROUTES:
                covered = covered or (route == "default") == (pool.version == 4)
                continue
            net = ipaddress.ip_network(route)
            covered = covered or (net.version == pool.version and pool.subnet_of(net))  # type: ignore[arg-type]
        if not covered:
            out.append(str(pool))
    return tuple(out)


def parse_host_port(
    text: str, option: str, example: str = "127.0.0.1:9184 or [::1]:9184"
) -> tuple[str, int]:
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
            f"{option} {text!r}: give an IP address and a port, e.g. {example}"
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
