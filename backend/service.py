"""The backend service: an asyncio object (no torch) that owns the persistent
queue and the worker processes, and fans worker events out to subscribers.

Events are dicts with a ``type``: queued, started, step, preview, image, done,
failed, cancelled, ready (a worker is up), log.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from backend import config, locations
from backend.errors import RequestError
from backend.extras_check import check_extras
from backend.guidance_settings import check_clip_skip
from backend.models import resolve_model, text_encoder_depth
from backend.outputs import check_out_dir
from backend.processes import process_exists
from backend.prompting import check_prompts
from backend.queue_store import ACTIVE, FINAL, Job, QueueStore
from backend.request import GenerateRequest

_CTX = mp.get_context("spawn")
_DEVICES = "auto, cpu, cuda or cuda:N[,cuda:M...]"
_CUDA = re.compile(r"cuda(?::(\d+))?")
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU this container may use
_DEV = Path("/dev")


def parse_devices(text: str) -> list[str]:
    """``--device`` as the workers' devices: ``["auto"]``, ``["cpu"]`` or CUDA devices.

    Raises RequestError("device") when the text is not one of ``_DEVICES``.
    """
    if text.strip() in ("auto", "cpu"):
        return [text.strip()]
    devices = [d.strip() for d in text.split(",")]
    bad = next((d for d in devices if not _CUDA.fullmatch(d)), None)
    if bad is not None:
        raise RequestError("device", f"{bad!r} is not allowed; use {_DEVICES}")
    return devices


def check_devices(text: str) -> list[str]:
    """``parse_devices``, and every CUDA device named must exist on this machine."""
    devices = parse_devices(text)
    count = visible_gpus()
    if count is None:
        return devices  # cannot tell without torch: the worker reports a missing GPU
    for device in devices:
        cuda = _CUDA.fullmatch(device)
        if cuda and int(cuda.group(1) or 0) >= count:
            have = ", ".join(f"cuda:{n}" for n in range(count)) or "no CUDA GPU"
            raise RequestError("device", f"{device} is not available; this machine has {have} (use auto or cpu)")
    return devices


def visible_gpus() -> int | None:
    """The CUDA GPUs this process may use, counted without torch; None when that cannot be told.

    Importing torch here would cost seconds and is not allowed in the TUI process. On Linux the
    NVIDIA driver lists its GPUs in /proc/driver/nvidia/gpus (containers see only theirs) and
    CUDA_VISIBLE_DEVICES narrows that down. Without that list, GPU device nodes (NVIDIA, AMD ROCm,
    WSL) mean "cannot tell", and none at all means no GPU. macOS has no CUDA.
    """
    if sys.platform == "darwin":
        return 0
    if not sys.platform.startswith("linux"):
        return None
    if _NVIDIA_GPUS.is_dir():
        physical = len(list(_NVIDIA_GPUS.iterdir()))
    elif any(_DEV.glob("nvidia[0-9]*")) or (_DEV / "kfd").exists() or (_DEV / "dxg").exists():
        return None
    else:
        physical = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return physical if visible is None else min(physical, _count_visible(visible, physical))


def _count_visible(visible: str, physical: int) -> int:
    """Entries of CUDA_VISIBLE_DEVICES up to the first invalid one (where CUDA stops reading)."""
    count = 0
    for entry in visible.split(","):
        entry = entry.strip()
        if not (entry.startswith(("GPU-", "MIG-")) or (entry.isdigit() and int(entry) < physical)):
            break
        count += 1
    return count


@dataclass
class _Worker:
    id: int
    device: str
    process: object = None
    jobs: object = None
    events: object = None  # the read end of this worker's event pipe
    cancel: object = None
    job: int | None = None
    died_reported: bool = False


class Service:
    """Queue + workers. Use ``await start()``, ``submit()``, ``subscribe()``, ``await close()``."""

    def __init__(self, devices: str = "auto", db_path: Path | None = None, recover: bool = False) -> None:
        self.devices = devices
        self.store = QueueStore(db_path or locations.queue_db())
        self.recover = recover
        self.owner = os.getpid()
        self.workers: list[_Worker] = []
        self._subscribers: list[asyncio.Queue] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.recover:
            self.store.adopt_orphans(self.owner, process_exists)
        for i, device in enumerate(self._initial_devices()):
            self._spawn(_Worker(i, device))
        self._reader = threading.Thread(target=self._read_events, name="dreamtty-events", daemon=True)
        self._reader.start()
        self._dispatch()

    def _initial_devices(self) -> list[str]:
        return parse_devices(self.devices)

    def _spawn(self, worker: _Worker) -> None:
        with _real_stderr():  # queues and processes may start multiprocessing's resource tracker
            self._start_process(worker)
        if worker not in self.workers:
            self.workers.append(worker)

    def _start_process(self, worker: _Worker) -> None:
        worker.jobs = _CTX.Queue()
        worker.events, sender = _CTX.Pipe(duplex=False)
        worker.cancel = _CTX.Value("q", 0)
        log_path = locations.state_dir() / "logs" / f"worker-{worker.id}.log"
        worker.process = _CTX.Process(
            target=_worker_entry,
            args=(worker.id, worker.device, worker.jobs, sender, worker.cancel, str(log_path)),
            name=f"dreamtty-worker-{worker.id}",
            daemon=True,
        )
        worker.process.start()
        sender.close()  # the worker holds the only write end: EOF here means it is gone

    async def close(self, cancel_jobs: bool = False) -> None:
        """Stop workers. This service's jobs still queued or running stay queued for the next
        start, or end as cancelled with ``cancel_jobs`` (the user interrupted them)."""
        self._stop.set()
        if cancel_jobs:  # at once: a second Ctrl-C may cut the rest of close short
            self._end_active("cancelled")
        for w in self.workers:
            if w.process.is_alive():
                w.jobs.put(None)
        for w in self.workers:
            if w.job is not None:
                w.cancel.value = w.job
        await asyncio.to_thread(self._join_workers)
        self._end_active("cancelled" if cancel_jobs else "queued")  # events handled meanwhile may have changed them
        if self._reader is not None:
            self._reader.join(timeout=2)
        self.store.close()

    def _end_active(self, state: str) -> None:
        for job in self.store.jobs(ACTIVE, owner=self.owner):
            if job.state != state:
                self.store.set_state(job.id, state)

    def _join_workers(self) -> None:
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=5)

    # -- API ---------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> tuple[GenerateRequest, str]:
        """Resolve the model and validate the request; raises a one-line DreamttyError."""
        ref = resolve_model(request.model)
        family = ref.family if ref.family != "unknown" else "sdxl"
        resolved = request.resolved(family)
        depth = text_encoder_depth(ref)
        if depth is not None:  # else the worker finds it, later
            check_clip_skip(resolved.guidance.clip_skip, depth)
        check_prompts(resolved)
        check_extras(resolved, ref.family)
        return resolved, ref.family

    def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        """Validate and queue a request; returns the job id. Nothing is queued on error."""
        return self.enqueue(*self.validate(request), out_dir)

    def enqueue(self, resolved: GenerateRequest, family: str, out_dir: Path | None = None) -> int:
        """Queue what ``validate`` returned (it may run in another thread: this part must not); the job id."""
        out = Path(out_dir) if out_dir else config.load().outputs_dir()
        check_out_dir(out)
        job_id = self.store.add("generate", {"request": resolved.to_dict(), "out": str(out), "family": family}, self.owner)
        self._publish({"type": "queued", "job": job_id, "request": resolved.to_dict()})
        self._dispatch()
        return job_id

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job. Returns False when it is not active."""
        job = self.store.get(job_id)
        if job is None or job.state not in ACTIVE:
            return False
        for w in self.workers:
            if w.job == job_id:
                w.cancel.value = job_id
                return True
        self.store.set_state(job_id, "cancelled")
        self._publish({"type": "cancelled", "job": job_id})
        return True

    def running_job(self) -> int | None:
        return next((w.job for w in self.workers if w.job is not None), None)

    def jobs(self, limit: int = 200) -> list[Job]:
        return self.store.jobs(limit=limit)

    def active_jobs(self) -> list[Job]:
        """This service's queued and running jobs, newest first."""
        return self.store.jobs(ACTIVE, owner=self.owner)

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        if q in self._subscribers:
            self._subscribers.remove(q)

    async def wait(self, job_id: int, events: asyncio.Queue | None = None):
        """Yield the events of one job until it ends (done, failed or cancelled)."""
        q = events or self.subscribe()
        try:
            while True:
                event = await q.get()
                if event.get("job") != job_id:
                    continue
                yield event
                if event["type"] in FINAL:
                    return
        finally:
            if events is None:
                self.unsubscribe(q)

    # -- internals -----------------------------------------------------------
    def _publish(self, event: dict) -> None:
        for q in self._subscribers:
            q.put_nowait(event)

    def _dispatch(self) -> None:
        if self._stop.is_set():
            return
        for w in self.workers:
            if w.job is not None or not w.process.is_alive():
                continue
            job = self.store.next_queued(self.owner)
            if job is None:
                return
            self.store.set_state(job.id, "running")
            w.job = job.id
            w.cancel.value = 0
            w.jobs.put({"job": job.id, **job.payload})

    def _read_events(self) -> None:
        """Thread: move worker events onto the event loop; notice dead workers."""
        while not self._stop.is_set():
            pipes = {w.events: w for w in self.workers if w.events is not None}
            for conn in mp_connection.wait(list(pipes), timeout=0.2):
                try:
                    event = conn.recv()
                except (EOFError, OSError):  # the worker exited: stop reading its pipe
                    if pipes[conn].events is conn:  # unless a restart already replaced it
                        pipes[conn].events = None
                    continue
                self._call(self._handle, event)
            for w in list(self.workers):
                if not w.process.is_alive() and not self._stop.is_set() and not w.died_reported:
                    w.died_reported = True
                    self._call(self._worker_died, w, w.process.exitcode)
            if not pipes:
                self._stop.wait(0.2)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            self._stop.set()

    def _handle(self, event: dict) -> None:
        kind = event["type"]
        job_id = event.get("job")
        worker = next((w for w in self.workers if w.id == event.get("worker")), None)
        if kind == "ready":
            self._maybe_add_gpu_workers(event)
        elif kind == "started":
            self.store.set_state(job_id, "running")
        elif kind == "image":
            self.store.add_output(job_id, event["path"])
        elif kind in FINAL:
            self.store.set_state(job_id, kind, event.get("error"))
            if worker is not None and worker.job == job_id:
                worker.job = None
        self._publish(event)
        if kind in FINAL or kind == "ready":
            self._dispatch()

    def _maybe_add_gpu_workers(self, event: dict) -> None:
        """With ``--device auto``, the first worker reports the GPU count; add one worker per extra GPU."""
        if self._initial_devices() != ["auto"] or event["worker"] != 0 or len(self.workers) > 1:
            return
        for n in range(1, event.get("cuda_count", 0)):
            self._spawn(_Worker(len(self.workers), f"cuda:{n}"))

    def _worker_died(self, worker: _Worker, exitcode) -> None:
        if self._stop.is_set():
            return
        job_id = worker.job
        worker.job = None
        if job_id is not None:
            error = f"worker crashed (exit code {exitcode}); it was restarted and the queue goes on"
            self.store.set_state(job_id, "failed", error)
            self._publish({"type": "failed", "job": job_id, "error": error})
        worker.died_reported = False
        self._spawn(worker)
        self._dispatch()


@contextlib.contextmanager
def _real_stderr():
    """multiprocessing hands ``sys.stderr``'s file descriptor to the helper processes it starts;
    under a TUI ``sys.stderr`` is a capture object without one, so use the process's real stderr."""
    saved = sys.stderr
    try:
        usable = saved.fileno() >= 0
    except (AttributeError, OSError, ValueError):
        usable = False
    if not usable:
        sys.stderr = sys.__stderr__
    try:
        yield
    finally:
        sys.stderr = saved


def _worker_entry(*args) -> None:
    from backend.worker import worker_main

    worker_main(*args)

