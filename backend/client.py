"""What a front end (the TUI, the CLI) needs of a service, whether it runs in this process or not.

:class:`LocalClient` runs a :class:`~backend.service.Service` in-process (``--local``, tests). A
remote client speaks the same interface over the service's API. Front ends hold a ``Client`` and
never learn which one it is. Calls that touch files or the model library run off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from backend.events import Event
from backend.queue_store import Job
from backend.request import GenerateRequest
from backend.service import Service


class Client(Protocol):
    warnings: list[str]  # problems met while connecting (a damaged queue moved aside, ...)
    jobs_survive_close: bool  # False: closing this client stops its queued and running jobs (until a restart)

    async def start(self) -> None: ...

    async def close(self, cancel_jobs: bool = False) -> None:
        """Detach; with ``cancel_jobs`` the jobs this client queued and that still run are cancelled."""

    async def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        """Validate and queue; a one-line DreamttyError names the bad field and nothing is queued."""

    async def validate(self, request: GenerateRequest) -> GenerateRequest:
        """The request as it would be queued (defaults filled in); raises as ``submit`` does."""

    async def cancel(self, job_id: int) -> bool: ...

    async def jobs(self, limit: int = 200) -> list[Job]: ...

    async def active_jobs(self) -> list[Job]:
        """Queued and running jobs this client is responsible for."""

    def subscribe(self) -> asyncio.Queue[Event]: ...

    def unsubscribe(self, events: asyncio.Queue[Event]) -> None: ...

    def wait(self, job_id: int, events: asyncio.Queue[Event] | None = None) -> AsyncIterator[Event]:
        """The events of one job until it ends."""


class LocalClient:
    """A client for a service in this process: its workers stop when the client closes."""

    jobs_survive_close = False

    def __init__(self, service: Service) -> None:
        self.service = service
        self.warnings = list(service.store.warnings)

    async def start(self) -> None:
        await self.service.start()

    async def close(self, cancel_jobs: bool = False) -> None:
        await self.service.close(cancel_jobs=cancel_jobs)

    async def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        prepared = await asyncio.to_thread(self.service.prepare, request, out_dir)
        return self.service.enqueue(prepared)

    async def validate(self, request: GenerateRequest) -> GenerateRequest:
        resolved, _ = await asyncio.to_thread(self.service.validate, request)
        return resolved

    async def cancel(self, job_id: int) -> bool:
        return self.service.cancel(job_id)

    async def jobs(self, limit: int = 200) -> list[Job]:
        return self.service.jobs(limit)

    async def active_jobs(self) -> list[Job]:
        return self.service.active_jobs()

    def subscribe(self) -> asyncio.Queue[Event]:
        return self.service.subscribe()

    def unsubscribe(self, events: asyncio.Queue[Event]) -> None:
        self.service.unsubscribe(events)

    def wait(self, job_id: int, events: asyncio.Queue[Event] | None = None) -> AsyncIterator[Event]:
        return self.service.wait(job_id, events)
