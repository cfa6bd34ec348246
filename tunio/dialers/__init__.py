"""Dialers: how a worker reaches a flow's destination."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from tunio.dialers.base import Address, Dialer, DialFunction, FunctionDialer
from tunio.dialers.direct import DirectDialer
from tunio.errors import ConfigError

__all__ = [
    "Address",
    "DialFunction",
    "Dialer",
    "DirectDialer",
    "FunctionDialer",
    "load_dialer",
]

_ACCEPTED = (
    "expected 'direct' or 'module:attr' (a Dialer, a zero-argument factory of one, "
    "or an async function (dst, src) -> socket)"
)


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
    spec: str | Dialer,
    *,
    egress_mark: int | None = None,
    egress_interface: str | None = None,
) -> Dialer:
    """Turn a dialer specification into a Dialer.

    The egress mark and interface apply to the direct dialer; a user's dialer gets its own
    settings from its own code.
    """
    if not isinstance(spec, str):
        if _is_dialer(spec):
            return spec
        raise ConfigError(f"dialer {spec!r}: {_ACCEPTED}")
    if spec == "direct":
        return DirectDialer(mark=egress_mark, interface=egress_interface)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"unknown dialer {spec!r}: {_ACCEPTED}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"dialer {spec!r}: cannot import {module_name!r}: {exc}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"dialer {spec!r}: {module_name!r} has no {attr!r}") from None
    return _from_object(obj, spec)
