"""Processes: liveness, for jobs and training runs whose owner may have died, and how one ended."""

from __future__ import annotations

import os
import signal
import sys
import threading


def process_exists(pid: int | None) -> bool:
    """True when a process with this pid exists (it may belong to another user)."""
    if not pid or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def be_nice(level: int) -> None:
    """Run the calling thread at niceness ``level`` at least (on Linux a thread's own, elsewhere the process's; the
    threads and processes it starts later take it). Never lowers it: that needs privileges."""
    who = threading.get_native_id() if sys.platform.startswith("linux") else 0
    if level > os.getpriority(os.PRIO_PROCESS, who):
        os.setpriority(os.PRIO_PROCESS, who, level)


def exit_text(code: int | None) -> str:
    """How a process ended, from its exit status: negative, the signal that killed it; 128 + N, a shell's
    (and a worker's) way to say it ended on signal N."""
    if code is None:
        return "ended"
    if code >= 0:
        name = _signal_name(code - 128) if code > 128 else None
        return f"exited with code {code}" + (f" (on {name})" if name else "")
    name = _signal_name(-code) or f"signal {-code}"
    return f"was killed by {name}" + (" (out of memory? see dmesg)" if -code == signal.SIGKILL else "")


def _signal_name(number: int) -> str | None:
    """``SIGTERM`` for 15; None for a number no signal has."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return None
