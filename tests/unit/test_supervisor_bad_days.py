"""The supervisor on a bad day: crash loops, stubborn workers, signal storms, generations that
never get up, undo steps that fail, a run killed between two changes. The fake world of
tests/unit/supervisorworld.py, whose worker and `ip` misbehave on demand."""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.supervisorworld import (
    REPO,
    TUN,
    LogWatch,
    Running,
    World,
    _assert_dead,
    _bootstrap,
    _options,
    _read_until,
    _start,
    _supervisor,
)
from tunio import netplan
from tunio import supervisor as supervisor_module
from tunio.cleanup import cleanup

pytestmark = pytest.mark.usefixtures("stop_left_supervisors")


@pytest.fixture
def bad(world: World) -> World:
    """The supervisor's fake world (tests/unit/supervisorworld.py): its fakes do what these
    tests ask of them on demand."""
    return world


def _until(what: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """A bounded poll of state the supervisor keeps (no event says it changed)."""
    end = time.monotonic() + timeout
    while not what():
        if time.monotonic() > end:
            return False
        time.sleep(step)
    return True


def _ended(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))




# ---------------------------------------------------------------- signals


def test_a_sighup_storm_then_sigterm_stops_cleanly(bad: World) -> None:
    env = {**os.environ, **bad.env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_bootstrap(bad), env=env, stderr=subprocess.PIPE)
    try:
        _read_until(proc, b"tunio ready:", timeout=20)
        end = time.monotonic() + 10.0
        while time.monotonic() < end and proc.poll() is None:
            proc.send_signal(signal.SIGHUP)  # `systemctl reload` in a loop, a flapping script
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, rest = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("tunio-run hung after a SIGHUP storm and a SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # what the run made is taken back, and it says so with its clean exit
    assert bad.ip_calls()[-1] == f"-4 route del default dev {TUN}", rest.decode()[-3000:]
    assert not bad.runtime.exists()
    assert b"Traceback" not in rest
    assert proc.returncode == 0, rest.decode()[-1500:]
    assert b"tunio stopped" in rest


# ---------------------------------------------------------------- reloads


def test_a_reload_to_a_dialer_module_that_raises_is_refused(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "review_broken_dialer.py").write_text("raise RuntimeError('half-edited file')\n")
    monkeypatch.syspath_prepend(str(mods))
    options = _options(bad, workers=1)
    running = _start(_supervisor(bad, options))
    assert running.supervisor.ready.wait(15)
    before = bad.pids("worker-0")
    running.supervisor.reload_with(
        dataclasses.replace(options, dialer="review_broken_dialer:dialer")
    )
    # the reload is refused in one line (not said to have changed the dialer first); the run
    # and its worker go on
    logwatch.wait_for(lambda m: m.startswith("reload refused:"), timeout=5)
    assert not any(m.startswith("reload: dialer changed") for m in logwatch.messages())
    assert running.thread.is_alive()
    os.kill(before[0], 0)
    assert running.stop() == 0


def test_a_dialer_module_that_raises_at_start_is_a_one_line_error(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "review_broken_start.py").write_text("x = (\n")  # a SyntaxError: a half-saved edit
    monkeypatch.syspath_prepend(str(mods))
    options = _options(bad, workers=1, dialer="review_broken_start:dialer")
    assert _supervisor(bad, options).run() == 2
    [error] = logwatch.messages("ERROR")
    assert "review_broken_start" in error
    assert "\n" not in error


def test_a_generation_that_never_gets_up_is_reported(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(bad.state / "gate")
    monkeypatch.setenv("FAKE_WORKER_HOLD", "worker-g2-0")
    options = _options(bad, workers=2)
    running = _start(_supervisor(bad, options, startup_deadline=2.0))
    assert running.supervisor.ready.wait(15)
    running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
    logwatch.wait_for(lambda m: m.startswith("reload: generation 2 (2 workers) starts"))
    # start-up gives up after --startup-deadline with "worker-1 not ready"; a reload says nothing
    try:
        said = logwatch.wait_for(lambda m: "worker-g2-0" in m and "ready" in m, timeout=8)
    finally:
        assert running.stop() == 0  # while the fake `ip` is still on PATH
    assert "not ready" in said or "did not" in said


def test_a_new_generation_after_zero_workers_is_not_logged_as_restarted(
    bad: World, logwatch: LogWatch
) -> None:
    options = _options(bad, workers=1)
    running = _start(_supervisor(bad, options))
    assert running.supervisor.ready.wait(15)
    none = dataclasses.replace(options, workers=0)
    running.supervisor.reload_with(none)
    logwatch.wait_for(lambda m: m.startswith("worker-0 (generation 1) has ended"))
    running.supervisor.reload_with(dataclasses.replace(none, workers=1))
    logwatch.wait_for(lambda m: m.startswith("reload: generation 3 (1 workers) starts"))
    sup = running.supervisor
    assert _until(lambda: [c.ready for c in sup._workers] == [True], 15)
    assert running.stop() == 0
    assert not [m for m in logwatch.messages() if m.startswith("worker-g3-0 restarted")]


def test_metrics_follow_the_generations(bad: World, monkeypatch: pytest.MonkeyPatch,
                                        logwatch: LogWatch) -> None:  # fmt: skip
    """Held up: the old generation's series go once it has ended, the new one's appear."""
    monkeypatch.setenv("FAKE_WORKER_REPORT", "worker-0,worker-1,worker-g2-0,worker-g2-1")
    options = _options(bad, workers=2)
    running = _start(_supervisor(bad, options))
    sup = running.supervisor
    assert sup.ready.wait(15)
    assert _until(lambda: {"worker-0", "worker-1"} <= set(sup.stats), 10)
    sup.reload_with(dataclasses.replace(options, connect_timeout=3.0))
    logwatch.wait_for(lambda m: m.startswith("worker-1 (generation 1) has ended"))
    logwatch.wait_for(lambda m: m.startswith("worker-0 (generation 1) has ended"))
    assert _until(lambda: set(sup.stats) == {"worker-g2-0", "worker-g2-1"}, 10), sup.stats
    assert running.stop() == 0


def test_stack_dies_during_a_reload(bad: World, logwatch: LogWatch,
                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Held up: the stack killed while generation 2 is held short of ready; once it is up the
    run is whole again and nothing is left unwatched."""
    os.mkfifo(bad.state / "gate")
    monkeypatch.setenv("FAKE_WORKER_HOLD", "worker-g2-0,worker-g2-1")
    options = _options(bad, workers=2)
    running = _start(_supervisor(bad, options))
    assert running.supervisor.ready.wait(15)
    running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
    logwatch.wait_for(lambda m: m.startswith("reload: generation 2 (2 workers) starts"))
    [stack] = bad.pids("stack")
    os.kill(stack, signal.SIGKILL)
    logwatch.wait_for(lambda m: m.startswith("stack restarted"))
    # read-write: the bytes wait in the FIFO for whichever of generation 2's workers comes next
    gate = os.open(bad.state / "gate", os.O_RDWR)
    try:
        os.write(gate, b"x" * 64)
        assert _until(lambda: all(c.ready for c in running.supervisor._workers), 20)
    finally:
        os.close(gate)
    for pid in bad.pids("worker-0") + bad.pids("worker-1"):
        assert _ended(pid, 10)
    assert running.supervisor._draining_next == []
    assert running.stop() == 0
    _assert_dead(bad.pids("stack") + bad.pids("worker-g2-0") + bad.pids("worker-g2-1"))


def test_sigterm_during_a_reload_and_a_drain(bad: World, logwatch: LogWatch,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Held up: a stop while generation 2 starts and generation 1 waits to drain."""
    os.mkfifo(bad.state / "gate")
    monkeypatch.setenv("FAKE_WORKER_HOLD", "worker-g2-0")
    options = _options(bad, workers=2)
    running = _start(_supervisor(bad, options))
    assert running.supervisor.ready.wait(15)
    running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
    logwatch.wait_for(lambda m: m.startswith("worker-g2-1 of generation 2 started"))
    assert running.stop() == 0
    _assert_dead(bad.pids("stack") + bad.pids("worker-0") + bad.pids("worker-1")
                 + bad.pids("worker-g2-0") + bad.pids("worker-g2-1"))  # fmt: skip
    assert not bad.runtime.exists()


def test_sighup_storm_of_live_and_refused_reloads(bad: World, logwatch: LogWatch) -> None:
    """Held up: thirty reloads in a row, live and refused mixed: the last live one is in force,
    one generation runs at the end with the number of workers asked, and the others are gone."""
    options = _options(bad, workers=2)
    running = _start(_supervisor(bad, options))
    sup = running.supervisor
    assert sup.ready.wait(15)
    for i in range(30):
        live = dataclasses.replace(options, connect_timeout=1.0 + i, workers=1 + i % 3)
        sup.reload_with(live if i % 3 else dataclasses.replace(live, mtu=9000))
    want = dataclasses.replace(options, connect_timeout=30.0, workers=3)  # i = 29
    sup.reload_with(want)

    def settled() -> bool:
        return (sup.options == want and not sup._draining_next and not sup._retiring
                and all(c.ready for c in sup._workers))  # fmt: skip

    assert _until(settled, 30)
    assert len(sup._workers) == 3
    names = {c.name for c in sup._workers}
    alive = [pid for f in bad.state.glob("worker*.pids") for pid in bad.pids(f.stem)
             if not _ended(pid, 0.0)]  # fmt: skip
    assert len(alive) == 3, (names, alive)
    assert running.stop() == 0


def test_a_stack_that_lost_its_device_ends_the_run_with_status_1(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device deleted under the run: not restarted on the same dead queues for good, but
    a stop that undoes the run's changes and an exit status a service manager acts on."""
    monkeypatch.setenv("FAKE_STACK_GONE", "1")
    running = _start(_supervisor(bad, _options(bad, workers=1)))
    assert running.supervisor.ready.wait(15)
    [stack] = bad.pids("stack")
    os.kill(stack, signal.SIGUSR2)
    running.thread.join(30)
    assert not running.thread.is_alive(), "the run goes on without its device"
    assert running.code == 1
    assert f"the TUN device {TUN} is gone (deleted while the run used it): stopping; a new run " \
        "makes it again" in logwatch.messages("ERROR")  # fmt: skip
    assert bad.pids("stack") == [stack]  # no new stack
    assert bad.ip_calls()[-1] == f"-4 route del default dev {TUN}"  # the run's changes undone
    _assert_dead(bad.pids("stack") + bad.pids("worker-0"))


def test_stack_error_after_ready_is_said_and_restarted(bad: World, logwatch: LogWatch) -> None:
    """Held up: the stack's error after READY is logged, and a new stack comes with workers."""
    running = _start(_supervisor(bad, _options(bad, workers=1)))
    assert running.supervisor.ready.wait(15)
    [stack] = bad.pids("stack")
    os.kill(stack, signal.SIGUSR2)
    logwatch.wait_for(lambda m: m == "stack: lost the TUN queues")
    logwatch.wait_for(lambda m: m.startswith("stack exited with code 0 after"))
    logwatch.wait_for(lambda m: m.startswith("stack restarted"))
    logwatch.wait_for(lambda m: m.startswith("worker-0 restarted"))
    assert running.stop() == 0
    _assert_dead(bad.pids("stack") + bad.pids("worker-0"))


def test_sigterm_while_workers_start(bad: World, logwatch: LogWatch,
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Held up: a stop while a worker is held short of ready at start-up."""
    os.mkfifo(bad.state / "gate")
    monkeypatch.setenv("FAKE_WORKER_HOLD", "worker-1")
    supervisor = _supervisor(bad, _options(bad, workers=2))
    running = _start(supervisor)
    assert _until(lambda: len(bad.pids("worker-1")) == 1, 15)
    assert running.stop() == 0
    assert any(m.startswith("stopping during start-up") for m in logwatch.messages())
    assert not supervisor.ready.is_set()
    _assert_dead(bad.pids("stack") + bad.pids("worker-0") + bad.pids("worker-1"))
    assert not bad.runtime.exists()
    assert bad.ip_calls()[-1] == f"-4 route del default dev {TUN}"


# ---------------------------------------------------------------- stubborn workers


def test_drain_timeout_ends_workers_that_ignore_sigterm(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_WORKER_STUBBORN", "worker-0,worker-1")
    options = _options(bad, workers=2, drain_timeout=0.5)
    running = _start(_supervisor(bad, options, stop_deadline=1.0))
    assert running.supervisor.ready.wait(15)
    old = bad.pids("worker-0") + bad.pids("worker-1")
    running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
    logwatch.wait_for(lambda m: m.startswith("worker-0 did not finish its flows within"))
    logwatch.wait_for(lambda m: m.startswith("worker-1 did not finish its flows within"))
    # after the SIGTERM, at most the stop deadline (1 s) before SIGKILL, as a stop does
    try:
        ended = [_ended(pid, 6.0) for pid in old]
        reaped = _until(lambda: running.supervisor._retiring == [], 3)
    finally:
        assert running.stop() == 0  # while the fake `ip` is still on PATH
    assert ended == [True, True], "a worker past --drain-timeout still runs"
    assert reaped


def test_sigterm_during_a_drain_of_stuck_workers(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held up: a stop while stuck workers drain ends them (SIGKILL) and reaps them."""
    monkeypatch.setenv("FAKE_WORKER_STUBBORN", "worker-0,worker-1")
    options = _options(bad, workers=2)
    running = _start(_supervisor(bad, options, stop_deadline=1.0))
    assert running.supervisor.ready.wait(15)
    old = bad.pids("worker-0") + bad.pids("worker-1")
    running.supervisor.reload_with(dataclasses.replace(options, connect_timeout=3.0))
    logwatch.wait_for(lambda m: m.startswith("generation 1 drains: 2 workers"))
    assert running.stop() == 0
    assert any(m.startswith("tunio-worker-0 did not stop: killing it") for m in
               logwatch.messages("WARNING"))  # fmt: skip
    _assert_dead(old + bad.pids("worker-g2-0") + bad.pids("worker-g2-1") + bad.pids("stack"))


def test_stop_with_stuck_workers_keeps_to_the_stop_deadline(
    bad: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"worker-{i}" for i in range(8)]
    monkeypatch.setenv("FAKE_WORKER_STUBBORN", ",".join(names))
    running = _start(_supervisor(bad, _options(bad, workers=8), stop_deadline=2.0))
    assert running.supervisor.ready.wait(15)
    began = time.monotonic()
    assert running.stop() == 0
    took = time.monotonic() - began
    _assert_dead([pid for name in names for pid in bad.pids(name)])
    # the deadline, a second for the SIGTERM to the stuck ones, and slack for the kills
    assert took < 2.0 + 1.0 + 1.5, f"the stop took {took:.1f} s"


# ---------------------------------------------------------------- crash loops, descriptors


def test_workers_the_supervisor_restarts_for_a_new_stack_get_no_backoff(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_WORKER_SURVIVE", "worker-0")
    running = _start(_supervisor(bad, _options(bad, workers=1)))
    sup = running.supervisor
    assert sup.ready.wait(15)
    for n in range(1, 4):  # a stack that crashes now and then, on one packet, say
        os.kill(bad.pids("stack")[-1], signal.SIGKILL)

        def back(n: int = n) -> bool:
            return len(bad.pids("worker-0")) == n + 1 and sup._workers[0].ready and sup._stack.ready

        assert _until(back, 30)
    assert running.stop() == 0
    # the worker did not fail: the supervisor ended it for the new stack, which waits for it,
    # so it comes back at once, not after a crash's backoff, and no crash is reported
    assert not [m for m in logwatch.messages("WARNING") if m.startswith("worker-0 exited")]
    rejoined = [m for m in logwatch.messages() if m == "worker-0 restarts to join the new stack"]
    assert len(rejoined) == 3


def _restarting_fast(bad: World, monkeypatch: pytest.MonkeyPatch) -> Running:
    """A run of one worker, up, whose children come back within 10-20 ms of an exit."""
    monkeypatch.setattr(supervisor_module, "BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(supervisor_module, "BACKOFF_MAX", 0.02)
    running = _start(_supervisor(bad, _options(bad, workers=1)))
    assert running.supervisor.ready.wait(15)
    return running


def test_a_crash_loop_is_not_a_line_per_restart(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = _restarting_fast(bad, monkeypatch)
    sup = running.supervisor
    (bad.state / "worker-0.crash").touch()  # every start from now on exits 0 at once
    os.kill(bad.pids("worker-0")[0], signal.SIGKILL)
    assert _until(lambda: sup.restarts.get("worker-0", 0) >= 40, 30), sup.restarts
    (bad.state / "worker-0.crash").unlink()
    assert running.stop() == 0
    # what an operator sees (info and above; each exit is still at debug)
    said = [m for lv, m in logwatch.lines if lv != "DEBUG" and m.startswith("worker-0 ")]
    assert len(said) < 10, f"{len(said)} lines for one crash loop, e.g. {said[-1]!r}"
    assert any(m.startswith("worker-0 is in a crash loop: ") for m in said), said


def test_no_descriptor_leaks_over_many_restarts(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held up: status pipes and sentinels of dead children are closed."""
    running = _restarting_fast(bad, monkeypatch)
    sup = running.supervisor
    before = _fds()
    for n in range(1, 21):
        os.kill(bad.pids("worker-0")[-1], signal.SIGKILL)

        def back(n: int = n) -> bool:
            return sup.restarts.get("worker-0") == n and sup._workers[0].ready

        assert _until(back, 20)
    for n in range(2, 7):  # and the stack, which takes its worker with it
        os.kill(bad.pids("stack")[-1], signal.SIGKILL)

        def whole(n: int = n) -> bool:
            return (len(bad.pids("stack")) == n and sup._stack.ready
                    and sup._workers[0].process is not None and sup._workers[0].ready)  # fmt: skip

        assert _until(whole, 20)
    # the same descriptors once all is up again (a leak never gets back to them)
    settled = _until(lambda: _fds() == before and sup._workers[0].ready, 10)
    after = _fds()
    assert running.stop() == 0
    assert settled, sorted(after ^ before)


# ---------------------------------------------------------------- the journal


def test_cleanup_takes_back_a_route_made_just_before_a_kill(bad: World) -> None:
    env = {**os.environ, **bad.env(), "PYTHONPATH": str(REPO),
           "FAKE_IP_KILL": f"-4 route add default dev {TUN}"}  # fmt: skip
    proc = subprocess.run(_bootstrap(bad), env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert f"-4 route add default dev {TUN}" in bad.ip_calls()
    cleanup(TUN, bad.runtime, bad.locks, sys_net=str(bad.sys_net))
    assert f"-4 route del default dev {TUN}" in bad.ip_calls()


def test_a_journal_that_cannot_be_written_leaves_no_route(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = netplan.Journal.add

    def add(self: netplan.Journal, change: netplan.Change) -> None:
        if change.what.startswith("route "):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, change)

    monkeypatch.setattr(netplan.Journal, "add", add)
    assert _supervisor(bad, _options(bad, workers=1)).run() == 1
    assert "No space left on device" in logwatch.messages("ERROR")[-1]
    calls = bad.ip_calls()
    # noted before it is made: a change the journal cannot take is never made
    assert f"-4 route add default dev {TUN}" not in calls, calls


def test_a_failed_undo_is_left_for_cleanup(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = _start(_supervisor(bad, _options(bad, workers=1)))
    assert running.supervisor.ready.wait(15)
    monkeypatch.setenv("FAKE_IP_FAIL", f"-4 route del default dev {TUN}")
    assert running.stop() == 0
    assert any(m.startswith("could not remove the route default into") for m in
               logwatch.messages("WARNING"))  # fmt: skip
    monkeypatch.delenv("FAKE_IP_FAIL")
    removed = cleanup(TUN, bad.runtime, bad.locks, sys_net=str(bad.sys_net))
    assert f"route default into {TUN}" in removed
    assert bad.ip_calls().count(f"-4 route del default dev {TUN}") == 2


def test_a_failed_route_is_undone_in_reverse(bad: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Held up: a failure half-way through the routes takes back what was made, newest first."""
    monkeypatch.setenv("FAKE_IP_FAIL", f"-4 route add 10.2.0.0/16 dev {TUN}")
    (bad.sys_net / TUN).mkdir()
    (bad.sys_net / TUN / "tun_flags").write_text("0x1101\n")
    routes = ("10.0.0.0/16", "10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16")
    assert _supervisor(bad, _options(bad, workers=1, routes=routes)).run() == 1
    calls = bad.ip_calls()
    failed = calls.index(f"-4 route add 10.2.0.0/16 dev {TUN}")
    assert calls[failed + 1:] == [
        f"-4 route del 10.1.0.0/16 dev {TUN}",
        f"-4 route del 10.0.0.0/16 dev {TUN}",
        f"addr del 198.18.255.1/24 dev {TUN}",
    ]
    assert not bad.runtime.exists()


# ---------------------------------------------------------------- hung, not dead


def test_a_worker_that_falls_silent_is_killed_and_started_again(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose loop stopped (code that blocks, SIGSTOP) is alive but carries nothing:
    past --hang-timeout without a report it is killed, and restarted as after a crash."""
    monkeypatch.setenv("FAKE_WORKER_REPORT", "worker-0")  # one report, then silence
    monkeypatch.setenv("FAKE_STACK_TICKS", "moving")
    options = _options(bad, workers=1, hang_timeout=0.5)
    running = _start(_supervisor(bad, options))
    try:
        assert running.supervisor.ready.wait(15)
        [first] = bad.pids("worker-0")
        logwatch.wait_for(lambda m: m.startswith("worker-0 showed no sign of life for 0.5 s"))
        assert _ended(first, 5.0), "the silent worker still runs"
        assert _until(lambda: len(bad.pids("worker-0")) == 2, 10), "no new worker-0"
        assert running.supervisor.restarts.get("worker-0") == 1
        assert not any(m.startswith("stack showed") for m in logwatch.messages())
    finally:
        assert running.stop() == 0


def test_a_stack_whose_loop_stopped_turning_is_killed_and_started_again(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack's reports come from its process's main thread: they go on while its loop is
    stuck, so what counts is whether the loop's ticks move."""
    monkeypatch.setenv("FAKE_STACK_TICKS", "stuck")
    options = _options(bad, workers=1, hang_timeout=0.5)
    running = _start(_supervisor(bad, options))
    try:
        assert running.supervisor.ready.wait(15)
        [first] = bad.pids("stack")
        logwatch.wait_for(lambda m: m.startswith("stack showed no sign of life for 0.5 s (its "
                                                 "loop has not turned"))  # fmt: skip
        assert _ended(first, 5.0), "the stuck stack still runs"
        assert _until(lambda: len(bad.pids("stack")) == 2, 10), "no new stack"
    finally:
        assert running.stop() == 0


def test_a_stack_whose_loop_turns_is_left_alone(
    bad: World, logwatch: LogWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STACK_TICKS", "moving")
    running = _start(_supervisor(bad, _options(bad, workers=1, hang_timeout=0.3)))
    try:
        assert running.supervisor.ready.wait(15)
        # ten reports a second, each with ticks that moved: four times the timeout passes
        assert not _until(lambda: len(bad.pids("stack")) > 1, 1.2)
        assert not any(m.startswith("stack showed") for m in logwatch.messages())
    finally:
        assert running.stop() == 0
