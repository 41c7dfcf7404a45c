"""Workers on a Ray cluster: one actor per GPU (or CPU actors), behind the ``WorkerPool`` interface.

The service's SQLite queue stays the source of truth (Ray's head is a single point of failure and
its task queue is not durable); actors are replaceable workers. Each actor runs jobs with
``backend.worker``'s code and keeps its pipelines loaded between jobs. Its events wait in an outbox
that the pool long-polls with plain actor calls (they also work over Ray Client, where streaming
generators do not). Its images come back as pixels and metadata: the pool saves them in the outputs
folder and records them in the queue, then announces them, so an image counts as made once it is
saved here. An actor that dies (killed, or its node lost) is replaced, and the service retries its
job once from the first image not saved. Actors share their driver's fate: a service that stops or
dies takes its actors with it, and the next service starts fresh ones.

Ray is imported inside functions only: the service starts without it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import queue
import socket
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from backend import events as ev, versions
from backend.cluster_address import ADDRESS, check_address
from backend.errors import DreamttyError, Transient
from backend.pool import OnDied, OnEvent, Slot, StartFaults
from backend.queue_store import QueueStore
from backend.safetext import first_line
from backend.worker import RELEASE, JobRun, pipeline_cache, release, run_jobs, save_output

NAMESPACE = "dreamtty"
POLL = 1.0  # seconds an events call waits for an event: also how soon an idle actor's death is noticed
RESTART_DELAY = 5.0  # seconds before trying again to start an actor that could not start
INSTALL = "pip install 'dreamtty[cluster]'"
_ALLOWED = "auto, ray://HEAD:10001 or HEAD:6379 (local: no cluster)"
HEAD_TIMEOUT = 5.0  # seconds to connect to a head, and for it to answer
HEAD_LOSS_LIMIT = 60  # seconds a driver outlives its head: Ray's gcs_rpc_server_reconnect_timeout_s default
NODES_WAIT = 1.0  # seconds the status waits for the cluster's nodes (a call still waiting is not waited for)
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def check_cluster(text: str, field: str = "cluster") -> str:
    """``--cluster`` (or the config's ``workers``) checked, as an address; Ray must be installed for it.

    Raises RequestError(field) for text that is no address, DreamttyError naming the install command
    when Ray (or Ray Client, for ``ray://``) is missing.
    """
    address = text.strip()
    if address == "local":
        return address
    if address != "auto":
        check_address(address, field, _ALLOWED)
    else:
        auto_target()
    if importlib.util.find_spec("ray") is None:
        raise DreamttyError(f"{field}: running workers on a Ray cluster needs Ray; {INSTALL}")
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise DreamttyError(f"{field}: ray:// addresses need Ray Client; {INSTALL}")
    return address


@dataclass
class ShippedImage:
    """An image an actor made, on its way to the service, which saves and records it."""

    job: int
    index: int
    seed: int
    image: object  # PIL.Image.Image
    meta: dict


class ActorWorker:
    """The body of a Ray actor: a worker with its pipeline cache, running the jobs the pool gives it
    one at a time on a thread of its own; its events and images wait in an outbox for ``events``."""

    def __init__(self, worker: int, device: str) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.worker = worker
        self.cache, self.cuda_count = pipeline_cache(device)
        self._jobs: queue.Queue = queue.Queue()
        self._outbox: list = []
        self._filled = threading.Condition()
        self._cancelled: set[int] = set()  # job ids are never reused
        threading.Thread(target=self._serve, name="dreamtty-jobs", daemon=True).start()

    def hello(self) -> dict:
        """Where this actor runs and the code it runs (its answer also says it is ready)."""
        return {"device": str(self.cache.device), "cuda_count": self.cuda_count, "host": socket.gethostname(),
                "build": versions.build()}

    def run(self, jobs: list[dict] | str) -> None:
        """Run ``jobs`` (one job's payload or a group's, see backend.job_groups), or ``RELEASE``."""
        self._jobs.put(jobs)

    def cancel(self, job: int) -> None:
        self._cancelled.add(job)

    def events(self, wait: float) -> list:
        """The events (``backend.events`` JSON) and images made since the last call, oldest first;
        waits up to ``wait`` seconds for one."""
        with self._filled:
            self._filled.wait_for(lambda: self._outbox, timeout=wait)
            items, self._outbox = self._outbox, []
        return items

    # -- the JobRun's event and image sinks (backend.worker.Output) --------------------------
    def send(self, event: ev.Event) -> None:
        self._put(ev.dumps(event))

    def save(self, run: JobRun, image, meta: dict, index: int, seed: int) -> None:
        self._put(ShippedImage(run.job["job"], index, seed, image, meta))

    def _put(self, item) -> None:
        with self._filled:
            self._outbox.append(item)
            self._filled.notify_all()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job == RELEASE:
                release(self.worker, self.cache, self.send)
                continue
            run_jobs([JobRun(self.worker, payload, self.cache, self.send, lambda j=payload["job"]: j in self._cancelled,
                             self) for payload in job])


@dataclass
class _Worker:
    """The pool's side of one slot: its current actor and job."""

    slot: Slot
    actor: object = None  # the actor jobs go to, set on the event loop once it is ready
    starting: object = None  # the actor being started (or last started) by the slot's thread
    ready: bool = False
    jobs: dict[int, dict] = field(default_factory=dict)  # job id -> the payload of each job it runs
    errors: dict[int, str] = field(default_factory=dict)  # jobs whose images cannot be saved: they end failed
    thread: threading.Thread | None = None


class RayPool:
    """Ray actors as workers: one per GPU in the cluster (``num_gpus=1``), or with ``gpu=False`` one
    CPU actor per node; ``actors`` sets the count instead (tests, benchmarks)."""

    def __init__(self, address: str, db_path: Path, gpu: bool = True, actors: int | None = None,
                 field: str = "cluster") -> None:
        self.address = check_cluster(address, field)
        self.field = field
        self.db_path = db_path
        self.gpu = gpu
        self.actors = actors
        self.slots: list[Slot] = []
        self._workers: dict[int, _Worker] = {}
        self._stop = threading.Event()
        self._connected = False  # this pool joined the cluster (and leaves it on close)
        self.head: str | None = None  # the head's address once joined (what ``auto`` found)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: OnEvent = lambda event: None
        self._on_died: OnDied = lambda slot, jobs, why, counts: None
        self._faults = StartFaults()  # actors that cannot start (tried again every RESTART_DELAY)
        self._asking: tuple[threading.Thread, list] | None = None  # a ray.nodes() call and its answer

    def start(self, on_event: OnEvent, on_died: OnDied) -> None:
        """Join the cluster (a one-line DreamttyError when it cannot) and start the actors; each slot
        becomes ready (a ``WorkerReady`` event) once its actor runs."""
        import ray

        self._loop = asyncio.get_running_loop()
        self._on_event, self._on_died = on_event, on_died
        self._connected = _connect(ray, self.address, self.field)
        self.head = _head_address(ray)
        count = self.actors if self.actors is not None else self._count(ray)
        # a CPU actor per node: spread over the nodes (Ray packs actors on one node by default)
        options = {"num_gpus": 1} if self.gpu else {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        actor_class = ray.remote(max_concurrency=4, max_restarts=0, **options)(ActorWorker)
        for i in range(count):
            worker = _Worker(Slot(i, "cuda" if self.gpu else "cpu"))
            self.slots.append(worker.slot)
            self._workers[i] = worker
            worker.thread = threading.Thread(target=self._drive, args=(ray, actor_class, worker),
                                             name=f"dreamtty-actor-{i}", daemon=True)
            worker.thread.start()

    def alive(self, slot: Slot) -> bool:
        return self._workers[slot.id].ready

    def run(self, slot: Slot, jobs: list[dict]) -> None:
        worker = self._workers[slot.id]
        slot.jobs = [job["job"] for job in jobs]
        worker.jobs, worker.errors = {job["job"]: job for job in jobs}, {}
        worker.actor.run.remote(jobs)

    def cancel(self, slot: Slot, job: int) -> None:
        if job in slot.jobs:
            self._workers[slot.id].actor.cancel.remote(job)

    def release(self, slot: Slot) -> None:
        slot.models = []
        self._workers[slot.id].actor.run.remote(RELEASE)

    def log_of(self, slot: Slot) -> str:
        return f"the Ray worker logs on {slot.node or 'its node'} (`ray logs` lists them)"

    def status(self) -> dict:
        """The cluster's nodes (host, GPUs, alive) and the workers: node, device, models, job."""
        import ray

        found, problem = self._nodes(ray)
        nodes = None if problem else [{"host": n["NodeManagerHostname"], "address": n["NodeManagerAddress"],
                                       "alive": n["Alive"], "gpus": int(n["Resources"].get("GPU", 0))} for n in found]
        return {"cluster": self.address, "head": self.head, "nodes": nodes,
                "workers": [slot.status(self.alive(slot)) for slot in self.slots],
                "warnings": [*([problem] if problem else []), *self.start_faults()]}

    def start_faults(self) -> list[str]:
        return self._faults.warnings()

    async def close(self) -> None:
        import ray

        self._stop.set()
        for worker in self._workers.values():
            for actor in (worker.actor, worker.starting):
                _kill(ray, actor)
        await asyncio.to_thread(self._join)
        if self._connected:
            ray.shutdown()

    # -- internals -------------------------------------------------------------------
    def _nodes(self, ray) -> tuple[list[dict], str | None]:
        """``ray.nodes()``, or none and why not. It blocks while the head is down (a minute, until Ray gives up),
        so it runs on a thread of its own, one call at a time, waited for NODES_WAIT at most: the status
        is answered on the service's event loop."""
        if self._asking is None or not self._asking[0].is_alive():
            answer: list = []

            def ask() -> None:
                try:
                    answer.append(ray.nodes())
                except Exception as exc:  # noqa: BLE001 - said in the status, in one line
                    answer.append(exc)

            thread = threading.Thread(target=ask, name="ray-nodes", daemon=True)
            self._asking = (thread, answer)
            thread.start()
            thread.join(NODES_WAIT)
        answer = self._asking[1]
        if not answer:
            return [], f"{self.field}: the Ray head at {self.head or self.address} does not answer"
        if isinstance(answer[0], Exception):
            return [], f"{self.field}: cannot list the nodes of {self.head or self.address}: {first_line(answer[0])}"
        return answer[0], None

    def _count(self, ray) -> int:
        if not self.gpu:
            return sum(node["Alive"] for node in ray.nodes())
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus == 0:
            raise DreamttyError(f"{self.field}: the Ray cluster at {self.address} has no GPU; add GPU nodes, "
                                "or use --device cpu for one CPU worker per node")
        return gpus

    def _join(self) -> None:
        for worker in self._workers.values():
            if worker.thread is not None:
                worker.thread.join(timeout=POLL + 5)

    def _drive(self, ray, actor_class, worker: _Worker) -> None:
        """Thread: keep an actor running for ``worker``'s slot; pass on its events, save its images."""
        store = self._queue(worker)
        if store is None:
            return
        try:
            while not self._stop.is_set():
                actor = self._start_actor(ray, actor_class, worker)
                if actor is None:
                    continue
                try:
                    while not self._stop.is_set():
                        for item in ray.get(actor.events.remote(POLL)):
                            self._take(worker, actor, item, store)
                except (ray.exceptions.RayError, ConnectionError) as exc:  # ConnectionError: Ray Client's
                    if not self._stop.is_set():
                        self._call(self._died, worker, *self._death(exc))
                _kill(ray, actor)
        finally:
            store.close()

    def _queue(self, worker: _Worker) -> QueueStore | None:
        """The service's queue (opened and checked already), for ``worker``'s thread. While it cannot be opened (a
        damaged file) the slot cannot start: said once, tried again every RESTART_DELAY; None once closing."""
        while not self._stop.is_set():
            try:
                return QueueStore(self.db_path, checked=False)
            except DreamttyError as exc:
                self._faults.cannot(worker.slot.id, f"worker {worker.slot.id}: {exc}", self._tell)
                self._stop.wait(RESTART_DELAY)
        return None

    def _tell(self, event: ev.Event) -> None:
        """Thread: hand ``event`` to the service."""
        self._call(self._on_event, event)

    def _start_actor(self, ray, actor_class, worker: _Worker):
        """A new actor for ``worker``, once it runs (a GPU may have to come free first); None when it
        could not start (said in a log event) or the pool is closing."""
        actor = worker.starting = actor_class.remote(worker.slot.id, "auto" if self.gpu else "cpu")
        try:
            info = ray.get(actor.hello.remote())
            why = None
        except ray.exceptions.RayError as exc:
            why = f"cannot start on the cluster: {first_line(exc)}"
        else:  # the events and payloads they pass must be read alike: see backend.versions
            if info.get("build") != versions.build():
                why = (f"{info.get('host')} runs other dreamtty code (build {info.get('build')}) than this service "
                       f"(build {versions.build()}); install the same dreamtty on every node, then restart the service")
        if why is not None:
            _kill(ray, actor)
            if not self._stop.is_set():
                # said once: it is tried again every RESTART_DELAY
                self._faults.cannot(worker.slot.id, f"worker {worker.slot.id}: {why}", self._tell)
                self._stop.wait(RESTART_DELAY)
            return None
        self._call(self._ready, worker, actor, info)
        return actor

    def _take(self, worker: _Worker, actor, item, store: QueueStore) -> None:
        """Thread: one item of an actor's outbox. An image is saved and recorded before its event."""
        if isinstance(item, ShippedImage):
            payload = worker.jobs.get(item.job)
            if payload is None or item.job in worker.errors:
                return
            try:
                event = save_output(store, payload, worker.slot.id, item.image, item.meta, item.index, item.seed)
            except (DreamttyError, OSError, sqlite3.Error) as exc:  # a full disk: the job fails with it, as locally
                worker.errors[item.job] = str(exc)
                actor.cancel.remote(item.job)
                return
        else:
            try:
                event = ev.loads(item)
            except ev.EventError:
                return
            if isinstance(event, ev.FINAL_EVENTS) and event.job in worker.errors:
                event = ev.Failed(job=event.job, worker=event.worker, error=worker.errors[event.job])
            elif isinstance(event, ev.Failed):
                event = replace(event, error=f"{event.error} (on {worker.slot.node})")
        self._tell(event)

    def _ready(self, worker: _Worker, actor, info: dict) -> None:
        slot = worker.slot
        slot.device, slot.node, slot.jobs, slot.models = info["device"], info["host"], [], []
        worker.actor, worker.ready = actor, True
        self._faults.started(slot.id)
        self._on_event(ev.WorkerReady(worker=slot.id, device=f"{slot.device} ({slot.node})",
                                      cuda_count=info["cuda_count"]))

    def _death(self, exc: Exception) -> tuple[str, bool]:
        """Why an actor was lost, and whether that counts as an attempt of its jobs: not when the head does not
        answer (a cluster outage, not a fault of the jobs: they wait queued for it)."""
        why = f"worker actor died ({first_line(exc)})"
        if self.head is None:
            return why, True
        try:
            _check_head_at(self.head, self.field)
        except DreamttyError:
            return (f"{why}; the Ray head at {self.head} does not answer (Ray ends this service when it stays down "
                    f"for {HEAD_LOSS_LIMIT} s; its queue is kept for the next)"), False
        return why, True

    def _died(self, worker: _Worker, why: str, counts: bool) -> None:
        """The slot's actor died (its thread starts another): the service retries its jobs (``counts``), or
        queues them again."""
        slot = worker.slot
        jobs, slot.jobs, slot.models = slot.jobs, [], []
        worker.ready, worker.jobs = False, {}
        self._on_died(slot, jobs, why, counts)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(self._unless_closed, fn, *args)
        except RuntimeError:  # the loop closed
            self._stop.set()

    def _unless_closed(self, fn, *args) -> None:
        if not self._stop.is_set():
            fn(*args)


def auto_target() -> str:
    """The head ``--cluster auto`` joins as RAY_ADDRESS names it ("" when unset: this machine's), checked as an
    address: Ray waits minutes on one it cannot read. RequestError("RAY_ADDRESS") otherwise."""
    target = os.environ.get("RAY_ADDRESS", "").strip()
    if target not in ("", "auto", "local"):  # Ray's own words for this machine's cluster
        check_address(target, "RAY_ADDRESS", "HOST:PORT or ray://HOST:PORT, or unset it")
    return target


def _head_address(ray) -> str | None:
    """The address of the head this process joined (``HOST:PORT``), None when Ray does not say."""
    try:
        return str(ray.get_runtime_context().gcs_address) or None
    except Exception:  # noqa: BLE001 - only shown: a Ray without it, or a runtime context that has none
        return None


def _connect(ray, address: str, field: str) -> bool:
    """Join the cluster at ``address``; False when this process is in one already (tests, embedding)."""
    if ray.is_initialized():
        return False
    target = auto_target() if address == "auto" else address
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the lines Ray prints (to serve.log): no colour codes
    _check_head_at(target, field)  # ray.init waits minutes for a head not there, or for another listener there
    with tempfile.TemporaryFile() as said:
        try:
            with _stderr_into(said):  # Ray's core logs each failed try there, a line apiece
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as exc:  # noqa: BLE001 - Ray raises several kinds: one line for each
            said.seek(0)
            why = first_line(exc)
            if b"InvalidAuthToken" in said.read():
                why = ("it refused this machine's token (give it the head's token in RAY_AUTH_TOKEN or "
                       "~/.ray/auth_token, and set RAY_AUTH_MODE=token: Ray sets it itself only for a cluster it finds)")
            elif address == "auto" and "Could not find any running Ray instance" in why:  # Ray names its own flag
                why = ("none runs on this machine (`ray start --head` starts one); or name one: RAY_ADDRESS, or "
                       "--cluster ray://HEAD:10001 or HEAD:6379")
            raise DreamttyError(f"{field}: cannot join the Ray cluster at {address}: {why}") from None
    return True


@contextmanager
def _stderr_into(file) -> Iterator[None]:
    """File descriptor 2 (where native code writes) into ``file`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_head_at(address: str, field: str) -> None:
    """:func:`_check_head` for a ``HOST:PORT`` or ``ray://HOST:PORT`` address (one of another form is Ray's to read)."""
    match = ADDRESS.fullmatch(address)
    if match:
        _check_head(address, match["host"].strip("[]"), int(match["port"]), field)


def _check_head(address: str, host: str, port: int, field: str) -> None:
    """DreamttyError(field) unless a gRPC server (a Ray GCS or Ray Client server) answers at ``host:port``."""
    try:
        sock = socket.create_connection((host, port), timeout=HEAD_TIMEOUT)
    except UnicodeError:  # the IDNA codec: an empty label ("a..b") or one over 63 characters
        raise DreamttyError(f"{field}: {host!r} in {address} is not a valid host name") from None
    except OSError as exc:  # a name no resolver knows is bad input; a head down or out of reach, a fault that passes
        said = f"{field}: cannot reach the Ray head at {address}: {exc.strerror or exc}"
        unknown = isinstance(exc, socket.gaierror) and exc.errno != socket.EAI_AGAIN  # not "try again" of a resolver
        raise (DreamttyError(said) if unknown else Transient(said)) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):  # a TLS head answers in TLS first
            return
        try:
            grpc = _answers_http2(sock)
        except OSError:  # silent until the timeout, or hung up
            grpc = False
    if not grpc:
        raise DreamttyError(f"{field}: {address} is not a Ray head (it does not answer gRPC); give the head's "
                            "GCS port (HEAD:6379) or Ray Client's (ray://HEAD:10001)")


def _answers_http2(sock: socket.socket) -> bool:
    """Whether the server speaks HTTP/2, as gRPC does: after a client's connection preface its first
    frame is SETTINGS (RFC 9113, section 3.4; a frame header is 9 bytes, the type at byte 3)."""
    sock.sendall(_HTTP2_PREFACE)
    head = b""
    while len(head) < 9 and (chunk := sock.recv(9 - len(head))):
        head += chunk
    return len(head) == 9 and head[3] == 0x4


def _kill(ray, actor) -> None:
    if actor is None:
        return
    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - gone already, or the cluster is: nothing left to stop
        pass
