"""The backend service: an asyncio object (no torch) that owns the persistent queue, decides which
job runs on which worker of its pool and when a training run may take its device, and fans typed
events (backend.events) out to subscribers.

Jobs are never lost: a job whose worker dies is retried once from its first unsaved image, then
fails with the reason; jobs of a service that was killed are adopted by the next recovering service
once that service's lease ran out (backend.queue_store). While the queue file takes no writes (another
program holds it locked, its disk is full), what a worker reports waits, in order, and is written
once it does: the queue moves on by itself.

Jobs and training runs share the devices first come, first served: a run waits until no job runs on
its devices, their workers free their pipelines, then its trainer starts; while it trains, those
workers get no job (backend.run_schedule).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from backend import companions, config, jobkinds, locations
from backend.devices import check_cluster_devices, check_devices
from backend.errors import DreamttyError, ModelError, RequestError, ServiceUnavailable
from backend.events import (FINAL_EVENTS, PUBLISHED, Cancelled, Done, Event, Failed, Fanout, Forgotten, JobEvent, Log,
                            Moved, Note, Queued, Retrying, Started, TextOutput, WorkerModels, WorkerReady,
                            WorkerReleased, concerns)
from backend.extras_check import check_extras
from backend.guidance_settings import check_clip_skip
from backend.job_groups import GROUP_SCAN, group_of
from backend.models import refiner_error, resolve_model, text_encoder_depth
from backend.outputs import check_out_dir, settle
from backend.pool import ProcessPool, Slot, WorkerPool
from backend.prompting import check_prompts
from backend.queue_store import (ACTIVE, LEASE_TTL, Job, JobTaken, QueueDamaged, QueueStore, QueueUnavailable,
                                  new_owner_id)
from backend.request import GenerateRequest
from backend.run_schedule import RunStore, ScheduledRun, TrainingRuns, device_label, resolve_devices, withdraw
from backend.training.config import TrainRequest
from backend.training import launch

MAX_RETRIES = 1  # a job whose worker died runs once more, then fails with the reason
LEASE_RENEW = LEASE_TTL / 5  # seconds between heartbeats
RUN_CHECK = 1.0  # seconds between checks that training runs' trainers still live
WRITE_RETRY = 2.0  # seconds between tries to write to a queue file that takes no writes
log = logging.getLogger("dreamtty.service")
T = TypeVar("T")
_LOG_LEVELS = {"warning": logging.WARNING, "error": logging.ERROR}  # a Log event's level -> the service log's


@dataclass(frozen=True)
class Prepared:
    """A checked job, ready for the queue."""

    kind: str
    payload: dict  # request (resolved), out, family


@dataclass(frozen=True)
class PreparedRun:
    """A checked training run, its folder made, ready for the schedule."""

    path: Path
    devices: list[str]
    launcher: str | None
    warnings: list[str]


def make_pool(devices: str, db_path: Path, nice: int = 0, cluster: str | None = None) -> WorkerPool:
    """The service's workers: processes on this machine, or actors on the Ray cluster that ``cluster``
    (``auto``, ``ray://HEAD:10001``, ``HEAD:6379``; ``local``: no cluster) or the config's ``workers`` names."""
    field = "cluster"
    if cluster is None:
        field, cluster = "workers", config.load().cluster
    if cluster in (None, "local"):
        return ProcessPool(devices, db_path, nice)
    from backend.ray_pool import RayPool

    return RayPool(cluster, db_path, gpu=check_cluster_devices(devices) != ["cpu"], field=field)


class Service:
    """Queue + workers. Use ``await start()``, ``subscribe()``, ``await close()``; a job is checked by ``prepare`` (in a
    thread: it reads files) and queued by ``enqueue_in_thread``, as the clients do, or both at once by ``submit``.

    ``recover``: adopt the jobs and training runs of services that died (the TUI and ``dreamtty
    serve`` do; a one-off ``dreamtty generate`` runs only its own). ``workers``: False for a service
    that runs no job (a one-off ``dreamtty train --local``): its pool is never started.
    """

    def __init__(self, devices: str = "auto", db_path: Path | None = None, recover: bool = False,
                 pool: WorkerPool | None = None, nice: int = 0, cluster: str | None = None,
                 workers: bool = True) -> None:
        self.store = QueueStore(db_path or locations.queue_db())
        self.pool = pool or make_pool(devices, self.store.path, nice, cluster)
        self.workers = workers
        self.recover = recover
        self.owner = new_owner_id()
        self._fanout = Fanout()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.started: float | None = None  # Unix time of start()
        self._ready: dict[int, WorkerReady] = {}  # worker -> its last ready event
        self._models: dict[int, WorkerModels] = {}  # worker -> what it holds loaded
        self.training = TrainingRuns(self.store.path, self.owner, self._fanout.publish)
        self._watch: asyncio.Task | None = None
        self._told_waiting: dict[int, int] = {}  # queued job -> the training run it was told it waits for
        self._cancelling: set[int] = set()  # running jobs asked to cancel: they stop after their current step
        self._unwritten: list[Callable[[], None]] = []  # queue writes that wait for the queue file (_when_writable)
        self._write_error: str | None = None  # why they wait, said once
        self._next_try: asyncio.TimerHandle | None = None
        self._active_seen: set[int] = set()  # this service's active jobs at the last _notice_cancelled
        self._ended_here: set[int] = set()  # jobs this service ended since then
        self._thread_store: QueueStore | None = None  # _write_in_thread's connection, one write at a time
        self._thread_lock = threading.Lock()

    @property
    def slots(self) -> list[Slot]:
        return self.pool.slots

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.started = time.time()
        self.store.renew_lease(self.owner)
        if self.recover:
            self.store.adopt_orphans(self.owner)
            self.training.store.adopt_orphans(self.owner)
            self.training.check()  # an adopted run whose trainer ended meanwhile holds no device
        if self.workers:
            self.pool.start(self._handle, self._worker_died)
        self._heartbeat = threading.Thread(target=self._keep_lease, name="dreamtty-lease", daemon=True)
        self._heartbeat.start()
        self._watch = asyncio.create_task(self._watch_others())
        self._dispatch()

    def _keep_lease(self) -> None:
        """Thread: renew this service's lease (a busy event loop must not lose it), adopt orphans. A database
        error (locked past its timeout, a full disk, a damaged file: opening it too) is logged and the next round
        tries again."""
        store: QueueStore | None = None
        run_store: RunStore | None = None
        try:
            while not self._closing.wait(LEASE_RENEW):
                try:
                    store = store or QueueStore(self.store.path, checked=False)
                    run_store = run_store or RunStore(self.store.path)
                    store.renew_lease(self.owner)
                    jobs = store.adopt_orphans(self.owner) if self.recover else []
                    runs = run_store.adopt_orphans(self.owner) if self.recover else []
                except (sqlite3.Error, DreamttyError) as exc:
                    log.warning("cannot renew this service's lease: %s", exc)
                    continue
                for what, ids in (("jobs", jobs), ("training runs", runs)):
                    if ids:  # said: a job it took over is not made twice, yet its images may come from two processes
                        log.info("took over %s %s of a service whose lease ran out", what, ", ".join(map(str, ids)))
                if jobs or runs:
                    self._loop.call_soon_threadsafe(self._take_adopted, jobs)
        except RuntimeError:  # the loop closed under us
            pass
        finally:
            for opened in (store, run_store):
                if opened is not None:
                    opened.close()

    def _take_adopted(self, jobs: list[int]) -> None:
        """Run what was adopted: end the adopted runs whose trainer is gone, then dispatch. The adopted jobs are
        watched for a cancel from now on (see ``_queued``)."""
        self._active_seen.update(jobs)
        self.training.check()
        self._dispatch()

    async def _watch_others(self) -> None:
        """Task: notice trainers that ended (their devices take jobs again), and jobs of this service that another
        process cancelled in the queue."""
        while True:
            await asyncio.sleep(RUN_CHECK)
            for what, check in (("training runs", self._notice_ended_runs), ("cancelled jobs", self._notice_cancelled)):
                try:
                    check()
                except (OSError, sqlite3.Error, QueueUnavailable) as exc:  # e.g. the queue's disk is full: next time
                    log.error("checking %s: %s", what, exc)

    def _notice_ended_runs(self) -> None:
        """A trainer that ended frees its devices for jobs. A run of this service that waits is tried again each
        time: the run it waits for may be another process's, whose end is seen only so (a --local train queued
        behind another waited for ever)."""
        if self.training.check() or self.training.waiting():
            self._dispatch()

    def _notice_cancelled(self) -> None:
        """Act on what another process cancelled in the queue (``dreamtty cancel`` of a job that a ``--local``
        command runs): a running job stops after its step, a queued one ends for whoever follows it."""
        active = self.store.states(ACTIVE, owner=self.owner)
        running = {job_id: slot for slot in self.slots for job_id in slot.jobs}
        left = (self._active_seen | running.keys()) - active.keys() - self._ended_here
        states = self.store.states_of(left) if left else {}
        self._active_seen, self._ended_here = set(active), set()
        for job_id, state in states.items():
            if state != "cancelled":
                continue
            if job_id not in running:
                self._ended_cancelled(job_id)
            elif job_id not in self._cancelling:
                self._cancelling.add(job_id)
                self.pool.cancel(running[job_id], job_id)

    async def close(self, cancel_jobs: bool = False) -> None:
        """Stop workers. This service's jobs still queued or running stay queued for the next
        start, or end as cancelled with ``cancel_jobs`` (the user interrupted them)."""
        self._closing.set()
        if self._watch is not None:
            self._watch.cancel()
        try:
            if cancel_jobs:  # at once: a second Ctrl-C may cut the rest of close short
                self._end_active("cancelled")
            if self.workers:
                await self.pool.close()
            self._write_unwritten()
            self._end_active("cancelled" if cancel_jobs else "queued")  # events handled meanwhile may have changed them
        except QueueUnavailable as exc:  # what stays running is adopted, and queued again, by the next service
            log.error("%s; this service's jobs are left as they are", exc)
        if self._next_try is not None:
            self._next_try.cancel()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=2)
        with contextlib.suppress(QueueUnavailable):  # its lease runs out by itself
            self.store.drop_lease(self.owner)  # what stays queued is adopted by the next recovering service
        self.store.close()
        if self._thread_store is not None and self._thread_lock.acquire(blocking=False):  # else a submission waits
            self._thread_store.close()  # for a locked queue file: it closes its connection when it is done
            self._thread_lock.release()
        self.training.close()  # runs keep training; waiting ones start with the next recovering service

    def _end_active(self, state: str) -> None:
        """End this service's queued and running jobs as ``state``; those asked to cancel as cancelled."""
        for job in self.store.jobs(ACTIVE, owner=self.owner):
            end = "cancelled" if job.id in self._cancelling else state
            if job.state != end:
                self.store.set_state(job.id, end, owner=self.owner)

    # -- API ---------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> tuple[GenerateRequest, str]:
        """Resolve the model and validate the request; raises a one-line DreamttyError.

        A request that loads no model (a fast upscale, describe) is not refused for a model it does not use, nor
        for a reference that changes nothing (weight or stop 0: recorded as given).
        """
        if not request.uses_model:
            resolved = request.resolved(self._family_or_default(request.model))
            if any(prompt.active for prompt in resolved.image_prompts):
                raise RequestError("image_prompt", f"{request.no_model}, so reference images cannot steer it; leave "
                                                   "them out")
            return resolved, ""
        ref = resolve_model(request.model, variants=request.model_variants)
        if ref.family == "sdxl-refiner":  # refused here, not when its worker loads it
            raise refiner_error(request.model)
        family = ref.family if ref.family != "unknown" else "sdxl"
        resolved = request.resolved(family)
        depth = text_encoder_depth(ref)
        if depth is not None:  # else the worker finds it, later
            check_clip_skip(resolved.guidance.clip_skip, depth)
        check_prompts(resolved)
        check_extras(resolved, ref.family)
        companions.plan(resolved.image_prompts, ref.family)
        return resolved, ref.family

    @staticmethod
    def _family_or_default(model: str) -> str:
        """The model's family for the request's defaults, "sdxl" when it cannot be told."""
        try:
            family = resolve_model(model, variants=("inpaint",)).family
        except ModelError:
            return "sdxl"
        return family if family != "unknown" else "sdxl"

    def prepare(self, request: GenerateRequest, out_dir: Path | None = None) -> Prepared:
        """Everything ``submit`` checks (model, fields, prompts, extras, the output folder): the slow,
        file-reading part, safe to run in a thread. Raises a one-line DreamttyError."""
        kind = jobkinds.kind_of(request)
        resolved, family = self.validate(request)
        cfg = config.load()
        out = Path(out_dir) if out_dir else cfg.outputs_dir()
        try:
            check_out_dir(out)
        except DreamttyError as exc:
            raise exc if out_dir else cfg.outputs_error(exc) from None
        return Prepared(kind.name, {"request": resolved.to_dict(), "out": str(out), "family": family})

    def enqueue(self, prepared: Prepared) -> int:
        """Queue a prepared job; returns its id."""
        return self._queued(self.store.add(prepared.kind, prepared.payload, self.owner), prepared)

    async def enqueue_in_thread(self, prepared: Prepared) -> int:
        """:meth:`enqueue`, written off the event loop (:meth:`_write_in_thread`)."""
        job_id = await self._write_in_thread(lambda store: store.add(prepared.kind, prepared.payload, self.owner),
                                             "queue the job again once it runs")
        return self._queued(job_id, prepared)

    async def _write_in_thread(self, write: Callable[[QueueStore], T], again: str) -> T:
        """``write`` run off the event loop on a connection of its own, one at a time: while another program holds
        the queue file locked, this call waits (then QueueUnavailable), not every client of the service. ``again``:
        what to do when the service is stopping."""
        def run() -> T:
            with self._thread_lock:
                if self._closing.is_set():
                    raise ServiceUnavailable(f"service: it is stopping; {again}")
                if self._thread_store is None:
                    self._thread_store = QueueStore(self.store.path, checked=False)
                try:
                    return write(self._thread_store)
                finally:
                    if self._closing.is_set():  # close() found it writing: its connection goes now
                        self._thread_store.close()

        return await asyncio.to_thread(run)

    def _queued(self, job_id: int, prepared: Prepared) -> int:
        """Say that ``job_id`` was queued (and why it waits, when no worker can start); hand out work. It is
        watched for a cancel by another process from now on: one before the next check was missed (``left`` in
        ``_notice_cancelled``), and its followers waited for ever."""
        self._active_seen.add(job_id)
        self._fanout.publish(Queued(job=job_id, kind=prepared.kind, request=prepared.payload["request"]))
        ready = any(slot.id in self._ready and self.pool.alive(slot) for slot in self.slots)
        if not ready and (faults := self.pool.start_faults()):  # said once, when it began: maybe before this client
            self._fanout.publish(Note(job=job_id, message=f"waiting: {faults[0]}"))
        self._dispatch()
        return job_id

    def submit(self, request: GenerateRequest, out_dir: Path | None = None) -> int:
        """Validate and queue a request of any kind; returns the job id. Nothing is queued on error."""
        return self.enqueue(self.prepare(request, out_dir))

    def prepare_run(self, request: TrainRequest, devices: str = "auto", launcher: str | None = None,
                    runs_root: Path | None = None) -> PreparedRun:
        """Check a training run and make its folder (``backend.training.launch.prepare_run``): the slow,
        file-reading part, safe to run in a thread. ``devices``: what it trains on, as ``--device``
        (``auto``: the device of the first worker). Raises a one-line DreamttyError."""
        check_devices(devices)  # a GPU this machine lacks is refused before anything is made
        chosen = resolve_devices(devices, self._first_device())
        launch.trainer_command(Path("."), launcher)  # a launcher that cannot be split is refused before anything is made
        prepared = launch.prepare_run(request, runs_root, chosen)
        return PreparedRun(prepared.run_dir, chosen, launcher, prepared.warnings)

    async def prepare_run_in_thread(self, request: TrainRequest, devices: str = "auto", launcher: str | None = None,
                                    runs_root: Path | None = None) -> PreparedRun:
        """:meth:`prepare_run` off the event loop. Cancelled meanwhile (Ctrl-C, a client that hung up),
        the folder it makes is recorded "stopped", not left "starting" (which refuses a retry)."""
        preparing = asyncio.ensure_future(asyncio.to_thread(self.prepare_run, request, devices, launcher, runs_root))
        try:
            return await asyncio.shield(preparing)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # e.g. its settings were refused: no folder was made
                withdraw((await preparing).path, "interrupted before it started")
            raise

    def enqueue_run(self, prepared: PreparedRun, client_ref: str | None = None) -> ScheduledRun:
        """Queue a prepared run; it starts at once when its devices are free."""
        run = self.training.add(prepared.path, prepared.devices, prepared.launcher, client_ref)
        self._dispatch()
        return self.training.get(run.id)

    def stop_run(self, run_id: int) -> bool:
        """Stop a run (a waiting one is taken off the queue). False when it had ended or is unknown."""
        stopped = self.training.stop(run_id)
        self._dispatch()
        return stopped

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued or running job. Returns False when it is not active."""
        job = self.store.get(job_id)
        if job is None or job.state not in ACTIVE:
            return False
        slot = self._slot_of(job_id)
        if slot is not None:
            self._cancelling.add(job_id)
            self.pool.cancel(slot, job_id)
            return True
        self.store.set_state(job_id, "cancelled")
        self._ended_cancelled(job_id)
        return True

    def cancel_all(self) -> list[int]:
        """Cancel every queued job (in one write) and every running one; the ids of those cancelled."""
        queued = self.store.cancel_queued()
        for job_id in queued:
            self._ended_cancelled(job_id)
        return queued + [job_id for job_id in self.store.states(("running",)) if self.cancel(job_id)]

    def _ended_cancelled(self, job_id: int) -> None:
        """Say that ``job_id``, written as cancelled, ended so."""
        self._forget_active(job_id)
        self._fanout.publish(Cancelled(job=job_id))

    def _forget_active(self, job_id: int) -> None:
        """``job_id`` ended here: it no longer waits or stops (and its end is not news to _notice_cancelled)."""
        self._ended_here.add(job_id)
        self._told_waiting.pop(job_id, None)
        self._cancelling.discard(job_id)

    async def forget_ended(self, days: int) -> int:
        """Forget the jobs that ended more than ``days`` days ago (their images stay on disk); how many. Deleted
        off the event loop (:meth:`_write_in_thread`)."""
        before = time.time() - days * 86400
        count = await self._write_in_thread(lambda store: store.forget_ended(before), "forget them once it runs")
        if count:
            self._fanout.publish(Forgotten(count=count))
        return count

    def jobs(self, limit: int = 200, states: tuple[str, ...] | None = None, with_images: bool = False) -> list[Job]:
        return self.store.jobs(states, limit=limit, with_images=with_images)

    def active_jobs(self) -> list[Job]:
        """This service's queued and running jobs, newest first."""
        return self.store.jobs(ACTIVE, owner=self.owner)

    def status(self) -> dict:
        """This process, its workers (device, node, job, loaded models), the pool's own facts (a cluster's
        address and nodes) and the length of its queue, as JSON."""
        counts = self.store.counts(self.owner)
        workers = []
        held = self.training.holding()
        for slot in self.slots:
            ready, models = self._ready.get(slot.id), self._models.get(slot.id)
            run = held.get(self._device_of(slot))
            workers.append({"id": slot.id, "device": ready.device if ready else slot.device, "pid": slot.pid,
                            "node": slot.node, "ready": ready is not None and self.pool.alive(slot), "job": slot.job,
                            "jobs": list(slot.jobs), "models": models.models if models else [],
                            "loads": models.loads if models else 0,
                            "training": run.id if run else None})
        pool = {key: value for key, value in self.pool.status().items() if key != "workers"}
        return {**pool, "pid": os.getpid(), "started": self.started,
                "uptime": time.time() - self.started if self.started else 0.0, "workers": workers,
                "queued": counts["queued"], "running": counts["running"],
                "runs": {"training": len({run.id for run in held.values()}), "waiting": len(self.training.waiting())}}

    def subscribe(self, overrun: Callable[[], None] | None = None) -> asyncio.Queue:
        """A queue of every event from now on (``overrun``: see ``Fanout.subscribe``)."""
        return self._fanout.subscribe(overrun)

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._fanout.unsubscribe(q)

    async def wait(self, job_id: int, events: asyncio.Queue | None = None):
        """Yield the events of one job until it ends (done, failed or cancelled)."""
        q = events or self.subscribe()
        try:
            while True:
                event = await q.get()
                if not concerns(event, job_id):
                    continue
                yield event
                if isinstance(event, FINAL_EVENTS):
                    return
        finally:
            if events is None:
                self.unsubscribe(q)

    # -- internals -----------------------------------------------------------
    def _slot_of(self, job_id: int) -> Slot | None:
        return next((s for s in self.slots if job_id in s.jobs), None)

    def _device_of(self, slot: Slot) -> str | None:
        """The device of ``slot``'s worker as training runs name it; None for a worker on a Ray node (Ray
        hands out its GPUs itself: runs on this machine do not share them)."""
        if slot.node is not None:
            return None
        ready = self._ready.get(slot.id)
        device = ready.device if ready else slot.device
        return resolve_devices(device, None)[0]  # a worker not ready yet on "auto" takes the first GPU, else the CPU

    def _first_device(self) -> str | None:
        return next((d for slot in self.slots if (d := self._device_of(slot))), None)

    def _dispatch(self) -> None:
        """Share the workers' devices between this service's queued jobs and waiting training runs,
        first come first served.

        A job goes to an idle worker whose device no run holds or waits for, one that has its model
        loaded when there is one (``pick_slot``), and resumes after its saved images. A run starts
        when no job runs on its devices and no older run holds or waits for them; until then it
        reserves them, so newer jobs do not keep it waiting.
        """
        if self._unwritten:  # after the queue writes that wait for the queue file
            if self._unwritten[-1] != self._share_devices:
                self._unwritten.append(self._share_devices)
            return
        try:
            self._share_devices()
        except QueueUnavailable as exc:
            self._unwritten.append(self._share_devices)
            self._try_later(exc)

    def _share_devices(self) -> None:
        if self._closing.is_set():
            return
        reserved = self.training.holding()  # device -> the run that holds it, or waits for it first
        busy = {device: slot.job for slot in self.slots if slot.jobs and (device := self._device_of(slot))}
        idle = [slot for slot in self.slots if not slot.jobs and self.pool.alive(slot)]
        runs = self.training.waiting()
        job = self.store.next_queued(self.owner)
        while job is not None or runs:
            if job is not None and (not runs or job.created <= runs[0].created):
                free = [slot for slot in idle if self._device_of(slot) not in reserved]
                if not free:
                    self._tell_waiting(reserved)
                    job = None  # first come first served: newer jobs wait too
                    continue
                slot = pick_slot(free, job.request.get("model", ""))
                idle.remove(slot)
                # the last free worker also takes the queued jobs alike to this one, as one group
                self._run_jobs(slot, self._group(job, runs) if len(free) == 1 else [job])
                if (device := self._device_of(slot)) is not None:
                    busy[device] = job.id
                job = self.store.next_queued(self.owner)
                continue
            run = runs.pop(0)
            blockers = [f"{device_label(d)}: training run {reserved[d].name}" if d in reserved
                        else f"{device_label(d)}: job {busy[d]} is running" for d in run.devices
                        if d in reserved or d in busy]
            for device in run.devices:
                reserved.setdefault(device, run)
            if blockers:
                self.training.wait(run, "; ".join(blockers))
                continue
            workers = {s.id: d for s in self.slots if (d := self._device_of(s)) in run.devices and self._holds_models(s)}
            slots = {slot.id: slot for slot in self.slots}
            if self.training.begin(run, workers, lambda worker: self.pool.release(slots[worker])):
                self._dispatch()  # it could not start: its devices are free for the jobs and runs after it
                return

    def _holds_models(self, slot: Slot) -> bool:
        """Whether ``slot``'s worker may hold a pipeline: one it reported, or a job's model since it started
        or last freed its device (a job that failed while loading may not have reported its model)."""
        reported = self._models.get(slot.id)
        return self.pool.alive(slot) and slot.id in self._ready and bool(slot.models or (reported and reported.models))

    def _group(self, first: Job, runs: list[ScheduledRun]) -> list[Job]:
        """``first`` and the queued jobs that may share its batches (``backend.job_groups``); none newer than a
        waiting training run, which comes first."""
        before = runs[0].created if runs else float("inf")
        oldest = self.store.jobs(("queued",), owner=self.owner, limit=GROUP_SCAN, oldest_first=True)
        return group_of(first, [job for job in oldest if job.created <= before])

    def _run_jobs(self, slot: Slot, jobs: list[Job]) -> None:
        jobs = [self._settled(job) for job in jobs]  # an adopted job resumes after every image it saved
        taken = self.store.set_running([job.id for job in jobs], self.owner)
        jobs = [job for job in jobs if job.id in taken]
        if not jobs:
            return
        slot.loads(jobs[0].request.get("model", ""))
        self.pool.run(slot, [{"job": job.id, "kind": job.kind, **job.payload, "first_image": len(job.outputs),
                              "owner": self.owner} for job in jobs])

    def _tell_waiting(self, reserved: dict[str, ScheduledRun]) -> None:
        """When training runs hold every worker's device, tell each queued job, once per run, that it waits for one."""
        devices = [d for slot in self.slots if self.pool.alive(slot) and (d := self._device_of(slot)) is not None]
        if not devices or any(d not in reserved for d in devices):
            return
        device = devices[0]
        run = reserved[device]
        for job in self.store.jobs(("queued",), owner=self.owner):
            if self._told_waiting.get(job.id) != run.id:
                self._told_waiting[job.id] = run.id
                self._fanout.publish(Note(job=job.id, message=f"waiting for {device_label(device)}: "
                                                              f"training run {run.name}"))

    def _handle(self, event: Event) -> None:
        """A worker's event: one that ends or starts a job is written to the queue first, then published."""
        if isinstance(event, TextOutput):  # kept with the job, so a client that was away reads it back
            self._when_writable(partial(self._record_text, event))
            return
        if isinstance(event, (*FINAL_EVENTS, Started)):
            if isinstance(event, Started):
                slot = self._slot_of(event.job)
                if slot is None or slot.id != event.worker:
                    return  # from a worker that died since: the job is queued again, or ended
            self._when_writable(partial(self._record, event))
            return
        if isinstance(event, WorkerReady):
            self._ready[event.worker] = event
            self._models.pop(event.worker, None)  # a restarted worker holds nothing yet
        elif isinstance(event, WorkerModels):
            self._models[event.worker] = event
        elif isinstance(event, Log):  # a pool's: why a worker cannot start
            self._say(event.message, event.level)
            return
        self._fanout.publish(event)
        # a worker that holds no pipeline lets a run start on its device; one that cannot start frees it again
        freed = isinstance(event, (WorkerReady, WorkerReleased)) and self.training.released(event.worker)
        if freed or isinstance(event, WorkerReady):
            self._dispatch()

    def _record(self, event: JobEvent) -> None:
        """Write a job's start or end to the queue, then publish it. A job another service adopted meanwhile
        (this one renewed no lease) is not written over: its followers here are told it went there."""
        if isinstance(event, Started):
            if self.store.set_state(event.job, "running", owner=self.owner):
                self._fanout.publish(event)
            return
        if not self.store.set_state(event.job, event.type, getattr(event, "error", None), self.owner):
            event = Moved(job=event.job, worker=event.worker, message=str(JobTaken(event.job)))
        elif isinstance(event, Done):  # with the images saved before a restart or a retry
            event = replace(event, paths=self.store.get(event.job).outputs)
        self._forget_active(event.job)
        slot = self._slot_of(event.job)
        if slot is not None and slot.id == event.worker:
            slot.jobs.remove(event.job)
        self._fanout.publish(event)
        self._dispatch()

    def _record_text(self, event: TextOutput) -> None:
        """Keep a job's text with it, then publish it."""
        self.store.add_text(event.job, event.image, event.text)
        self._fanout.publish(event)

    def _when_writable(self, write: Callable[[], None]) -> None:
        """Run ``write`` (queue writes first, then what follows from them) now or, while the queue file takes no
        writes, once it does: in order, tried again every ``WRITE_RETRY`` seconds, said once."""
        self._unwritten.append(write)
        if len(self._unwritten) == 1:
            self._write_unwritten()

    def _write_unwritten(self) -> None:
        """Run the waiting writes in order; the first that fails waits for the next try, and those after it."""
        while self._unwritten:
            try:
                self._unwritten[0]()
            except QueueUnavailable as exc:
                if self._closing.is_set():
                    raise
                self._try_later(exc)
                return
            except Exception:  # a fault of its own (a row no version of dreamtty wrote): the writes after it go on
                log.exception("queue: a write failed; the writes after it go on")
            self._unwritten.pop(0)
        if self._write_error is not None:
            self._write_error = None
            self._say(f"queue: {self.store.path} takes writes again; the jobs go on", "info")

    def _try_later(self, exc: QueueUnavailable) -> None:
        """Say why the queue writes wait (once), and try them again in ``WRITE_RETRY`` seconds."""
        if self._write_error != str(exc):
            self._write_error = str(exc)
            # a damaged file takes writes again only once a service repaired it: its message says so
            waits = "" if isinstance(exc, QueueDamaged) else ("; the jobs' states are written when it can be, and "
                                                              "the queue goes on then")
            self._say(f"{exc}{waits}", "warning")
        self._next_try = self._loop.call_later(WRITE_RETRY, self._write_unwritten)

    def _say(self, message: str, level: str) -> None:
        event = Log(message=message, level=level)
        log.log(_LOG_LEVELS.get(level, logging.INFO), "%s", message, extra={PUBLISHED: event.tells_waiters()})
        self._fanout.publish(event)

    def _worker_died(self, slot: Slot, job_ids: list[int], why: str, counts: bool) -> None:
        """A worker died (it was restarted): retry each of its jobs once from its first unsaved image, then fail
        (one asked to cancel ends cancelled). A death that does not ``count`` as an attempt (a worker of code
        changed on disk refused them) queues them again, to wait for a restart."""
        self._models.pop(slot.id, None)  # its pipelines died with it
        self._ready.pop(slot.id, None)  # its replacement is starting
        self._when_writable(partial(self._retry_jobs, job_ids, why, counts, self.pool.log_of(slot)))

    def _retry_jobs(self, job_ids: list[int], why: str, counts: bool, log: str) -> None:
        for job_id in job_ids:
            job = self.store.get(job_id)
            if self._closing.is_set() or job is None:
                continue
            if job.state == "cancelled" and job_id in self._cancelling:  # another process cancelled it (and the
                self._ended_cancelled(job_id)  # worker died before it stopped): it ends so for its followers
            if job.owner != self.owner:  # adopted by another service while this one renewed no lease: it runs there
                self._forget_active(job.id)
                self._fanout.publish(Moved(job=job.id, message=str(JobTaken(job.id))))
                continue
            if job.state != "running":
                continue
            job = self._settled(job)
            if job.id in self._cancelling:  # it was to stop anyway: not run again
                self.store.set_state(job.id, "cancelled", owner=self.owner)
                self._ended_cancelled(job.id)
            elif not counts:
                self.store.set_state(job.id, "queued", owner=self.owner)
            elif job.attempts < MAX_RETRIES:
                self.store.retry(job.id, self.owner)
                self._fanout.publish(Retrying(job=job.id, error=why, first_image=len(job.outputs)))
            else:
                error = f"{why}, {job.attempts + 1} times; the queue goes on (see {log})"
                self.store.set_state(job.id, "failed", error, self.owner)
                self._fanout.publish(Failed(job=job.id, error=error))
        self._dispatch()

    def _settled(self, job: Job) -> Job:
        """``job`` with the images recorded that its worker saved but was killed before recording (else they
        would be made again: see ``backend.outputs.settle``)."""
        try:
            recorded = settle(Path(job.payload.get("out", "")), self.store.image_tag(job.id),
                              lambda path: self.store.add_output(job.id, str(path), self.owner))
        except JobTaken:  # its new owner settles it; set_running leaves it out
            return job
        return self.store.get(job.id) if recorded else job


def pick_slot(idle: list[Slot], model: str) -> Slot:
    """The idle slot for a job of ``model``: one whose worker has it loaded, else one that has none
    loaded (other models stay where they are), else the first."""
    return (next((s for s in idle if model in s.models), None) or next((s for s in idle if not s.models), None)
            or idle[0])
