"""The service log stays small: one old log kept, asyncio's out-of-descriptors line once a minute."""

from __future__ import annotations

import errno
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from backend import service_log


def test_a_large_log_is_moved_aside_once(tmp_path, monkeypatch):
    monkeypatch.setattr(service_log, "MAX_BYTES", 10)
    log = tmp_path / "serve.log"
    log.write_text("short\n")
    service_log.rotate(log)
    assert log.read_text() == "short\n"
    log.write_text("x" * 11)
    service_log.rotate(log)
    assert not log.exists() and (tmp_path / "serve.log.1").read_text() == "x" * 11
    service_log.rotate(log)  # no log yet: nothing to do


def test_a_full_descriptor_table_is_said_once_a_minute(caplog, monkeypatch):
    service_log.quiet_client_faults()
    clock = iter([1000.0, 1001.0, 1061.0])
    monkeypatch.setattr(service_log.time, "monotonic", lambda: next(clock))
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(3):  # what asyncio's default exception handler logs, each second
            logging.getLogger("asyncio").error(f"{service_log.FULL_TABLE}\nsocket: <sock>", exc_info=exc)
        logging.getLogger("aiohttp.server").error("Error handling request", exc_info=ConnectionResetError())
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [
        (f"{service_log.FULL_TABLE} ([Errno 24] Too many open files); new connections wait", None)] * 2


def _logging_to(log: Path, script: str) -> None:
    """Run ``script`` with its stdout and stderr appended to ``log``, as a detached service's are."""
    with open(log, "ab") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=out, check=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_running_service_moves_its_own_log_aside(tmp_path):
    """A detached service writes its log as stdout and stderr: past MAX_BYTES both go to a new file."""
    log = tmp_path / "serve.log"
    script = ("import sys; from pathlib import Path; from backend import service_log\n"
              "service_log.MAX_BYTES = 10\n"
              f"log = Path({str(log)!r})\n"
              "print('first line, past ten bytes'); service_log.rotate_own(log)\n"
              "print('2'); print('e', file=sys.stderr); service_log.rotate_own(log)\n")
    _logging_to(log, script)
    assert (tmp_path / "serve.log.1").read_text() == "first line, past ten bytes\n"
    assert log.read_text() == "2\ne\n"
    _logging_to(tmp_path / "other.log", script)  # a log that is not this process's own stays
    assert log.read_text() == "2\ne\n"
    log.unlink()
    with open(log, "ab") as out:  # `serve >> serve.log` in a terminal: its stderr stays on the terminal
        ran = subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.PIPE, check=True,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert log.read_text() == "2\n" and ran.stderr == "e\n"


def test_an_idle_service_moves_its_log_aside_too(tmp_path):
    """Lines no job caused (a client's) fill the log too: the service checks its size every LOG_CHECK."""
    log = tmp_path / "serve.log"
    script = ("import asyncio; from pathlib import Path; from backend import serve, service_log\n"
              "service_log.MAX_BYTES, serve.LOG_CHECK = 10, 0.05\n"
              "async def main():\n"
              f"    task = asyncio.create_task(serve._rotate_log(Path({str(log)!r})))\n"
              "    print('first line, past ten bytes'); await asyncio.sleep(0.5); print('2')\n"
              "    task.cancel()\n"
              "asyncio.run(main())\n")
    _logging_to(log, script)
    assert (tmp_path / "serve.log.1").read_text() == "first line, past ten bytes\n"
    assert log.read_text() == "2\n"


def test_a_worker_moves_a_large_log_aside_as_it_starts(tmp_path):
    log = tmp_path / "worker-0.log"
    log.write_text("x" * 11)
    script = ("from pathlib import Path; from backend import service_log, worker\n"
              f"service_log.MAX_BYTES = 10; worker._redirect_output(Path({str(log)!r})); print('started')\n")
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert (tmp_path / "worker-0.log.1").read_text() == "x" * 11 and log.read_text() == "started\n"


def test_log_lines_read_as_the_service_announcements_do():
    """``2026-12-06 11:31:24 dreamtty: worker 0 ready`` beside ``2026-12-06 11:31:35 dreamtty.service: ...``."""
    script = ("import logging; from backend import service_log\n"
              "service_log.configure(); logging.getLogger('dreamtty.service').info('worker 0: changed')\n")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d dreamtty\.service: worker 0: changed\n", ran.stderr)
