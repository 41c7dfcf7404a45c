"""The HTTP + WebSocket API of ``dreamtty serve`` (aiohttp), over a Unix socket and optionally TCP.

Routes (JSON; see docs/api.md): ``GET /v1/version``, ``GET /v1/status``, ``GET|POST /v1/jobs``,
``POST /v1/validate``, ``POST /v1/closest``, ``GET /v1/jobs/{id}``, ``POST /v1/jobs/{id}/cancel``,
``POST /v1/jobs/cancel``, ``POST /v1/jobs/forget?days=N``,
``GET /v1/jobs/{id}/images/{n}``, ``GET|POST /v1/runs``, ``GET /v1/runs/{id}``,
``POST /v1/runs/{id}/stop``, ``GET /v1/events`` (WebSocket: one ``backend.events.dumps`` text per
message), ``POST /v1/shutdown``.

Who may call: over the Unix socket, processes of this user (the peer uid, checked with SO_PEERCRED
where the system has it, beside the socket's 0600 and its folder's 0700); over TCP, whoever sends
the token as ``Authorization: Bearer TOKEN``. Every error is ``{"error": one line}`` (plus ``field``
and ``message`` for a bad request field), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aiohttp import WSCloseCode, web

from backend import config, foreign_metadata, jobkinds, metadata
from backend.errors import DreamttyError, RequestError, Transient, field_and_message
from backend.events import Fanout, Preview, dumps
from backend.http_server import trust
from backend.outputs import check_out_dir
from backend.queue_store import ACTIVE, FINAL, MAX_ID, check_limit
from backend.request import GenerateRequest
from backend.run_schedule import STATES as RUN_STATES
from backend.run_schedule import withdraw
from backend.safetext import cut_line, error_line
from backend.service import Service
from backend.service_files import bearer_ok
from backend.training.config import TrainRequest
from backend.values import check_text, kind_of
from backend.versions import versions

MAX_BODY = 1 << 20  # bytes: a request is a few KiB
DECODED = ("identity", "gzip", "deflate")  # the Content-Encodings of a body aiohttp decodes with no extra package
CLOSE_TIMEOUT = 5.0  # seconds a stream that fell behind has to take its close
BODY_FIELDS = ("kind", "request", "out", "client_ref")
_JOB_ACTIONS = ("cancel", "forget")  # the POST routes /v1/jobs/cancel and /forget, beside GET /v1/jobs/{id}
MAX_REF = 64  # characters of a client_ref
RUN_FIELDS = ("request", "devices", "launcher", "runs_root", "client_ref")
METADATA_FIELDS = ("version", "family", "prompt")  # the rest of an image's metadata, ignored
log = logging.getLogger("dreamtty.api")


class NotFound(DreamttyError):
    """A job or image that is not there (404)."""


def peer_uid(sock) -> int | None:
    """The uid of the process at the other end of a Unix socket; None where the system cannot tell."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    fmt = "3i"  # struct ucred: pid, uid, gid
    _, uid, _ = struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
    return uid


def _unix_socket(request: web.Request):
    """The socket of a request that came over the Unix socket (a process of this machine), else None."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock if sock is not None and sock.family == socket.AF_UNIX else None


def _error(status: int, text: str, **extra) -> web.Response:
    return web.json_response({"error": error_line(text), **extra}, status=status)  # it may echo a long id


async def _expect(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` on a route that reads a body: one over MAX_BODY is refused before it is sent
    (aiohttp's own handler said "100 Continue" to it, then 413 once it had come), else the client is told to go
    on (RFC 9110, 10.1.1)."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return _error(417, f"Expect: {request.headers.get('Expect')}: only 100-continue is understood")
    if (request.content_length or 0) > MAX_BODY:
        response = _error(413, f"body: larger than {MAX_BODY} bytes")
        response.force_close()  # the body it did not send may still come
        return response
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # what was written is no part of the response (its size is logged)
    return None


class Api:
    """The routes over one :class:`Service`. ``token``: what TCP clients must send (None: no TCP).
    ``stop``: called by ``POST /v1/shutdown``; ``info``: more fields for ``GET /v1/status``."""

    def __init__(self, service: Service, token: str | None = None, stop: Callable[[], None] = lambda: None,
                 info: Callable[[], dict] = dict) -> None:
        self.service = service
        self.token = token
        self.stop = stop
        self.info = info
        self.last_request = time.monotonic()
        self.streams: dict[web.WebSocketResponse, web.Request] = {}  # the event streams open, and their requests
        self.app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard, self._errors])
        self.app.add_routes([
            web.get("/v1/version", self.version),
            web.get("/v1/status", self.status),
            web.get("/v1/jobs", self.list_jobs),
            web.post("/v1/jobs", self.submit, expect_handler=_expect),
            web.post("/v1/validate", self.validate, expect_handler=_expect),
            web.post("/v1/closest", self.closest, expect_handler=_expect),
            web.get("/v1/jobs/{id}", self.get_job),
            web.post("/v1/jobs/{id}/cancel", self.cancel),
            web.post("/v1/jobs/cancel", self.cancel_all),
            web.post("/v1/jobs/forget", self.forget_ended),
            web.get("/v1/jobs/{id}/images/{n}", self.image),
            web.get("/v1/runs", self.list_runs),
            web.post("/v1/runs", self.start_run, expect_handler=_expect),
            web.get("/v1/runs/{id}", self.get_run),
            web.post("/v1/runs/{id}/stop", self.stop_run),
            web.get("/v1/events", self.events),
            web.post("/v1/shutdown", self.shutdown),
        ])
        self.app.on_shutdown.append(self._close_streams)

    # -- middlewares ---------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Unix socket: this user's processes only. TCP: the bearer token. No detail on refusal."""
        sock = _unix_socket(request)
        if sock is not None:
            uid = peer_uid(sock)
            if uid is not None and uid != os.getuid():
                return _error(403, "forbidden")
        elif not bearer_ok(request.headers.get("Authorization", ""), self.token):
            return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"})
        trust(request)
        self.last_request = time.monotonic()
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            _check_request(request)
            return await handler(request)
        except NotFound as exc:
            return _error(404, str(exc))
        except Transient as exc:  # for now (the queue file takes no writes, the service stops): try again later
            return _error(503, str(exc))
        except DreamttyError as exc:
            field, message, line = _field_of(exc)
            response = _error(400, line, field=field, message=message)
            if request.content.exception() is not None:  # a body that could not be read: the connection ends
                response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body: larger than {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            if allow and request.path.removeprefix("/v1/jobs/") in _JOB_ACTIONS:  # not also /v1/jobs/{id}'s GET
                allow = {"Allow": "POST"}
            line = {404: f"{request.path}: no such route (docs/api.md lists them)",
                    405: f"{request.method} {request.path}: not allowed; use {allow.get('Allow')}"}
            return web.json_response({"error": line.get(exc.status, exc.reason)}, status=exc.status, headers=allow)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # a bug: one line to the client, the traceback to the service log
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"internal error ({type(exc).__name__}); see the service log")

    # -- routes ----------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({**versions(), "settings": config.service_settings()})

    async def status(self, request: web.Request) -> web.Response:
        status, info = self.service.status(), self.info()
        warnings = [*(info.get("warnings") or []), *(status.get("warnings") or [])]
        return web.json_response({**versions(), **status, **info, "warnings": warnings, "streams": len(self.streams)})

    async def list_jobs(self, request: web.Request) -> web.Response:
        limit, states = _listing(request, "job", (*ACTIVE, *FINAL))
        images, brief = _flag(request, "images", "jobs with saved images only"), _flag(request, "brief", "id and state")
        if images and brief:
            raise RequestError("images", "cannot be combined with brief=1, which lists every job's id and state")
        if brief:  # a TUI counting a queue of thousands: no job read whole
            listed = self.service.store.states(states, limit, oldest_first=False)
            return web.json_response({"jobs": [{"id": job, "state": state} for job, state in listed.items()]})
        jobs = self.service.jobs(limit, states, with_images=images)
        return web.json_response({"jobs": [job.to_dict() for job in jobs]})

    async def submit(self, request: web.Request) -> web.Response:
        job_request, out, ref = await _read_job(request)
        prepared = await asyncio.to_thread(self.service.prepare, job_request, out)
        if ref is not None:  # kept in the job, so a client that lost the answer can find the job
            prepared = replace(prepared, payload={**prepared.payload, "client_ref": ref})
        return web.json_response({"id": await self.service.enqueue_in_thread(prepared)}, status=201)

    async def validate(self, request: web.Request) -> web.Response:
        job_request, out, _ = await _read_job(request)
        resolved, _ = await asyncio.to_thread(self.service.validate, job_request)
        if out is not None:
            await asyncio.to_thread(check_out_dir, out, False)  # a dry run makes no folder
        return web.json_response({"kind": jobkinds.kind_of(resolved).name, "request": resolved.to_dict()})

    async def closest(self, request: web.Request) -> web.Response:
        job_request, _, _ = await _read_job(request)
        closest, left = await asyncio.to_thread(foreign_metadata.without_missing_extras, job_request)
        return web.json_response({"kind": jobkinds.kind_of(closest).name, "request": closest.to_dict(), "left": left})

    async def get_job(self, request: web.Request) -> web.Response:
        return web.json_response(self._job(request).to_dict())

    async def cancel(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": self.service.cancel(self._job(request).id)})

    async def cancel_all(self, request: web.Request) -> web.Response:
        return web.json_response({"cancelled": self.service.cancel_all()})

    async def forget_ended(self, request: web.Request) -> web.Response:
        if "days" not in request.query:
            raise RequestError("days", "missing; give ?days=N (0: every ended job)")
        days = _digits(request.query["days"], "days")
        return web.json_response({"forgotten": await self.service.forget_ended(days)})

    async def image(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        text = request.match_info["n"]
        n = _digits(text, "image")
        if not 0 <= n < len(job.outputs):
            raise NotFound(f"job {job.id}: no image {text} (it has {len(job.outputs)})")
        path, out = Path(job.outputs[n]), job.payload.get("out")
        # a link put in its place since (the file, or a folder on its way) may lead anywhere
        moved = path.is_symlink() or (isinstance(out, str) and not path.resolve().is_relative_to(Path(out).resolve()))
        if moved or not path.is_file():
            raise NotFound(f"job {job.id}: image {n} is no longer at {path}")
        return web.FileResponse(path, headers={"Content-Type": "image/png"})

    async def list_runs(self, request: web.Request) -> web.Response:
        limit, states = _listing(request, "run", RUN_STATES)
        return web.json_response({"runs": [run.to_dict() for run in self.service.training.listing(states, limit)]})

    async def start_run(self, request: web.Request) -> web.Response:
        data = await _read_object(request, RUN_FIELDS, '{"request": {"model": ..., "instance_dir": ...}}')
        if "request" not in data:
            raise RequestError("request", "missing; give the run's settings as an object")
        if not isinstance(data["request"], dict):
            what = kind_of(data["request"])
            raise RequestError("request", f"expected an object of the run's settings, got {what}")
        devices, launcher = data.get("devices", "auto"), data.get("launcher")
        for name, value in (("devices", devices), ("launcher", launcher)):
            if value is not None and not isinstance(value, str):
                raise RequestError(name, f"expected text, got {kind_of(value)}")
        if launcher and _unix_socket(request) is None:  # a command line the service runs: its own user's only
            raise RequestError("launcher", "is taken over the service's Unix socket only, not over TCP; leave it "
                                           "out (the service trains with its own launcher)")
        runs_root, ref = _absolute(data.get("runs_root"), "runs_root"), _client_ref(data)
        train = TrainRequest.from_dict(data["request"])
        for name in ("instance_dir", "output", "resume"):
            if (name, getattr(train, name)) != ("resume", "latest"):  # resume: "latest" or a checkpoint's folder
                _absolute(getattr(train, name) or None, name)
        prepared = await self.service.prepare_run_in_thread(train, devices or "auto", launcher, runs_root)
        if request.transport is None:  # the client hung up meanwhile (Ctrl-C): nobody asks for the run any more
            withdraw(prepared.path, "interrupted before it started")
            return web.json_response({"error": "the client hung up; the run was not started"}, status=400)
        run = self.service.enqueue_run(prepared, ref)
        return web.json_response({"run": run.to_dict(), "warnings": prepared.warnings}, status=201)

    async def get_run(self, request: web.Request) -> web.Response:
        return web.json_response(self._run(request).to_dict())

    async def stop_run(self, request: web.Request) -> web.Response:
        return web.json_response({"stopped": self.service.stop_run(self._run(request).id)})

    async def events(self, request: web.Request) -> web.WebSocketResponse:
        """Every event of the service from now on, one JSON text per message (``?previews=0``: none)."""
        previews = _flag(request, "previews", "preview pixels, the default", default=True)
        ws = web.WebSocketResponse(heartbeat=20.0)
        if not ws.can_prepare(request).ok:
            raise RequestError("events", "is a WebSocket: send GET with Connection: Upgrade and Upgrade: websocket")
        overran = asyncio.Event()
        queue = self.service.subscribe(overran.set)  # before the handshake: a client that then submits misses nothing
        self.streams[ws] = request
        try:
            await ws.prepare(request)
            sender = asyncio.create_task(self._send_events(queue, ws, previews))
            tasks = (sender, asyncio.create_task(self._drop_when(overran, ws, request, sender)))
            try:
                async for _ in ws:  # clients send nothing; this ends when they close or vanish
                    pass
            finally:
                for task in tasks:
                    task.cancel()
        finally:
            self.streams.pop(ws, None)
            self.service.unsubscribe(queue)
        return ws

    async def shutdown(self, request: web.Request) -> web.Response:
        self.stop()
        return web.json_response({"stopping": True}, status=202)

    # -- helpers -------------------------------------------------------------------------
    def _job(self, request: web.Request):
        return _found(request, "job", self.service.store.get)

    def _run(self, request: web.Request):
        return _found(request, "run", self.service.training.get)

    @staticmethod
    async def _send_events(queue: asyncio.Queue, ws: web.WebSocketResponse, previews: bool) -> None:
        try:
            while True:
                event = await queue.get()
                behind = queue.qsize() > Fanout.PREVIEW_BACKLOG
                if isinstance(event, Preview) and not event.label and (not previews or behind):
                    continue  # a slow client loses live previews, never the events that matter (nor the maps)
                await ws.send_str(dumps(event))
        except (ConnectionError, RuntimeError):  # the client went away mid-stream
            pass

    @staticmethod
    async def _drop_when(overran: asyncio.Event, ws: web.WebSocketResponse, request: web.Request,
                         sender: asyncio.Task) -> None:
        """Close a stream whose client stopped reading (``Fanout.BACKLOG`` events behind): it connects again
        and reads back what it missed."""
        await overran.wait()
        sender.cancel()  # no event after the close
        reason = f"events: this client fell {Fanout.BACKLOG} events behind; connect again"
        await _close(ws, request, WSCloseCode.TRY_AGAIN_LATER, reason)

    async def _close_streams(self, app: web.Application) -> None:
        """Close every stream at once as the service stops (a client stopped with Ctrl-Z does not hold it up)."""
        await asyncio.gather(*(_close(ws, request, WSCloseCode.GOING_AWAY, "service stopping")
                               for ws, request in list(self.streams.items())))


async def _close(ws: web.WebSocketResponse, request: web.Request, code: int, reason: str) -> None:
    """Close the stream ``ws``; one whose client has not taken the close CLOSE_TIMEOUT seconds later is cut off,
    unsent bytes and all (closing waits for the bytes it has not taken, for ever)."""
    asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, _cut_off, request)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT)


def _cut_off(request: web.Request) -> None:
    """End ``request``'s connection now, if it is still open."""
    if request.transport is not None:
        request.transport.abort()


def _found(request: web.Request, what: str, get: Callable[[int], object]):
    """The job or run the route's ``{id}`` names; NotFound (404) when there is none."""
    text = request.match_info["id"]
    key = _digits(text, what)
    found = get(key) if key <= MAX_ID else None
    if found is None:
        raise NotFound(f"{what} {text}: no such {what}")
    return found


def _listing(request: web.Request, what: str, allowed: tuple[str, ...]) -> tuple[int, tuple[str, ...] | None]:
    """``?limit=N&state=a,b`` of a list route: the limit and the states asked for (None: all)."""
    text = request.query.get("limit", "200")
    limit = check_limit(_digits(text, "limit"), what, text)
    states = tuple(s for s in request.query.get("state", "").split(",") if s)
    bad = next((s for s in states if s not in allowed), None)
    if bad is not None:
        raise RequestError("state", f"{bad!r} is not a {what} state; use {', '.join(allowed)}")
    return limit, states or None


# The query parameters of each route (by its path as registered); another one is refused with its name.
_QUERY = {"/v1/jobs": ("limit", "state", "images", "brief"), "/v1/runs": ("limit", "state"),
          "/v1/events": ("previews",), "/v1/jobs/forget": ("days",)}


_BODIES = ("/v1/jobs", "/v1/validate", "/v1/closest", "/v1/runs")  # the routes that read a body


def _check_request(request: web.Request) -> None:
    """RequestError naming a query parameter the route does not take (a typo was ignored: ``?stat=queued``
    listed every job) or one given twice (the first was taken: ``?days=0&days=30`` forgot every ended job), or
    for a body sent to a route that reads none."""
    resource = request.match_info.route.resource
    if resource is None:  # no such route: the handler says so
        return
    if request.match_info.get("id") in _JOB_ACTIONS and resource.canonical == "/v1/jobs/{id}":
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])  # GET /v1/jobs/cancel: a POST route, not a job id
    allowed = _QUERY.get(resource.canonical, ())
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise RequestError(unknown[0], f"unknown query parameter; allowed: {', '.join(allowed) or 'none'}")
    twice = next((name for name in request.query if len(request.query.getall(name)) > 1), None)
    if twice is not None:
        raise RequestError(twice, "given twice; give it once (state takes a comma-separated list)")
    if request.method == "POST" and resource.canonical not in _BODIES and request.body_exists:  # it was ignored
        raise RequestError("body", "this route takes none; send the request without one")


def _flag(request: web.Request, name: str, what: str, default: bool = False) -> bool:
    """``?name=1`` (``what``; also ``true``, ``yes``) or ``0`` (``false``, ``no``), ``default`` when left out;
    RequestError naming ``name`` otherwise."""
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() not in (*_ON, *_OFF):
        raise RequestError(name, f"{value!r} is not allowed; use 1 ({what}) or 0")
    return value.lower() in _ON


_ON, _OFF = ("1", "true", "yes"), ("0", "false", "no")


def _absolute(value: object, field: str) -> Path | None:
    """A folder the request names: the service's working folder is not the client's, so it must be absolute."""
    if value is not None and (not isinstance(value, str) or not Path(value).is_absolute()):
        raise RequestError(field, "must be an absolute folder path")
    check_text(field, value)
    return Path(value) if value else None


def _digits(text: str, field: str) -> int:
    """A number in a route's path or query (an id, an image, a limit): ASCII digits only, not the
    ``+``, spaces, ``_`` or other scripts' digits that ``int`` would take. A number past MAX_ID reads
    as MAX_ID + 1 (no id, image or limit goes that far), without ``int`` reading thousands of digits."""
    if not (text.isascii() and text.isdigit()):
        raise RequestError(field, f"{text!r} is not a whole number of digits 0-9")
    significant = text.lstrip("0")
    return int(significant or "0") if len(significant) <= len(str(MAX_ID)) else MAX_ID + 1


def _field_of(exc: DreamttyError) -> tuple[str, str, str]:
    """The JSON key an error is about, its message and its line: a RequestError's own, else the
    ``field: message`` its line starts with (``request`` when it names none)."""
    field, message = field_and_message(exc)
    if field is None:
        return "request", error_line(exc), error_line(exc)
    key = cut_line(RequestError(field, message).json_key, 100)  # an unknown key echoed
    return key, error_line(message), error_line(f"{key}: {message}")


async def _read_object(request: web.Request, allowed: tuple[str, ...], example: str,
                       ignored: tuple[str, ...] = ()) -> dict:
    """The body as a JSON object with no key but ``allowed`` (and ``ignored``); RequestError otherwise."""
    encoding = request.headers.get("Content-Encoding", "identity")
    undecoded = RequestError("body", f"cannot be decoded (Content-Encoding: {encoding}); send plain JSON")
    if encoding.strip().lower() not in DECODED:  # aiohttp passes an unknown one over
        raise undecoded
    try:
        body = await request.read()
    except web.RequestPayloadError:
        raise undecoded from None
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise RequestError("body", f"is not valid JSON; send {example}") from None
    except ValueError:  # Python refuses to convert an integer of more digits than this
        raise RequestError("body", f"holds a number of more than {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(data, dict):
        raise RequestError("body", f"expected a JSON object, got {kind_of(data)}")
    unknown = sorted(set(data) - set(allowed) - set(ignored), key=str)
    if unknown:
        raise RequestError(str(unknown[0]), f"unknown field; allowed: {', '.join(allowed)}")
    return data


async def _read_job(request: web.Request):
    """The job a body describes: ``{"kind", "request", "out", "client_ref"}`` (an image's metadata is accepted as
    is); returns (request, out, client_ref)."""
    data = await _read_object(request, BODY_FIELDS, '{"kind": "generate", "request": {...}}', METADATA_FIELDS)
    if "request" not in data:
        raise RequestError("request", "missing; give the request's fields as an object")
    kind = data.get("kind", "generate")
    if not isinstance(kind, str):
        raise RequestError("kind", f"expected a name, got {kind_of(kind)}")
    job_kind = jobkinds.get(kind)
    if "version" not in data and isinstance(data["request"], dict):  # a client's own fields, not an image's record
        job_kind.request_type.check_given(data["request"])
    job = job_kind.request(data["request"])
    if "version" in data:  # an image's metadata: its Random Style picks and reference models as it made them
        job = metadata.as_made(job, data.get("prompt"))
    _absolute_inputs(job)
    return job, _absolute(data.get("out"), "out"), _client_ref(data)


def _absolute_inputs(request: GenerateRequest) -> None:
    """The images a job reads must be named absolute, as folders: the service's working folder is not the
    client's, so a relative path would read whatever lies there."""
    named = [*((role, "", path) for role, (path, _) in request.input_files().items()),
             *(("image_prompt", f"{prompt.label(i)}: ", prompt.path) for i, prompt in enumerate(request.image_prompts))]
    for field, which, path in named:
        if path and not Path(path).is_absolute():
            raise RequestError(field, f"{which}{path!r} is relative; give an absolute path (the service reads it)")


def _client_ref(data: dict) -> str | None:
    """A body's ``client_ref``: the client's name for what it asks to queue, to find it if the answer is lost."""
    ref = data.get("client_ref")
    if ref is not None and not (isinstance(ref, str) and 0 < len(ref) <= MAX_REF and ref.isascii() and ref.isprintable()):
        raise RequestError("client_ref", f"give up to {MAX_REF} printable ASCII characters, got {ref!r:.80}")
    return ref
