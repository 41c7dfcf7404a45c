"""Worker process: keeps pipelines loaded and runs jobs of every kind, streaming events.

Started by :class:`backend.pool.ProcessPool` with the multiprocessing *spawn* context. Torch is
imported here, never in the service's process. Each saved image is recorded in the queue at once,
so a job that starts again (after a crash of the service or of this worker) resumes after it.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from backend import events as ev

PREVIEW_INTERVAL = 0.25  # seconds: at most ~4 previews a second
STEP_INTERVAL = 0.1  # seconds between step events (the last step is always sent)
PARENT_CHECK = 1.0  # seconds an idle worker waits before checking that its service still lives
RELEASE = "release"  # on a worker's job queue: free every pipeline (a training run takes the device)

log = logging.getLogger("dreamtty.worker")


def _redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr to a log file so it never draws over the TUI."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def worker_main(worker_id: int, device: str, jobs, events, cancel, log_path: str, db_path: str,
                parent: int, nice: int = 0) -> None:
    """Process entry point: serve jobs from ``jobs`` until it yields None or the service is gone.

    ``events`` is this worker's own pipe end: if the process dies mid-write only its pipe is
    spoiled, never another worker's. ``nice`` is set first, so every thread started later inherits it.
    """
    if nice:
        os.nice(nice)
    _redirect_output(Path(log_path))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from backend.queue_store import QueueStore

    cache, cuda_count = pipeline_cache(device)
    send = lambda event: events.send_bytes(ev.dumps(event).encode())  # noqa: E731
    send(ev.WorkerReady(worker=worker_id, device=str(cache.device), cuda_count=cuda_count))
    output = LocalOutput(QueueStore(Path(db_path)))
    while True:
        try:
            job = jobs.get(timeout=PARENT_CHECK)
        except queue.Empty:
            if os.getppid() != parent:  # the service was killed: nobody reads our events
                return
            continue
        if job is None:
            return
        if job == RELEASE:
            release(worker_id, cache, send)
            continue
        run_job(JobRun(worker_id, job, cache, send, lambda job_id=job["job"]: cancel.value == job_id, output))


def pipeline_cache(device: str):
    """An empty pipeline cache on ``device`` (``auto``: the first GPU, else the CPU), and the CUDA GPU count."""
    import torch

    from backend.engine.loader import PipelineCache

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda:0" if cuda else "cpu"
    return PipelineCache(torch.device(device)), torch.cuda.device_count() if cuda else 0


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
        run.send(save_output(self.store, run.job, run.worker, image, meta, index, seed))


def save_output(store, job: dict, worker: int, image, meta: dict, index: int, seed: int) -> ev.ImageSaved:
    """Save image ``index`` of ``job`` (a queue payload) and record it in ``store``; its event."""
    from backend.outputs import save_image

    path = str(save_image(image, meta, Path(job["out"])))
    store.add_output(job["job"], path)  # before anything else: a crash now must not redo it
    return ev.ImageSaved(job=job["job"], worker=worker, image=index, path=path, seed=seed)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run_job(run: JobRun) -> None:
    import torch

    from backend.engine.denoise import Cancelled
    from backend.errors import DreamttyError

    run.emit(ev.Started, first_image=run.job.get("first_image", 0))
    try:
        _make_images(run)
    except Cancelled:
        run.emit(ev.Cancelled)
    except torch.OutOfMemoryError:
        free_pipelines(run.cache)
        _report_models(run)
        req = run.job["request"]
        run.emit(ev.Failed, error=(
            f"out of memory on {run.cache.device} at {req['width']}x{req['height']}: "
            "lower the size or the image count, or use --dtype fp16"
        ))
    except DreamttyError as exc:
        run.emit(ev.Failed, error=str(exc))
    except Exception as exc:  # a bug or an unexpected library error: one line to the user, details to the log
        log.error("job %s failed:\n%s", run.job["job"], traceback.format_exc())
        run.emit(ev.Failed, error=f"{type(exc).__name__}: {one_line(exc)}")
    else:
        run.emit(ev.Done)  # the service adds the paths: those of earlier attempts too


def _report_models(run: JobRun) -> None:
    run.send(_models(run.worker, run.cache))


def _models(worker: int, cache) -> ev.WorkerModels:
    return ev.WorkerModels(worker=worker, models=cache.loaded(), loads=cache.loads)


def _make_images(run: JobRun) -> None:
    """The job's pipeline (at the job's speed; none when the request needs no model, e.g. a fast
    upscale) and its images."""
    from backend import jobkinds
    from backend.engine import fast
    from backend.engine.extras import apply_extras
    from backend.engine.loader import pick_dtype
    from backend.models import resolve_model

    kind = jobkinds.get(run.job["kind"])
    request = kind.request(run.job["request"])
    make_image = kind.image_function()
    if not request.uses_model:
        _image_loop(run, kind, request, None, run.job.get("family", ""), make_image)
        return
    ref = resolve_model(request.model, variants=request.model_variants)
    speed = fast.effective_speed(request.speed, run.cache.device)
    if speed != request.speed:
        run.note(fast.CPU_NOTE)
    if speed == "fast" and any(p.active for p in request.image_prompts):
        speed = "default"  # adapters change the UNet's attention processors and inputs: a compiled one would recompile
        run.note("image prompts run at the default speed (a compiled UNet does not take them)")
    loads = run.cache.loads
    pipe = run.cache.get(ref, pick_dtype(request.dtype, run.cache.device), speed)

    def on_preview(label: str, image) -> None:  # an image prompt's preprocessed map, before sampling
        run.emit(ev.Preview, image=run.job.get("first_image", 0), width=image.width, height=image.height,
                 rgb=image.convert("RGB").tobytes(), label=label)

    request = apply_extras(pipe, request, run.cache, on_preview=on_preview, note=run.note)
    if run.cache.loads != loads:
        _report_models(run)
    with fast.compiled_run(pipe, ref.location, (request.width, request.height), run.cache.compiled, run.note):
        _image_loop(run, kind, request, pipe, pipe.dreamtty.family, make_image)


def _image_loop(run: JobRun, kind, request, pipe, family_name: str, make_image) -> None:
    """Images ``first_image``..count-1 of the job, each handed to ``run.output`` as it is made (a kind that
    makes text sends it as a ``text`` event instead).

    The kind's image function gets the pipeline (or None) and the worker's device; the warnings in
    the record it returns are announced as notes, once per job.
    """
    from backend import metadata
    from backend.engine.denoise import latent_preview
    from backend.families import FAMILIES

    family = FAMILIES.get(family_name)
    kept = request.keep_inputs_in(Path(run.job["out"]))
    announced: set[str] = set()
    for i in range(run.job.get("first_image", 0), request.count):
        per_image = request.per_image(i)
        clock = {"start": time.monotonic(), "step": 0.0, "preview": 0.0}

        def on_step(step: int, total: int, latents, i=i, clock=clock) -> None:
            now = time.monotonic()
            last = step == total
            if last or now - clock["step"] >= STEP_INTERVAL:
                clock["step"] = now
                rate = step / max(now - clock["start"], 1e-9)
                run.emit(ev.Step, image=i, count=request.count, step=step, total=total, its=rate,
                         eta=(total - step) / rate + (request.count - i - 1) * total / rate)
            if family is not None and not last and now - clock["preview"] >= PREVIEW_INTERVAL:
                clock["preview"] = now
                rgb = latent_preview(latents, family.preview_matrix, family.preview_bias)
                run.emit(ev.Preview, image=i, width=rgb.shape[1], height=rgb.shape[0], rgb=rgb.tobytes())

        result, record = make_image(pipe, per_image, on_step=on_step, should_cancel=run.should_cancel,
                                    device=run.cache.device)
        for warning in record.get("warnings", []):
            if warning not in announced:
                announced.add(warning)
                run.note(warning)
        if kind.output == "text":
            run.emit(ev.TextOutput, image=i, text=result)
            continue
        if kept:
            record["kept_inputs"] = kept
        meta = metadata.build(per_image, family_name, record, kind.name)
        run.output.save(run, result, meta, i, per_image.seed)
