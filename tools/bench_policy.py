"""What a per-flow policy costs a worker, per new flow: the policy call itself (no policy, a
Python function, rules tables of 10 and 100 rules matched by CIDR, port and domain, the last
rule or none matching), and the lookup of the app behind a flow (NETLINK_SOCK_DIAG for a real
loopback connection, then its process), once per flow as the worker makes it.

    python tools/bench_policy.py [--flows 20000] [--json]

No privileges and no network beyond loopback; about ten seconds. Printed in µs per flow, next
to what a worker spends on a whole short connection (make bench prints that: ~200 µs).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ipaddress

from tunio.dialers import Address, DirectDialer
from tunio.owner import OwnerLookup
from tunio.policy import Flow, Policy, decide
from tunio.rules import Rule, RuleTable

DEFAULT, OTHER = DirectDialer(mark=1), DirectDialer(mark=2)
SRC = Address("198.18.255.9", 40000)


def _table(count: int) -> RuleTable:
    """`count` rules, none matching the benchmark's flow but the last."""
    rules = [Rule(networks=(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24"),),
                  ports=((1000 + i, 1000 + i),), action=("other",), where=f"rule {i}")
             for i in range(count - 1)]  # fmt: skip
    rules.append(Rule(domains=("example.com",), action=("other",), where="last"))
    return RuleTable(rules, {"default": DEFAULT, "other": OTHER})


def _per_flow(policy: Policy | None, flows: int, make: Callable[[int], Flow]) -> float:
    """µs per decide() over `flows` fresh flows."""
    made = [make(i) for i in range(flows)]
    start = time.perf_counter()
    for flow in made:
        decide(policy, flow, DEFAULT)
    return (time.perf_counter() - start) / flows * 1e6


def _lookup_cost(flows: int) -> dict[str, float]:
    """µs per owner lookup of a real connection (a new one each time, as flows are)."""
    lookup = OwnerLookup()
    total = 0.0
    found = 0
    with socket.create_server(("127.0.0.1", 0)) as server:
        for _ in range(flows):
            with socket.create_connection(server.getsockname()) as client:
                peer, _ = server.accept()
                src, dst = Address(*client.getsockname()), Address(*client.getpeername())
                start = time.perf_counter()
                owner = lookup.owner("tcp", src, dst)
                total += time.perf_counter() - start
                found += owner is not None and owner.pid is not None
                peer.close()
    lookup.close()
    return {"owner_lookup_us": total / flows * 1e6, "owner_found": found / flows,
            "proc_scans": float(lookup.scans)}  # fmt: skip


def measure(flows: int) -> dict[str, float]:
    def to(host: str, name: str | None = None) -> Callable[[int], Flow]:
        def make(i: int) -> Flow:
            address = Address(host, 443 + i % 2)  # a fresh flow each time, as in a worker
            return Flow(SRC, Address(name, address.port) if name else address, "tcp",
                        address=address)  # fmt: skip

        return make

    out = {
        "no_policy_us": _per_flow(None, flows, to("192.0.2.7")),
        "function_us": _per_flow(
            lambda f: OTHER if f.dst.port == 22 else None, flows, to("192.0.2.7")
        ),
        "rules_10_none_us": _per_flow(_table(10), flows, to("192.0.2.7")),
        "rules_100_none_us": _per_flow(_table(100), flows, to("192.0.2.7")),
        "rules_100_last_us": _per_flow(_table(100), flows, to("192.0.2.7", "www.example.com")),
    }
    out.update(_lookup_cost(min(flows, 2000)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=20000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.flows)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print("per-flow policy cost in a worker (µs per new flow):")
    for key, value in result.items():
        print(f"  {key:20} {value:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
