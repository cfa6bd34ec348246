"""What a run sets up on the host, and takes back at its end.

In order: the device's lock (one run per TUN device, tunio.devicelock), the runtime directory
(its ipc socket, its own keys), then every change to the host's network (tunio.netplan: the
device and its queues, its addresses and settings, routes into it and around it, the bypass),
each noted in the journal before the next is made. Every step registers its undo on the run's
ExitStack as it is made, so whatever happens after, the host is left as it was found.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tunio import bypass, devicelock, netplan, ports, tundev, wayout
from tunio.config import Options, Plan, validate
from tunio.errors import TunError, TunioError, describe
from tunio.netplan import Change
from tunio.runtime import RuntimeDir

if TYPE_CHECKING:
    from tunio.dialers import Dialer
    from tunio.keys import StackKeys

log = logging.getLogger("tunio.supervisor")


class Host:
    """The host side of one run: `set_up(undo)` makes everything, `plan_changes()` says what
    would be made. After set_up: `fds` (the TUN queues), `endpoint`, `socket` (the ipc socket's
    path, or None for tcp://), `keys` (CURVE, for tcp://), `locks` (what children must close)."""

    def __init__(
        self,
        options: Options,
        *,
        proc: str = tundev.PROC,
        sys_net: str = tundev.SYS_NET,
        tun_path: str = tundev.TUN_PATH,
        lock_dir: Path | None = None,
    ) -> None:
        self.options = options
        self._proc = proc
        self._sys_net = sys_net
        self._tun_path = tun_path
        self._lock_dir = lock_dir if lock_dir is not None else devicelock.default_directory()
        self.fds: list[int] = []
        self.endpoint = ""
        self.socket: Path | None = None
        self.keys: StackKeys | None = None
        self.locks: list[devicelock.DeviceLock | RuntimeDir] = []
        self.uplink: str | None = None
        self._made: list[Change] = []  # the changes made, in order (the journal's lines)
        self.device_lost = False  # the stack found every TUN queue failed: the device gone
        self._left: list[Change] = []  # those a stop could not take back

    def plan_changes(self) -> list[Change]:
        """What a run would change on this host, in order, changing nothing (--dry-run)."""
        plan = validate(self.options, self._sys_net)
        existed, held = self._device_state(plan)
        return self._changes(plan, existed, held)

    def set_up(
        self, plan: Plan, undo: contextlib.ExitStack, check_stop: Callable[[], None]
    ) -> None:
        """Locks, runtime directory, keys, device and network changes; `check_stop()` between
        the steps that take time (it raises to abandon the start)."""
        opts = self.options
        device = devicelock.DeviceLock(self._lock_dir, opts.tun)
        undo.callback(undo_step, "device lock", device.release)
        device.acquire()
        rundir = RuntimeDir(plan.runtime_dir, opts.tun)
        undo.callback(undo_step, "runtime directory", rundir.release)
        rundir.acquire()
        self.locks = [device, rundir]
        self.endpoint = plan.endpoint or rundir.endpoint
        if self.endpoint.startswith("tcp://"):
            self.keys = self._load_keys(plan, undo)
        self.socket = rundir.socket_path if plan.endpoint is None else None

        existed, held = self._device_state(plan)
        # the way out as the host has it now, before any route into the TUN exists
        self.uplink = opts.egress_interface or _default_interface()
        changes = self._changes(plan, existed, held)
        journal = netplan.Journal(plan.runtime_dir)
        # after every change is taken back: what could not be stays noted for --cleanup
        undo.callback(self._close_journal, journal)
        check_stop()

        from tunio.stack import open_tun  # noqa: PLC0415 - the cffi extension is heavy

        self.fds = open_tun(opts.tun, opts.queues, offload=opts.offload)
        undo.callback(self._close_tun, existed)
        self._apply(changes, journal, undo)
        check_stop()

    def _device_state(self, plan: Plan) -> tuple[bool, list[bool]]:
        """Whether the device exists (and is one we can use), and which addresses it holds."""
        opts = self.options
        tundev.check_tun_device(self._tun_path)
        existed = tundev.link_exists(opts.tun, self._sys_net)
        if existed:
            tundev.check_existing_link(opts.tun, self._sys_net)
        held = [tundev.check_address_free(opts.tun, address) for address in plan.addresses]
        return existed, held

    def _changes(self, plan: Plan, existed: bool, held: list[bool]) -> list[Change]:
        """Every change of the run, computed from what the host has before any is made."""
        opts = self.options
        changes = netplan.device_changes(opts, plan, existed, held)
        changes += netplan.exclude_changes(opts.tun, plan.excludes)
        if opts.auto_bypass:
            changes += bypass.plan(opts.tun, wayout.egress_mark(opts) or bypass.MARK, self._proc)
        changes += netplan.route_changes(opts.tun, plan.routes)
        return changes

    def _apply(self, changes: list[Change], journal: netplan.Journal,
               undo: contextlib.ExitStack) -> None:  # fmt: skip
        """Makes each change (the device's own was made by opening its queues), notes it in the
        journal, and registers its undo: at exit they are taken back in reverse order."""
        for change in changes:
            # noted before it is made: a kill in between must not leave a change the journal
            # does not know of; a change that fails is taken out of it again
            journal.add(change)
            if change.do:
                try:
                    tundev.run(*change.do)
                except TunError as exc:
                    journal.keep_only(self._made)  # it was not made
                    if exc.errno != errno.EEXIST or not change.exists_hint:
                        raise
                    raise TunError(exc.errno, f"{exc.strerror} ({change.exists_hint})") from exc
            self._made.append(change)
            if change.do and change.undo:
                undo.callback(self._undo, change)
            log.debug("made: %s", change.what)

    def _undo(self, change: Change) -> None:
        """Takes `change` back; one that cannot be stays noted for --cleanup."""
        try:
            tundev.run(*change.undo)
        except (TunioError, OSError) as exc:
            if self._went_with_the_device(change):
                log.debug("the %s went with the device", change.what)
                return
            log.warning("could not remove the %s: %s", change.what, describe(exc))
            self._left.append(change)

    def _went_with_the_device(self, change: Change) -> bool:
        """A route (or address) on the TUN device, which is gone (deleted under the run): the
        kernel took it away with the device, so there is nothing left to take back."""
        if not self.device_lost or tundev.link_exists(self.options.tun, self._sys_net):
            return False
        pairs = itertools.pairwise(change.undo)
        return any(a == "dev" and b == self.options.tun for a, b in pairs)

    def _close_journal(self, journal: netplan.Journal) -> None:
        # what was never taken back by a step of its own (the device's settings go with it)
        # counts as done; only the failed undos stay
        left = [c for c in self._made if c in self._left]
        if left:
            log.warning("left in %s for tunio-run --cleanup: %s", journal.path,
                        ", ".join(c.what for c in left))  # fmt: skip
        journal.keep_only(left)

    def _load_keys(self, plan: Plan, undo: contextlib.ExitStack) -> StackKeys:
        """Workers on other hosts: CURVE, and only workers holding our worker key get in. Keys
        of --keys are the user's; without it a pair is made for this run only, in the runtime
        directory, and removed at exit (a pair a killed run left there is replaced)."""
        from tunio.keys import key_files, load_or_create  # noqa: PLC0415

        if self.options.keys:
            path = Path(self.options.keys)
        else:
            path = plan.runtime_dir / "keys"
            for stale in key_files(path):
                stale.unlink(missing_ok=True)
            for made in key_files(path):
                undo.callback(made.unlink, missing_ok=True)
        keys = load_or_create(path)
        log.info("workers on other hosts need %s.worker (tunio-worker --keys)", path)
        return keys

    def _close_tun(self, existed: bool) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        # A device we created goes with its last fd unless something made it persistent.
        if not existed and tundev.link_exists(self.options.tun, self._sys_net):
            undo_step("device", tundev.delete_link, self.options.tun)

    def warn_egress(self, plan: Plan, dialer: Dialer) -> None:
        """Says so when the workers' own connections may be dropped or loop into the TUN, and
        what the port range allows when every dial goes to one proxy."""
        from tunio.dialers import DirectDialer  # noqa: PLC0415 - dialers load with user code
        from tunio.dialers.proxy import ProxyDialer  # noqa: PLC0415 - the same

        if isinstance(dialer, ProxyDialer):
            note = ports.one_proxy_note(Path(self._proc))
            if note is not None:
                log.info("%s", note)
        opts = self.options
        if opts.auto_bypass:
            return  # the bypass made the workers' way out, reverse path included
        uplink = self.uplink
        if plan.routes and uplink is not None and uplink != opts.tun:
            line = tundev.rp_filter_warning(uplink, opts.tun, self._proc)
            if line is not None:
                log.warning("%s", line)
        direct = isinstance(dialer, DirectDialer)
        # Any route into the TUN, not only the default one: a worker's connection to a network
        # routed into the TUN goes into it again (0.0.0.0/1 and 128.0.0.0/1 as much as default).
        if plan.routes and direct and opts.egress_mark is None and opts.egress_interface is None:
            log.warning(
                "--route %s with the direct dialer and neither --egress-mark nor "
                "--egress-interface: the workers' own connections to what is routed into %s "
                "will be routed into it again and loop",
                " --route ".join(plan.routes),
                opts.tun,
            )


def _default_interface() -> str | None:
    try:
        return tundev.default_route_interface()
    except TunError as exc:
        log.debug("no default route interface: %s", describe(exc))
        return None


def undo_step(what: str, action: Callable[..., object], *args: object) -> None:
    """One step of the teardown: a failure is logged and the other steps still run."""
    try:
        action(*args)
    except (TunioError, OSError) as exc:
        log.warning("could not remove the %s: %s", what, describe(exc))
