"""The rules table of a configuration file: the common policies without code.

    [dialers]                      # names for dialers ("direct" and "default" are built in)
    proxy = "socks5://10.0.0.1:1080"
    office = ["socks5://10.0.0.1:1080", "http://10.1.0.1:3128"]   # a chain

    [[rule]]
    domain = ["example.com"]       # the name or a name under it (fake-IP DNS gives names)
    action = "proxy"

    [[rule]]
    uid = [1000]                   # the app's user, its process name: `process = ["curl"]`
    cidr = ["10.0.0.0/8"]          # and/or the destination's address, port, protocol
    port = [22, "8000-8999"]
    action = ["proxy", "direct"]   # failover: the next is tried if a dial fails

    [[rule]]
    cidr = ["192.0.2.0/24"]
    action = "reject"              # refused (errno = "EHOSTUNREACH" to refuse otherwise)

A rule matches when every condition it gives holds (any value of a list); the first that
matches decides, and a flow no rule matches takes the run's own dialer ("default").
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tunio.dialers.base import Dialer
from tunio.errors import ConfigError
from tunio.policy import Decision, Flow, IPAddress, Reject

#: the keys a rule may have
CONDITIONS = ("domain", "cidr", "port", "uid", "process", "protocol")
KEYS = (*CONDITIONS, "action", "errno")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    domains: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    uids: frozenset[int] = frozenset()
    processes: frozenset[str] = frozenset()
    protocols: frozenset[str] = frozenset()
    action: tuple[str, ...] = ("default",)  # dialer names, tried in order; or ("reject",)
    refusal: int = errno.ECONNREFUSED
    where: str = ""  # FILE:LINE of the rule, for errors and logs

    @property
    def needs_owner(self) -> bool:
        return bool(self.uids or self.processes)

    def matches(self, flow: Flow) -> bool:
        """Every condition the rule gives holds (the app's owner is looked up last, and only
        for rules that ask about it)."""
        return (
            (not self.protocols or flow.protocol in self.protocols)
            and (not self.ports or any(lo <= flow.dst.port <= hi for lo, hi in self.ports))
            and (not self.networks or _in_any(flow.ip, self.networks))
            and (not self.domains or _under_any(flow.name, self.domains))
            and (not self.uids or flow.uid in self.uids)
            and (not self.processes or flow.process in self.processes)
        )


def _in_any(ip: IPAddress | None, networks: tuple[Network, ...]) -> bool:
    return ip is not None and any(ip in net for net in networks)


def _under_any(name: str | None, domains: tuple[str, ...]) -> bool:
    """`name` is one of `domains` or under one of them (www.example.com under example.com)."""
    if not name:
        return False
    name = name.rstrip(".").lower()
    return any(name == d or name.endswith("." + d) for d in domains)


class RuleTable:
    """A policy made of rules: the first rule that matches a flow decides."""

    def __init__(self, rules: Sequence[Rule], dialers: Mapping[str, Dialer]) -> None:
        self.rules = tuple(_placed(rule, index) for index, rule in enumerate(rules))
        self.dialers = dict(dialers)
        for rule in self.rules:
            for name in rule.action:
                if name != "reject" and name not in self.dialers:
                    known = ", ".join(sorted(self.dialers))
                    raise ConfigError(f"{rule.where}: action {name!r} is no dialer "
                                      f"(known: {known}, reject)")  # fmt: skip

    def __call__(self, flow: Flow) -> Decision:
        for rule in self.rules:
            if rule.matches(flow):
                if rule.action == ("reject",):
                    return Reject(rule.refusal, f"rule at {rule.where}")
                return [self.dialers[name] for name in rule.action]
        return None  # the run's own dialer


def _placed(rule: object, index: int) -> Rule:
    """`rule` checked, with a place to be named by in errors and logs: a rule a library made
    has no FILE:LINE, so it is named by its index in Options.rules."""
    if not isinstance(rule, Rule):  # a library's Options(rules=...) may hold anything
        raise ConfigError(f"rules[{index}]: {rule!r:.60} is a {type(rule).__name__}, not a "
                          "tunio.rules.Rule")  # fmt: skip
    placed = rule if rule.where else replace(rule, where=f"rules[{index}]")
    try:
        Reject(placed.refusal)  # checked now, not at the first flow it refuses
    except ConfigError as exc:
        raise ConfigError(f"{placed.where}: refusal: {exc}") from None
    return placed


def parse_rules(raw: Sequence[Mapping[str, Any]], where: Callable[[int, str], str]) -> list[Rule]:
    """Rules from a file's [[rule]] tables; `where(index, key)` names the line of a value."""
    return [_rule(item, index, where) for index, item in enumerate(raw)]


def _rule(item: Mapping[str, Any], index: int, where: Callable[[int, str], str]) -> Rule:
    for key in item:
        if key not in KEYS:
            raise ConfigError(f"{where(index, key)}: rule: unknown key {key!r} "
                              f"(use {', '.join(KEYS)})")  # fmt: skip
    if not any(key in item for key in CONDITIONS):
        raise ConfigError(f"{where(index, '')}: a rule needs a condition ({', '.join(CONDITIONS)})")

    def strings(key: str) -> tuple[str, ...]:
        value = item.get(key, [])
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{where(index, key)}: rule {key} = {value!r}: give strings")
        return tuple(values)

    try:
        networks = tuple(ipaddress.ip_network(c, strict=False) for c in strings("cidr"))
    except ValueError as exc:
        raise ConfigError(f"{where(index, 'cidr')}: rule cidr: {exc}") from None
    action = strings("action") if "action" in item else ("default",)
    if "reject" in action and len(action) > 1:
        raise ConfigError(f"{where(index, 'action')}: rule action: reject stands alone")
    refusal = errno.ECONNREFUSED
    if "errno" in item:
        name = item["errno"]
        refusal = getattr(errno, name, 0) if isinstance(name, str) else 0
        if not refusal:
            raise ConfigError(f"{where(index, 'errno')}: rule errno = {name!r}: give a name "
                              "such as ECONNREFUSED, EHOSTUNREACH, ETIMEDOUT")  # fmt: skip
    protocols = frozenset(strings("protocol"))
    if protocols - {"tcp", "udp", "icmp"}:
        raise ConfigError(f"{where(index, 'protocol')}: rule protocol: tcp, udp or icmp")
    return Rule(
        domains=tuple(d.strip(".").lower() for d in strings("domain")),
        networks=networks,
        ports=_ports(item.get("port", []), where(index, "port")),
        uids=frozenset(_ints(item.get("uid", []), where(index, "uid"), "uid")),
        processes=frozenset(strings("process")),
        protocols=protocols,
        action=action,
        refusal=refusal,
        where=where(index, ""),
    )


def _ints(value: Any, where: str, key: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{where}: rule {key} = {value!r}: give whole numbers")
    return list(values)


def _ports(value: Any, where: str) -> tuple[tuple[int, int], ...]:
    out = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and "-" in item:
            first, _, last = item.partition("-")
            try:
                lo, hi = int(first), int(last)
            except ValueError:
                lo = hi = -1
        else:
            lo = hi = -1
        if not 0 <= lo <= hi <= 65535:
            raise ConfigError(f"{where}: rule port {item!r}: a port or a range like \"8000-8999\"")
        out.append((lo, hi))
    return tuple(out)
