"""A run's metrics in Prometheus' text format, served by tunio-run (`--metrics HOST:PORT`).

Every process of a run counts for itself: the stack in C, each worker in Python. Each reports
its counters to the supervisor once a second (on its status channel), and the supervisor keeps
the latest report of each; a scrape renders them. The format is written here by hand rather than
through prometheus_client: its registry sees one process, and its multiprocess mode wants a
directory of files per process, where ours already arrive as plain data.

Series of the workers carry a `worker` label: a restarted worker starts its counters again, and
Prometheus' rate() takes a counter reset in its stride only when it is one series.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tunio.defaults import DIAL_BUCKETS

Snapshot = Mapping[str, Any]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric, type, help, [(labels, key of the stack's counters)])
_STACK: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("tunio_flows_active", "gauge", "Flows open now: TCP flows, datagram sessions (UDP, ping).",
     (('kind="tcp"', "flows_active"), ('kind="datagram"', "udp_sessions"))),
    ("tunio_flows_total", "counter", "Flows opened: TCP flows (OPENs), datagram sessions.",
     (('kind="tcp"', "flows_opened"), ('kind="datagram"', "udp_sessions_opened"))),
    ("tunio_pending_flows", "gauge", "TCP flows whose dial runs now (their SYN held).",
     (("", "pending"),)),
    ("tunio_transferred_bytes_total", "counter", "Bytes of TCP flows, each way.",
     (('direction="to_destination"', "bytes_to_workers"),
      ('direction="to_app"', "bytes_from_workers"))),
    ("tunio_datagrams_total", "counter", "Datagrams of datagram sessions, each way, as the "
     "stack passed them on: to_destination counts those handed to a worker, which may yet "
     "refuse or drop them (tunio_worker_datagrams_sent_total counts those sent).",
     (('direction="to_destination"', "udp_to_workers"),
      ('direction="to_app"', "udp_from_workers"))),
    ("tunio_packets_total", "counter", "Packets the stack read from and wrote into the TUN.",
     (('direction="read"', "packets_read"), ('direction="written"', "packets_written"))),
    ("tunio_dropped_packets_total", "counter", "Packets from the TUN the stack dropped, by why.",
     (('reason="truncated"', "drop_truncated"), ('reason="bad_header"', "drop_bad_header"),
      ('reason="fragment"', "drop_fragment"), ('reason="unsupported"', "drop_unsupported"),
      ('reason="reserved_address"', "drop_reserved"), ('reason="unknown_flow"', "drop_unknown"),
      ('reason="martian_destination"', "drop_martian"),
      ('reason="write_error"', "write_errors"))),
    ("tunio_refused_flows_total", "counter", "New flows refused before any dial, by why.",
     (('reason="max_flows"', "refused_max_flows"), ('reason="max_pending"', "refused_max_pending"),
      ('reason="no_worker"', "no_worker"), ('reason="nat_full"', "nat_table_full"))),
    ("tunio_deferred_syns_total", "counter", "SYNs left for the app to send again: their "
     "destination held its share of --max-pending.", (("", "deferred_pending_share"),)),
    ("tunio_worker_backlog_bytes", "gauge", "DATA bytes the workers have not credited back yet "
     "(each at most --worker-backlog).", (("", "backlog_bytes"),)),
    ("tunio_backlog_waits_total", "counter", "Times a flow with credit waited for its worker's "
     "backlog to go under --worker-backlog.", (("", "backlog_waits"),)),
    ("tunio_failed_dials_total", "counter", "TCP flows whose dial failed (OPEN_FAIL).",
     (("", "dial_failed"),)),
    ("tunio_resets_total", "counter", "TCP flows the stack reset, and RSTs it sent for "
     "packets of no flow.",
     (('what="flow"', "flows_reset"), ('what="unknown_flow"', "rst_unknown_flow"))),
    ("tunio_datagrams_dropped_total", "counter", "Datagrams the stack dropped (queue full, no "
     "credit, no worker).", (('where="stack"', "udp_dropped"),)),
    ("tunio_datagrams_dropped_backlog_total", "counter", "Datagrams the stack dropped at a "
     "session's or a worker's bound of bytes in flight (also in tunio_datagrams_dropped_total).",
     (("", "udp_dropped_backlog"),)),
    ("tunio_datagram_backlog_bytes", "gauge", "DGRAM bytes the workers have not credited back yet "
     "(each at most --worker-backlog, a bound apart from DATA's).", (("", "udp_backlog_bytes"),)),
    ("tunio_nat_entries", "gauge", "NAT slots in use, the ones resting after their flow included.",
     (("", "nat_entries"),)),
    ("tunio_workers", "gauge", "Workers the stack has now (HELLO said, alive).",
     (('state="alive"', "workers"),)),
    ("tunio_workers_lost_total", "counter", "Workers the stack lost (silence, BYE, gone).",
     (("", "workers_lost"),)),
    ("tunio_protocol_errors_total", "counter", "Malformed or unexpected messages the stack "
     "dropped.", (('side="stack"', "protocol_errors"),)),
    ("tunio_dns_queries_total", "counter", "DNS queries of the stack's DNS (--dns), by what "
     "became of them.",
     (('result="answered"', "dns_answered"), ('result="forwarded"', "dns_forwarded"),
      ('result="malformed"', "dns_malformed"), ('result="pool_full"', "dns_pool_full"))),
    ("tunio_dns_map_entries", "gauge", "Names holding a fake-IP address now.",
     (("", "dns_map_entries"),)),
    ("tunio_dns_recycled_total", "counter", "Fake-IP addresses taken from one name for another.",
     (("", "dns_recycled"),)),
    ("tunio_dns_tcp_idle_closed_total", "counter", "DNS-over-TCP connections to the DNS address "
     "the stack closed when idle.", (("", "dns_idle_closed"),)),
)  # fmt: skip

# (metric, type, help, key of a worker's counters)
_WORKER: tuple[tuple[str, str, str, str], ...] = (
    ("tunio_worker_flows", "gauge", "Flows and sessions a worker holds now.", "flows_active"),
    ("tunio_worker_dials_total", "counter", "TCP dials a worker started.", "opens"),
    ("tunio_worker_bytes_total", "counter", "Bytes a worker moved to its destinations.",
     "bytes_to_destination"),
    ("tunio_worker_datagrams_sent_total", "counter", "Datagrams a worker sent to their "
     "destinations.", "datagrams_to_destination"),
    ("tunio_worker_resets_sent_total", "counter", "RSTs a worker sent the stack.", "resets_sent"),
    ("tunio_worker_failovers_total", "counter", "Dials that failed and went on to the next "
     "dialer of a policy's list.", "failovers"),
    ("tunio_worker_refused_by_policy_total", "counter", "New flows a policy refused.",
     "refused_by_policy"),
    ("tunio_worker_protocol_errors_total", "counter", "Malformed or unexpected messages a "
     "worker dropped.", "protocol_errors"),
    ("tunio_worker_loop_stalls_total", "counter", "Times code that blocks (a dialer, a policy) "
     "held a worker's loop up for half a second or more.", "loop_stalls"),
    ("tunio_worker_routing_loops_total", "counter", "New flows that were a worker's own "
     "connection routed back into the TUN, refused.", "routing_loops"),
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(*pairs: tuple[str, str]) -> str:
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs if value or name)
    return f"{{{inner}}}" if inner else ""


def _join(fixed: str, extra: str) -> str:
    """`{a="1"}` and `b="2"` as `{a="1",b="2"}`."""
    if not extra:
        return fixed
    if not fixed:
        return f"{{{extra}}}"
    return fixed[:-1] + "," + extra + "}"


def _stack_lines(stack: Snapshot | None) -> Iterator[str]:
    for name, kind, text, series in _STACK:
        yield f"# HELP {name} {text}"
        yield f"# TYPE {name} {kind}"
        if stack is None:
            continue
        for labels, key in series:
            if key in stack:
                yield f"{name}{_join('', labels)} {int(stack[key])}"


def _worker_lines(workers: Mapping[str, Snapshot]) -> Iterator[str]:
    for name, kind, text, key in _WORKER:
        yield f"# HELP {name} {text}"
        yield f"# TYPE {name} {kind}"
        for worker, snap in sorted(workers.items()):
            yield f"{name}{_labels(('worker', worker))} {int(snap.get(key, 0))}"
    yield from _dial_lines(workers)
    name = "tunio_datagrams_dropped_total"
    for worker, snap in sorted(workers.items()):
        for reason in ("credit", "window", "send"):
            labels = _labels(("where", "worker"), ("reason", reason), ("worker", worker))
            yield f"{name}{labels} {int(snap.get(f'datagrams_dropped_{reason}', 0))}"


def _dial_lines(workers: Mapping[str, Snapshot]) -> Iterator[str]:
    hist = "tunio_dial_duration_seconds"
    yield f"# HELP {hist} How long the TCP dials that connected took, by dialer."
    yield f"# TYPE {hist} histogram"
    errors: list[str] = []
    for worker, snap in sorted(workers.items()):
        for dialer, dial in sorted(snap.get("dialers", {}).items()):
            base = (("dialer", dialer), ("worker", worker))
            seconds = dial["seconds"]
            running = 0
            for bound, count in zip((*DIAL_BUCKETS, float("inf")), seconds["counts"], strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                yield f"{hist}_bucket{_labels(*base, ('le', le))} {running}"
            yield f"{hist}_sum{_labels(*base)} {seconds['total']:.6f}"
            yield f"{hist}_count{_labels(*base)} {seconds['count']}"
            for errname, count in sorted(dial["failures"].items()):
                labels = _labels(("dialer", dialer), ("errno", errname), ("worker", worker))
                errors.append(f"tunio_dial_errors_total{labels} {count}")
    yield "# HELP tunio_dial_errors_total TCP dials that failed, by dialer and errno."
    yield "# TYPE tunio_dial_errors_total counter"
    yield from errors


def render(stats: Mapping[str, Snapshot], restarts: Mapping[str, int],
           tun_counters: Mapping[str, int]) -> str:  # fmt: skip
    """The metrics from the children's latest reports (`stats`: "stack", "worker-N"), the
    supervisor's restart counts, and the TUN device's own counters."""
    workers = {name: snap for name, snap in stats.items() if name != "stack"}
    lines = [*_stack_lines(stats.get("stack")), *_worker_lines(workers)]
    lines += ["# HELP tunio_restarts_total Processes of the run started again after they died.",
              "# TYPE tunio_restarts_total counter"]  # fmt: skip
    lines += [f"tunio_restarts_total{_labels(('process', name))} {count}"
              for name, count in sorted(restarts.items())]  # fmt: skip
    lines += ["# HELP tunio_tun_dropped_packets_total Packets the TUN device dropped: queued for "
              "the stack's readers while its queues were full (tx), or written by the stack "
              "and refused (rx).", "# TYPE tunio_tun_dropped_packets_total counter"]  # fmt: skip
    lines += [f"tunio_tun_dropped_packets_total{_labels(('direction', d))} {c}"
              for d, c in sorted(tun_counters.items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def tun_drops(sys_net: str, tun: str) -> dict[str, int]:
    """The TUN device's dropped-packet counters ({"tx": n, "rx": n}), or {} without it."""
    out: dict[str, int] = {}
    for direction in ("tx", "rx"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(sys_net, tun, "statistics", f"{direction}_dropped").read_text()
            out[direction] = int(text)
    return out


# A scraper sends its request at once and reads the page in well under a second. One that
# connects and says nothing (or a crowd of them) must not hold a thread of the supervisor each
# for ever: a connection is dropped after IDLE_TIMEOUT seconds of silence, and past MAX_CLIENTS
# at once a new one is closed unanswered.
IDLE_TIMEOUT = 10.0
MAX_CLIENTS = 16
BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[http.server.BaseHTTPRequestHandler],
                 max_clients: int) -> None:  # fmt: skip
        self._slots = threading.BoundedSemaphore(max_clients)
        self.refused = 0  # connections closed unanswered: MAX_CLIENTS were being served
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            with contextlib.suppress(OSError):  # a word if the socket takes it now, no wait
                request.setblocking(False)
                request.send(BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _V6Server(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """HTTP on HOST:PORT in a thread of its own: GET /metrics renders `source()`."""

    def __init__(
        self,
        host: str,
        port: int,
        source: Callable[[], str],
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = idle_timeout  # a socket timeout: a silent client is dropped

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "see /metrics")
                    return
                body = source().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape every few seconds is not news

        server_class = _V6Server if ":" in host else _Server
        self._server = server_class((host, port), Handler, max_clients)
        self._thread = threading.Thread(target=self._server.serve_forever, name="tunio-metrics",
                                        daemon=True)  # fmt: skip

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def refused(self) -> int:
        """Connections closed unanswered because the server was full."""
        return self._server.refused

    def fileno(self) -> int:
        """The listening socket: forked children must close it."""
        return self._server.fileno()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
