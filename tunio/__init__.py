"""tunio: every TCP flow of a TUN device, carried out through a dialer written in Python.

A C stack process terminates the flows (by address translation into the kernel's own TCP) and
ships them over ZeroMQ to worker processes that run the dialer. As a library::

    import tunio

    class Redirect:                       # any object with `async def dial(dst, src)`
        async def dial(self, dst, src): ...

    tunio.run(tunio.Options(tun="tun0", address="198.18.0.1/24", routes=("default",),
                            dialer=Redirect(), workers=4))
"""

from __future__ import annotations

from tunio.config import Options
from tunio.dialers import Address, Dialer, load_dialer
from tunio.errors import ConfigError, DialError, StackError, TunError, TunioError
from tunio.policy import Flow, Owner, Reject
from tunio.supervisor import Supervisor

__version__ = "0.1.0"

__all__ = [
    "Address",
    "ConfigError",
    "DialError",
    "Dialer",
    "Flow",
    "Options",
    "Owner",
    "Reject",
    "StackError",
    "Supervisor",
    "TunError",
    "TunioError",
    "__version__",
    "load_dialer",
    "run",
]


def run(options: Options) -> int:
    """Runs tunio until SIGINT/SIGTERM (or Supervisor.stop()); returns the exit code."""
    return Supervisor(options).run()
