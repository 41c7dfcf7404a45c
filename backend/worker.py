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

from backend import events as ev

PREVIEW_INTERVAL = 0.25  # seconds: at most ~4 previews a second
STEP_INTERVAL = 0.1  # seconds between step events (the last step is always sent)
PARENT_CHECK = 1.0  # seconds an idle worker waits before checking that its service still lives

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
    import torch

    from backend.engine.loader import PipelineCache
    from backend.queue_store import QueueStore

    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    send = lambda event: events.send_bytes(ev.dumps(event).encode())  # noqa: E731
    send(ev.WorkerReady(worker=worker_id, device=device, cuda_count=cuda_count))
    cache = PipelineCache(dev)
    store = QueueStore(Path(db_path))
    while True:
        try:
            job = jobs.get(timeout=PARENT_CHECK)
        except queue.Empty:
            if os.getppid() != parent:  # the service was killed: nobody reads our events
                return
            continue
        if job is None:
            return
        _run_job(JobRun(worker_id, job, cache, send, lambda job_id=job["job"]: cancel.value == job_id, store))


@dataclass
class JobRun:
    """One job in this worker: what it asks, and where its events and images go."""

    worker: int
    job: dict  # the queue payload: job, kind, request, out, family, first_image
    cache: object  # backend.engine.loader.PipelineCache
    send: object  # Event -> None
    should_cancel: object  # () -> bool
    store: object  # backend.queue_store.QueueStore

    def emit(self, cls: type[ev.JobEvent], **data) -> None:
        self.send(cls(job=self.job["job"], worker=self.worker, **data))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _run_job(run: JobRun) -> None:
    import torch

    from backend.engine.denoise import Cancelled
    from backend.errors import DreamttyError

    run.emit(ev.Started, first_image=run.job.get("first_image", 0))
    try:
        paths = _make_images(run)
    except Cancelled:
        run.emit(ev.Cancelled)
    except torch.OutOfMemoryError:
        while run.cache.evict_oldest():
            pass
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
        run.emit(ev.Failed, error=f"{type(exc).__name__}: {_one_line(exc)}")
    else:
        run.emit(ev.Done, paths=paths)


def _report_models(run: JobRun) -> None:
    run.send(ev.WorkerModels(worker=run.worker, models=run.cache.loaded(), loads=run.cache.loads))


def _make_images(run: JobRun) -> list[str]:
    """Images ``first_image``..count-1 of the job, each saved, recorded and announced as it is made."""
    from backend import jobkinds, metadata
    from backend.engine.denoise import latent_preview
    from backend.engine.extras import apply_extras
    from backend.engine.loader import pick_dtype
    from backend.families import FAMILIES
    from backend.models import resolve_model
    from backend.outputs import save_image

    kind = jobkinds.get(run.job["kind"])
    request = kind.request(run.job["request"])
    make_image = kind.image_function()
    loads = run.cache.loads
    pipe = run.cache.get(resolve_model(request.model), pick_dtype(request.dtype, run.cache.device))
    request = apply_extras(pipe, request, run.cache)
    if run.cache.loads != loads:
        _report_models(run)
    family = FAMILIES[pipe.dreamtty_family]
    paths: list[str] = []
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
            if not last and now - clock["preview"] >= PREVIEW_INTERVAL:
                clock["preview"] = now
                rgb = latent_preview(latents, family.preview_matrix, family.preview_bias)
                run.emit(ev.Preview, image=i, width=rgb.shape[1], height=rgb.shape[0], rgb=rgb.tobytes())

        image, record = make_image(pipe, per_image, on_step=on_step, should_cancel=run.should_cancel)
        meta = metadata.build(per_image, pipe.dreamtty_family, record, kind.name)
        path = str(save_image(image, meta, Path(run.job["out"])))
        run.store.add_output(run.job["job"], path)  # before anything else: a crash now must not redo it
        paths.append(path)
        run.emit(ev.ImageSaved, image=i, path=path, seed=per_image.seed)
    return paths
