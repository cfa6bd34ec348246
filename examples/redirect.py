"""tunio as a library, with a dialer of your own: a redirect map.

Connections to a mapped destination are sent to another address instead, like a socat tunnel
in front of the real server; every other connection goes straight through. The dialer is a
closure over the map: the workers are forked from this process, so it needs no import path.

    sudo python examples/redirect.py --tun tun0 --address 198.18.0.1/24 --route default \\
        --egress-mark 0x1 --map 203.0.113.7:80=192.0.2.10:8080

The same dialer runs under tunio-run as `--dialer redirect:from_env`, with examples/ on
PYTHONPATH and the map in REDIRECT_MAP (`203.0.113.7:80=192.0.2.10:8080,...`).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import tunio
from tunio import logs
from tunio.dialers import Address, DirectDialer, FunctionDialer


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host.strip("[]"), int(port))


def parse_map(text: str) -> dict[Address, Address]:
    """`from=to,from=to` with `host:port` on each side."""
    pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
    return {parse_address(old): parse_address(new) for old, new in pairs}


def redirect_dialer(table: dict[Address, Address], via: DirectDialer) -> FunctionDialer:
    async def dial(dst: Address, src: Address) -> socket.socket:
        return await via.dial(table.get(dst, dst), src)

    return FunctionDialer(dial)


def from_env() -> FunctionDialer:
    """The factory `--dialer redirect:from_env` names (REDIRECT_MAP). Its DirectDialer is made
    bare: in each worker it takes the run's way out (--egress-mark, --auto-bypass's mark)."""
    return redirect_dialer(parse_map(os.environ.get("REDIRECT_MAP", "")), DirectDialer())


def main() -> int:
    ap = argparse.ArgumentParser(description="tunio with a redirect map")
    ap.add_argument("--tun", default="tunio0")
    ap.add_argument("--address", default="198.18.0.1/24")
    ap.add_argument("--route", action="append", default=[])
    ap.add_argument("--egress-mark", type=lambda s: int(s, 0))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runtime-dir")
    ap.add_argument("--map", type=parse_map, required=True, metavar="FROM=TO,...")
    args = ap.parse_args()
    logs.setup("info")
    dialer = redirect_dialer(args.map, DirectDialer())  # bare: the workers give it --egress-mark
    options = tunio.Options(
        tun=args.tun,
        address=args.address,
        routes=tuple(args.route),
        workers=args.workers,
        queues=2,
        dialer=dialer,
        egress_mark=args.egress_mark,
        runtime_dir=args.runtime_dir,
    )
    return tunio.run(options)  # until SIGINT/SIGTERM; logs a line with "ready" once it forwards


if __name__ == "__main__":
    sys.exit(main())
