"""Command lines: `tunio-run` (the whole of tunio on this host) and `tunio-worker` (one worker)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from tunio import defaults, logs
from tunio.config import Options, check_seconds, check_window, parse_keepalive
from tunio.endpoints import check_endpoint
from tunio.errors import ConfigError, describe
from tunio.settings import BY_FLAG, SETTINGS, Setting, parse_mark

if TYPE_CHECKING:
    from tunio.dialers.resolve import Resolver

log = logging.getLogger("tunio.cli")


class _Parser(argparse.ArgumentParser):
    """Reports a bad option in one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _mark(text: str) -> int:
    try:
        return parse_mark(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number (decimal, or hex with 0x)"
        ) from None


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "mark": _mark}


def _dialer_spec(specs: str | tuple[str, ...] | list[str] | None) -> str | tuple[str, ...]:
    """One --dialer as itself, several as a chain (first hop first)."""
    if not specs:
        return "direct"
    if isinstance(specs, str):
        return specs
    return specs[0] if len(specs) == 1 else tuple(specs)


def _version() -> str:
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version("tunio")
    except metadata.PackageNotFoundError:
        import tunio  # noqa: PLC0415 - running from a source tree

        return str(getattr(tunio, "__version__", "unknown"))


def _add_setting(parser: argparse.ArgumentParser, setting: Setting) -> None:
    """One flag of the settings table. Left out, it leaves no attribute (SUPPRESS), so that a
    configuration file's value (or the default) stands where the command line says nothing."""
    kw: dict[str, Any] = {"dest": setting.field, "default": argparse.SUPPRESS, "help": setting.help}
    if setting.kind == "bool":
        kw["action"] = "store_false" if setting.invert else "store_true"
    else:
        kw["action"] = "append" if setting.repeat else "store"
        kw["metavar"] = setting.metavar
        if setting.kind == "choice":
            kw["choices"] = setting.choices
        elif setting.kind in _TYPES:
            kw["type"] = _TYPES[setting.kind]
    parser.add_argument(f"--{setting.flag}", **kw)


WORKER_SETTINGS = (
    "dialer", "egress-mark", "egress-interface", "connect-timeout", "window", "log-level",
    "log-format", "policy", "dns-upstream", "tcp-keepalive",
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tunio-run",
        description="Carry every TCP and UDP flow that enters a TUN device out through a Python "
        "dialer. Runs until SIGINT/SIGTERM, then removes what it set up. Every setting can also "
        "be given in a TOML file (--config): its key is the flag's name with _ for - (an array "
        "for a repeatable flag); flags override the file.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--config", metavar="FILE", help="read settings from this TOML file (flags override it)"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (defaults, the file, the flags) as a configuration "
        "file, and exit",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print every change to links, addresses, routes and rules that a run would make, "
        "and exit having changed nothing",
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="remove what a killed run on --tun left (bypass rules and table, routes, device, "
        "runtime directory, lock), say what was removed, and exit",
    )
    for setting in SETTINGS:
        _add_setting(parser, setting)
    return parser


def build_worker_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tunio-worker",
        description="Run one tunio worker that connects to a stack's endpoint (for workers on "
        "another host or namespace). Runs until the stack says BYE or SIGINT/SIGTERM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--endpoint",
        required=True,
        metavar="URL",
        help="the stack's ZeroMQ endpoint (ipc://PATH or tcp://HOST:PORT)",
    )
    parser.add_argument(
        "--name",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="name this worker gives the stack (default: <host>-<pid>)",
    )
    parser.add_argument(
        "--keys",
        metavar="FILE",
        help="CURVE keys for a tcp:// endpoint: the FILE.worker written by tunio-run --keys FILE",
    )
    for flag in WORKER_SETTINGS:
        _add_setting(parser, BY_FLAG[flag])
    return parser


_ACTIONS = ("config", "print_config", "dry_run", "cleanup")  # flags that are not settings


def _flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The settings the command line gave, as Options fields."""
    values = {k: v for k, v in vars(args).items() if k not in _ACTIONS}
    for setting in SETTINGS:
        if setting.repeat and setting.field in values:
            given = tuple(values[setting.field])
            one = setting.field in ("address", "dialer") and len(given) == 1
            values[setting.field] = given[0] if one else given
    return values


def options_from(args: argparse.Namespace) -> Options:
    """Defaults, then the configuration file, then the flags: the Options of this run."""
    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    if args.config:
        from tunio import configfile  # noqa: PLC0415

        read = configfile.read(Path(args.config))
        values.update(read.values)
        origins.update(read.origins)
    flags = _flag_values(args)
    values.update(flags)
    for name in flags:
        origins.pop(name, None)  # the flag's value is the one in force
    return Options(**values, origins=origins)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    """tunio-run."""
    args = build_parser().parse_args(argv)
    import multiprocess  # noqa: PLC0415

    multiprocess.current_process().name = "tunio-run"  # every line says who wrote it
    try:
        options = options_from(args)
    except ConfigError as exc:
        logs.setup(getattr(args, "log_level", defaults.LOG_LEVEL))
        log.error("%s", describe(exc))
        return 2
    logs.setup(options.log_level, fmt=options.log_format)
    if args.cleanup:
        return _cleanup(options)
    if args.print_config or args.dry_run:
        return _show(options, dry_run=args.dry_run)
    from tunio.process import one_arena  # noqa: PLC0415
    from tunio.supervisor import Supervisor  # noqa: PLC0415

    one_arena()  # before any thread: the children forked later inherit our arenas
    # SIGHUP reads the same file with the same flags again
    return Supervisor(options, reload=lambda: options_from(args), exiting=True).run()


def _show(options: Options, *, dry_run: bool) -> int:
    """--print-config and --dry-run: what a run would be and do, with nothing changed."""
    from tunio import configfile, wayout  # noqa: PLC0415
    from tunio.config import explain, validate  # noqa: PLC0415
    from tunio.errors import TunioError  # noqa: PLC0415
    from tunio.supervisor import Supervisor  # noqa: PLC0415

    try:
        validate(options)
        # what a run would refuse at its start (a dialer, a policy, the rules' names), before
        # anything is printed: user code is imported here as the run would
        wayout.load_policy(options, wayout.load_dialer(options))
        if not dry_run:
            sys.stdout.write(configfile.render(options))
            return 0
        changes = Supervisor(options).plan_changes()
    except ConfigError as exc:
        log.error("%s", explain(exc, options))
        return 2
    except (TunioError, OSError) as exc:
        log.error("%s", describe(exc))
        return 1
    print(f"tunio-run would make {len(changes)} changes, in this order (none is made now):")
    for change in changes:
        print(f"  {change.what}: {change.command()}")
    return 0


def _cleanup(options: Options) -> int:
    from tunio import devicelock, runtime  # noqa: PLC0415
    from tunio.cleanup import cleanup  # noqa: PLC0415
    from tunio.errors import TunioError  # noqa: PLC0415

    rundir = Path(options.runtime_dir or runtime.default_path(options.tun)).absolute()
    try:
        removed = cleanup(options.tun, rundir, devicelock.default_directory())
    except TunioError as exc:
        log.error("%s", describe(exc))
        return 1
    for line in removed:
        print(f"removed: {line}")
    if not removed:
        # what a run left is found in its runtime directory: one of another --runtime-dir (or
        # of a --config that set it) is not looked at unless given here too
        print(f"nothing left by a run on {options.tun} in {rundir} to remove "
              "(a run with another --runtime-dir or --config: give it here too)")  # fmt: skip
    return 0


def _worker_resolver(
    upstream: str | None, mark: int | None, interface: str | None
) -> Resolver | None:
    """A remote worker's resolver of the names of fake-IP flows: --dns-upstream, asked with the
    egress mark and interface (none: such flows fail, as a direct dialer takes IP literals only)."""
    if upstream is None:
        return None
    from tunio.config import parse_upstream  # noqa: PLC0415
    from tunio.dialers.resolve import Resolver  # noqa: PLC0415

    host, port = parse_upstream(upstream)
    return Resolver(str(host), port, mark=mark, interface=interface)


def worker_main(argv: list[str] | None = None) -> int:
    """tunio-worker."""
    args = build_worker_parser().parse_args(argv)
    logs.setup(
        getattr(args, "log_level", defaults.LOG_LEVEL),
        fmt=getattr(args, "log_format", defaults.LOG_FORMAT),
    )
    import multiprocess  # noqa: PLC0415

    multiprocess.current_process().name = f"tunio-worker {args.name}"
    from tunio.process import keep_freed_memory  # noqa: PLC0415

    connect_timeout = getattr(args, "connect_timeout", defaults.CONNECT_TIMEOUT)
    window = getattr(args, "window", defaults.WINDOW)
    try:
        check_endpoint(args.endpoint)
        check_seconds(connect_timeout, "connect-timeout")
        check_window(window)
        keepalive = parse_keepalive(getattr(args, "tcp_keepalive", defaults.TCP_KEEPALIVE))
    except ConfigError as exc:
        log.error("%s", describe(exc))
        return 2
    try:
        from tunio.dialers import load_dialer  # noqa: PLC0415
        from tunio.keys import WorkerKeys, load_worker  # noqa: PLC0415
        from tunio.policy import load_policy  # noqa: PLC0415

        keys: WorkerKeys | None = None
        if args.endpoint.startswith("tcp://"):
            if not args.keys:
                raise ConfigError(
                    "a tcp:// endpoint needs --keys FILE: the FILE.worker that tunio-run wrote "
                    "next to its --keys file"
                )
            keys = load_worker(Path(args.keys))
        mark = getattr(args, "egress_mark", None)
        interface = getattr(args, "egress_interface", None)
        names = _worker_resolver(getattr(args, "dns_upstream", None), mark, interface)
        dialer = load_dialer(
            _dialer_spec(getattr(args, "dialer", None)),
            egress_mark=mark,
            egress_interface=interface,
            resolver=names,
        )
        spec = getattr(args, "policy", None)
        policy = load_policy(spec) if spec else None
    except ConfigError as exc:
        log.error("%s", describe(exc))
        return 2
    from tunio.dialers.direct import use_run_egress  # noqa: PLC0415
    from tunio.worker import run_worker  # noqa: PLC0415

    use_run_egress(mark, interface, names)
    keep_freed_memory()
    return run_worker(
        args.endpoint,
        dialer,
        name=args.name,
        window=window,
        connect_timeout=connect_timeout,
        keys=keys,
        policy=policy,
        keepalive=keepalive,
    )


if __name__ == "__main__":
    sys.exit(main())
