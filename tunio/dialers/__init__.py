"""Dialers: how a worker reaches a flow's destination."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from tunio.dialers.base import (
    Address,
    DatagramDialer,
    DatagramSession,
    Dialer,
    DialFunction,
    FunctionDialer,
    PingDialer,
    StartConnect,
    toward_proxy,
)
from tunio.dialers.direct import DirectDialer
from tunio.dialers.http import HttpDialer
from tunio.dialers.proxy import ProxyDialer
from tunio.dialers.resolve import Resolver
from tunio.dialers.socks5 import Socks5Dialer
from tunio.errors import ConfigError
from tunio.loading import load_object

__all__ = [
    "Address",
    "DatagramDialer",
    "DatagramSession",
    "DialFunction",
    "Dialer",
    "DirectDialer",
    "FunctionDialer",
    "HttpDialer",
    "PingDialer",
    "ProxyDialer",
    "Resolver",
    "Socks5Dialer",
    "StartConnect",
    "label",
    "load_dialer",
    "toward_proxy",
]

_ACCEPTED = (
    "expected 'direct', 'socks5://[user:pass@]host:port', 'http://[user:pass@]host:port' or "
    "'module:attr' (a Dialer, a zero-argument factory of one, or an async function "
    "(dst, src) -> socket)"
)

#: URL schemes of the built-in proxy dialers
PROXIES: dict[str, type[ProxyDialer]] = {"socks5": Socks5Dialer, "http": HttpDialer}


def label(dialer: object) -> str:
    """A dialer's name in logs and metrics, never with credentials: "direct",
    "socks5://10.0.0.1:1080" ("socks5://a:1080,http://b:3128" for a chain), "module:function"
    for a function, a `label` attribute of a dialer that has one, else its class."""
    if isinstance(dialer, DirectDialer):
        return "direct"
    if isinstance(dialer, ProxyDialer):
        own = f"{dialer.scheme}://{dialer.proxy}"
        via = dialer.via
        return f"{label(via)},{own}" if isinstance(via, ProxyDialer) else own
    if isinstance(dialer, FunctionDialer):
        func = dialer.func
        return f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', func)}"
    named = getattr(dialer, "label", None)
    if isinstance(named, str) and named:
        return named
    kind = type(dialer)
    return f"{kind.__module__}:{kind.__qualname__}"


def _is_dialer(obj: object) -> bool:
    return not inspect.isclass(obj) and callable(getattr(obj, "dial", None))


def _from_object(obj: object, spec: str) -> Dialer:
    if _is_dialer(obj):
        return obj  # type: ignore[return-value]
    if inspect.iscoroutinefunction(obj):
        return FunctionDialer(obj)
    if callable(obj):
        try:
            made: Any = obj()
        except Exception as exc:
            raise ConfigError(f"dialer {spec!r}: factory failed: {exc!r}") from exc
        if _is_dialer(made):
            return made  # type: ignore[no-any-return]
        raise ConfigError(f"dialer {spec!r}: factory returned {type(made).__name__}, not a Dialer")
    raise ConfigError(f"dialer {spec!r} is a {type(obj).__name__}: {_ACCEPTED}")


def load_dialer(
    spec: str | Sequence[str] | Dialer,
    *,
    egress_mark: int | None = None,
    egress_interface: str | None = None,
    resolver: Resolver | None = None,
) -> Dialer:
    """Turn a dialer specification into a Dialer (`resolver`: the direct dialer's, for names).

    A list of specifications is a chain: each proxy URL after the first is reached through the
    dialers before it (`["socks5://a:1080", "http://b:3128"]` asks a for a tunnel to b, and b
    for one to the destination). The egress mark and interface apply to the first hop's own
    connections (the direct dialer's, or the first proxy's); a user's dialer gets its own
    settings from its own code.
    """
    if isinstance(spec, str):
        return _load_one(spec, None, egress_mark, egress_interface, resolver)
    if isinstance(spec, Sequence):
        if not spec:
            raise ConfigError(f"an empty dialer chain: {_ACCEPTED}")
        dialer: Dialer | None = None
        for item in spec:
            if not isinstance(item, str):
                raise ConfigError(f"dialer chain entry {item!r}: {_ACCEPTED}")
            dialer = _load_one(item, dialer, egress_mark, egress_interface, resolver)
        assert dialer is not None
        return dialer
    if _is_dialer(spec):
        return spec
    raise ConfigError(_not_a_dialer(spec))


def _not_a_dialer(obj: object) -> str:
    """What is wrong with a library's dialer object, and what to give instead."""
    if inspect.iscoroutinefunction(obj):
        return f"dialer {obj!r} is a function: give tunio.dialers.FunctionDialer(it)"
    if inspect.isclass(obj):
        return f"dialer {obj!r} is a class: give an instance of it"
    return (f"dialer {obj!r:.80} has no dial method: give an object with "
            "`async def dial(dst, src)`, or a specification: 'direct', a proxy URL or "
            "'module:attr'")  # fmt: skip


def _load_one(
    spec: str,
    via: Dialer | None,
    egress_mark: int | None,
    egress_interface: str | None,
    resolver: Resolver | None = None,
) -> Dialer:
    scheme, colon_slashes, _ = spec.partition("://")
    if colon_slashes and scheme in PROXIES:
        return PROXIES[scheme].from_url(spec, via=via, mark=egress_mark, interface=egress_interface)
    if via is not None:
        raise ConfigError(
            f"dialer {spec!r} cannot follow another dialer in a chain: only proxy URLs "
            "(socks5://, http://) can"
        )
    if colon_slashes:
        raise ConfigError(f"unknown dialer {spec!r}: {_ACCEPTED}")
    if spec == "direct":
        return DirectDialer(mark=egress_mark, interface=egress_interface, resolver=resolver)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"unknown dialer {spec!r}: {_ACCEPTED}")
    return _from_object(load_object(spec, f"dialer {spec!r}"), spec)
