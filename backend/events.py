"""Every event between workers, the service, its clients and training runs, as typed records.

One encoding serves a worker's pipe, the API's socket and WebSocket, and a training run's
``events.jsonl``: a JSON object ``{"v": VERSION, "type": NAME, ...fields}``, with bytes (preview
pixels) as base64. :func:`dumps` / :func:`loads` are the only way in and out, so both sides of every
channel agree on names and fields. A record from a newer version is refused with one line; fields
this version does not know are dropped (a newer minor version may add some).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar, TypeVar

from backend.errors import DreamttyError
from backend.values import is_number, is_whole, shape_fault

VERSION = 1
_TYPES: dict[str, type["Event"]] = {}
E = TypeVar("E", bound="Event")


class EventError(DreamttyError):
    """A record that is not an event of this version."""


def _register(name: str):
    def register(cls: type[E]) -> type[E]:
        cls = dataclass(frozen=True, kw_only=True)(cls)
        cls.type = name
        _TYPES[name] = cls
        return cls

    return register


@dataclass(frozen=True, kw_only=True)
class Event:
    type: ClassVar[str] = ""

    def problem(self) -> str | None:
        """What makes this event unusable besides its fields' types (None: nothing)."""
        return None


# -- jobs ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class JobEvent(Event):
    job: int
    worker: int | None = None  # the worker that sent it (None: the service)


@_register("queued")
class Queued(JobEvent):
    kind: str
    request: dict


@_register("started")
class Started(JobEvent):
    first_image: int = 0  # > 0 when a recovered job resumes after its saved images


@_register("step")
class Step(JobEvent):
    image: int
    count: int
    step: int
    total: int
    its: float
    eta: float
    done: int | None = None  # steps done over the job's images, those denoised together each counted (None: unknown)
    batch: int = 1  # the job's images denoised together with this one (this one's batch)

    def problem(self) -> str | None:
        return None if self.total > 0 else f"has total {self.total} (a step of none)"


@_register("preview")
class Preview(JobEvent):
    image: int
    width: int
    height: int
    rgb: bytes  # width * height * 3, row-major RGB
    label: str = ""  # "" for the image being sampled; else what it shows, e.g. an image prompt's map "canny-1"

    def problem(self) -> str | None:
        if self.width > 0 and self.height > 0 and len(self.rgb) == self.width * self.height * 3:
            return None
        return f"has {len(self.rgb)} bytes for {self.width}x{self.height} RGB pixels"


@_register("image")
class ImageSaved(JobEvent):
    image: int
    path: str
    seed: int


@_register("text")
class TextOutput(JobEvent):
    """The result of a job whose kind makes text (describe)."""

    image: int
    text: str


@_register("done")
class Done(JobEvent):
    paths: list[str] = field(default_factory=list)


@_register("failed")
class Failed(JobEvent):
    error: str


@_register("cancelled")
class Cancelled(JobEvent):
    pass


@_register("note")
class Note(JobEvent):
    """A line about the job for people: a fallback taken, a first-time compile coming."""

    message: str


@_register("retrying")
class Retrying(JobEvent):
    """The job's worker died; the job runs again from its first unsaved image."""

    error: str
    first_image: int


@_register("moved")
class Moved(JobEvent):
    """Another service took the job over while this one renewed no lease (it was paused, or the queue file took
    no writes): it goes on there, and this service's followers stop following it."""

    message: str


FINAL_EVENTS = (Done, Failed, Cancelled, Moved)  # the last event of a job a follower of this service sees


# -- workers and the service -----------------------------------------------------------
@_register("ready")
class WorkerReady(Event):
    worker: int
    device: str
    cuda_count: int = 0


@_register("worker-models")
class WorkerModels(Event):
    """The pipelines a worker holds, sent when that changes (for the service's status)."""

    worker: int
    models: list[dict] = field(default_factory=list)  # {"model": name, "dtype": "float16", "bytes": N}
    loads: int = 0  # pipelines loaded since the worker started


@_register("worker-released")
class WorkerReleased(Event):
    """A worker freed every pipeline it held, as asked when a training run takes its device."""

    worker: int
    freed: int = 0  # pipelines it let go


@_register("service-ready")
class ServiceReady(Event):
    """The service a client talks to has started (or the client reconnected): refresh job lists."""


@_register("service-lost")
class ServiceLost(Event):
    """The client lost its service's event stream (it stopped, or the network broke) and tries again;
    ``ServiceReady`` follows when it is back."""

    message: str


@_register("forgotten")
class Forgotten(Event):
    """Ended jobs were forgotten (``dreamtty jobs --forget``): job lists and galleries read again."""

    count: int


PUBLISHED = "published"  # a log record's attribute: its line is also a Log event that clients following jobs print


@_register("log")
class Log(Event):
    message: str
    level: str = "info"  # info, warning or error
    job: int | None = None

    def tells_waiters(self) -> bool:
        """Whether a client following a job is told it too: an error of the service's (no worker can start)."""
        return self.job is None and self.level == "error"


def concerns(event: Event, job_id: int) -> bool:
    """Whether a client following job ``job_id`` is shown ``event``: the job's own, or a service error for waiters."""
    if isinstance(event, Log):
        return event.tells_waiters()
    return isinstance(event, JobEvent) and event.job == job_id


# -- training runs as the service schedules them ------------------------------------------
@_register("run")
class RunState(Event):
    """A training run's place in the service's schedule changed (backend.run_schedule)."""

    run: int
    path: str
    state: str  # waiting, training or ended
    devices: list[str] = field(default_factory=list)
    pid: int | None = None
    waiting_for: str | None = None  # why it waits, e.g. "GPU cuda:0: job 12 is running"
    outcome: str | None = None  # once ended: the run's own state (done, failed, stopped)
    error: str | None = None


# -- training runs (a run's events.jsonl) ----------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TrainEvent(Event):
    time: float | None = None  # Unix seconds, set by the writer


@_register("train-state")
class TrainState(TrainEvent):
    state: str
    step: int | None = None
    max_steps: int | None = None
    message: str | None = None
    device: str | None = None
    processes: int | None = None
    mixed_precision: str | None = None


@_register("train-step")
class TrainStep(TrainEvent):
    step: int
    max_steps: int
    loss: float
    prior_loss: float | None = None
    lr: float | None = None
    its: float | None = None
    mem_gib: float | None = None
    epoch: int | None = None


@_register("train-log")
class TrainLog(TrainEvent):
    message: str
    level: str = "info"


@_register("train-class-images")
class TrainClassImages(TrainEvent):
    done: int
    total: int


@_register("train-checkpoint")
class TrainCheckpoint(TrainEvent):
    step: int
    path: str


@_register("train-validation")
class TrainValidation(TrainEvent):
    step: int
    images: list[str] = field(default_factory=list)


@_register("train-resume")
class TrainResume(TrainEvent):
    step: int
    checkpoint: str | None = None


@_register("train-error")
class TrainError(TrainEvent):
    message: str


# Before events were versioned, a run's events.jsonl named its training events without the prefix.
_UNVERSIONED_TRAIN = {"state", "step", "log", "class_images", "checkpoint", "validation", "resume", "error"}


class Fanout:
    """The event queues of a process's subscribers: each gets every event published, except live previews
    for a subscriber that has ``PREVIEW_BACKLOG`` events not read yet (a stalled client must not hold
    every preview in memory; a later one replaces them anyway).

    A subscriber across a network may be dropped instead when it stops reading: once it has left
    ``BACKLOG`` events unread for ``PATIENCE`` seconds (a burst, such as cancelling a long queue, is
    read in time by a client that reads), or ``HARD_BACKLOG`` at once. It then must not hold the
    service's memory; it reads what it missed back when it subscribes again."""

    PREVIEW_BACKLOG = 64
    BACKLOG = 1024
    HARD_BACKLOG = 16 * BACKLOG
    PATIENCE = 10.0

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[Event]] = []
        self._overrun: dict[int, Callable[[], None]] = {}  # id(queue): called when it is dropped
        self._behind: dict[int, float] = {}  # id(queue): since when it has had BACKLOG events unread

    def subscribe(self, overrun: Callable[[], None] | None = None) -> asyncio.Queue[Event]:
        """A new subscriber's queue; ``overrun``: drop it when it stops reading (see above) and call this."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.queues.append(queue)
        if overrun is not None:
            self._overrun[id(queue)] = overrun
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self.queues:
            self.queues.remove(queue)
            self._overrun.pop(id(queue), None)
            self._behind.pop(id(queue), None)

    def publish(self, event: Event) -> None:
        droppable = isinstance(event, Preview)
        for queue in list(self.queues):
            if droppable and queue.qsize() >= self.PREVIEW_BACKLOG:
                continue
            overrun = self._overrun.get(id(queue))
            if overrun is not None and self._stopped_reading(queue):
                self.unsubscribe(queue)
                overrun()
                continue
            queue.put_nowait(event)

    def _stopped_reading(self, queue: asyncio.Queue[Event]) -> bool:
        unread = queue.qsize()
        if unread < self.BACKLOG:
            self._behind.pop(id(queue), None)
            return False
        since = self._behind.setdefault(id(queue), time.monotonic())
        return unread >= self.HARD_BACKLOG or time.monotonic() - since >= self.PATIENCE


# -- encoding -----------------------------------------------------------------------------
def to_dict(event: Event) -> dict:
    """The event as a JSON-ready dict (bytes as base64)."""
    data: dict = {"v": VERSION, "type": event.type}
    for f in fields(event):
        value = getattr(event, f.name)
        data[f.name] = base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
    return data


def from_dict(data: object, run_file: bool = False) -> Event:
    """The event a dict from :func:`to_dict` describes; EventError when it is none.

    ``run_file``: the dict is a line of a training run's events.jsonl, which may predate versions.
    """
    if not isinstance(data, dict):
        raise EventError(f"event: expected a JSON object, got {type(data).__name__}")
    version, name = data.get("v"), data.get("type")
    if version is None and run_file and name in _UNVERSIONED_TRAIN:
        version, name = VERSION, "train-" + str(name).replace("_", "-")
    if not isinstance(version, int) or version > VERSION:
        raise EventError(f"event: version {version!r} is not supported (this dreamtty speaks {VERSION}); "
                         "restart the service after an upgrade")
    cls = _TYPES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise EventError(f"event: unknown type {name!r}")
    values = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            if f.type == "bytes" and isinstance(value, str):
                try:
                    value = base64.b64decode(value, validate=True)
                except ValueError:
                    raise EventError(f"event: {name}'s {f.name!r} field is not base64") from None
            if not _holds(f.type, value):
                raise EventError(f"event: {name}'s {f.name!r} field holds {type(value).__name__}, not {f.type}")
            values[f.name] = value
        elif f.default is MISSING and f.default_factory is MISSING:
            raise EventError(f"event: {name} lacks its {f.name!r} field")
    event = cls(**values)
    if (problem := event.problem()) is not None:
        raise EventError(f"event: {name} {problem}")
    return event


# What a field of each annotation the events use may hold, as JSON gives it (a test checks there are no others).
_HOLDS = {"None": type(None), "int": is_whole, "float": is_number, "str": str, "bytes": bytes, "dict": dict,
          "list[dict]": [dict], "list[str]": [str]}


def _holds(annotation: str, value: object) -> bool:
    """Whether ``value`` is of the type ``annotation`` names (``int | None``: either)."""
    return any(shape_fault(value, _HOLDS[kind]) is None for kind in annotation.split(" | "))


def dumps(event: Event) -> str:
    """One line of JSON (no newline inside: control characters are escaped)."""
    return json.dumps(to_dict(event), separators=(",", ":"))


def loads(text: str | bytes, run_file: bool = False) -> Event:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EventError(f"event: not JSON ({exc})") from None
    return from_dict(data, run_file)
