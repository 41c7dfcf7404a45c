"""Where jobs run: a pool of worker slots behind one small interface.

:class:`ProcessPool` runs one worker process per device on this machine (multiprocessing; see ``_context``);
``backend.ray_pool.RayPool`` runs Ray actors on a cluster instead. The service decides which job goes
to which slot; a pool only starts, feeds, cancels and watches its workers, and reports their events
and deaths.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from backend import service_log, versions
from backend.devices import parse_devices, visible_gpus
from backend.events import Event, EventError, Log, WorkerReady, loads
from backend.processes import be_nice, exit_text
from backend.request import MAX_COUNT
from backend.safetext import first_line
from backend.worker import MODELS_KEPT, RELEASE


log = logging.getLogger("dreamtty.pool")
JOIN_PATIENCE = 5.0  # seconds a worker has to exit when the pool closes, then after SIGTERM
EARLY_DEATHS_SAID = 2  # a worker that dies this many times in a row before it is ready is said to be unable to start
RESPAWN_BACKOFF = (1.0, 60.0)  # seconds: first and longest wait before restarting a worker that dies before ready

_SPAWN = mp.get_context("spawn")
_FORK_SERVER = mp.get_context("forkserver") if "forkserver" in mp.get_all_start_methods() else None
if _FORK_SERVER is not None:
    _FORK_SERVER.set_forkserver_preload(["backend.preload"])


def _context():
    """How a worker starts. Where this machine shows no GPU, it is forked from a fork server that has imported
    the heavy libraries once (``backend.preload``): it (re)starts in a fraction of a second. Beside a GPU it is
    spawned: importing them may ask the driver about the GPU (bitsandbytes does), and CUDA does not survive a
    fork."""
    if _FORK_SERVER is None or not sys.platform.startswith("linux") or visible_gpus() != 0:
        return _SPAWN
    return _FORK_SERVER


@dataclass
class Slot:
    """One worker as the service sees it."""

    id: int
    device: str
    jobs: list[int] = field(default_factory=list)  # the jobs it runs: one, or a group (backend.job_groups)
    pid: int | None = None
    node: str | None = None  # the machine it runs on, when not this one (a Ray node)
    models: list[str] = field(default_factory=list)  # the models of its last jobs, most recent last: loaded

    def loads(self, model: str) -> None:
        """Note that this slot's worker loads ``model`` for a job (and keeps the last ``MODELS_KEPT``)."""
        self.models = [*(m for m in self.models if m != model), model][-MODELS_KEPT:]

    @property
    def job(self) -> int | None:
        """The first of the jobs it runs, or None when it is idle."""
        return self.jobs[0] if self.jobs else None

    def status(self, ready: bool) -> dict:
        """This slot as JSON, with its first job and whether its worker is ready for jobs."""
        return {**asdict(self), "job": self.job, "ready": ready}


OnEvent = Callable[[Event], None]
# the slot whose worker died, the jobs it was handed, why, and whether that counts as an attempt of each (False:
# a worker of code changed on disk refused them before it read one; they wait queued for a restart)
OnDied = Callable[[Slot, list[int], str, bool], None]


class StartFaults:
    """Why each slot's worker cannot start: said once (an error ``Log``), not at each try, and a status
    warning until a worker of that slot runs."""

    def __init__(self) -> None:
        self._why: dict[int, str] = {}  # slot id -> why

    def cannot(self, slot_id: int, why: str, say: OnEvent) -> None:
        if self._why.get(slot_id) != why:
            say(Log(message=why, level="error"))
        self._why[slot_id] = why

    def started(self, slot_id: int) -> None:
        self._why.pop(slot_id, None)

    def warnings(self) -> list[str]:
        return list(self._why.values())


class WorkerPool(Protocol):
    slots: list[Slot]

    def start(self, on_event: OnEvent, on_died: OnDied) -> None:
        """Start the workers; callbacks run on the calling thread's event loop."""

    def alive(self, slot: Slot) -> bool: ...

    def run(self, slot: Slot, jobs: list[dict]) -> None:
        """Hand ``jobs`` (each its payload plus ``job``, its id: one job or a group) to the idle ``slot``."""

    def cancel(self, slot: Slot, job: int) -> None:
        """Ask ``slot``'s worker to stop ``job`` between steps (its group-mates go on)."""

    def release(self, slot: Slot) -> None:
        """Ask ``slot``'s idle worker to free every pipeline it holds (a training run takes its device);
        it answers with a ``WorkerReleased`` event."""

    def log_of(self, slot: Slot) -> str:
        """Where ``slot``'s worker writes its log, for an error that points there."""

    def status(self) -> dict:
        """Where the workers run, what each holds and runs, as JSON (``workers``: a list of slot statuses; and
        ``warnings``, when there are any: why a worker cannot start)."""

    def start_faults(self) -> list[str]:
        """Why workers cannot start, a line each (none when they can)."""

    async def close(self) -> None: ...


@dataclass
class _Process:
    process: object
    jobs: object
    events: object  # the read end of this worker's event pipe
    cancel: object  # shared array: the id of each job of the group at its position once it is cancelled
    group: list[int] = field(default_factory=list)  # the ids of the jobs last handed over, in order
    died_reported: bool = False
    starting: bool = True  # until its process started, or failed to (see ProcessPool._start)
    ready: bool = False  # it reported WorkerReady (a worker that dies before is restarted after a wait)

    def retire(self) -> None:
        """Free what a dead worker's process and job queue hold (the reader closes its pipe at EOF)."""
        if self.process.pid is not None:
            self.process.join(timeout=1)
        self.jobs.close()
        self.jobs.cancel_join_thread()


def _still_alive(processes: list) -> list:
    """Wait up to JOIN_PATIENCE seconds in all for ``processes`` to exit; those still running."""
    deadline = time.monotonic() + JOIN_PATIENCE
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    return [process for process in processes if process.is_alive()]


class ProcessPool:
    """One worker process per device (``--device``); ``auto`` adds one per extra GPU the first finds."""

    def __init__(self, devices: str, db_path: Path, nice: int = 0) -> None:
        self.devices = parse_devices(devices)
        self.db_path = db_path
        self.nice = nice  # workers beside a TUI yield the CPU to it, so keys are painted promptly
        self.slots: list[Slot] = []
        self._procs: dict[int, _Process] = {}
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._on_event: OnEvent = lambda event: None
        self._on_died: OnDied = lambda slot, jobs, why, counts: None
        self._loop = None
        self._early_deaths: dict[int, int] = {}  # slot id -> deaths in a row before the worker was ready
        self._start_faults = StartFaults()  # workers that cannot start: the code changed on disk, or they die early

    def start(self, on_event: OnEvent, on_died: OnDied) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._on_event, self._on_died = on_event, on_died
        os.environ[versions.SERVICE_BUILD] = versions.build()  # each worker compares it with its own code's
        for i, device in enumerate(self.devices):
            self._spawn(Slot(i, device))
        self._reader = threading.Thread(target=self._read_events, name="dreamtty-events", daemon=True)
        self._reader.start()

    def alive(self, slot: Slot) -> bool:
        proc = self._procs.get(slot.id)
        return proc is not None and proc.process.is_alive()

    def run(self, slot: Slot, jobs: list[dict]) -> None:
        proc = self._procs[slot.id]
        proc.group = [job["job"] for job in jobs]
        slot.jobs = list(proc.group)  # the service drops each job as it ends
        proc.cancel[:] = [0] * len(proc.cancel)
        proc.jobs.put(jobs)

    def cancel(self, slot: Slot, job: int) -> None:
        proc = self._procs[slot.id]
        if job in slot.jobs:
            proc.cancel[proc.group.index(job)] = job

    def release(self, slot: Slot) -> None:
        slot.models = []
        if self.alive(slot):  # one waiting to be restarted holds nothing
            self._procs[slot.id].jobs.put(RELEASE)

    def log_of(self, slot: Slot) -> str:
        return str(service_log.log_file(f"worker-{slot.id}.log"))

    def status(self) -> dict:
        workers = [slot.status(self.alive(slot)) for slot in self.slots]
        return {"workers": workers, "warnings": self.start_faults()}

    def start_faults(self) -> list[str]:
        return self._start_faults.warnings()

    async def close(self) -> None:
        import asyncio

        self._stop.set()
        for slot in self.slots:
            proc = self._procs[slot.id]
            if proc.starting or proc.process.is_alive():  # one still starting reads it first
                proc.jobs.put(None)
            for job in list(slot.jobs):
                self.cancel(slot, job)
        await asyncio.to_thread(self._join)
        if self._reader is not None:
            self._reader.join(timeout=2)

    # -- internals -------------------------------------------------------------
    def _spawn(self, slot: Slot) -> None:
        """Start a worker for ``slot``, in a thread: a fork server still importing its libraries makes it wait."""
        context = _context()
        with _real_stderr():  # queues and processes may start multiprocessing's resource tracker
            jobs = context.Queue()
            events, sender = context.Pipe(duplex=False)
            cancel = context.Array("q", MAX_COUNT)
            process = context.Process(
                target=_in_service_env,
                args=(dict(os.environ), _folder(), _worker_entry, slot.id, slot.device, jobs, sender, cancel,
                      self.log_of(slot), str(self.db_path), os.getpid(), self.nice),
                name=f"dreamtty-worker-{slot.id}",
                daemon=True,
            )
        proc = self._procs[slot.id] = _Process(process, jobs, events, cancel)
        slot.pid, slot.jobs, slot.models = None, [], []
        if slot not in self.slots:
            self.slots.append(slot)
        threading.Thread(target=self._start, args=(slot, proc, sender), name=f"dreamtty-start-{slot.id}",
                         daemon=True).start()

    def _start(self, slot: Slot, proc: _Process, sender) -> None:
        """Thread: start ``proc``'s process; one that cannot start is reported dead by the reader. The thread
        takes the workers' niceness first: on Linux it is a thread's own, and a fork server started from this
        thread imports at it (a service beside a TUI yields the CPU then, as its workers do)."""
        try:
            if sys.platform.startswith("linux"):
                be_nice(self.nice)
            proc.process.start()
        except Exception as exc:  # the fork server died or cannot fork
            log.warning("worker %s did not start: %s", slot.id, first_line(exc))
        finally:
            sender.close()  # the worker holds the only write end: EOF here means it is gone
            proc.starting = False
        if self._procs.get(slot.id) is proc:
            slot.pid = proc.process.pid

    def _join(self) -> None:
        """Wait for the workers to exit; SIGTERM those still there, then SIGKILL (one stopped or stuck in a
        driver call ignores SIGTERM, and this process waits for its children at exit)."""
        left = _still_alive([proc.process for proc in self._procs.values() if proc.process.pid is not None])
        for process in left:
            process.terminate()
        for process in _still_alive(left):
            process.kill()
        _still_alive(left)

    def _read_events(self) -> None:
        """Thread: move worker events onto the event loop; notice dead workers."""
        while not self._stop.is_set():
            pipes = {p.events: p for s in self.slots if (p := self._procs[s.id]).events is not None}
            for conn in mp_connection.wait(list(pipes), timeout=0.2):
                self._receive(pipes[conn], conn)
            for slot in list(self.slots):
                proc = self._procs[slot.id]
                if not (proc.starting or proc.process.is_alive() or self._stop.is_set() or proc.died_reported):
                    while (conn := proc.events) is not None and conn.poll(0):  # what it sent before it died first
                        self._receive(proc, conn)
                    proc.died_reported = True
                    self._call(self._died, slot, proc.process.exitcode)
            if not pipes:
                self._stop.wait(0.2)

    def _receive(self, proc: _Process, conn) -> None:
        """Thread: one event from ``proc``'s pipe onto the event loop; at the pipe's end (the worker exited), stop
        reading it."""
        try:
            event = loads(conn.recv_bytes())
        except (EOFError, OSError):
            if proc.events is conn:  # unless a restart already replaced it
                proc.events = None
            conn.close()
            return
        except EventError:
            return
        self._call(self._deliver, event)

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed
            self._stop.set()

    def _deliver(self, event: Event) -> None:
        if isinstance(event, WorkerReady):
            self._procs[event.worker].ready = True
            self._early_deaths.pop(event.worker, None)
            self._start_faults.started(event.worker)
            self._add_gpu_workers(event)
        self._on_event(event)

    def _add_gpu_workers(self, event: WorkerReady) -> None:
        """With ``--device auto``, the first worker reports the GPU count; add one worker per extra GPU."""
        if self.devices != ["auto"] or event.worker != 0 or len(self.slots) > 1:
            return
        for n in range(1, event.cuda_count):
            self._spawn(Slot(len(self.slots), f"cuda:{n}"))

    def _died(self, slot: Slot, exitcode) -> None:
        if self._stop.is_set():
            return
        jobs, dead = slot.jobs, self._procs[slot.id]
        dead.retire()
        why, stale = f"worker {exit_text(exitcode)}", exitcode == versions.STALE_EXIT
        if stale:
            why = f"worker {slot.id}: {versions.stale_why()}"
            self._start_faults.cannot(slot.id, why, self._on_event)
        if dead.ready:
            self._spawn(slot)  # first: the service may hand the new worker a job at once
        else:  # it cannot start (a broken install or driver): restart it after a wait, not in a loop
            deaths = self._early_deaths[slot.id] = self._early_deaths.get(slot.id, 0) + 1
            if deaths >= EARLY_DEATHS_SAID and not stale:  # else its queued jobs wait in silence
                self._start_faults.cannot(slot.id, f"worker {slot.id} cannot start: it {exit_text(exitcode)} before "
                                          f"it was ready, {EARLY_DEATHS_SAID} or more times in a row (see "
                                          f"{self.log_of(slot)}); it is started again after growing waits, and "
                                          "queued jobs wait", self._on_event)
            first, longest = RESPAWN_BACKOFF
            slot.jobs = []
            self._loop.call_later(min(longest, first * 2 ** (deaths - 1)), self._respawn, slot)
        self._on_died(slot, jobs, why, not stale)  # a stale worker read no job: they wait for a restart

    def _respawn(self, slot: Slot) -> None:
        if not self._stop.is_set():
            self._spawn(slot)  # its WorkerReady lets the service hand it jobs again


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


def _folder() -> str | None:
    """This process's working folder; None when it was deleted."""
    try:
        return os.getcwd()
    except OSError:
        return None


def _in_service_env(environ: dict[str, str], folder: str | None, entry: Callable, *args) -> None:
    """A worker process starts here: ``entry(*args)`` with the service's environment and working folder of now
    (a fork server's are those of when it started)."""
    os.environ.clear()
    os.environ.update(environ)
    if folder is not None:
        with contextlib.suppress(OSError):  # deleted since: where the fork server is, as spawn would be
            os.chdir(folder)
    entry(*args)


def _worker_entry(*args) -> None:
    if versions.stale_worker():  # before it speaks: see backend.versions (the pool says why)
        sys.exit(versions.STALE_EXIT)
    from backend.worker import worker_main

    worker_main(*args)
