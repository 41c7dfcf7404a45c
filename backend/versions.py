"""What a client and a service compare on connect: a mismatch means the service must be restarted."""

from __future__ import annotations

from backend import events

API_VERSION = 1  # of backend.api's routes and bodies


def versions() -> dict:
    from importlib import metadata  # 10 ms to import: not before a TUI's first frame

    try:
        package = metadata.version("dreamtty")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {"dreamtty": package, "api": API_VERSION, "events": events.VERSION}
