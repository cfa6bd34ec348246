"""tunio as a library: a per-app split tunnel. The flows of one user go through a SOCKS5 proxy,
everyone else's leave directly, and one network is refused outright.

    sudo python examples/split_by_user.py --user 1000 --proxy socks5://10.0.0.5:1080

The policy is a function of a `tunio.Flow`, called once for each new flow while its SYN is still
held: the app sees only the outcome. `flow.uid` (and `flow.pid`, `flow.process`) is looked up
from the app's socket on this host, once per flow, and is None for traffic from a container or
another host, so those flows take the run's own dialer here.

The same policy runs under tunio-run as `--policy split_by_user:from_env`, with examples/ on
PYTHONPATH and SPLIT_USER and SPLIT_PROXY in the environment.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import sys
from collections.abc import Callable

import tunio
from tunio import logs
from tunio.dialers import Dialer, DirectDialer, load_dialer

BLOCKED = ipaddress.ip_network("192.0.2.0/24")  # refused for everyone, as an unreachable net


def split_by_user(user: int, proxy: Dialer, direct: Dialer) -> Callable[[tunio.Flow], object]:
    def policy(flow: tunio.Flow) -> object:
        if ipaddress.ip_address(flow.address.host) in BLOCKED:
            return tunio.Reject(errno.ENETUNREACH)
        if flow.uid == user:
            # the proxy first; should it refuse or fail, the flow still goes out directly
            return [proxy, direct]
        return direct

    return policy


def from_env() -> Callable[[tunio.Flow], object]:
    """For tunio-run --policy split_by_user:from_env. The dialers are made bare: in each worker
    they take the run's way out (--egress-mark, --auto-bypass's mark, --egress-interface)."""
    proxy = load_dialer(os.environ["SPLIT_PROXY"])
    return split_by_user(int(os.environ["SPLIT_USER"]), proxy, DirectDialer())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--user", type=int, required=True, help="the uid whose flows take the proxy")
    ap.add_argument("--proxy", required=True, help="socks5://[user:pass@]host:port")
    ap.add_argument("--tun", default="tunio0")
    ap.add_argument("--address", default="198.18.0.1/24")
    args = ap.parse_args()
    logs.setup("info")
    # --auto-bypass lets marked sockets out past the TUN; the dialers made here bare get the
    # bypass's mark in each worker, as the run's own do
    direct = DirectDialer()
    policy = split_by_user(args.user, load_dialer(args.proxy), direct)
    options = tunio.Options(tun=args.tun, address=args.address, auto_bypass=True,
                            routes=("0.0.0.0/1", "128.0.0.0/1"), dialer=direct, policy=policy)
    return tunio.run(options)


if __name__ == "__main__":
    sys.exit(main())
