"""Per-flow policy: which dialer carries a flow, decided while its SYN is still held.

A policy is called once for each new flow with a `Flow` (its source, its destination with the
name when the stack knows it, its protocol, the app that sent it when that can be known, and the
worker) and returns what to do:

- a dialer: dial through it;
- a list of dialers: try them in order; a failed dial (refused, unreachable, timeout, a proxy's
  error) moves on to the next before the app is answered, so the app sees one clean connect,
  or only the last failure;
- `Reject(errno)`: refuse the flow, as a direct connect refused with that errno would look;
- None: the run's own dialer (--dialer).

`--policy module:attr` names a function (or an object with `choose(flow)`, or a factory of one);
the rules of a configuration file (tunio.rules) are a policy too. Both run in every worker.
"""

from __future__ import annotations

import errno
import inspect
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from tunio.dialers.base import Address, Dialer
from tunio.errors import MAX_ERRNO, ConfigError, is_errno
from tunio.loading import load_object
from tunio.logs import EverySecond

log = logging.getLogger("tunio.policy")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Reject:
    """A refusal by policy: the app sees its connect refused as with `errno` (ECONNREFUSED: a
    reset; EHOSTUNREACH / ENETUNREACH: ICMP unreachable; ETIMEDOUT: silence)."""

    errno: int = errno.ECONNREFUSED
    reason: str = "refused by policy"

    def __post_init__(self) -> None:
        # An errno number is what goes to the stack: a name (the rules' spelling), None or 0
        # would fail inside the worker or refuse nothing (a UDP app would hear silence).
        code = self.errno
        if not is_errno(code):
            named = isinstance(code, str) and code.isupper()
            hint = f"errno.{code}" if named else "errno.EHOSTUNREACH"
            raise ConfigError(f"Reject({code!r}): give an errno number (1..{MAX_ERRNO}), e.g. "
                              f"Reject({hint})")  # fmt: skip


class Owner:
    """The app that sent a flow, from the kernel's socket table (same host only): its `uid`,
    and the `pid` and `process` (name) holding the socket, None when none can be seen. The
    process is looked for only when it is asked for: a rule by uid costs one socket lookup."""

    __slots__ = ("_pid", "_process", "_resolve", "uid")

    def __init__(
        self,
        uid: int,
        pid: int | None = None,
        process: str | None = None,
        *,
        resolve: Callable[[], tuple[int | None, str | None]] | None = None,
    ) -> None:
        self.uid = uid
        self._pid, self._process = pid, process
        self._resolve = resolve

    def _resolved(self) -> None:
        if self._resolve is not None:
            resolve, self._resolve = self._resolve, None
            self._pid, self._process = resolve()

    @property
    def pid(self) -> int | None:
        self._resolved()
        return self._pid

    @property
    def process(self) -> str | None:
        self._resolved()
        return self._process

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Owner):
            return NotImplemented
        return (self.uid, self.pid, self.process) == (other.uid, other.pid, other.process)

    def __hash__(self) -> int:
        return hash(self.uid)

    def __repr__(self) -> str:
        return f"Owner(uid={self.uid}, pid={self.pid}, process={self.process!r})"


class Flow:
    """What a policy knows of a new flow. `uid`, `pid` and `process` are looked up on first use
    (once per flow) and are None when unknown: traffic from a container, a VM or another host
    through the TUN has no socket on this host to look up."""

    __slots__ = ("_ip", "_ip_parsed", "_lookup", "_owner", "address", "dst", "protocol", "src",
                 "worker")  # fmt: skip

    def __init__(self, src: Address, dst: Address, protocol: str, *, worker: str = "",
                 address: Address | None = None,
                 lookup: Callable[[Flow], Owner | None] | None = None) -> None:  # fmt: skip
        self.src = src
        self.dst = dst  # dst.host: the name, for a flow to a fake-IP address; else the IP
        self.address = address or dst  # the IP address the app sent to
        self.protocol = protocol  # "tcp", "udp" or "icmp"
        self.worker = worker
        self._lookup = lookup
        self._owner: Owner | bool | None = False  # False: not looked up yet
        self._ip: IPAddress | None = None  # `address` parsed, once asked for
        self._ip_parsed = False

    @property
    def name(self) -> str | None:
        """The destination's name, when the app reached it by one (fake-IP DNS)."""
        return self.dst.host if self.dst is not self.address else None

    @property
    def ip(self) -> IPAddress | None:
        """The address the app sent to, parsed (once); None if it is no IP address."""
        if not self._ip_parsed:
            self._ip_parsed = True
            try:
                self._ip = ipaddress.ip_address(self.address.host)
            except ValueError:
                self._ip = None
        return self._ip

    @property
    def owner(self) -> Owner | None:
        if self._owner is False:
            self._owner = self._lookup(self) if self._lookup is not None else None
        return self._owner if isinstance(self._owner, Owner) else None

    @property
    def uid(self) -> int | None:
        owner = self.owner
        return owner.uid if owner is not None else None

    @property
    def pid(self) -> int | None:
        owner = self.owner
        return owner.pid if owner is not None else None

    @property
    def process(self) -> str | None:
        owner = self.owner
        return owner.process if owner is not None else None

    def __repr__(self) -> str:
        return f"Flow({self.protocol} {self.src} -> {self.dst})"


Decision = Dialer | Sequence[Dialer] | Reject | None


@runtime_checkable
class Chooser(Protocol):
    def choose(self, flow: Flow) -> Decision: ...


Policy = Callable[[Flow], Decision]


def as_policy(obj: object, spec: str | None = None) -> Policy:
    """A policy from a function of a Flow, an object with `choose(flow)`, or a class or a
    zero-argument factory that makes one. `spec` names it in errors (--policy's module:attr);
    a library's object is named after itself."""
    if spec is None:
        spec = _name_of(obj)
    if inspect.isclass(obj):
        return as_policy(_made(obj, spec), spec)
    if isinstance(obj, Chooser):
        return obj.choose
    if callable(obj):
        if _takes_an_argument(obj):
            return cast(Policy, obj)
        return as_policy(_made(obj, spec), spec)
    raise ConfigError(f"policy {spec!r} is a {type(obj).__name__}: give a function of a Flow, "
                      "or an object with choose(flow)")  # fmt: skip


def _name_of(obj: object) -> str:
    """module:qualname for a function or a class, as --policy would name it; else its repr."""
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(qualname, str):
        return f"{getattr(obj, '__module__', '?')}:{qualname}"
    return f"{obj!r:.60}"


def _made(factory: Callable[[], object], spec: str) -> object:
    """What a policy's class or factory makes; its failure is a ConfigError naming it."""
    try:
        return factory()
    except Exception as exc:
        raise ConfigError(f"--policy {spec!r}: making the policy failed: {exc!r}") from exc


def _takes_an_argument(func: Callable[..., object]) -> bool:
    try:
        return bool(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: call it with the flow
        return True


def load_policy(spec: str) -> Policy:
    """`module:attr` -> the policy it names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--policy {spec!r}: give module:attr")
    return as_policy(load_object(spec, f"--policy {spec!r}"), spec)


#: a policy that fails for every flow logs one traceback a second, not one a flow (the worker
#: calls `failures.flush()` on its report interval)
failures = EverySecond(log, logging.ERROR, "flows refused by a failing policy")
_named: set[type] = set()  # the kinds of wrong answer already logged


def decide(policy: Policy | None, flow: Flow, default: Dialer) -> list[Dialer] | Reject:
    """What to do with `flow`: the dialers to try in order, or a refusal. A policy that fails
    (a sys.exit() in it included), or answers what is not a dialer, refuses the flow
    (ECONNREFUSED) and is logged; it never takes the worker down."""
    try:
        decision = policy(flow) if policy is not None else None
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        failures.log(type(exc).__name__, "the policy failed on %r: refusing it", flow,
                     exc_info=exc)  # fmt: skip
        return Reject(errno.ECONNREFUSED, "the policy failed")
    if decision is None:
        return [default]
    if isinstance(decision, Reject):
        return decision
    answered: list[object] = list(decision) if isinstance(decision, (list, tuple)) else [decision]
    if not answered:
        return Reject(errno.ECONNREFUSED, "the policy gave an empty list of dialers")
    for dialer in answered:
        # a class has a dial too (its function): DirectDialer where DirectDialer() was meant
        if isinstance(dialer, type) or not callable(getattr(dialer, "dial", None)):
            return _not_a_dialer(dialer)
    return cast(list[Dialer], answered)


def _not_a_dialer(answer: object) -> Reject:
    kind = type(answer)
    if isinstance(answer, Reject):
        why = f"the policy put {answer!r} in a list of dialers: return a Reject alone"
    elif isinstance(answer, type):
        why = f"the policy answered the class {answer.__qualname__}, not a dialer: return one"
    else:
        shown = repr(answer)
        shown = f"a {kind.__qualname__}" if shown.startswith("<") else f"{shown:.60}"
        why = f"the policy answered {shown}, not a dialer"
    if kind not in _named:  # a policy's bug shows once, not once a flow
        _named.add(kind)
        log.error("%s: refusing the flows it is given for", why)
    return Reject(errno.ECONNREFUSED, why)
