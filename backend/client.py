"""What a front end (the TUI, the CLI) needs of a service, whether it runs in this process or not.

:class:`LocalClient` runs a :class:`~backend.service.Service` in-process (``--local``, tests);
:class:`~backend.remote_client.RemoteClient` speaks the same interface over the API of
``dreamtty serve``. Front ends get one from :func:`connect` and never learn which it is. Calls that
touch files or the model library run off the event loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from backend.events import Event

if TYPE_CHECKING:  # a CLI client imports only what it runs (benchmarks/cli_warm.py counts its start-up)
    from backend.queue_store import Job
    from backend.request import GenerateRequest
    from backend.run_schedule import ScheduledRun
    from backend.service import Service
    from backend.training.config import TrainRequest

LOCAL_ENV = "DREAMTTY_LOCAL"  # true: every command runs its own service in-process
SERVICE_ENV = "DREAMTTY_SERVICE"  # HOST:PORT of a service to reach over TCP
TOKEN_ENV = "DREAMTTY_TOKEN"  # its token (default: the token file, for a service at a loopback address)


class Client(Protocol):
    warnings: list[str]  # problems met while connecting (a damaged queue moved aside, ...)
    jobs_survive_close: bool  # False: closing this client stops its queued and running jobs (until a restart)
    started: int | None  # the pid of the background service this client started (it outlives the client)
    kept: list[int]  # the jobs close(cancel_jobs=True) could not cancel (no service answered): they stay queued

    async def start(self) -> None: ...

    async def close(self, cancel_jobs: bool = False) -> None:
        """Detach; with ``cancel_jobs`` the jobs this client queued and that still run are cancelled."""

    async def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        """Validate and queue; a one-line DreamttyError names the bad field and nothing is queued."""

    async def validate(self, request: GenerateRequest) -> GenerateRequest:
        """The request as it would be queued (defaults filled in); raises as ``submit`` does."""

    async def closest(self, request: GenerateRequest) -> tuple[GenerateRequest, list[str]]:
        """``request`` without the LoRAs and the VAE the service does not have, and lines naming what was left
        out: reproducing another tool's image, whose files are those of the machine that made it."""

    async def cancel(self, job_id: int) -> bool: ...

    async def cancel_all(self) -> list[int]:
        """Cancel every queued and running job of the queue; the ids of those cancelled."""

    async def forget_ended(self, days: int) -> int:
        """Forget the jobs that ended more than ``days`` days ago (their images stay on disk); how many."""

    async def job(self, job_id: int) -> Job | None: ...

    async def jobs(self, limit: int = 200, states: tuple[str, ...] | None = None,
                   with_images: bool = False) -> list[Job]:
        """The newest ``limit`` jobs (in ``states``; all when None), those with saved images only when
        ``with_images``."""

    async def active_jobs(self) -> list[Job]:
        """Queued and running jobs this client is responsible for."""

    async def active_states(self) -> dict[int, str]:
        """The state of every queued and running job of the queue, by id (no job read whole)."""

    async def status(self) -> dict:
        """The service as JSON: pid, uptime, workers (device, job, loaded models), queue length."""

    async def start_run(self, request: TrainRequest, devices: str = "auto", launcher: str | None = None,
                        runs_root: Path | None = None) -> tuple[ScheduledRun, list[str]]:
        """Check a training run, make its folder and queue it: it starts when its devices are free (at
        once, when they are). The run and the warnings about its settings; a one-line DreamttyError
        names a bad setting and nothing is made."""

    async def runs(self, limit: int = 200) -> list[ScheduledRun]:
        """Training runs in the schedule, newest first (a waiting one says what it waits for)."""

    async def stop_run(self, run_id: int) -> bool:
        """Stop a run after its current step, or take a waiting one off the queue; False when it had ended."""

    def subscribe(self) -> asyncio.Queue[Event]: ...

    def unsubscribe(self, events: asyncio.Queue[Event]) -> None: ...

    def wait(self, job_id: int, events: asyncio.Queue[Event] | None = None) -> AsyncIterator[Event]:
        """The events of one job until it ends."""


class LocalClient:
    """A client for a service in this process: its workers stop when the client closes."""

    jobs_survive_close = False
    started = None  # its service is in this process

    def __init__(self, service: Service) -> None:
        self.service = service
        self.warnings = list(service.store.warnings)
        self.kept: list[int] = []

    async def start(self) -> None:
        await self.service.start()

    async def close(self, cancel_jobs: bool = False) -> None:
        await self.service.close(cancel_jobs=cancel_jobs)

    async def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        prepared = await asyncio.to_thread(self.service.prepare, request, out_dir)
        return await self.service.enqueue_in_thread(prepared)

    async def validate(self, request: GenerateRequest) -> GenerateRequest:
        resolved, _ = await asyncio.to_thread(self.service.validate, request)
        return resolved

    async def closest(self, request: GenerateRequest) -> tuple[GenerateRequest, list[str]]:
        from backend.foreign_metadata import without_missing_extras

        return await asyncio.to_thread(without_missing_extras, request)

    async def cancel(self, job_id: int) -> bool:
        return self.service.cancel(job_id)

    async def cancel_all(self) -> list[int]:
        return self.service.cancel_all()

    async def forget_ended(self, days: int) -> int:
        return await self.service.forget_ended(days)

    async def job(self, job_id: int) -> Job | None:
        return self.service.store.get(job_id)

    async def jobs(self, limit: int = 200, states: tuple[str, ...] | None = None,
                   with_images: bool = False) -> list[Job]:
        return self.service.jobs(limit, states, with_images)

    async def active_jobs(self) -> list[Job]:
        return self.service.active_jobs()

    async def active_states(self) -> dict[int, str]:
        from backend.queue_store import ACTIVE

        return self.service.store.states(ACTIVE)

    async def status(self) -> dict:
        return self.service.status()

    async def start_run(self, request: TrainRequest, devices: str = "auto", launcher: str | None = None,
                        runs_root: Path | None = None) -> tuple[ScheduledRun, list[str]]:
        prepared = await self.service.prepare_run_in_thread(request, devices, launcher, runs_root)
        return self.service.enqueue_run(prepared), prepared.warnings

    async def runs(self, limit: int = 200) -> list[ScheduledRun]:
        return self.service.training.listing(limit=limit)

    async def stop_run(self, run_id: int) -> bool:
        return self.service.stop_run(run_id)

    def subscribe(self) -> asyncio.Queue[Event]:
        return self.service.subscribe()

    def unsubscribe(self, events: asyncio.Queue[Event]) -> None:
        self.service.unsubscribe(events)

    def wait(self, job_id: int, events: asyncio.Queue[Event] | None = None) -> AsyncIterator[Event]:
        return self.service.wait(job_id, events)


def is_local(local: bool = False) -> bool:
    """Whether a command runs its own service in-process: ``--local``, or ``DREAMTTY_LOCAL`` true (1, true, yes,
    on; "false" turned it on). RequestError naming the variable for another value."""
    from backend.values import to_bool

    value = os.environ.get(LOCAL_ENV, "").strip()
    return local or (bool(value) and to_bool(LOCAL_ENV, value))


def connect(device: str = "auto", local: bool = False, tui: bool = False, start: bool = True,
            cluster: str | None = None, nice: int = 0, jobs: bool = True) -> Client:
    """The client a front end uses; nothing is contacted or started before its first call.

    ``local`` (or ``DREAMTTY_LOCAL=1``): a service in this process, its workers on ``device`` or
    ``cluster`` at ``nice`` (none without ``jobs``: a command that only trains). Else the running
    ``dreamtty serve`` (over TCP when ``DREAMTTY_SERVICE`` is set), started in the background on
    ``device`` / ``cluster`` when none runs and ``start`` allows it. ``tui``: a client for the TUI,
    which adopts the jobs and runs of services that died (local), receives previews and waits for a
    lost service as long as it takes.
    """
    if is_local(local):
        from backend.service import Service

        return LocalClient(Service(devices=device, recover=tui, nice=nice, cluster=cluster, workers=jobs))
    from backend.remote_client import Address, RemoteClient
    from backend.serve import ServeOptions, is_loopback, parse_listen
    from backend.service_files import ServiceFiles, read_token

    patience = None if tui else 30.0
    remote = os.environ.get(SERVICE_ENV)
    if remote:
        host, port = parse_listen(remote, SERVICE_ENV)
        # this machine's token file is read for (and sent to) this machine only
        token = os.environ.get(TOKEN_ENV) or (read_token() if is_loopback(host) else None)
        address = Address(host=host, port=port, token=token)
        return RemoteClient(address, start=None, previews=tui, patience=patience)
    options = ServeOptions(devices=device, cluster=cluster) if start else None
    return RemoteClient(Address(socket=ServiceFiles.default().socket), start=options, previews=tui, patience=patience)
