"""The service's log (``serve.log``), its workers' (``worker-N.log``) and their fork server's (``preload.log``):
where they are, and what a client can make the service write stays small.

A request aiohttp cannot parse (it answers 400) or a client that hangs up mid-request would each
write a traceback; anyone who can reach a TCP port could fill the disk with them. They are left out.
The one old log kept is ``<log>.1``: a log past MAX_BYTES is moved there when its process starts, and
by the process as it writes (:func:`rotate_own`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

MAX_BYTES = 16 << 20  # a log past this is moved to serve.log.1
FULL_TABLE = "socket.accept() out of system resource"  # asyncio's line, every second while no fd is free
FULL_TABLE_EVERY = 60.0  # seconds


def log_file(name: str) -> Path:
    """Where the log ``name`` (``serve.log``, ``worker-0.log``, ``preload.log``) is written."""
    from backend import locations

    return locations.state_dir() / "logs" / name


def configure() -> None:
    """Log lines as the service's own announcements read: ``2026-12-06 11:31:35 dreamtty.service: ...``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def rotate(path: Path) -> None:
    """Move ``path`` to ``<path>.1`` (replacing it) when it is over MAX_BYTES."""
    try:
        if path.stat().st_size > MAX_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    except OSError:
        pass  # no log yet, or one we cannot move: it is appended to as before


def output_to(path: Path) -> None:
    """Point this process's stdout and stderr at the log ``path`` (:func:`rotate`\ d first), so that nothing it
    or a library prints draws over a TUI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def rotate_own(path: Path) -> None:
    """:func:`rotate` the log this process writes as its stdout or stderr (a detached service's both), and
    point those at a new ``path``. Children started before (multiprocessing's resource tracker; workers
    write their own ``worker-N.log``) write on to the old file."""
    try:
        log = path.stat()
        own = [fd for fd in (1, 2) if os.path.samestat(os.fstat(fd), log)]
    except OSError:
        return
    if not own or log.st_size <= MAX_BYTES:
        return  # a terminal (``serve`` in the foreground), or small yet
    rotate(path)
    try:
        fresh = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, log.st_mode & 0o777)
    except OSError:
        return  # the old file, now <path>.1, is written on
    for fd in own:
        os.dup2(fresh, fd)
    os.close(fresh)


class _ClientFaults(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.said_full = -math.inf
        # aiohttp is imported here, in the service, not by every CLI that imports ``backend.serve``
        from aiohttp.http_exceptions import HttpProcessingError
        from aiohttp.web_protocol import RequestPayloadError  # a body that does not decode as it says (gzip)
        self.client_faults = (HttpProcessingError, RequestPayloadError, ConnectionError)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.client_faults):
            return False
        if isinstance(record.msg, str) and record.msg.startswith(FULL_TABLE):
            now = time.monotonic()
            if now - self.said_full < FULL_TABLE_EVERY:
                return False
            self.said_full = now
            record.msg, record.args = "%s (%s); new connections wait", (FULL_TABLE, exc)
            record.exc_info = record.exc_text = None
        return True


def quiet_client_faults() -> None:
    """Install the filter (once) on the loggers that report client faults (aiohttp's server, asyncio)."""
    faults = _ClientFaults()
    for name in ("aiohttp.server", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ClientFaults) for f in logger.filters):
            logger.addFilter(faults)
