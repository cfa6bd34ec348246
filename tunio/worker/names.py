"""The names the stack sends (NAME, docs/protocol.md) for flows to fake-IP addresses.

NAME comes right before the OPEN of a TCP flow, or before the first DGRAM of a datagram session,
on the same flow id; the opener takes it from here when that message arrives. A name that is
never taken (a flow the stack reset before its OPEN went out) is pushed out by later ones: the
table holds at most MAX_PENDING.
"""

from __future__ import annotations

import re

from tunio import wire

#: names held for flows whose OPEN or DGRAM has not come yet
MAX_PENDING = 4096

#: what the stack's fake-IP map holds (csrc/dnsmap.c): lower-case letters, digits, -, _, dots;
#: anything else (a newline that would forge a log line) is no name of its
_NAME = re.compile(r"[a-z0-9_.-]{1,253}")

class Names:
    def __init__(self) -> None:
        self._by_flow: dict[int, str] = {}

    def on_name(self, fid: int, payload: wire.Payload) -> None:
        """NAME: the flow's destination name (lower case, dotted, no final dot)."""
        name = bytes(payload).decode("ascii", errors="replace")
        if not _NAME.fullmatch(name):
            return  # not a name the stack makes: its flow dials the address (and fails there)
        by_flow = self._by_flow
        by_flow.pop(fid, None)
        if len(by_flow) >= MAX_PENDING:
            del by_flow[next(iter(by_flow))]  # the oldest: its flow never came
        by_flow[fid] = name

    def take(self, fid: int) -> str | None:
        """The name of flow `fid`, once: its OPEN or first DGRAM is here."""
        return self._by_flow.pop(fid, None)

    def clear(self) -> None:
        self._by_flow.clear()

    def __len__(self) -> int:
        return len(self._by_flow)
