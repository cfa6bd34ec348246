"""The one table of tunio-run's settings: each one's flag, file key, kind and help.

The command line (tunio.cli), the configuration file (tunio.configfile) and `--print-config`
are all made from this table, so a setting has the same name everywhere: `--egress-mark` on the
command line is `egress_mark` in a file, and a repeatable flag (`--address`, `--route`) is an
array there. Defaults are `tunio.config.Options`' own; checks of values are `tunio.config.validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from tunio import defaults

Kind = Literal["str", "int", "float", "mark", "bool", "choice"]


@dataclass(frozen=True)
class Setting:
    flag: str  # "egress-mark": --egress-mark on the command line, egress_mark in a file
    field: str  # the tunio.config.Options attribute it sets
    kind: Kind
    help: str
    metavar: str | None = None
    repeat: bool = False  # a repeatable flag; an array in a file
    choices: tuple[str, ...] = ()
    invert: bool = False  # a --no-X flag: given (or true in a file), it sets the field False
    live: bool = False  # a reload (SIGHUP) can change it without a restart
    unset: str = ""  # what the run does when it is not set, where that is not one value

    @property
    def key(self) -> str:
        """Its name in a configuration file."""
        return self.flag.replace("-", "_")


_CPU = "CPU count"

SETTINGS: tuple[Setting, ...] = (
    Setting("tun", "tun", "str", f"TUN device to create or open (default: {defaults.TUN})",
            "NAME"),
    Setting("address", "address", "str",
            "the TUN's address and prefix; give it twice for one IPv4 and one IPv6 address. The "
            f"top of each prefix is used for address translation (default: {defaults.ADDRESS})",
            "CIDR", repeat=True),
    Setting("mtu", "mtu", "int", f"MTU of the TUN device (default: {defaults.MTU})", "N"),
    Setting("queues", "queues", "int",
            f"TUN queues, one reader thread each, 1..{defaults.MAX_QUEUES} (default: {_CPU})",
            "N"),
    Setting("workers", "workers", "int",
            f"local worker processes, 0..{defaults.MAX_WORKERS}; 0 = remote workers "
            f"(tunio-worker) only (default: {_CPU})", "N", live=True),
    Setting("dialer", "dialer", "str",
            "how workers reach destinations: 'direct', 'socks5://[user:pass@]host:port', "
            "'http://[user:pass@]host:port' (HTTP CONNECT), or 'module:attr' naming a dialer, a "
            "factory or an async dial function; repeat it for a chain of proxies, first hop "
            "first (default: direct)", "SPEC", repeat=True, live=True),
    Setting("egress-mark", "egress_mark", "mark",
            "firewall mark (SO_MARK) on the workers' outbound sockets, so a policy rule can "
            "keep them out of the TUN (decimal or 0x hex)", "MARK", live=True),
    Setting("egress-interface", "egress_interface", "str",
            "bind the workers' outbound sockets to this interface (SO_BINDTODEVICE)", "IFNAME",
            live=True),
    Setting("connect-timeout", "connect_timeout", "float",
            "give up dialing a destination after this many seconds; the app then sees a "
            f"timeout (default: {defaults.CONNECT_TIMEOUT:g})", "SEC", live=True),
    Setting("window", "window", "int",
            f"flow-control window per flow and direction, bytes (default: {defaults.WINDOW})",
            "BYTES"),
    Setting("worker-backlog", "worker_backlog", "int",
            "data bytes a worker may have unanswered, all its flows together: past it the "
            "stack waits before reading more from those apps, so a new flow's dial never "
            "queues behind more; datagrams have a bound of this size of their own, past which "
            f"they are dropped (default: {defaults.WORKER_BACKLOG})", "BYTES"),
    Setting("log-level", "log_level", "choice",
            f"least severe messages to print (default: {defaults.LOG_LEVEL})",
            choices=("debug", "info", "warning", "error")),
    Setting("log-format", "log_format", "choice",
            "text lines, or one JSON object a line for log collectors (default: text)",
            choices=("text", "json")),
    Setting("endpoint", "endpoint", "str",
            "ZeroMQ endpoint the stack binds for workers: ipc://PATH or tcp://HOST:PORT "
            "(default: ipc://<runtime-dir>/stack.sock)", "URL"),
    Setting("runtime-dir", "runtime_dir", "str",
            "private directory (mode 0700) for the ipc socket and the run's own keys "
            "(default: /run/tunio/<tun>, or $XDG_RUNTIME_DIR/tunio/<tun> when not root; "
            "in a namespace ip netns named, netns-<name>/<tun> there)", "DIR"),
    Setting("route", "routes", "str",
            "send this network ('default' allowed) into the TUN; removed at exit", "CIDR",
            repeat=True),
    Setting("exclude", "exclude", "str",
            "keep this network out of the TUN (the LAN, a proxy's own address): routed by the "
            "main table as before; removed at exit", "CIDR", repeat=True),
    Setting("auto-bypass", "auto_bypass", "bool",
            "keep the workers' own connections out of the TUN without a hand-made rule: mark "
            "them, and route marked traffic by a table of tunio's own over the uplink the host "
            "uses now (IPv4 and IPv6); removed at exit"),
    Setting("keys", "keys", "str",
            "CURVE keys for a tcp:// endpoint, made if FILE does not exist (then FILE.worker "
            "is what the worker hosts need); default: a new pair per run, removed at its end",
            "FILE"),
    Setting("no-offload", "offload", "bool",
            "read the TUN packet by packet, without TSO and checksum offload (slower; for "
            "kernels or setups where virtio-net headers misbehave)", invert=True),
    Setting("udp-timeout", "udp_timeout", "float",
            "end a UDP session after this many seconds without a datagram "
            f"(default: {defaults.UDP_TIMEOUT:g})", "SEC"),
    Setting("tcp-keepalive", "tcp_keepalive", "str",
            "TCP keepalive on both ends of each flow: seconds idle before the first probe, "
            "seconds between probes, probes unanswered before the flow is reset; a vanished "
            f"app or destination ends its flow this way, or 'off' (default: "
            f"{defaults.TCP_KEEPALIVE})", "IDLE,INTERVAL,COUNT"),
    Setting("txqueuelen", "txqueuelen", "int",
            "transmit queue length of the TUN device; short queues drop packets under load "
            f"(default: {defaults.TXQUEUELEN})", "N"),
    Setting("policy", "policy", "str",
            "a per-flow policy, module:attr: a function of a tunio.Flow that returns a dialer, "
            "a list of dialers to try in order, or tunio.Reject(errno); called once a flow",
            "MODULE:ATTR", live=True),
    Setting("drain-timeout", "drain_timeout", "float",
            "after a reload (SIGHUP), the old generation of workers finishes its flows for at "
            f"most this many seconds; the rest are reset (default: {defaults.DRAIN_TIMEOUT:g})",
            "SEC", live=True),
    Setting("hang-timeout", "hang_timeout", "float",
            "a stack or worker that shows no sign of life this many seconds (its loop hung, or "
            "the process stopped) is killed and started again; 0: never "
            f"(default: {defaults.HANG_TIMEOUT:g})", "SEC"),
    Setting("metrics", "metrics", "str",
            "serve Prometheus metrics on HOST:PORT (GET /metrics): flows, bytes, dials, "
            "refusals, workers, drops", "HOST:PORT"),
    Setting("max-flows", "max_flows", "int",
            "TCP flows and UDP sessions at once; a new one past this is refused (a RST, or ICMP "
            f"for UDP), counted and logged once a second (default: {defaults.MAX_FLOWS})", "N"),
    Setting("dns", "dns", "str",
            "answer DNS in the stack: 'fake-ip[:CIDR[,CIDR6]]' answers A and AAAA queries to "
            "--dns-address with addresses of a pool (default "
            f"{defaults.DNS_POOL} less the TUN's own prefix, and {defaults.DNS_POOL6}), so each "
            "flow reaches its dialer with its name; other queries go to --dns-upstream. "
            "'hijack' sends every query to port 53, whatever its destination, to --dns-upstream "
            "(default: off)", "MODE"),
    Setting("dns-address", "dns_address", "str",
            "where fake-ip answers (UDP and TCP port 53), one per family (default: the second "
            "address of each TUN prefix, e.g. 198.18.0.2)", "IP", repeat=True),
    Setting("dns-upstream", "dns_upstream", "str",
            "the resolver that other queries (and hijacked ones) go to through a worker, and "
            "that the direct dialer resolves names with (default: the host's first nameserver "
            "in /etc/resolv.conf)", "IP[:PORT]"),
    Setting("dns-ttl", "dns_ttl", "int",
            f"TTL of the fake-ip answers, seconds (default: {defaults.DNS_TTL})", "SEC"),
    Setting("dns-hold", "dns_hold", "float",
            "a fake address answered for a name keeps that name this many seconds past the TTL "
            "(and as long as flows use it) before another name may take it "
            f"(default: {defaults.DNS_HOLD:g})", "SEC"),
    Setting("max-pending", "max_pending", "int",
            "new TCP flows whose dial is still running (their SYN held); past this a new one "
            "is refused at once with a RST, as it is when its destination already holds a "
            f"quarter of them (default: {defaults.MAX_PENDING}, or --max-flows if lower)", "N",
            unset=f"{defaults.MAX_PENDING}, or max_flows if lower"),
)  # fmt: skip

BY_FLAG: Mapping[str, Setting] = {s.flag: s for s in SETTINGS}
BY_KEY: Mapping[str, Setting] = {s.key: s for s in SETTINGS}
BY_FIELD: Mapping[str, Setting] = {s.field: s for s in SETTINGS}


def parse_mark(text: str) -> int:
    """A firewall mark as written on a command line: decimal, or hex with 0x."""
    return int(text, 0)
