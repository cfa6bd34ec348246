"""--auto-bypass: the workers' own connections kept out of the TUN, without a hand-made rule.

The uplink is the way the host goes out now: the main table's default route of each family, read
before any route into the TUN exists. The bypass copies it, with the routes of the uplink's own
link, into a routing table of tunio's own, and a rule sends the workers' traffic (their firewall
mark) there. With strict reverse-path filtering on an IPv4 uplink, the replies to the workers
would be dropped, since their reverse route now points into the TUN; a rule `from <uplink
address> lookup <table>` makes the uplink their reverse route again (tunio never changes the
uplink's own settings). Each step is a netplan.Change: printed by --dry-run, noted in the
journal, taken back at exit.
"""

from __future__ import annotations

import logging
from typing import Any

from tunio import tundev
from tunio.errors import ConfigError
from tunio.netplan import Change

log = logging.getLogger("tunio.bypass")

MARK = 0x7475  # the workers' mark when --egress-mark is not given ("tu")
TABLE_FIRST = 7475  # the first routing table tried for our own; the next free one is taken
TABLE_TRIES = 256
RULE_PREF = 7475  # our rules' priority: before the main table's (32766)


def free_table() -> int:
    """A routing table that no route and no rule uses, of either family."""
    used: set[str] = set()
    for family in (4, 6):
        used |= {str(r.get("table")) for r in tundev.routes_of(family, "all")}
        used |= {str(r.get("table")) for r in tundev.rules_of(family)}
    for table in range(TABLE_FIRST, TABLE_FIRST + TABLE_TRIES):
        if str(table) not in used:
            return table
    raise ConfigError(
        f"--auto-bypass: routing tables {TABLE_FIRST}..{TABLE_FIRST + TABLE_TRIES - 1} are all in "
        "use: remove stale ones (tunio-run --cleanup) or set up the bypass by hand"
    )


def _copy(route: dict[str, Any], family: str, table: int) -> Change:
    """`route` of the main table, again in `table`."""
    dst = str(route["dst"])
    gateway = str(route["gateway"]) if route.get("gateway") else None
    path = tundev.nexthop(gateway, str(route["dev"]), "onlink" in route.get("flags", ()))
    extra = [*(("scope", route["scope"]) if route.get("scope") == "link" else ()),
             *(("src", route["prefsrc"]) if route.get("prefsrc") else ())]  # fmt: skip
    where = ("table", str(table))
    return Change(
        f"bypass route {dst} {' '.join(path)} in table {table}",
        (family, "route", "add", dst, *path, *extra, *where),
        (family, "route", "del", dst, *path, *where),
    )


def _rule(family: str, selector: tuple[str, ...], table: int, pref: int, why: str) -> Change:
    args = (*selector, "lookup", str(table), "pref", str(pref))
    return Change(f"bypass rule {' '.join(args)} ({why})", (family, "rule", "add", *args),
                  (family, "rule", "del", *args))  # fmt: skip


def plan(tun: str, mark: int, proc: str = tundev.PROC) -> list[Change]:
    """The bypass's changes for every family the host has a default route of (not into `tun`)."""
    table = free_table()
    out: list[Change] = []
    for version in (4, 6):
        family = f"-{version}"
        main = [r for r in tundev.routes_of(version) if r.get("dev") != tun]
        default = next((r for r in main if r.get("dst") == "default" and "dev" in r), None)
        if default is None:
            continue
        uplink = str(default["dev"])
        out += [_copy(r, family, table) for r in main if r.get("dev") == uplink]
        out.append(_rule(family, ("fwmark", f"{mark:#x}"), table, RULE_PREF,
                         "the workers' own connections leave by " + uplink))  # fmt: skip
        if version == 4 and tundev.rp_filter(uplink, proc) == 1:
            sources = sorted({str(r["prefsrc"]) for r in main if r.get("prefsrc")
                              and r.get("dev") == uplink})  # fmt: skip
            out += [
                _rule(family, ("from", src), table, RULE_PREF + 1,
                      f"rp_filter is strict on {uplink}: replies to the workers pass it")
                for src in sources
            ]  # fmt: skip
    if not out:
        raise ConfigError(
            "--auto-bypass: the host has no default route (outside the TUN) to find the uplink "
            "by: add one, or give --egress-interface / --egress-mark with a rule of your own"
        )
    return out
