"""systemd's readiness protocol (sd_notify(3)), without libsystemd: one datagram to the socket
that $NOTIFY_SOCKET names. With `Type=notify` the unit is "active" once tunio forwards, "reloading"
while a SIGHUP is applied, and "deactivating" while it stops; outside systemd this does nothing."""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Sends "READY=1", "STATUS=...", ... as one message; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False  # systemd went away: nothing to tell
    return True
