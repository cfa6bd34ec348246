"""Configure the TUN device with iproute2: one function per job, fixed argument lists."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunio.errors import ConfigError, TunError

TUN_PATH = "/dev/net/tun"
SYS_NET = "/sys/class/net"
PROC = "/proc"

IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100

_IP_TIMEOUT = 10.0


def _errno_of(message: str) -> int:
    """The errno whose text `ip` printed ("RTNETLINK answers: File exists" -> EEXIST)."""
    matches = [code for code in errno.errorcode if os.strerror(code) in message]
    # The longest text wins: "No such device or address" is ENXIO, not ENODEV.
    return max(matches, key=lambda code: len(os.strerror(code)), default=errno.EIO)


def _ip(*args: str) -> str:
    """Run `ip ARGS`; its stdout, or TunError with ip's stderr on one line."""
    argv = ["ip", *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise TunError(errno.ENOENT, "`ip` (iproute2) is not installed or not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise TunError(errno.ETIMEDOUT, f"`{' '.join(argv)}` did not finish") from exc
    if done.returncode != 0:
        detail = "; ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise TunError(_errno_of(detail), f"`{' '.join(argv)}` failed: {detail or 'no message'}")
    return done.stdout


def run(*args: str) -> str:
    """`ip ARGS` (a change of a run's plan, or a read); its stdout, or TunError."""
    return _ip(*args)


def _ip_json(*args: str) -> list[dict[str, Any]]:
    """`ip -j ARGS` as parsed JSON (a list of objects; empty when there is nothing)."""
    out = _ip("-j", *args).strip()
    parsed = json.loads(out) if out else []
    return parsed if isinstance(parsed, list) else []


@dataclass(frozen=True)
class Route:
    """How the host reaches a destination now: a gateway (or none: on link) and a device."""

    gateway: str | None
    dev: str
    prefsrc: str | None = None
    onlink: bool = False  # the gateway is on the device without a prefix that covers it


def route_to(network: str) -> Route | None:
    """The main table's way to the first address of `network`, or None if it has none."""
    net = ipaddress.ip_network(network, strict=False)
    family = "-6" if net.version == 6 else "-4"
    try:
        found = _ip_json(family, "route", "get", str(net.network_address))
    except TunError:
        return None  # unreachable: no route
    if not found or "dev" not in found[0]:
        return None
    first = found[0]
    gateway, dev = first.get("gateway"), str(first["dev"])
    # `route get` leaves out the flag; the main table's route through that gateway has it (a
    # copy without it is refused: "Nexthop has invalid gateway")
    onlink = gateway is not None and any(
        r.get("gateway") == gateway and r.get("dev") == dev and "onlink" in r.get("flags", ())
        for r in _ip_json(family, "route", "show", "table", "main")
    )
    return Route(gateway, dev, first.get("prefsrc"), onlink)


def route_exists(network: str, table: str = "main") -> bool:
    """True when `table` has a route for exactly `network`."""
    family = "-6" if ":" in network else "-4"
    return bool(_ip_json(family, "route", "show", "table", table, "exact", network))


def routes_of(family: int, table: str = "main") -> list[dict[str, Any]]:
    """Every route of `table` for IP version `family`, as `ip -j route show` gives them."""
    return _ip_json("-6" if family == 6 else "-4", "route", "show", "table", table)


def rules_of(family: int) -> list[dict[str, Any]]:
    """The policy rules of IP version `family`, as `ip -j rule show` gives them."""
    return _ip_json("-6" if family == 6 else "-4", "rule", "show")


def check_tun_device(path: str = TUN_PATH) -> None:
    if not os.path.exists(path):
        raise TunError(
            errno.ENOENT,
            "no /dev/net/tun: load the tun module (modprobe tun) or run in a VM/container "
            "that exposes it",
        )


def link_exists(name: str, sys_net: str = SYS_NET) -> bool:
    return os.path.exists(os.path.join(sys_net, name))


def tun_flags(name: str, sys_net: str = SYS_NET) -> int | None:
    """IFF_* flags of an existing TUN/TAP link; None when the link is no TUN/TAP device."""
    try:
        text = Path(sys_net, name, "tun_flags").read_text(encoding="ascii")
    except OSError:
        return None
    return int(text.strip(), 0)


def check_existing_link(name: str, sys_net: str = SYS_NET) -> None:
    """ConfigError unless an existing link `name` is a multi-queue TUN that we can open."""
    flags = tun_flags(name, sys_net)
    if flags is None:
        raise ConfigError(f"interface {name} exists and is not a TUN device: pick another --tun")
    if not flags & IFF_TUN:
        raise ConfigError(f"interface {name} is a TAP device, not TUN: pick another --tun")
    if not flags & IFF_MULTI_QUEUE:
        raise ConfigError(
            f"TUN device {name} exists without multi-queue support (tun_flags {flags:#x}): "
            f"delete it (ip link del {name}) or pick another --tun"
        )


Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def _family(version: int) -> str:
    return "-6" if version == 6 else "-4"


def address_owner(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The interface that holds `address`, or None."""
    kind = "inet6" if address.version == 6 else "inet"
    for line in _ip("-o", _family(address.version), "addr", "show").splitlines():
        # "2: eth0    inet 172.17.0.2/16 brd 172.17.255.255 scope global eth0\ ..."
        fields = line.split()
        if (
            len(fields) >= 4
            and fields[2] == kind
            and ipaddress.ip_interface(fields[3]).ip == address
        ):
            return fields[1].split("@", 1)[0]
    return None


def check_address_free(name: str, address: Interface) -> bool:
    """True when `name` already holds `address`; ConfigError when another interface does."""
    owner = address_owner(address.ip)
    if owner is not None and owner != name:
        raise ConfigError(
            f"address {address.ip} is already in use on {owner}: pick another --address"
        )
    return owner == name


#: each family's default route, as tunio's routes spell it (config.parse_route makes them so)
DEFAULT_ROUTES = ("default", "::/0")


def nexthop(gateway: str | None, dev: str, onlink: bool = False) -> tuple[str, ...]:
    """`ip route` arguments for a way out: via the gateway (if any), on the device, and
    `onlink` when the main table's route has it (a copy without it is refused)."""
    return (*(("via", gateway) if gateway else ()), "dev", dev, *(("onlink",) if onlink else ()))


def route_version(destination: str) -> int:
    """4 for "default" and IPv4 networks, 6 for IPv6 ones ("::/0" is IPv6's default)."""
    return 6 if ":" in destination else 4


def delete_link(name: str) -> None:
    _ip("link", "del", "dev", name)


def default_route_interface() -> str | None:
    """The device of the main table's IPv4 default route, if there is one."""
    for line in _ip("-4", "route", "show", "default").splitlines():
        fields = line.split()
        if "dev" in fields[:-1]:
            return fields[fields.index("dev") + 1]
    return None


def rp_filter(interface: str, proc: str = PROC) -> int | None:
    """The effective rp_filter of `interface`: the larger of its own and `all`'s."""
    values: list[int] = []
    for conf in ("all", interface):
        try:
            text = Path(proc, "sys/net/ipv4/conf", conf, "rp_filter").read_text(encoding="ascii")
        except OSError:
            continue
        values.append(int(text.strip()))
    return max(values) if values else None


def rp_filter_warning(interface: str, tun: str, proc: str = PROC) -> str | None:
    """One line saying why strict reverse-path filtering on `interface` breaks flows, or None."""
    if rp_filter(interface, proc) != 1:
        return None
    return (
        f"rp_filter is strict on {interface}: replies to the workers' connections whose reverse "
        f"route points into {tun} will be dropped; set it to loose "
        f"(sysctl net.ipv4.conf.{interface}.rp_filter=2 and .all.rp_filter=2) or add a "
        f"'from <{interface} address> lookup <table>' rule (tunio leaves it as it is)"
    )
