"""What a reload (SIGHUP) may change, and what it must refuse.

A reload rereads the configuration (the same file, the same flags) and compares it with the
settings in force. What the workers do with new flows (the dialer, the policy and its rules,
the egress mark or interface, the dial timeout, how many workers) changes live: a new
generation of workers takes every new flow while the old one finishes its own. What the device,
the stack or the host's network were set up with (addresses, routes, MTU, queues, endpoint, ...)
cannot change under running flows: a reload that changes any of it is refused as a whole, in one
line, and the settings in force stay.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tunio.config import Options
from tunio.settings import BY_FIELD

#: fields a reload may change besides the settings marked live (tunio.settings): the rules
#: tables of a configuration file, which have no flag
LIVE_TABLES = frozenset({"dialers", "rules"})
#: fields that are no settings of a run at all
_IGNORED = frozenset({"origins"})


@dataclass(frozen=True)
class Changes:
    live: tuple[str, ...]  # changed, and a new generation of workers takes them
    fixed: tuple[str, ...]  # changed, but only a restart can

    def describe_fixed(self, old: Options, new: Options) -> str:
        """One line naming each setting a reload cannot change, with both values."""
        parts = []
        for name in self.fixed:
            setting = BY_FIELD.get(name)
            shown = f"--{setting.flag}" if setting is not None else name
            parts.append(f"{shown} ({getattr(old, name)!r} -> {getattr(new, name)!r})")
        return ", ".join(parts)


def _live(name: str) -> bool:
    setting = BY_FIELD.get(name)
    return name in LIVE_TABLES or (setting is not None and setting.live)


def compare(old: Options, new: Options) -> Changes:
    """Which settings differ between the settings in force and a reloaded configuration."""
    names = [f.name for f in fields(Options) if f.name not in _IGNORED]
    changed = [name for name in names if getattr(old, name) != getattr(new, name)]

    def live(name: str) -> bool:
        # the bypass's rule was made for the mark in force: a new one needs a new rule
        if name == "egress_mark" and (old.auto_bypass or new.auto_bypass):
            return False
        return _live(name)

    return Changes(
        live=tuple(name for name in changed if live(name)),
        fixed=tuple(name for name in changed if not live(name)),
    )
