"""What a client and a service compare on connect: a mismatch means the service must be restarted."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from backend import events

API_VERSION = 1  # of backend.api's routes and bodies
SERVICE_BUILD = "DREAMTTY_SERVICE_BUILD"  # environment: the build of the service that spawns this worker
STALE_EXIT = 75  # a worker's exit status when the code on disk is not its service's (EX_TEMPFAIL)


def versions() -> dict:
    from importlib import metadata  # 10 ms to import: not before a TUI's first frame

    try:
        package = metadata.version("dreamtty")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {"dreamtty": package, "api": API_VERSION, "events": events.VERSION, "build": build()}


def versions_differ(theirs: dict) -> str | None:
    """What a service's versions (its ``/v1/version`` or status answer) say when they are not this client's, and
    the way out; None when they are the same."""
    ours = versions()
    if {key: theirs.get(key) for key in ours} == ours:
        return None
    if not isinstance(theirs.get("api"), int):  # no dreamtty at all: restarting it would not help
        return "it does not answer as a dreamtty service (its GET /v1/version names no API version)"
    return (f"it runs dreamtty {theirs.get('dreamtty')} (API {theirs.get('api')}, events {theirs.get('events')}, "
            f"build {theirs.get('build')}) and this is {ours['dreamtty']} (API {ours['api']}, events "
            f"{ours['events']}, build {ours['build']}); restart the service: dreamtty serve --stop, then run this "
            "again")


@functools.cache
def build() -> str:
    """A fingerprint of this install's backend code, taken once: a service still running the code of before
    an upgrade (a source checkout pulled, a reinstall of the same version) differs from the new client's."""
    return on_disk()


def on_disk() -> str:
    """The fingerprint of the backend code on disk now."""
    return fingerprint(Path(__file__).parent)


def fingerprint(root: Path) -> str:
    """A hash of the names and contents of the ``.py`` files under ``root``. Hidden ones (an editor's lock
    link ``.#pool.py``) and those that cannot be read (removed by an upgrade under way) are left out."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in name.split("/")):
            continue
        try:
            digest.update(name.encode() + b"\0" + path.read_bytes())
        except OSError:
            continue
    return digest.hexdigest()[:12]


def stale_worker() -> bool:
    """Whether this worker's code (read from disk as it started) is not the code of the service that spawned it:
    an upgrade in place under a running service. Such a worker must exit at once, with ``STALE_EXIT``, before it
    speaks: its events and its reading of job payloads may differ from the service's. Every future version's
    worker entry keeps this check first."""
    service = os.environ.get(SERVICE_BUILD)
    return service is not None and service != build()


def changed_on_disk() -> bool:
    """Whether the code on disk is no longer this process's (as ``build()`` read it): a worker checks before each
    job, since a job may import a module for the first time (a job kind, an extra)."""
    return on_disk() != build()


def stale_why() -> str:
    """The service's line when a worker it spawned exits with ``STALE_EXIT``."""
    now = on_disk()  # read again: build() was taken as this service started
    return (f"dreamtty was changed on disk since this service started (build {build()}, now {now}): "
            "restart it to run jobs again (the service: dreamtty serve --stop, then start it as before); "
            "queued jobs wait")
