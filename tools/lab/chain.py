"""A three-namespace lab for comparing forwarders on one path: app -> gw -> srv.

`ChainLab` is `Lab` (tools/lab/netlab.py) with a gateway namespace between the app and the
servers, where a SOCKS5 proxy can run that every forwarder under test shares. IPv4 only (what
the benchmarks measure); every address lives inside the lab's own namespaces::

    tunio-app-<id>                   tunio-gw-<id>                     tunio-srv-<id>
      tun0 198.18.255.1/24             lo 198.18.0.11/32 (the proxy)     lo 198.18.0.10/32
        (made by the forwarder)        ip_forward=1                        (the servers)
      tva<id> 198.19.0.1/24 ==veth== tvg<id> 198.19.0.2/24
        noprefixroute                tvh<id> 198.19.1.1/24 ==veth==    tvs<id> 198.19.1.2/24
      fwmark 0x1 -> table 100:         198.18.0.10/32 via 198.19.1.2     default via 198.19.1.1
        198.19.0.0/24 dev tva<id>
        198.18.0.0/16 via 198.19.0.2
        unreachable default

As in `Lab`, the app's own traffic has no way out until a forwarder routes it into its TUN or a
benchmark adds a host route over the veth; a forwarder's own (marked) traffic leaves by the veth
through table 100. The proxy dials the servers from its own address, which srv answers through
its default route, so the proxy's traffic never passes the app namespace.

Teardown is `Lab`'s (our processes, then the app and srv namespaces, which take both veth pairs
with them), then the gateway namespace, also when the body raised.
"""

from __future__ import annotations

import contextlib
import shutil

from lab.netlab import (
    APP_ADDRESS,
    EGRESS_MARK,
    EGRESS_TABLE,
    NETNS_ETC,
    SERVER_ADDRESS,
    Lab,
    LabError,
    _ip,
)

GW_ADDRESS = "198.19.0.2"  # the gateway's address on the app's side (Lab's SRV_ADDRESS)
GW_SRV_ADDRESS = "198.19.1.1"  # the gateway's address on the servers' side
SRV_CHAIN_ADDRESS = "198.19.1.2"
PROXY_ADDRESS = "198.18.0.11"  # on gw's lo (the same address tools/lab/proxies.py uses on srv)


def _namespaces() -> set[str]:
    out = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class ChainLab(Lab):
    """Build app, gw and srv on enter; remove every trace of them on exit."""

    def __init__(self, lab_id: str | None = None) -> None:
        super().__init__(lab_id)
        self.gw = f"tunio-gw-{self.id}"
        self.veth_gw_app = f"tvg{self.id}"  # gw's end of the app's veth
        self.veth_gw_srv = f"tvh{self.id}"  # gw's end of the servers' veth

    def __enter__(self) -> ChainLab:
        super().__enter__()
        return self

    def _build(self) -> None:
        app, gw, srv = self.app, self.gw, self.srv
        va, vga, vgs, vs = self.veth_app, self.veth_gw_app, self.veth_gw_srv, self.veth_srv
        for ns in (app, gw, srv):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Every row dials the same few destinations (danted's port, the echo server) from
            # the same address, thousands of times a run: without reuse, the ports left in
            # TIME_WAIT by one row or repeat (60 s each, 28,232 ports) make the next one's
            # connect() search for a free port for milliseconds, and then fail. Reuse once the
            # timestamps make it safe, as a gateway that dials one proxy is tuned (tunio's own
            # EADDRNOTAVAIL hint says so, tunio/ports.py); the same for every row.
            self._sysctl(ns, "net.ipv4.tcp_tw_reuse=1")
        # Made directly inside the namespaces: the host never sees the veth pairs.
        _ip("-n", app, "link", "add", va, "type", "veth", "peer", "name", vga, "netns", gw)
        _ip("-n", gw, "link", "add", vgs, "type", "veth", "peer", "name", vs, "netns", srv)
        for ns, dev in ((app, va), (gw, vga), (gw, vgs), (srv, vs)):
            _ip("-n", ns, "link", "set", dev, "up")

        # app: no prefix route for the veth, so only marked traffic (table 100) may use it.
        _ip("-n", app, "addr", "add", f"{APP_ADDRESS}/24", "dev", va, "noprefixroute")
        mark, table = f"{EGRESS_MARK:#x}", str(EGRESS_TABLE)
        _ip("-n", app, "rule", "add", "fwmark", mark, "lookup", table, "pref", table)
        _ip("-n", app, "route", "add", "198.19.0.0/24", "dev", va, "table", table)
        _ip("-n", app, "route", "add", "198.18.0.0/16", "via", GW_ADDRESS, "dev", va,
            "table", table)  # fmt: skip
        _ip("-n", app, "route", "add", "unreachable", "default", "table", table)
        # Replies to marked traffic arrive on the veth while the main table points into the TUN.
        self._sysctl(app, "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{va}.rp_filter=0")

        _ip("-n", gw, "addr", "add", f"{GW_ADDRESS}/24", "dev", vga)
        _ip("-n", gw, "addr", "add", f"{GW_SRV_ADDRESS}/24", "dev", vgs)
        _ip("-n", gw, "addr", "add", f"{PROXY_ADDRESS}/32", "dev", "lo")
        _ip("-n", gw, "route", "add", f"{SERVER_ADDRESS}/32", "via", SRV_CHAIN_ADDRESS)
        self._sysctl(gw, "net.ipv4.ip_forward=1")

        _ip("-n", srv, "addr", "add", f"{SRV_CHAIN_ADDRESS}/24", "dev", vs)
        _ip("-n", srv, "addr", "add", f"{SERVER_ADDRESS}/32", "dev", "lo")
        _ip("-n", srv, "route", "add", "default", "via", GW_SRV_ADDRESS)

    def close(self) -> None:
        """`Lab.close`, then the gateway namespace (even if the first part failed)."""
        errors: list[str] = []
        try:
            super().close()
        except LabError as exc:
            errors.append(str(exc))
        finally:
            if self.gw in _namespaces():
                proc = _ip("netns", "delete", self.gw, check=False)
                if proc.returncode != 0:
                    errors.append(f"ip netns delete {self.gw}: {proc.stderr.strip()}")
            with contextlib.suppress(OSError):
                shutil.rmtree(NETNS_ETC / self.gw)
            if self.gw in _namespaces():
                errors.append(f"namespace left behind: {self.gw}")
        if errors:
            raise LabError("; ".join(errors))
