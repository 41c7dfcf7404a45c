"""Running a job's images in the test process, as a worker would (no worker process, no service)."""

from __future__ import annotations

from pathlib import Path

from backend.queue_store import QueueStore
from backend.worker import JobGroup, JobRun, LocalOutput, _make_images, run_jobs


def worker_images(payload: dict, cache, db: Path, kind: str = "generate",
                  whole: bool = False) -> tuple[list[str], list]:
    """Queue ``payload`` (request, out, ...) in the queue at ``db``, make its images with ``cache`` (a
    PipelineCache); returns the saved paths (as the queue records them) and the events sent. ``whole``:
    run it as a worker does, its errors sent as its Failed event, not raised."""
    store = QueueStore(db)
    job = store.add(kind, payload, "test")
    sent: list = []
    run = JobRun(0, {"job": job, "kind": kind, **payload}, cache, sent.append, lambda: False, LocalOutput(store))
    run_jobs([run]) if whole else _make_images(JobGroup([run]))
    return store.get(job).outputs, sent
