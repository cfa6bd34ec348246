"""How a run's workers reach destinations: the dialer and the per-flow policy its options name.

Made once at start and again at each reload (tunio.reload), in the supervisor, so that a bad
spec is an error there and then, not in every worker; the workers get the objects by fork.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tunio import bypass
from tunio.config import Options, dns_enabled, dns_upstream
from tunio.errors import ConfigError

if TYPE_CHECKING:
    from tunio.dialers import Dialer
    from tunio.dialers.resolve import Resolver
    from tunio.policy import Policy


def egress_mark(options: Options) -> int | None:
    """The workers' firewall mark: the one given, or the bypass's own."""
    if options.egress_mark is None and options.auto_bypass:
        return bypass.MARK
    return options.egress_mark


def resolver(options: Options) -> Resolver | None:
    """The direct dialers' resolver of names (fake-IP flows): --dns-upstream, asked from
    sockets with the egress mark and interface; None without --dns (a direct dialer then takes
    IP literals only, and fake-IP flows do not exist)."""
    if not dns_enabled(options):
        return None
    from tunio.dialers.resolve import Resolver  # noqa: PLC0415

    host, port = dns_upstream(options)
    return Resolver(str(host), port, mark=egress_mark(options),
                    interface=options.egress_interface)  # fmt: skip


def run_egress(options: Options) -> tuple[int | None, str | None, Resolver | None]:
    """The way out a worker gives the DirectDialers made without one
    (tunio.dialers.direct.use_run_egress): the mark, the interface, the resolver."""
    return egress_mark(options), options.egress_interface, resolver(options)


def load_dialer(options: Options) -> Dialer:
    """The run's own dialer (--dialer), with the egress mark and interface (and the resolver of
    --dns for a direct one)."""
    from tunio.dialers import load_dialer as load  # noqa: PLC0415 - user code may import slowly

    # a library's dialer object is checked here too: one without dial() is said now, not by a
    # traceback in every worker at every flow
    spec = options.dialer
    with _from_the_file(options, "dialer", "dialer ="):
        return load(
            spec,
            egress_mark=egress_mark(options),
            egress_interface=options.egress_interface,
            resolver=resolver(options),
        )


@contextlib.contextmanager
def _from_the_file(options: Options, field: str, key: str) -> Iterator[None]:
    """A ConfigError about a setting read from a configuration file names the file and the line
    (`field`'s origin) and the key, as the checks of tunio.config do."""
    try:
        yield
    except ConfigError as exc:
        where = options.origins.get(field)
        if where is None:
            raise
        raise ConfigError(f"{where}: {key} {exc}") from None


def load_policy(options: Options, dialer: Dialer) -> Policy | None:
    """The workers' per-flow policy: --policy's, or the rules' with their named dialers
    ("default" is `dialer`, "direct" a direct dialer with the egress settings); None: every
    flow takes `dialer`."""
    from tunio import policy as policies  # noqa: PLC0415 - user code may import slowly

    # the named dialers are loaded even when nothing uses them: a mistake in one is said now,
    # not on the day a rule (or a reload) starts to use it
    named = _named_dialers(options, dialer) if options.dialers or options.rules else {}
    if isinstance(options.policy, str):
        with _from_the_file(options, "policy", "policy ="):
            return policies.load_policy(options.policy)
    if options.policy is not None:
        return policies.as_policy(options.policy)
    if not options.rules:
        return None
    from tunio.rules import RuleTable  # noqa: PLC0415

    return RuleTable(options.rules, named)


def _named_dialers(options: Options, dialer: Dialer) -> dict[str, Dialer]:
    from tunio.dialers import DirectDialer  # noqa: PLC0415
    from tunio.dialers import load_dialer as load  # noqa: PLC0415

    mark, interface = egress_mark(options), options.egress_interface
    names = resolver(options)
    named: dict[str, Dialer] = {
        "default": dialer,
        "direct": DirectDialer(mark=mark, interface=interface, resolver=names),
    }
    for name, spec in options.dialers.items():
        with _from_the_file(options, f"dialers.{name}", f"dialers.{name} ="):
            named[name] = load(spec, egress_mark=mark, egress_interface=interface, resolver=names)
    return named
