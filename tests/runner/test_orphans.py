"""The watchdog that keeps an engine's helper processes from outliving their runner."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from runners import orphans


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])


def test_helpers_are_killed_when_their_owner_is_killed_outright():
    owner, helper = _sleeper(), _sleeper()
    watchdog = orphans.guard([psutil.Process(helper.pid)], owner=owner.pid)
    try:
        time.sleep(1.5)
        assert helper.poll() is None  # the owner lives: the helper is left alone
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert helper.wait(timeout=10) == -signal.SIGKILL
        assert watchdog.wait(timeout=10) == 1
    finally:
        for process in (owner, helper, watchdog):
            process.kill()


def test_the_watchdog_leaves_once_its_helpers_are_gone():
    helper = _sleeper()
    watchdog = orphans.guard([psutil.Process(helper.pid)])  # owned by this test process
    try:
        helper.terminate()
        helper.wait()
        assert watchdog.wait(timeout=10) == 0
    finally:
        helper.kill()
        watchdog.kill()


def test_a_reused_pid_is_not_the_same_process():
    helper = _sleeper()
    identity = orphans._identity(psutil.Process(helper.pid))
    assert orphans._alive(identity) is not None
    assert orphans._alive(f"{helper.pid}@1.0") is None  # same pid, another start time
    helper.kill()
    helper.wait()
    assert orphans._alive(identity) is None


def test_a_process_is_still_itself_after_the_system_clock_moves(monkeypatch):
    # The kernel's boot time (btime) moves with clock adjustments; a watchdog started later
    # must still recognise its owner and helpers, or it guards nothing.
    helper = _sleeper()
    try:
        identity = orphans._identity(psutil.Process(helper.pid))
        boot = psutil._pslinux.boot_time()
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: boot + 2.0)
        assert psutil.Process(helper.pid).create_time() != float(identity.split("@")[1])
        assert orphans._alive(identity) is not None
    finally:
        helper.kill()
        helper.wait()
