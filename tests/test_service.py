"""The service with real worker processes: events, files, cancel, crashes, restarts."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
from PIL import Image

from backend import metadata
from backend.queue_store import QueueStore
from backend.request import GenerateRequest
from backend.service import Service, _Worker

TIMEOUT = 120


async def _collect(service, job_id, events):
    out = []
    async for event in service.wait(job_id, events):
        out.append(event)
    return out


@pytest.fixture
def db(tmp_path):
    return tmp_path / "queue.sqlite3"


@pytest.fixture
async def running(db, demo_dirs):
    """A started CPU service and its event subscription; closed after the test."""
    service = Service(devices="cpu", db_path=db)
    events = service.subscribe()
    await service.start()
    yield service, events
    await service.close()


async def test_generate_streams_events_and_saves_png(running, db, tmp_path):
    service, events = running
    req = GenerateRequest(prompt="a red fox", seed=5, count=2, steps=6, sampler="euler")
    job = service.submit(req, tmp_path / "out")
    seen = await asyncio.wait_for(_collect(service, job, events), TIMEOUT)
    kinds = [e["type"] for e in seen]
    assert kinds[:2] == ["queued", "started"] and kinds[-1] == "done"
    assert kinds.count("image") == 2
    steps = [e for e in seen if e["type"] == "step"]
    assert steps[-1]["step"] == steps[-1]["total"] == 6
    previews = [e for e in seen if e["type"] == "preview"]
    for p in previews:  # 128px image -> 16x16 latent preview
        assert len(p["rgb"]) == p["width"] * p["height"] * 3 == 16 * 16 * 3
    paths = [e["path"] for e in seen if e["type"] == "image"]
    seeds = [metadata.read(p)["request"]["seed"] for p in paths]
    assert seeds == [5, 6]
    pixels = [np.asarray(Image.open(p)) for p in paths]
    assert pixels[0].shape == (128, 128, 3) and np.abs(pixels[0].astype(int) - pixels[1]).max() > 0
    store = QueueStore(db)
    assert store.get(job).state == "done" and store.get(job).outputs == paths


async def test_cancel_running_and_queued(running, db, tmp_path):
    service, events = running
    long = service.submit(GenerateRequest(prompt="x", steps=400, seed=1), tmp_path)
    queued = service.submit(GenerateRequest(prompt="y", steps=4, seed=1), tmp_path)
    assert service.cancel(queued)
    async for event in service.wait(long, events):
        if event["type"] == "step":
            service.cancel(long)
    last = event
    after = service.submit(GenerateRequest(prompt="z", steps=2, seed=1), tmp_path)
    final = (await asyncio.wait_for(_collect(service, after, events), TIMEOUT))[-1]
    assert not service.cancel(after)  # finished jobs cannot be cancelled
    assert last["type"] == "cancelled"
    assert final["type"] == "done"
    store = QueueStore(db)
    assert [store.get(j).state for j in (long, queued, after)] == ["cancelled", "cancelled", "done"]
    assert store.get(long).outputs == []  # nothing decoded or saved for the cancelled job


async def test_killed_worker_fails_job_and_queue_goes_on(running, db, tmp_path):
    service, events = running
    doomed = service.submit(GenerateRequest(prompt="x", steps=400, seed=1), tmp_path)
    survivor = service.submit(GenerateRequest(prompt="y", steps=3, seed=2), tmp_path)
    async for event in service.wait(doomed, events):
        if event["type"] == "step":
            os.kill(service.workers[0].process.pid, signal.SIGKILL)
    failed = event
    done = (await asyncio.wait_for(_collect(service, survivor, events), TIMEOUT))[-1]
    assert failed["type"] == "failed" and "worker crashed" in failed["error"]
    assert done["type"] == "done"
    assert QueueStore(db).get(doomed).state == "failed"


def _dead_pid() -> int:
    proc = mp.get_context("spawn").Process(target=int)
    proc.start()
    proc.join()
    return proc.pid


async def test_queue_survives_restart(db, tmp_path, demo_dirs):
    # A previous app queued two jobs (one was running) and died.
    req = GenerateRequest(prompt="saved", steps=2, seed=3).resolved("demo").to_dict()
    store = QueueStore(db)
    dead = _dead_pid()
    first = store.add("generate", {"request": req, "out": str(tmp_path), "family": "demo"}, dead)
    second = store.add("generate", {"request": req, "out": str(tmp_path), "family": "demo"}, dead)
    store.set_state(first, "running")
    store.close()

    service = Service(devices="cpu", db_path=db, recover=True)
    events = service.subscribe()
    await service.start()
    try:
        for job in (first, second):
            final = (await asyncio.wait_for(_collect(service, job, events), TIMEOUT))[-1]
            assert final["type"] == "done"
    finally:
        await service.close()
    assert all(QueueStore(db).get(j).state == "done" for j in (first, second))


async def test_bad_request_queues_nothing(db, tmp_path):
    service = Service(devices="cpu", db_path=db)
    with pytest.raises(Exception, match="steps"):
        service.submit(GenerateRequest(prompt="x", steps=-1), tmp_path)
    assert service.jobs() == []
    service.store.close()


def test_device_plan(db, monkeypatch):
    """--device auto adds one worker per extra GPU the first worker reports; explicit lists are kept."""
    spawned: list[str] = []
    monkeypatch.setattr(Service, "_spawn", lambda self, w: (spawned.append(w.device), self.workers.append(w)))
    auto = Service(devices="auto", db_path=db)
    assert auto._initial_devices() == ["auto"]
    for device in auto._initial_devices():
        auto._spawn(_Worker(len(auto.workers), device))
    auto._maybe_add_gpu_workers({"type": "ready", "worker": 0, "cuda_count": 3})
    auto._maybe_add_gpu_workers({"type": "ready", "worker": 1, "cuda_count": 3})  # only the first worker counts
    assert spawned == ["auto", "cuda:1", "cuda:2"]
    explicit = Service(devices="cuda:0, cuda:1", db_path=db)
    assert explicit._initial_devices() == ["cuda:0", "cuda:1"]
    explicit._maybe_add_gpu_workers({"type": "ready", "worker": 0, "cuda_count": 4})
    assert spawned == ["auto", "cuda:1", "cuda:2"]
    auto.store.close()
    explicit.store.close()
