"""Worker process: keeps pipelines loaded and runs jobs of every kind, streaming events.

Started by :class:`backend.pool.ProcessPool` with the multiprocessing *spawn* context; the same functions are the
body of a Ray actor (:mod:`backend.ray_pool`). Torch is imported here, never in the service's process. Each saved
image is recorded in the queue at once, so a job that starts again (after a crash of the service or of this worker)
resumes after it.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from backend import events as ev, service_log, versions
from backend.processes import be_nice, process_exists
from backend.safetext import first_line

PREVIEW_INTERVAL = 0.25  # seconds: at most ~4 previews a second
STEP_INTERVAL = 0.1  # seconds between step events (the last step is always sent)
PARENT_CHECK = 1.0  # seconds an idle worker waits before checking that its service still lives
RELEASE = "release"  # on a worker's job queue: free every pipeline (a training run takes the device)
MODELS_KEPT = 2  # pipelines a worker keeps loaded (the least recently used goes)
RECORD_PATIENCE = 600.0  # seconds a saved image waits for the queue file to take its record; then its job fails
RECORD_RETRY = 2.0  # seconds between tries

log = logging.getLogger("dreamtty.worker")


def _redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr to its log (one over ``service_log.MAX_BYTES`` is moved aside first, as
    after each job), and its log lines."""
    service_log.output_to(log_path)
    service_log.configure()


def _orphan_check(service: int) -> Callable[[], bool]:
    """Whether the service is gone. This process's parent is the service, or the service's fork server, which
    exits with it (``backend.pool``): either way the parent changes when the service dies."""
    parent = os.getppid()
    return lambda: os.getppid() != parent or not process_exists(service)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the worker is."""


TERMINATED_EXIT = 128 + signal.SIGTERM  # as a shell says "ended on SIGTERM"; else it would exit 1, as if it crashed


def _terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler: unwind from wherever the worker is."""
    raise Terminated


def worker_main(worker_id: int, device: str, jobs, events, cancel, log_path: str, db_path: str,
                parent: int, nice: int = 0) -> None:
    """Process entry point: serve jobs from ``jobs`` (lists of payloads: a job or a group) until it yields None
    or the service is gone. ``cancel`` holds at position k the id of the group's job k once it is cancelled.

    ``events`` is this worker's own pipe end: if the process dies mid-write only its pipe is
    spoiled, never another worker's. ``nice`` is set first, so every thread started later inherits it.
    """
    be_nice(nice)  # forked from a fork server at that niceness, it is there already
    _redirect_output(Path(log_path))
    # SIGTERM (`timeout`, `kill -- -PGID` on the command's process group, `kill PID`) ends it as Ctrl-C does,
    # unwinding: what it holds is released (killed outright, it left a semaphore the resource tracker warned of)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        _serve(worker_id, device, jobs, events, cancel, log_path, db_path, parent)
    except Terminated:
        sys.exit(TERMINATED_EXIT)


def _serve(worker_id: int, device: str, jobs, events, cancel, log_path: str, db_path: str, parent: int) -> None:
    """Serve jobs until told to stop or orphaned (see worker_main)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from backend.queue_store import QueueStore

    versions.build()  # the code this worker runs: read before its first job (see changed_on_disk)
    orphaned = _orphan_check(parent)
    cache, cuda_count = pipeline_cache(device)
    send = lambda event: events.send_bytes(ev.dumps(event).encode())  # noqa: E731
    # The service opened and checked the queue; a queue this worker cannot open is a start fault, said before ready.
    output = LocalOutput(QueueStore(Path(db_path), checked=False))
    send(ev.WorkerReady(worker=worker_id, device=str(cache.device), cuda_count=cuda_count))
    while True:
        try:
            job = jobs.get(timeout=PARENT_CHECK)
        except queue.Empty:
            if orphaned():  # the service was killed: nobody reads our events
                return
            continue
        if job is None:
            return
        if job == RELEASE:
            release(worker_id, cache, send)
            continue
        if versions.changed_on_disk():  # upgraded in place: its jobs wait, uncounted, and the pool says why
            sys.exit(versions.STALE_EXIT)
        run_jobs([JobRun(worker_id, payload, cache, send, lambda k=k, i=payload["job"]: cancel[k] == i, output)
                  for k, payload in enumerate(job)])
        service_log.rotate_own(Path(log_path))


def pipeline_cache(device: str):
    """An empty pipeline cache on ``device`` (``auto``: the first GPU, else the CPU), and the CUDA GPU count."""
    import torch

    from backend.engine.loader import PipelineCache

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda:0" if cuda else "cpu"
    return PipelineCache(torch.device(device), MODELS_KEPT), torch.cuda.device_count() if cuda else 0


def free_pipelines(cache) -> int:
    """Evict every pipeline from ``cache`` and give their memory back to the device; how many there were."""
    import gc

    import torch

    freed = 0
    while cache.evict_oldest():
        freed += 1
    gc.collect()  # pipelines hold reference cycles: their tensors go only now
    if cache.device.type == "cuda":
        torch.cuda.empty_cache()
    return freed


def release(worker: int, cache, send) -> None:
    """Free the worker's device for a training run, and say so."""
    freed = free_pipelines(cache)
    send(_models(worker, cache))
    send(ev.WorkerReleased(worker=worker, freed=freed))


@dataclass
class JobRun:
    """One job in this worker: what it asks, and where its events and images go."""

    worker: int
    job: dict  # the queue payload: job, kind, request, out, family, first_image
    cache: object  # backend.engine.loader.PipelineCache
    send: object  # Event -> None
    should_cancel: object  # () -> bool
    output: Output  # where its images go

    def emit(self, cls: type[ev.JobEvent], **data) -> None:
        self.send(cls(job=self.job["job"], worker=self.worker, **data))

    def note(self, message: str) -> None:
        """A line about this job for people (the progress line, the CLI's stderr)."""
        self.emit(ev.Note, message=message)


class Output(Protocol):
    """Where a job's images go: saved in its outputs folder and recorded in the queue at once, so a
    job that starts again (after a crash) resumes after them, then announced (``ImageSaved``)."""

    def save(self, run: JobRun, image, meta: dict, index: int, seed: int) -> None: ...


@dataclass
class LocalOutput:
    """Images saved and recorded by this process (a worker process on the service's machine)."""

    store: object  # backend.queue_store.QueueStore

    def save(self, run: JobRun, image, meta: dict, index: int, seed: int) -> None:
        run.send(save_output(self.store, run.job, run.worker, image, meta, index, seed, run.note))


def save_output(store, job: dict, worker: int, image, meta: dict, index: int, seed: int,
                say: Callable[[str], None] = log.warning) -> ev.ImageSaved:
    """Save image ``index`` of ``job`` (a queue payload) and record it in ``store``; its event."""
    from backend.outputs import save_image

    path = str(save_image(image, meta, Path(job["out"]), tag=store.image_tag(job["job"]),
                          record=lambda saved: record_output(store, job["job"], str(saved), say, job.get("owner"))))
    return ev.ImageSaved(job=job["job"], worker=worker, image=index, path=path, seed=seed)


def record_output(store, job_id: int, path: str, say: Callable[[str], None], owner: str | None = None) -> None:
    """Record a saved image in the queue before anything else: a crash now must not make it again. While the
    queue file takes no writes (another program holds it locked, its disk is full), the job holds still until
    it does, said once, for up to ``RECORD_PATIENCE`` seconds; then it fails, naming the saved image. A job that
    another service took over from ``owner`` meanwhile fails here (JobTaken), its image removed: the new owner
    makes it."""
    from backend.errors import DreamttyError
    from backend.queue_store import JobTaken, QueueDamaged, QueueUnavailable

    deadline, said = time.monotonic() + RECORD_PATIENCE, False
    while True:
        try:
            return store.add_output(job_id, path, owner)
        except JobTaken:
            Path(path).unlink(missing_ok=True)
            raise
        except QueueUnavailable as exc:
            if isinstance(exc, QueueDamaged) or time.monotonic() > deadline:  # a damaged file mends only on restart
                raise DreamttyError(f"{exc}; the image {path} is saved but not recorded") from None
            if not said:
                say(f"{exc}; the job waits until it can record its image")
                said = True
            time.sleep(RECORD_RETRY)


class JobGroup:
    """The jobs a worker runs together: one, or a group of alike jobs (``backend.job_groups``) whose images
    share batches. Each job ends on its own, once: cancelled as soon as its cancel is seen (its group-mates
    go on), done once its last image is handed over; an error ends every job still running."""

    def __init__(self, runs: list[JobRun]) -> None:
        self.runs = runs
        self.ended: set[int] = set()

    @property
    def first(self) -> JobRun:
        return self.runs[0]

    def running(self, run: JobRun) -> bool:
        return run.job["job"] not in self.ended

    def end(self, run: JobRun, cls: type[ev.JobEvent], **data) -> None:
        if self.running(run):
            self.ended.add(run.job["job"])
            run.emit(cls, **data)

    def end_all(self, cls: type[ev.JobEvent], **data) -> None:
        for run in self.runs:
            self.end(run, cls, **data)

    def note(self, message: str) -> None:
        for run in self.runs:
            if self.running(run):
                run.note(message)

    def should_cancel(self, members: list[JobRun]) -> Callable[[], bool]:
        """For a batch of ``members``' images: ends each job of the group whose cancel is seen (those with
        images in later batches too); True (stop the batch) once none of the members runs."""
        def check() -> bool:
            for run in self.runs:
                if self.running(run) and run.should_cancel():
                    self.end(run, ev.Cancelled)
            return not any(self.running(run) for run in members)
        return check


def run_jobs(runs: list[JobRun]) -> None:
    """Run one job, or a group of alike jobs whose images share batches (see :class:`JobGroup`)."""
    import torch

    from backend.errors import DreamttyError

    for run in runs:
        run.emit(ev.Started, first_image=run.job.get("first_image", 0))
    group = JobGroup(runs)
    try:
        _make_images(group)
    except torch.OutOfMemoryError:
        free_pipelines(group.first.cache)
        _report_models(group.first)
        req = group.first.job["request"]
        group.end_all(ev.Failed, error=(
            f"out of memory on {group.first.cache.device} at {req['width']}x{req['height']}: "
            "lower the size or the image count, or set dtype to fp16"
        ))
    except DreamttyError as exc:
        group.end_all(ev.Failed, error=str(exc))
    except Exception as exc:  # a bug or an unexpected library error: one line to the user, details to the log
        log.error("jobs %s failed:\n%s", [run.job["job"] for run in runs], traceback.format_exc())
        group.end_all(ev.Failed, error=f"{type(exc).__name__}: {first_line(exc)}")
    else:
        group.end_all(ev.Done)  # the service adds the paths: those of earlier attempts too


def _report_models(run: JobRun) -> None:
    run.send(_models(run.worker, run.cache))


def _models(worker: int, cache) -> ev.WorkerModels:
    return ev.WorkerModels(worker=worker, models=cache.loaded(), loads=cache.loads)


def _make_images(group: JobGroup) -> None:
    """The group's pipeline (its first job's model, at its speed; none when the request needs no model,
    e.g. a fast upscale) and its jobs' images. A group's jobs share everything but their images' own
    fields (``backend.job_groups.OWN_FIELDS``)."""
    from backend import jobkinds
    from backend.engine import fast
    from backend.engine.extras import apply_extras
    from backend.engine.loader import pick_dtype
    from backend.errors import DreamttyError
    from backend.models import resolve_model

    first = group.first
    kind = jobkinds.get(first.job["kind"])
    requests = [kind.request(run.job["request"]) for run in group.runs]
    request = requests[0]
    make_image = kind.image_function()
    if not request.uses_model:
        _image_loop(group, kind, {run.job["job"]: r for run, r in zip(group.runs, requests)}, None,
                    first.job.get("family", ""), make_image)
        return
    ref = resolve_model(request.model, variants=request.model_variants)
    speed, why = fast.effective_speed(request.speed, first.cache.device)
    if why:
        group.note(why)
    if speed != "default" and any(p.active for p in request.image_prompts):
        speed = "default"  # adapters change the UNet's attention processors and inputs: a compiled one would recompile
        group.note("image prompts run at the default speed (a compiled UNet does not take them)")
    loads = first.cache.loads
    pipe = first.cache.get(ref, pick_dtype(request.dtype, first.cache.device), speed)

    def on_preview(label: str, image) -> None:  # an image prompt's preprocessed map, before sampling
        for run in group.runs:
            run.emit(ev.Preview, image=run.job.get("first_image", 0), width=image.width, height=image.height,
                     rgb=image.convert("RGB").tobytes(), label=label)

    effective = {}  # job -> its request with its extras applied (group-mates differ in their embeddings only)
    for run, job_request in zip(group.runs, requests):
        try:
            effective[run.job["job"]] = apply_extras(pipe, job_request, first.cache, on_preview=on_preview,
                                                     note=group.note)
        except DreamttyError as exc:  # e.g. an embedding its prompt names: this job fails, its group-mates go on
            if len(group.runs) == 1:
                raise
            group.end(run, ev.Failed, error=str(exc))
    if first.cache.loads != loads:
        _report_models(first)
    _image_loop(group, kind, effective, pipe, pipe.dreamtty.family, make_image,
                lambda: fast.compiled_run(pipe, ref.location, first.cache.compiled, group.note))


@dataclass
class _Item:
    """An image to make: its job, its index in the job (None: a batch-mate of an image reproduced, not
    kept) and its per-image request."""

    run: JobRun
    index: int | None
    request: object


def _image_loop(group: JobGroup, kind, requests: dict[int, object], pipe, family_name: str, make_image,
                compiled: Callable[[], AbstractContextManager] = nullcontext) -> None:
    """The images of the group's jobs (``requests``: job id -> its request, for those still running; each from
    its ``first_image``), each handed over as it is made (``_Handover``), in batches of up to ``max_batch``
    where the kind can denoise several at once (``compiled()`` is around each batch); a job is done
    once its last image is handed over. The kind's function gets the pipeline (or None) and the worker's
    device. A batch that runs out of GPU memory is tried again at half its size, from its first unsaved
    image; one whose jobs were all cancelled, or that fails with a one-line error, ends its jobs, and the
    loop goes on with the other jobs' images.
    """
    import torch

    from backend.engine.denoise import Cancelled
    from backend.errors import DreamttyError
    from backend.families import FAMILIES

    family = FAMILIES.get(family_name)
    runs = [(run, requests[run.job["job"]]) for run in group.runs if run.job["job"] in requests]
    if not runs:
        return
    steps = {id(run): _step_events(run, request, family) for run, request in runs}
    hand_over = {}
    for run, request in runs:
        kept, notes = request.keep_inputs_in(Path(run.job["out"]))
        for note in notes:
            run.note(note)
        hand_over[id(run)] = _Handover(run, kind, family_name, kept)
    make, limit = _batch_plan(group, kind, runs[0][1], pipe, make_image)
    todo = [_Item(run, i, per_image) for run, request in runs
            for i, per_image in _images_to_make(request, run.job.get("first_image", 0))]
    _end_finished(group, todo)
    while todo:
        batch = todo[:limit]
        members = list({id(item.run): item.run for item in batch}.values())
        callbacks = _batch_callbacks(batch, todo[len(batch):], steps, limit)
        cancelled = group.should_cancel(members)
        try:
            with compiled():
                made = make(pipe, [item.request for item in batch], on_step=callbacks,
                            should_cancel=cancelled, device=group.first.cache.device)
                for item, (result, record, place) in zip(batch, made):
                    todo.pop(0)
                    cancelled()  # a cancel seen after the last step (while decoding): no image of its job is saved
                    if item.index is not None and group.running(item.run):  # else a mate of the image reproduced
                        hand_over[id(item.run)](item.index, replace(item.request, batch=place), result, record)
                    _end_finished(group, todo)
        except Cancelled:  # every job of the batch was cancelled (each ended as its cancel was seen)
            for run in members:
                group.end(run, ev.Cancelled)
        except DreamttyError as exc:  # e.g. a style file removed since the jobs were queued: this batch's jobs fail
            for run in members:
                group.end(run, ev.Failed, error=str(exc))
        except torch.OutOfMemoryError:
            if len(batch) == 1 or runs[0][1].batch is not None:
                raise
            torch.cuda.empty_cache()
            limit = max(1, len(batch) // 2)
            group.note(f"out of memory with {len(batch)} images at once; trying {limit} at a time")
        todo[:] = [item for item in todo if group.running(item.run)]


def _end_finished(group: JobGroup, todo: list[_Item]) -> None:
    """End (done) each running job of the group with no image left to make."""
    left = {id(item.run) for item in todo}
    for run in group.runs:
        if id(run) not in left:
            group.end(run, ev.Done)


def _batch_callbacks(batch: list[_Item], later: list[_Item], steps: dict, limit: int) -> list:
    """Step callbacks for the images of ``batch``, each from its job's ``_step_events``, which also counts
    the batches still to come with that job's images (``later``: the images after this batch)."""
    callbacks: list = [None] * len(batch)
    for run_id in dict.fromkeys(id(item.run) for item in batch):
        positions = [k for k, item in enumerate(batch) if id(item.run) == run_id]
        rest = sum(id(item.run) == run_id for item in later)
        mine = steps[run_id]([(batch[k].index, batch[k].request) for k in positions], later=-(-rest // limit))
        for k, callback in zip(positions, mine):
            callbacks[k] = callback
    return callbacks


@dataclass
class _Handover:
    """Hands image ``i`` of a job over: saved with its metadata through ``run.output`` (a kind that makes
    text sends it as a ``text`` event instead); the warnings in its record become notes, once per job."""

    run: JobRun
    kind: object  # backend.jobkinds.JobKind
    family: str
    kept: dict[str, str]  # the job's kept input files
    announced: set[str] = field(default_factory=set)

    def __call__(self, i: int, per_image, result, record: dict) -> None:
        from backend import metadata

        for warning in record.get("warnings", []):
            if warning not in self.announced:
                self.announced.add(warning)
                self.run.note(warning)
        if self.kind.output == "text":
            self.run.emit(ev.TextOutput, image=i, text=result)
            return
        if self.kept:
            record["kept_inputs"] = self.kept
        meta = metadata.build(per_image, self.family, record, self.kind.name)
        self.run.output.save(self.run, result, meta, i, per_image.seed)


def _images_to_make(request, first: int) -> list[tuple[int | None, object]]:
    """(image index, per-image request) for images ``first``.. of the job. A request that names the batch its
    image was made in (``reproduce``) makes that whole batch, its mates with index None (not kept)."""
    if request.batch is None:
        return [(i, request.per_image(i)) for i in range(first, request.count)]
    if first > 0:
        return []
    position = request.batch[1]
    return [(0 if k == position else None, mate) for k, mate in enumerate(request.batch_mates())]


def _batch_plan(group: JobGroup, kind, request, pipe, make_image) -> tuple[Callable, int]:
    """The function making a batch of the group's images (one at a time where the kind or its guidance needs
    that, said in a note) and how many images a batch holds at most (``request``: the first job's)."""
    from backend.engine import batching
    from backend.job_groups import one_at_a_time

    make_batch = kind.batch_function()
    if make_batch is None:
        return _one_by_one(make_image), 1
    if request.batch is not None:
        return make_batch, request.batch[0]
    limit = batching.max_batch(request, group.first.cache.device, pipe.unet.dtype)
    why = one_at_a_time(request)
    if limit > 1 and why is not None and request.count - group.first.job.get("first_image", 0) > 1:
        group.note(why)
        limit = 1
    return make_batch, limit


def _one_by_one(make_image) -> Callable:
    """A kind's one-image function as a batch function (of batches of one)."""
    def make(pipe, requests, on_step, should_cancel, device):
        for request, callback in zip(requests, on_step):
            yield (*make_image(pipe, request, on_step=callback, should_cancel=should_cancel, device=device), None)
    return make


def _step_events(run: JobRun, request, family) -> Callable:
    """``on_step(batch, later)``: step callbacks for the images of ``batch`` ((index or None, request) pairs),
    each sending its image's Step events and live previews (at most every STEP_INTERVAL and PREVIEW_INTERVAL);
    ``later`` whole batches are still to come after this one."""
    from backend.engine.denoise import latent_preview

    def on_step(batch: list, later: int) -> list:
        mine = [i for i, _ in batch if i is not None]
        return [None if i is None else callback(i, mine[0], len(mine), later) for i, _ in batch]

    def callback(i: int, first: int, images: int, later: int):
        clock = {"start": time.monotonic(), "step": 0.0, "preview": 0.0}

        def on_image_step(step: int, total: int, latents) -> None:
            now = time.monotonic()
            last = step == total
            if last or now - clock["step"] >= STEP_INTERVAL:
                clock["step"] = now
                rate = step / max(now - clock["start"], 1e-9)
                run.emit(ev.Step, image=i, count=request.count, step=step, total=total, its=rate,
                         eta=(total - step) / rate + later * total / rate, done=first * total + images * step,
                         batch=images)
            if family is not None and not last and now - clock["preview"] >= PREVIEW_INTERVAL:
                clock["preview"] = now
                rgb = latent_preview(latents, family.preview_matrix, family.preview_bias)
                run.emit(ev.Preview, image=i, width=rgb.shape[1], height=rgb.shape[0], rgb=rgb.tobytes())

        return on_image_step

    return on_step
