"""Helper processes that must not outlive the process that owns them.

vLLM runs its engine core (and, under it, its workers) in child processes of the runner. When
the runner stops normally it shuts them down; but a runner killed outright (SIGKILL, the OOM
killer) leaves its engine core running, holding the model's memory (on a GPU, the memory its
replacement needs), because vLLM's engine core does not watch its parent. ``bentoml serve``
then starts a new runner beside the orphan.

:func:`guard` starts a small watchdog process that polls the owner once a second and kills
the processes it was given once the owner is gone. It works whatever start method made the
children (fork or spawn), which a parent-death signal set in the child would not.
Run as ``python -m runners.orphans OWNER_PID PID@START ...``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil

POLL_SECONDS = 1.0


def _started(process: psutil.Process) -> str:
    """When the process started, fixed for the process's life.

    psutil's ``create_time()`` adds the boot time the kernel reports *now* (``btime`` in
    /proc/stat) to the start time since boot, and ``btime`` moves when the system clock is
    adjusted. Two processes reading it a minute apart can then disagree about the same
    process, and the watchdog would take its owner and helpers for gone at once and guard
    nothing (seen once in CI). On Linux we read the start in clock ticks since boot."""
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{process.pid}/stat", "rb") as f:
        # the fields after "(comm)": state is the line's 3rd field, starttime its 22nd
        return f.read().rsplit(b")", 1)[1].split()[19].decode()
    return repr(round(process.create_time()))  # elsewhere: to the second, against small drift


def _identity(process: psutil.Process) -> str:
    """``pid@start``: a pid the system reuses later is not the same process."""
    return f"{process.pid}@{_started(process)}"


def _alive(identity: str) -> psutil.Process | None:
    pid, started = identity.split("@")
    with contextlib.suppress(psutil.Error):
        process = psutil.Process(int(pid))
        if _started(process) == started and process.status() != psutil.STATUS_ZOMBIE:
            return process
    return None


def guard(processes: list[psutil.Process], owner: int | None = None) -> subprocess.Popen:
    """Kill ``processes`` once ``owner`` (this process by default) has died; the watchdog
    ends by itself once they are all gone. Terminate it to stop guarding."""
    owner_process = psutil.Process(owner or os.getpid())
    return subprocess.Popen(
        [sys.executable, "-m", "runners.orphans", _identity(owner_process),
         *(_identity(p) for p in processes)],
        stdin=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # not stopped with the owner's process group
    )  # fmt: skip


def watch(owner: str, identities: list[str]) -> int:
    """The watchdog's loop: returns when the guarded processes are gone."""
    while any(_alive(i) for i in identities):
        if _alive(owner) is None:
            for identity in identities:
                process = _alive(identity)
                if process is not None:
                    with contextlib.suppress(psutil.Error):
                        process.send_signal(signal.SIGKILL)
            return 1
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl+C in the terminal is the owner's
    raise SystemExit(watch(sys.argv[1], sys.argv[2:]))
