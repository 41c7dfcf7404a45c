"""The service's log (``serve.log``): what a client can make the service write stays small.

A request aiohttp cannot parse (it answers 400) or a client that hangs up mid-request would each
write a traceback; anyone who can reach a TCP port could fill the disk with them. They are left out.
The one old log kept is ``serve.log.1``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

MAX_BYTES = 16 << 20  # a log past this is moved to serve.log.1 when a service starts
FULL_TABLE = "socket.accept() out of system resource"  # asyncio's line, every second while no fd is free
FULL_TABLE_EVERY = 60.0  # seconds


def rotate(path: Path) -> None:
    """Move ``path`` to ``<path>.1`` (replacing it) when it is over MAX_BYTES."""
    try:
        if path.stat().st_size > MAX_BYTES:
            path.replace(path.with_name(path.name + ".1"))
    except OSError:
        pass  # no log yet, or one we cannot move: it is appended to as before


class _ClientFaults(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.said_full = -math.inf
        # aiohttp is imported here, in the service, not by every CLI that imports ``backend.serve``
        from aiohttp.http_exceptions import HttpProcessingError
        self.client_faults = (HttpProcessingError, ConnectionError)

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
