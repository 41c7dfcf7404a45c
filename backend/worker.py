"""Worker process: keeps pipelines loaded and runs generate jobs, streaming events.

Started by :class:`backend.service.Service` with the multiprocessing *spawn*
context. Torch is imported here, never in the service's process.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

PREVIEW_INTERVAL = 0.25  # seconds: at most ~4 previews a second
STEP_INTERVAL = 0.1  # seconds between step events (the last step is always sent)

log = logging.getLogger("dreamtty.worker")


def _redirect_output(log_path: Path) -> None:
    """Send this process's stdout/stderr to a log file so it never draws over the TUI."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")


def worker_main(worker_id: int, device: str, jobs, events, cancel, log_path: str) -> None:
    """Process entry point: serve jobs from ``jobs`` until it yields None.

    ``events`` is this worker's own pipe end: if the process dies mid-write only
    its pipe is spoiled, never another worker's.
    """
    _redirect_output(Path(log_path))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from backend.engine.loader import PipelineCache

    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    events.send({"type": "ready", "worker": worker_id, "device": device, "cuda_count": cuda_count})
    cache = PipelineCache(dev)
    while True:
        job = jobs.get()
        if job is None:
            return
        _run_job(worker_id, job, cache, events, cancel)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _run_job(worker_id: int, job: dict, cache, events, cancel) -> None:
    import torch

    from backend.engine.denoise import Cancelled
    from backend.errors import DreamttyError

    job_id = job["job"]
    emit = lambda kind, **data: events.send({"type": kind, "job": job_id, "worker": worker_id, **data})  # noqa: E731
    emit("started")
    try:
        paths = _generate(job, cache, emit, should_cancel=lambda: cancel.value == job_id)
    except Cancelled:
        emit("cancelled")
    except torch.OutOfMemoryError:
        while cache.evict_oldest():
            pass
        req = job["request"]
        emit("failed", error=(
            f"out of memory on {cache.device} at {req['width']}x{req['height']}: "
            "lower the size or the image count, or use --dtype fp16"
        ))
    except DreamttyError as exc:
        emit("failed", error=str(exc))
    except Exception as exc:  # a bug or an unexpected library error: one line to the user, details to the log
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        emit("failed", error=f"{type(exc).__name__}: {_one_line(exc)}")
    else:
        emit("done", paths=paths)


def _generate(job: dict, cache, emit, should_cancel) -> list[str]:
    from backend import metadata
    from backend.engine.denoise import latent_preview
    from backend.engine.extras import apply_extras
    from backend.engine.generate import generate_image
    from backend.engine.loader import pick_dtype
    from backend.families import FAMILIES
    from backend.models import resolve_model
    from backend.outputs import save_image
    from backend.request import GenerateRequest

    request = GenerateRequest.from_dict(job["request"])
    ref = resolve_model(request.model)
    pipe = cache.get(ref, pick_dtype(request.dtype, cache.device))
    request = apply_extras(pipe, request, cache)
    family = FAMILIES[pipe.dreamtty_family]
    paths: list[str] = []
    for i in range(request.count):
        per_image = request.per_image(i)
        clock = {"start": time.monotonic(), "step": 0.0, "preview": 0.0}

        def on_step(step: int, total: int, latents, i=i, clock=clock) -> None:
            now = time.monotonic()
            last = step == total
            if last or now - clock["step"] >= STEP_INTERVAL:
                clock["step"] = now
                rate = step / max(now - clock["start"], 1e-9)
                emit("step", image=i, count=request.count, step=step, total=total, its=rate,
                     eta=(total - step) / rate + (request.count - i - 1) * total / rate)
            if not last and now - clock["preview"] >= PREVIEW_INTERVAL:
                clock["preview"] = now
                rgb = latent_preview(latents, family.preview_matrix, family.preview_bias)
                emit("preview", image=i, width=rgb.shape[1], height=rgb.shape[0], rgb=rgb.tobytes())

        image, record = generate_image(pipe, per_image, on_step=on_step, should_cancel=should_cancel)
        meta = metadata.build(per_image, pipe.dreamtty_family, record)
        path = str(save_image(image, meta, Path(job["out"])))
        paths.append(path)
        emit("image", image=i, path=path, seed=per_image.seed)
    return paths
