"""Loading what the user names as `module:attr` (a dialer, a policy): one place for the import,
the attribute path, and the errors that say which of the two went wrong."""

from __future__ import annotations

import importlib

from tunio.errors import ConfigError


def load_object(spec: str, what: str) -> object:
    """The object `module:attr.attr...` names; ConfigError starting with `what` ("dialer
    'x:y'", "--policy 'x:y'") if the module does not import or has no such attribute."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what}: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # user code that fails as it loads (a SyntaxError, a raise at import)
        raise ConfigError(f"{what}: importing {module_name!r} failed: {exc!r}") from exc
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{what}: {module_name!r} has no {attr!r}") from None
    return obj
