"""A :class:`~backend.client.Client` for a service in another process: the API of ``dreamtty serve``
over its Unix socket (or TCP with the token), through :mod:`backend.http_client`.

Events come over one WebSocket, opened when someone subscribes. A dropped stream is opened again
(a restarted service included): a ``ServiceLost`` event is published when it drops, a ``ServiceReady``
event when it is back so lists refresh; a job
followed with :meth:`RemoteClient.wait` is then read back from the service, so an image saved or a
job ended while the stream was down is not missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from backend import config
from backend.errors import DreamttyError, RequestError, ServiceUnavailable, Transient
from backend.events import (FINAL_EVENTS, Event, EventError, Fanout, ImageSaved, ServiceLost, ServiceReady, TextOutput,
                            concerns, loads)
from backend.http_client import HTTPClient, Unreachable, WebSocket, authority
from backend.queue_store import ACTIVE, MAX_ID, Job
from backend.safetext import one_line
from backend.serve import ServeOptions, start_detached
from backend.service_status import checked_status, placement_differs
from backend.values import absolute
from backend.versions import versions_differ

if TYPE_CHECKING:  # imported where used: a generate call never needs them (benchmarks/cli_warm.py)
    from backend.request import GenerateRequest
    from backend.run_schedule import ScheduledRun
    from backend.training.config import TrainRequest

RECONNECT_DELAY = (0.1, 2.0)  # seconds: first and longest wait between attempts to reopen the stream
POLL = 1.0  # seconds between checks, while waiting, that the stream is not lost for good
RECHECK = 5.0  # seconds between reads of a waited job's record: a --local command's job sends the service no events
ANSWER_TIMEOUT = 300.0  # seconds a request waits for the service's answer
QUICK_TIMEOUT = 10.0  # seconds a quick request (a read, a cancel: no model touched) waits for it
STREAM_IDLE = 45.0  # seconds without a message on the event stream (the service pings every 20) before it is lost
T = TypeVar("T")


@dataclass(frozen=True)
class Address:
    """Where a service listens: a Unix socket, or TCP ``host:port`` with its token."""

    socket: Path | None = None
    host: str | None = None
    port: int | None = None
    token: str | None = None

    def __str__(self) -> str:
        return str(self.socket) if self.socket else f"http://{authority(self.host, self.port)}"


class RemoteClient:
    """A client of a service in another process, whose jobs run on when the client closes.

    ``start``: a service started in the background when none answers (None: fail instead).
    ``previews``: receive preview pixels. ``patience``: seconds a lost stream may stay down before
    waits fail (None: keep trying, as a TUI does). ``manage``: a client that only reads the service's
    status or stops it, which may run another version or other settings (``serve --stop`` is the way out)."""

    jobs_survive_close = True

    def __init__(self, address: Address, start: ServeOptions | None = None, previews: bool = True,
                 patience: float | None = 30.0, manage: bool = False) -> None:
        self.address = address
        self.warnings: list[str] = []
        self._manage = manage
        self._start_options = start
        self._holding_starts = 0  # see _starting_none
        self._previews = previews
        self._patience = patience
        self._http: HTTPClient | None = None
        self._fanout = Fanout()
        self._stream: asyncio.Task | None = None
        self._connecting = asyncio.Lock()
        self._lost: DreamttyError | None = None
        self._left_queued = False  # it gave up on its lost service, saying that the jobs stay queued
        self._submitted: list[int] = []
        self.kept: list[int] = []
        self._unanswered: set[str] = set()  # client_refs of submits whose answer did not come
        self._placement_checked = False
        self.started: int | None = None  # the pid of the service this client started, when it did

    # -- connection --------------------------------------------------------------------
    async def start(self) -> None:
        await self._connect()

    async def _connect(self) -> None:
        """Open the session (starting a service when allowed and none answers), check versions,
        and open the event stream when someone subscribed. Calls made at once (a TUI's screens as it
        starts) wait for the first one's connection."""
        async with self._connecting:
            if self._http is None:
                self._http = self._new_http()
                try:
                    try:
                        await self._check_versions()
                    except ServiceUnreachable:
                        if (options := self._options_to_start()) is None:
                            raise ServiceUnreachable(f"service: none is running at {self.address}; "
                                                     "start one with dreamtty serve --detach") from None
                        info = await asyncio.to_thread(start_detached, options)
                        self.started = info.get("pid") if info.get("started") else None
                        await self._check_versions()
                        # what the new service found (a damaged queue file moved aside, ...) is said here
                        status = await self._request("GET", "/v1/status", quick=True)
                        self.warnings = [str(w) for w in status.get("warnings") or []]
                    else:
                        await self._check_placement()
                except BaseException:
                    self._drop_http()
                    raise
            if self._fanout.queues and self._stream is None:
                self._stream = asyncio.create_task(self._follow(await self._open_stream()))

    def _new_http(self) -> HTTPClient:
        headers = {"Authorization": f"Bearer {self.address.token}"} if self.address.token else {}
        if self.address.socket:
            return HTTPClient(socket=str(self.address.socket), headers=headers)
        return HTTPClient(host=self.address.host, port=self.address.port, headers=headers)

    async def _check_versions(self) -> None:
        """Same versions as this client, and for a service of this machine's user the same settings
        (``config.service_settings``: --config, --allow-pickle, model folders)."""
        theirs = await self._request("GET", "/v1/version", quick=True)
        settings = theirs.pop("settings", None) or {}
        if self._manage:
            return
        if (differ := versions_differ(theirs)) is not None:
            raise VersionMismatch(f"service: {differ}")
        if self.address.socket and settings != (mine := config.service_settings()):
            differ = sorted(k for k in {*settings, *mine} if settings.get(k) != mine.get(k))
            raise VersionMismatch(
                "service: it runs with other settings ("
                + "; ".join(f"{k}: {settings.get(k) or 'unset'} there, {mine.get(k) or 'unset'} here" for k in differ)
                + "); restart the service with these: dreamtty serve --stop, then run this again (a command that "
                  "runs jobs may instead run them in its own process with --local)")

    async def _check_placement(self) -> None:
        """Warn, once, when the service found running puts its workers elsewhere than this command's ``--device``
        or ``--cluster`` ask (asked for only: the defaults fit any service). Advisory: a status that does not
        come or read is no error."""
        options = self._start_options
        if options is None or (options.devices == "auto" and options.cluster is None) or self._placement_checked:
            return
        self._placement_checked = True
        try:
            status = checked_status(await self._request("GET", "/v1/status", quick=True))
        except (DreamttyError, ValueError):
            return
        self.warnings += [differ] if (differ := placement_differs(status, options.devices, options.cluster)) else []

    async def _open_stream(self) -> WebSocket:
        try:
            return await asyncio.wait_for(
                self._http.websocket("/v1/events", {"previews": "1" if self._previews else "0"}), ANSWER_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ValueError) as exc:  # unreachable, refused, reset, timed out
            raise ServiceUnreachable(f"service: cannot follow the events of {self.address}: {exc}") from None

    async def _follow(self, ws: WebSocket) -> None:
        """Task: publish the stream's events; reopen it when it drops."""
        delay, down_since = RECONNECT_DELAY[0], None
        while True:
            try:
                while (message := await ws.receive(STREAM_IDLE)) is not None:
                    try:
                        self._fanout.publish(loads(message))
                    except EventError:
                        continue
            except (OSError, asyncio.TimeoutError):  # the stream broke (or went quiet) rather than closed
                pass
            finally:
                ws.close()
            why = f" ({one_line(ws.close_reason)})" if ws.close_reason else ""
            self._fanout.publish(ServiceLost(message=f"service: lost the connection to {self.address}{why}; trying "
                                                     "again (its jobs stay queued)"))
            down_since, said = down_since or time.monotonic(), None
            while True:
                await asyncio.sleep(delay)
                try:
                    if self._http is None:  # a call dropped the session (a service it started did not come up)
                        self._http = self._new_http()
                    await self._check_versions()
                    ws = await self._open_stream()
                    break
                except (VersionMismatch, Unauthorized) as exc:  # another version, settings or token took its place
                    if self._patience is not None:  # a command says so and ends
                        self._lost = exc
                        return
                    if str(exc) != said:  # a TUI says so, and waits on for a service it can use
                        said = str(exc)
                        self._fanout.publish(ServiceLost(message=f"{exc}; trying again"))
                except DreamttyError:  # not up yet
                    pass
                delay = min(delay * 2, RECONNECT_DELAY[1])
                if self._patience is not None and time.monotonic() - down_since > self._patience:
                    self._lost = ServiceUnreachable(
                        f"service: lost the connection to {self.address} for {self._patience:g} s; its jobs stay "
                        "queued (dreamtty jobs, dreamtty wait ID follow them when a service runs again)")
            delay, down_since, self._lost = RECONNECT_DELAY[0], None, None
            self._fanout.publish(ServiceReady())

    def _drop_http(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    async def close(self, cancel_jobs: bool = False) -> None:
        """Close the session; ``cancel_jobs``: cancel the jobs this client queued, those of a submit whose
        answer never came (interrupted) too, when the service queued them. Not once this client gave up on
        its lost service: it said that the jobs stay queued. No service is started to cancel them: with none
        answering, they stay queued (``kept``)."""
        if cancel_jobs and self._http is not None and not self._left_queued:
            try:
                with self._starting_none():
                    if self._unanswered:
                        self._submitted += [job.id for job in await self.active_jobs()
                                            if job.payload.get("client_ref") in self._unanswered]
                    for job_id in list(self._submitted):
                        await self.cancel(job_id)
                        self._submitted.remove(job_id)
            except DreamttyError:
                self.kept = list(self._submitted)  # the service is gone: they stay queued for the next one
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        self._drop_http()

    @contextlib.contextmanager
    def _starting_none(self) -> Iterator[None]:
        """Within: a service gone is not started again (one stopped with ``serve --stop`` stays stopped). Counted,
        not a swap of the options: the catch-ups of several waits may overlap."""
        self._holding_starts += 1
        try:
            yield
        finally:
            self._holding_starts -= 1

    def _options_to_start(self) -> ServeOptions | None:
        """The options of a service to start when none answers; None when this client starts none now."""
        return None if self._holding_starts else self._start_options

    async def _call(self, method: str, path: str, body: dict | None = None, quick: bool = False, **params) -> dict:
        """One API request, once connected. A service gone since (stopped) is started again when this client
        may start one, as for its first request: the request was not sent, so it is sent to the new one."""
        await self._connect()
        try:
            return await self._request(method, path, body, quick, **params)
        except ServiceUnreachable:
            if self._options_to_start() is None:
                raise
        self._drop_http()
        await self._connect()
        return await self._request(method, path, body, quick, **params)

    async def _read(self, decode: Callable[[dict], T], method: str, path: str, body: dict | None = None,
                    quick: bool = False, **params) -> T:
        """An API request (``_call``) whose answer ``decode`` reads. An answer that does not read as this
        version's (a field missing or of the wrong type, from a service of another make) is one line."""
        data = await self._call(method, path, body, quick, **params)
        try:
            return decode(data)
        except DreamttyError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            said = f"service: {self.address}: its answer does not read ({type(exc).__name__}: {one_line(exc)})"
            try:  # one of another version (read with ``manage``, as serve --status does) is to be restarted
                differ = versions_differ(await self._request("GET", "/v1/version", quick=True))
            except DreamttyError:
                differ = None
            raise DreamttyError(said if differ is None else f"{said}; {differ}") from None

    async def _request(self, method: str, path: str, body: dict | None = None, quick: bool = False,
                       **params) -> dict:
        """One API request on the open session; the service's one-line error as a DreamttyError
        (RequestError for a field). ``quick``: an answer that needs no model, awaited ``QUICK_TIMEOUT``
        seconds (a service that hangs is named soon), not ``ANSWER_TIMEOUT``."""
        try:
            status, data = await asyncio.wait_for(self._http.request(method, path, body, params or None),
                                                  QUICK_TIMEOUT if quick else ANSWER_TIMEOUT)
        except Unreachable as exc:
            raise ServiceUnreachable(f"service: cannot reach {self.address}: {exc}") from None
        except asyncio.TimeoutError:
            raise ServiceUnavailable(f"service: {self.address} did not answer {method} {path} in time") from None
        except (OSError, ValueError) as exc:
            raise DreamttyError(f"service: {self.address}: {exc}") from None
        if status >= 400:
            if status == 401:
                raise Unauthorized("service: unauthorized (the token is wrong or missing: DREAMTTY_TOKEN)")
            if status == 404 and isinstance(data, dict):
                raise _NotFound(str(data.get("error")))
            if not isinstance(data, dict):
                raise DreamttyError(f"service: HTTP {status}")
            if data.get("field"):
                raise RequestError.from_json_key(str(data["field"]), str(data.get("message")))
            raise (Transient if status == 503 else DreamttyError)(str(data.get("error") or f"HTTP {status}"))
        if not isinstance(data, dict):
            raise DreamttyError(f"service: {self.address}: {method} {path} answered no JSON object")
        return data

    # -- the Client interface -------------------------------------------------------------
    async def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        cfg = config.load()
        out = Path(os.path.expanduser(out_dir or cfg.outputs_dir())).absolute()
        ref = uuid.uuid4().hex  # if the answer is lost (Ctrl-C), close finds the job by it
        self._unanswered.add(ref)
        try:
            job_id = await self._read(lambda data: int(data["id"]), "POST", "/v1/jobs", {**_body(request, out),
                                                                                       "client_ref": ref})
        except DreamttyError as exc:
            raise exc if out_dir else cfg.outputs_error(exc) from None
        self._unanswered.discard(ref)
        self._submitted.append(job_id)
        return job_id

    async def validate(self, request: GenerateRequest) -> GenerateRequest:
        return await self._read(lambda data: type(request).from_dict(data["request"]), "POST", "/v1/validate",
                                _body(request))

    async def closest(self, request: GenerateRequest) -> tuple[GenerateRequest, list[str]]:
        def decode(data: dict) -> tuple[GenerateRequest, list[str]]:
            return type(request).from_dict(data["request"]), [str(line) for line in data["left"]]

        return await self._read(decode, "POST", "/v1/closest", _body(request), quick=True)  # files looked up only

    async def cancel(self, job_id: int) -> bool:
        return await self._read(lambda data: bool(data["cancelled"]), "POST", f"/v1/jobs/{int(job_id)}/cancel",
                                quick=True)

    async def cancel_all(self) -> list[int]:
        return await self._read(lambda data: [int(job_id) for job_id in data["cancelled"]], "POST", "/v1/jobs/cancel")

    async def forget_ended(self, days: int) -> int:
        return await self._read(lambda data: int(data["forgotten"]), "POST", "/v1/jobs/forget", days=str(days))

    async def job(self, job_id: int) -> Job | None:
        try:
            return await self._read(Job.from_dict, "GET", f"/v1/jobs/{int(job_id)}", quick=True)
        except _NotFound:
            return None

    async def jobs(self, limit: int = 200, states: tuple[str, ...] | None = None,
                   with_images: bool = False) -> list[Job]:
        params = {"limit": str(limit)} | ({"state": ",".join(states)} if states else {})
        return await self._read(lambda data: [Job.from_dict(job) for job in data["jobs"]], "GET", "/v1/jobs",
                                quick=True, **params, **({"images": "1"} if with_images else {}))

    async def active_jobs(self) -> list[Job]:
        return await self.jobs(MAX_ID, ACTIVE)

    async def active_states(self) -> dict[int, str]:
        return await self._read(lambda data: {int(job["id"]): str(job["state"]) for job in data["jobs"]}, "GET",
                                "/v1/jobs", quick=True, state=",".join(ACTIVE), limit=str(MAX_ID), brief="1")

    async def status(self) -> dict:
        return await self._read(checked_status, "GET", "/v1/status", quick=True)

    async def start_run(self, request: TrainRequest, devices: str = "auto", launcher: str | None = None,
                        runs_root: Path | None = None) -> tuple[ScheduledRun, list[str]]:
        ref = uuid.uuid4().hex  # if the answer is lost (Ctrl-C), the run is found by it and stopped
        body = {"request": _train_paths_for_service(request).to_dict(), "devices": devices,
                "launcher": _program_found_here(launcher),
                "client_ref": ref}
        if runs_root is not None:
            body["runs_root"] = absolute(str(runs_root))
        from backend.run_schedule import ScheduledRun

        try:
            return await self._read(lambda data: (ScheduledRun.from_dict(data["run"]), list(data["warnings"])),
                                    "POST", "/v1/runs", body)
        except (asyncio.CancelledError, KeyboardInterrupt):
            await self._stop_runs_of(ref)
            raise

    async def _stop_runs_of(self, ref: str) -> None:
        """Stop the run queued with ``ref``, if the service queued it (one it was still checking, it drops
        itself when it finds this client gone)."""
        from backend.run_schedule import ENDED

        try:
            for run in await self.runs(limit=20):
                if run.client_ref == ref and run.state != ENDED:
                    await self.stop_run(run.id)
        except DreamttyError:
            pass  # the service is gone: the run waits for the next one

    async def runs(self, limit: int = 200) -> list[ScheduledRun]:
        from backend.run_schedule import ScheduledRun

        return await self._read(lambda data: [ScheduledRun.from_dict(run) for run in data["runs"]], "GET",
                                "/v1/runs", quick=True, limit=str(limit))

    async def stop_run(self, run_id: int) -> bool:
        return await self._read(lambda data: bool(data["stopped"]), "POST", f"/v1/runs/{int(run_id)}/stop",
                                quick=True)

    async def shutdown(self) -> None:
        """Ask the service to stop (its jobs stay queued for the next start)."""
        await self._call("POST", "/v1/shutdown", quick=True)

    def subscribe(self) -> asyncio.Queue[Event]:
        return self._fanout.subscribe()

    def unsubscribe(self, events: asyncio.Queue[Event]) -> None:
        self._fanout.unsubscribe(events)

    async def wait(self, job_id: int, events: asyncio.Queue[Event] | None = None) -> AsyncIterator[Event]:
        """The events of one job until it ends; what the stream missed is read back from the service, and so is the
        job's record every :data:`RECHECK` seconds (the job of a ``--local`` command sends the service no events)."""
        queue = events or self.subscribe()
        seen: set[str] = set()
        try:
            await self._connect()
            for event in await self._catch_up(job_id, seen):
                yield event
                if isinstance(event, FINAL_EVENTS):
                    return
            checked = time.monotonic()
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), POLL)
                except asyncio.TimeoutError:
                    if self._lost is not None:
                        self._left_queued = not isinstance(self._lost, VersionMismatch)
                        raise self._lost from None
                    event = None
                caught_up = [event] if _tells(event, job_id, seen) else []
                if isinstance(event, ServiceReady) or time.monotonic() - checked >= RECHECK:
                    try:
                        with self._starting_none():  # a stopped service is waited for (see _follow), not restarted
                            caught_up += await self._catch_up(job_id, seen)
                    except ServiceUnreachable:
                        pass  # the stream says it is lost, and gives up after the patience
                    checked = time.monotonic()
                for event in caught_up:
                    yield event
                    if isinstance(event, FINAL_EVENTS):
                        return
        finally:
            if events is None:
                self.unsubscribe(queue)

    # -- internals ------------------------------------------------------------------------
    async def _catch_up(self, job_id: int, seen: set[str]) -> list[Event]:
        """The job's saved images and texts not yet seen and, when it ended, its final event, read from the
        service."""
        job = await self.job(job_id)
        if job is None:
            raise DreamttyError(f"job {job_id}: no such job")
        seed = int(job.request.get("seed", 0))
        caught: list[Event] = [
            *(ImageSaved(job=job.id, image=i, path=path, seed=seed + i) for i, path in enumerate(job.outputs)),
            *(TextOutput(job=job.id, image=i, text=text) for i, text in enumerate(job.texts))]
        caught = [event for event in caught if _result_key(event) not in seen]
        seen.update(map(_result_key, caught))
        return caught + ([end] if (end := job.end_event()) else [])


def _tells(event: Event | None, job_id: int, seen: set[str]) -> bool:
    """Whether a waiter of ``job_id`` is shown ``event``: the job's own (a result once), or a log line for waiters;
    a result is added to ``seen``."""
    if event is None or not concerns(event, job_id):
        return False
    if isinstance(event, (ImageSaved, TextOutput)):
        if _result_key(event) in seen:
            return False
        seen.add(_result_key(event))
    return True


def _result_key(event: ImageSaved | TextOutput) -> str:
    """What tells one result of a job from another: an image's path, a text's index."""
    return event.path if isinstance(event, ImageSaved) else f"text {event.image}"


class Unauthorized(DreamttyError):
    """The service refused this client's token."""


class VersionMismatch(ServiceUnavailable):
    """The service runs another version of dreamtty or of its API, or other settings: a client that finds it in
    its service's place stops following it. No service this client can use answers (a command exits 3, not 2:
    nothing it was given is wrong)."""


class ServiceUnreachable(ServiceUnavailable):
    """Nothing answers at the address (no service, or it is starting or gone)."""


class _NotFound(DreamttyError):
    """The job or image asked for is not there."""


def _body(request: GenerateRequest, out: Path | None = None) -> dict:
    from backend import jobkinds

    body = {"kind": jobkinds.kind_of(request).name, "request": _paths_for_service(request).to_dict()}
    if out is not None:
        body["out"] = str(out)
    return body


def _name_or_path(name: str | None) -> str | None:
    """A model name as it is, a path that exists here made absolute."""
    from backend.models import absolute_model  # the model library's scanner: not before a TUI's first frame

    return absolute_model(name) if name else name


def _paths_for_service(request: GenerateRequest) -> GenerateRequest:
    """The request with the files it names made absolute, since the service runs elsewhere: input
    images and image prompts, and model, VAE, refiner and LoRA names that are paths here (names of
    models in the library or on the Hub are left as they are)."""
    inputs = request.input_files()
    return replace(request, model=_name_or_path(request.model), vae=_name_or_path(request.vae),
                   refiner=_name_or_path(request.refiner), loras=[(_name_or_path(n), w) for n, w in request.loras],
                   image_prompts=[replace(p, path=absolute(p.path)) for p in request.image_prompts],
                   **{role: absolute(path) for role, (path, _) in inputs.items()})


def _program_found_here(launcher: str | None) -> str | None:
    """The launcher's command line with its program as this shell finds it on PATH (the service's PATH may lack
    the folder, e.g. a virtualenv's bin activated after the service started); as given when not found here."""
    try:
        words = shlex.split(launcher or "")
    except ValueError:  # said by the service
        return launcher
    found = shutil.which(words[0]) if words else None
    return shlex.join([os.path.abspath(found), *words[1:]]) if found else launcher


def _train_paths_for_service(request: TrainRequest) -> TrainRequest:
    """A training run's folders (instance images, the run, a checkpoint to resume) and model made absolute."""
    return replace(request, model=_name_or_path(request.model), instance_dir=absolute(request.instance_dir),
                   output=absolute(request.output) if request.output else None,
                   resume=request.resume if request.resume in (None, "", "latest") else absolute(request.resume))
