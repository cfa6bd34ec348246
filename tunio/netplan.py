"""The changes a run makes to the host's network, planned before any is made.

Everything tunio-run changes (the TUN device, its addresses and settings, the routes into it,
the routes that keep networks out of it, the bypass's rules and table) is first a list of
`Change`s, computed from the options and from what the host has now. `--dry-run` prints the
list and changes nothing. A run applies it in order and notes each change it made in a journal
in its runtime directory, so that at exit it takes back exactly those, in reverse order, and
`tunio-run --cleanup` can take back what a killed run left.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tunio import tundev
from tunio.config import Interface, Options, Plan
from tunio.errors import ConfigError

JOURNAL_NAME = "changes.jsonl"


@dataclass(frozen=True)
class Change:
    """One change and how to take it back, as `ip` arguments. The device has no `do`: opening
    its queues makes it (and closing them removes it)."""

    what: str
    do: tuple[str, ...] = ()
    undo: tuple[str, ...] = ()  # empty: it goes with the device
    exists_hint: str = ""  # what to do when `do` fails because the thing exists already

    def command(self) -> str:
        return "ip " + " ".join(self.do) if self.do else "(tunio-run itself opens its queues)"


def device_changes(
    options: Options, plan: Plan, existed: bool, held: Sequence[bool]
) -> list[Change]:
    """The device and its settings: made (or adopted) first, everything else depends on it."""
    tun = options.tun
    out: list[Change] = []
    if not existed:
        # made by opening its queues, and gone with the last of them; the undo is for
        # --cleanup, should something have made it persistent
        out.append(Change(f"create TUN device {tun} ({options.queues} queues)",
                          undo=("link", "del", "dev", tun)))  # fmt: skip
    for address, has in zip(plan.addresses, held, strict=True):
        if not has:
            # a device we created takes its address with it; one we adopted keeps nothing of ours
            undo = _address_args("del", tun, address) if existed else ()
            out.append(Change(f"address {address} on {tun}", _address_args("add", tun, address),
                              undo))  # fmt: skip
    mtu, qlen = str(options.mtu), str(options.txqueuelen)
    out += [
        Change(f"mtu {mtu} on {tun}", ("link", "set", "dev", tun, "mtu", mtu)),
        Change(f"txqueuelen {qlen} on {tun}", ("link", "set", "dev", tun, "txqueuelen", qlen)),
        Change(f"{tun} up", ("link", "set", "dev", tun, "up")),
    ]
    return out


def _address_args(verb: str, tun: str, address: Interface) -> tuple[str, ...]:
    if address.version == 6:
        # No duplicate address detection: the stack binds its listener to this address at
        # once, and a tentative address cannot be bound; nothing else answers on a TUN anyway.
        extra = ("nodad",) if verb == "add" else ()
        return ("-6", "addr", verb, str(address), "dev", tun, *extra)
    return ("addr", verb, str(address), "dev", tun)


def route_changes(tun: str, routes: Iterable[str]) -> list[Change]:
    """The routes into the TUN, each removed at exit (the device may outlive us)."""
    out = []
    for route in routes:
        v6 = tundev.route_version(route) == 6
        family = "-6" if v6 else "-4"
        if route in tundev.DEFAULT_ROUTES:
            halves = (
                "--route ::/1 --route 8000::/1" if v6 else "--route 0.0.0.0/1 --route 128.0.0.0/1"
            )
            hint = (f"the host has a default route of its own: give {halves} instead, which win "
                    "over it and leave it in place")  # fmt: skip
        else:
            hint = f"the host has a route to {route} of its own: remove it, or route another prefix"
        out.append(Change(f"route {route} into {tun}", (family, "route", "add", route, "dev", tun),
                          (family, "route", "del", route, "dev", tun), hint))  # fmt: skip
    return out


def exclude_changes(tun: str, excludes: Iterable[str]) -> list[Change]:
    """Networks kept out of the TUN: each gets a route of its own along the way the host reaches
    it now (before any route into the TUN exists), unless the main table has that very route."""
    out = []
    for network in excludes:
        family = "-6" if ":" in network else "-4"
        if tundev.route_exists(network):
            continue  # already routed by its own prefix, which wins over any wider route of ours
        via = tundev.route_to(network)
        if via is None:
            raise ConfigError(f"--exclude {network}: the host has no route to it now")
        if via.dev == tun:
            raise ConfigError(f"--exclude {network}: the host routes it into {tun} already")
        path = tundev.nexthop(via.gateway, via.dev, via.onlink)
        out.append(Change(f"route {network} kept out of {tun} ({' '.join(path)})",
                          (family, "route", "add", network, *path),
                          (family, "route", "del", network, *path)))  # fmt: skip
    return out


# ---------------------------------------------------------------- the journal


class Journal:
    """The changes a run made, one JSON line each, in its runtime directory: what --cleanup
    takes back if the run could not (it was killed)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / JOURNAL_NAME

    def add(self, change: Change) -> None:
        """Notes `change` before it is made (a kill between the two leaves it in the journal,
        and --cleanup's undo of a change that was never made fails harmlessly)."""
        line = json.dumps({"what": change.what, "do": change.do, "undo": change.undo})
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def keep_only(self, changes: list[Change]) -> None:
        """The journal holds `changes` alone (the last noted, which failed, dropped; or what a
        stop could not take back, for --cleanup), written whole before it replaces the old."""
        if not changes:
            self.remove()
            return
        text = "".join(json.dumps({"what": c.what, "do": c.do, "undo": c.undo}) + "\n"
                       for c in changes)  # fmt: skip
        part = self.path.with_name(self.path.name + ".new")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, self.path)

    def read(self) -> list[Change]:
        """The changes noted, in the order they were made (a torn last line is left out)."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                item = json.loads(line)
                out.append(Change(str(item["what"]), tuple(item["do"]), tuple(item["undo"])))
        return out

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
