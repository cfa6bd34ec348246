"""Command lines: `tunio-run` (the whole of tunio on this host) and `tunio-worker` (one worker)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from tunio import defaults, logs

log = logging.getLogger("tunio.cli")


class _Parser(argparse.ArgumentParser):
    """Reports a bad option in one line on stderr (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _mark(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number (decimal, or hex with 0x)"
        ) from None


def _dialer_spec(specs: list[str] | None) -> str | tuple[str, ...]:
    """One --dialer as itself, several as a chain (first hop first)."""
    if not specs:
        return "direct"
    return specs[0] if len(specs) == 1 else tuple(specs)


def _version() -> str:
    from importlib import metadata  # noqa: PLC0415

    try:
        return metadata.version("tunio")
    except metadata.PackageNotFoundError:
        import tunio  # noqa: PLC0415 - running from a source tree

        return str(getattr(tunio, "__version__", "unknown"))


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    """Options that tunio-run and tunio-worker share."""
    parser.add_argument(
        "--dialer",
        action="append",
        metavar="SPEC",
        help="how workers reach destinations: 'direct', 'socks5://[user:pass@]host:port', "
        "'http://[user:pass@]host:port' (HTTP CONNECT), or 'module:attr' naming a dialer, a "
        "factory or an async dial function; repeat it for a chain of proxies, first hop first "
        "(default: direct)",
    )
    parser.add_argument(
        "--egress-mark",
        type=_mark,
        metavar="MARK",
        help="firewall mark (SO_MARK) on the workers' outbound sockets, so a policy rule can "
        "keep them out of the TUN (decimal or 0x hex)",
    )
    parser.add_argument(
        "--egress-interface",
        metavar="IFNAME",
        help="bind the workers' outbound sockets to this interface (SO_BINDTODEVICE)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=defaults.CONNECT_TIMEOUT,
        metavar="SEC",
        help="give up dialing a destination after this many seconds; the app then sees a "
        f"timeout (default: {defaults.CONNECT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=defaults.WINDOW,
        metavar="BYTES",
        help=f"flow-control window per flow and direction (default: {defaults.WINDOW})",
    )
    parser.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default="info",
        help="least severe messages to print on stderr (default: info)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tunio-run",
        description="Carry every TCP flow that enters a TUN device out through a Python dialer. "
        "Runs until SIGINT/SIGTERM, then removes what it set up.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--tun",
        default="tunio0",
        metavar="NAME",
        help="TUN device to create or open (default: tunio0)",
    )
    parser.add_argument(
        "--address",
        action="append",
        dest="addresses",
        metavar="CIDR",
        help="the TUN's address and prefix; give it twice for one IPv4 and one IPv6 address. "
        "The top of each prefix is used for address translation (default: 198.18.0.1/24)",
    )
    parser.add_argument(
        "--mtu", type=int, default=1500, metavar="N", help="MTU of the TUN device (default: 1500)"
    )
    cpus = len(os.sched_getaffinity(0)) or 1
    parser.add_argument(
        "--queues",
        type=int,
        default=cpus,
        metavar="N",
        help=f"TUN queues, one reader thread each (default: CPU count, {cpus})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=cpus,
        metavar="N",
        help=f"local worker processes; 0 = remote workers (tunio-worker) only "
        f"(default: CPU count, {cpus})",
    )
    _add_worker_options(parser)
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help="ZeroMQ endpoint the stack binds for workers: ipc://PATH or tcp://HOST:PORT "
        "(default: ipc://<runtime-dir>/stack.sock)",
    )
    parser.add_argument(
        "--runtime-dir",
        metavar="DIR",
        help="private directory (mode 0700) for the lock and the ipc socket "
        "(default: /run/tunio/<tun>, or $XDG_RUNTIME_DIR/tunio/<tun> when not root)",
    )
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="CIDR",
        dest="routes",
        help="send this network ('default' allowed) into the TUN; removed at exit (repeatable)",
    )
    parser.add_argument(
        "--keys",
        metavar="FILE",
        help="CURVE keys for a tcp:// endpoint, made if FILE does not exist (then FILE.worker "
        "is what the worker hosts need); default: a new pair per run in the runtime directory",
    )
    parser.add_argument(
        "--no-offload",
        dest="offload",
        action="store_false",
        help="read the TUN packet by packet, without TSO and checksum offload (slower; for "
        "kernels or setups where virtio-net headers misbehave)",
    )
    parser.add_argument(
        "--udp-timeout",
        type=float,
        default=defaults.UDP_TIMEOUT,
        metavar="SEC",
        help="end a UDP session after this many seconds without a datagram "
        f"(default: {defaults.UDP_TIMEOUT:g})",
    )
    parser.add_argument(
        "--txqueuelen",
        type=int,
        default=10000,
        metavar="N",
        help="transmit queue length of the TUN device; short queues drop packets under load "
        "(default: 10000)",
    )
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
    _add_worker_options(parser)
    return parser


def _addresses(given: list[str] | None) -> str | tuple[str, ...]:
    """One --address stays a string (the library's usual form); two become a tuple."""
    if not given:
        return "198.18.0.1/24"
    return given[0] if len(given) == 1 else tuple(given)


def main(argv: list[str] | None = None) -> int:
    """tunio-run."""
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    import multiprocess  # noqa: PLC0415

    multiprocess.current_process().name = "tunio-run"
    from tunio.config import Options  # noqa: PLC0415
    from tunio.supervisor import Supervisor  # noqa: PLC0415

    options = Options(
        tun=args.tun,
        address=_addresses(args.addresses),
        mtu=args.mtu,
        queues=args.queues,
        workers=args.workers,
        dialer=_dialer_spec(args.dialer),
        egress_mark=args.egress_mark,
        egress_interface=args.egress_interface,
        endpoint=args.endpoint,
        runtime_dir=args.runtime_dir,
        routes=tuple(args.routes),
        connect_timeout=args.connect_timeout,
        udp_timeout=args.udp_timeout,
        offload=args.offload,
        keys=args.keys,
        window=args.window,
        txqueuelen=args.txqueuelen,
        log_level=args.log_level,
    )
    return Supervisor(options).run()


def worker_main(argv: list[str] | None = None) -> int:
    """tunio-worker."""
    args = build_worker_parser().parse_args(argv)
    logs.setup(args.log_level)
    import multiprocess  # noqa: PLC0415

    multiprocess.current_process().name = f"tunio-worker {args.name}"
    from tunio.errors import ConfigError, describe  # noqa: PLC0415
    from tunio.process import keep_freed_memory  # noqa: PLC0415

    if not args.endpoint.startswith(("ipc://", "tcp://")):
        log.error("--endpoint %r: use ipc://PATH or tcp://HOST:PORT", args.endpoint)
        return 2
    if not args.connect_timeout > 0:
        log.error("--connect-timeout %g must be above 0", args.connect_timeout)
        return 2
    try:
        from tunio.dialers import load_dialer  # noqa: PLC0415
        from tunio.keys import WorkerKeys, load_worker  # noqa: PLC0415

        keys: WorkerKeys | None = None
        if args.endpoint.startswith("tcp://"):
            if not args.keys:
                raise ConfigError(
                    "a tcp:// endpoint needs --keys FILE: the FILE.worker that tunio-run wrote "
                    "next to its --keys file"
                )
            keys = load_worker(Path(args.keys))
        dialer = load_dialer(
            _dialer_spec(args.dialer),
            egress_mark=args.egress_mark,
            egress_interface=args.egress_interface,
        )
    except ConfigError as exc:
        log.error("%s", describe(exc))
        return 2
    from tunio.worker import run_worker  # noqa: PLC0415

    keep_freed_memory()
    return run_worker(
        args.endpoint,
        dialer,
        name=args.name,
        window=args.window,
        connect_timeout=args.connect_timeout,
        keys=keys,
    )


if __name__ == "__main__":
    sys.exit(main())
