"""tunio-run's configuration file (TOML): read into settings, and written back for --print-config.

Every flag has a key of the same name with `_` for `-` (tunio.settings); a repeatable flag is an
array. An unknown key or a value of the wrong kind is one ConfigError naming the file, the line
and the key. Where each value came from is kept (`origins`), so that a value the checks of
tunio.config refuse later is reported at its line too.
"""

from __future__ import annotations

import errno
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tunio.errors import ConfigError
from tunio.settings import BY_KEY, SETTINGS, Setting

if TYPE_CHECKING:
    from tunio.rules import Rule


@dataclass(frozen=True)
class FileSettings:
    """What a configuration file sets: Options fields to values, and each one's `FILE:LINE`."""

    path: Path
    values: Mapping[str, object] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)


_AT_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def _not_toml(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> str:
    """tomllib's words, with the file's line number in front and the line itself behind: its
    "Cannot overwrite a value" says neither which key nor that the key was given twice."""
    why = str(exc)
    at = _AT_LINE.search(why)
    if at is None:
        return f"{path}: not valid TOML: {why}"
    number = int(at[1])
    lines = text.splitlines()
    shown = lines[number - 1].strip() if 0 < number <= len(lines) else ""
    why = _AT_LINE.sub("", why).strip()
    if why == "Cannot overwrite a value":
        why = "a key given twice (or a value set again)"
    return f"{path}:{number}: not valid TOML: {why}" + (f": {shown}" if shown else "")


def read(path: Path) -> FileSettings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_not_toml(path, text, exc)) from None
    lines = text.splitlines()
    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    for key, raw in data.items():
        where = f"{path}:{_line_of(lines, key)}"
        if key in TABLES:
            values[TABLES[key]] = _table(key, raw, path, lines)
            origins[TABLES[key]] = where
            if key == "dialers":  # each named dialer's own line, for the errors of its loading
                for name in cast(dict[str, object], raw):
                    origins[f"dialers.{name}"] = f"{path}:{_line_in(lines, 'dialers', 0, name)}"
            continue
        setting = BY_KEY.get(key)
        if setting is None:
            raise ConfigError(
                f"{where}: unknown key {key!r} (the keys are tunio-run's flags with _ for -: "
                "see tunio-run --help)"
            )
        values[setting.field] = _value(setting, raw, f"{where}: {key}")
        origins[setting.field] = where
    return FileSettings(path, values, origins)


#: the tables a file may have beyond the flags' keys, and the Options fields they set
TABLES = {"dialers": "dialers", "rule": "rules"}
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # a TOML key that needs no quotes


def _table(key: str, raw: object, path: Path, lines: list[str]) -> object:
    """[dialers] (names for dialer specs) or [[rule]] (the rules, tunio.rules)."""
    if key == "dialers":
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}:{_line_of(lines, key)}: dialers: give a [dialers] table")
        out: dict[str, str | tuple[str, ...]] = {}
        for name, spec in raw.items():
            where = f"{path}:{_line_in(lines, 'dialers', 0, name)}"
            if isinstance(spec, str):
                out[name] = spec
            elif isinstance(spec, list) and spec and all(isinstance(x, str) for x in spec):
                out[name] = tuple(spec)
            else:
                raise ConfigError(f"{where}: dialers.{name} = {_shown(spec)}: give a dialer spec "
                                  "or an array of them (a chain)")  # fmt: skip
            if name in ("reject", "default", "direct"):
                raise ConfigError(f"{where}: dialers.{name}: {name!r} is built in: pick another")
        return out
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ConfigError(f"{path}:{_line_of(lines, key)}: rule: give [[rule]] tables")
    from tunio.rules import parse_rules  # noqa: PLC0415

    return tuple(parse_rules(raw, lambda i, k: f"{path}:{_line_in(lines, 'rule', i, k)}"))


_HEADERS = {
    "dialers": re.compile(r"^\s*\[\s*dialers\s*\]"),
    "rule": re.compile(r"^\s*\[\[\s*rule\s*\]\]"),
}


def _line_in(lines: list[str], table: str, index: int, key: str) -> int:
    """The line of `key` in the `index`-th table `table` ([dialers], [[rule]]); the table's own
    line when the key is "" or not found there."""
    head = _HEADERS[table]
    key_rx = re.compile(rf"^\s*{re.escape(key)}\s*=") if key else None
    seen, found = -1, 0
    for number, line in enumerate(lines, 1):
        if head.match(line):
            seen += 1
            if seen > index:
                break
            found = number if seen == index else found
        elif seen == index and line.lstrip().startswith("["):
            break
        elif seen == index and key_rx is not None and key_rx.match(line):
            return number
    return found


def _line_of(lines: list[str], key: str) -> int:
    """The line that sets top-level `key` (1-based), or its table's header ([key], [[key]], or a
    dotted [key.x]); 0 if it cannot be found."""
    name = rf"""(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
    pattern = re.compile(rf"^\s*{name}\s*[=.]")  # key = ..., or a dotted key.x = ...
    header = re.compile(rf"^\s*\[\[?\s*{name}\s*[\].]")
    in_tables = False
    for number, line in enumerate(lines, 1):
        if header.match(line):
            return number
        in_tables = in_tables or line.lstrip().startswith("[")
        if not in_tables and pattern.match(line):  # top-level keys come before the first table
            return number
    return 0


def _value(setting: Setting, raw: object, where: str) -> object:
    """`raw` from the file as the Options field wants it; ConfigError naming `where`."""
    if setting.repeat:
        items = raw if isinstance(raw, list) else [raw]
        converted = tuple(_scalar(setting, item, where) for item in items)
        # one value stays a plain value, as with one flag (Options takes either)
        if setting.field in ("address", "dialer") and len(converted) == 1:
            return converted[0]
        return converted
    value = _scalar(setting, raw, where)
    return (not value) if setting.invert else value


def _scalar(setting: Setting, raw: object, where: str) -> object:
    kind = setting.kind
    if kind in ("str", "choice"):
        if not isinstance(raw, str):
            raise ConfigError(f"{where} = {_shown(raw)}: expected a string")
        if kind == "choice" and raw not in setting.choices:
            raise ConfigError(f"{where} = {_shown(raw)}: use one of {', '.join(setting.choices)}")
        return raw
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{where} = {_shown(raw)}: expected true or false")
        return raw
    if kind == "mark" and isinstance(raw, str):
        try:
            return int(raw, 0)
        except ValueError:
            raise ConfigError(f"{where} = {_shown(raw)}: expected a number (or 0x hex)") from None
    if kind in ("int", "mark"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where} = {_shown(raw)}: expected an integer")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(f"{where} = {_shown(raw)}: expected a number")
    return float(raw)


def _shown(raw: object) -> str:
    if isinstance(raw, str):
        return f'"{raw}"'
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return repr(raw)


def render(options: Any) -> str:
    """The effective settings of `options` (a tunio.config.Options) as a configuration file:
    what --print-config shows, and a file tunio-run --config takes back unchanged."""
    out = ["# tunio-run's effective settings (tunio-run --print-config)"]
    for setting in SETTINGS:
        value = getattr(options, setting.field)
        if setting.invert:
            value = not value
        if value is None:
            meaning = f": {setting.unset}" if setting.unset else ""
            out.append(f"# {setting.key} is not set{meaning}")
            continue
        if setting.repeat:
            items = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(i, str) for i in items):
                out.append(f"# {setting.key} = {value!r} (set by the library, not a file)")
                continue
            value = list(items)
        elif not isinstance(value, (str, int, float, bool)):
            out.append(f"# {setting.key} = {value!r} (set by the library, not a file)")
            continue
        out.append(f"{setting.key} = {_toml(value)}")
    out += _dialer_table(options.dialers)
    for rule in options.rules:
        out += ["", "[[rule]]", *_rule_lines(rule)]
    return "\n".join(out) + "\n"


def _dialer_table(dialers: Mapping[str, object]) -> list[str]:
    """The [dialers] table: a name's spec, or its chain of specs (an object is no file's)."""
    if not dialers:
        return []
    out = ["", "[dialers]"]
    for name, spec in dialers.items():
        key = name if BARE_KEY.fullmatch(name) else _toml(name)
        if isinstance(spec, str) or (
            isinstance(spec, tuple) and all(isinstance(s, str) for s in spec)
        ):
            out.append(f"{key} = {_toml(spec if isinstance(spec, str) else list(spec))}")
        else:
            out.append(f"# {key} = {spec!r} (set by the library, not a file)")
    return out


def _rule_lines(rule: Rule) -> list[str]:
    """A rule as the keys of its [[rule]] table, conditions first (empty ones left out)."""
    ports = [lo if lo == hi else f"{lo}-{hi}" for lo, hi in rule.ports]
    fields: list[tuple[str, list[Any]]] = [
        ("domain", list(rule.domains)),
        ("cidr", [str(n) for n in rule.networks]),
        ("port", ports),
        ("uid", sorted(rule.uids)),
        ("process", sorted(rule.processes)),
        ("protocol", sorted(rule.protocols)),
        ("action", list(rule.action)),
    ]
    out = [f"{key} = {_toml(value)}" for key, value in fields if value]
    if rule.refusal != errno.ECONNREFUSED:
        out.append(f"errno = {_toml(errno.errorcode[rule.refusal])}")
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)
