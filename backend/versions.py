"""What a client and a service compare on connect: a mismatch means the service must be restarted."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from backend import events

API_VERSION = 1  # of backend.api's routes and bodies


def versions() -> dict:
    from importlib import metadata  # 10 ms to import: not before a TUI's first frame

    try:
        package = metadata.version("dreamtty")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {"dreamtty": package, "api": API_VERSION, "events": events.VERSION, "build": build()}


@functools.cache
def build() -> str:
    """A fingerprint of this install's backend code, taken once: a service still running the code of before
    an upgrade (a source checkout pulled, a reinstall of the same version) differs from the new client's."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]
