"""tunio: every TCP flow of a TUN device, carried out through a dialer written in Python.

A C stack process terminates the flows (by address translation into the kernel's own TCP) and
ships them over ZeroMQ to worker processes that run the dialer. As a library::

    import tunio
    from tunio.dialers import DirectDialer

    direct = DirectDialer()               # made bare: it takes the run's way out, the bypass

    class Redirect:                       # any object with `async def dial(dst, src)`
        async def dial(self, dst, src):
            return await direct.dial(dst, src)

    tunio.run(tunio.Options(tun="tun0", address="198.18.0.1/24", auto_bypass=True,
                            routes=("0.0.0.0/1", "128.0.0.0/1"), dialer=Redirect(), workers=4))

The dialer's own connections must not be routed back into the TUN: `auto_bypass` (or
`egress_mark` with a rule of one's own) lets them out past it.
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
