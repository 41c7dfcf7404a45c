"""The service with real worker processes: events, files, cancel, crashes, restarts, leases."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import metadata
from backend.events import (Cancelled, Done, Event, Failed, ImageSaved, Moved, Preview, Queued, Retrying, Started, Step,
                            WorkerReady)
from backend.pool import ProcessPool, Slot
from backend.queue_store import QueueStore
from backend.request import GenerateRequest
from backend.service import Service

TIMEOUT = 120
ROOT = Path(__file__).resolve().parents[1]


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


def _seeds(paths: list[str]) -> list[int]:
    return [metadata.read(p)["request"]["seed"] for p in paths]


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_generate_streams_events_and_saves_png(on_job_service, tmp_path):
    service, events = on_job_service
    req = GenerateRequest(prompt="a red fox", seed=5, count=2, steps=6, sampler="euler")
    job = service.submit(req, tmp_path / "out")
    seen = await asyncio.wait_for(_collect(service, job, events), TIMEOUT)
    assert isinstance(seen[0], Queued) and isinstance(seen[1], Started) and isinstance(seen[-1], Done)
    assert sum(isinstance(e, ImageSaved) for e in seen) == 2
    steps = [e for e in seen if isinstance(e, Step)]
    assert steps[-1].step == steps[-1].total == 6
    for p in (e for e in seen if isinstance(e, Preview)):  # 128px image -> 16x16 latent preview
        assert len(p.rgb) == p.width * p.height * 3 == 16 * 16 * 3
    paths = [e.path for e in seen if isinstance(e, ImageSaved)]
    assert _seeds(paths) == [5, 6] and seen[-1].paths == paths
    assert metadata.read(paths[0])["kind"] == "generate"
    pixels = [np.asarray(Image.open(p)) for p in paths]
    assert pixels[0].shape == (128, 128, 3) and np.abs(pixels[0].astype(int) - pixels[1]).max() > 0
    store = QueueStore(service.store.path)
    assert store.get(job).state == "done" and store.get(job).outputs == paths


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_pngs_follow_the_umask(on_job_service, tmp_path):
    service, events = on_job_service
    old = os.umask(0o022)
    try:
        job = service.submit(GenerateRequest(prompt="x", steps=2, seed=1), tmp_path)
        done = (await asyncio.wait_for(_collect(service, job, events), TIMEOUT))[-1]
    finally:
        os.umask(old)
    assert oct(os.stat(done.paths[0]).st_mode & 0o777) == oct(0o644)


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_cancel_running_and_queued(on_job_service, tmp_path):
    service, events = on_job_service
    long = service.submit(GenerateRequest(prompt="x", steps=400, seed=1), tmp_path)
    queued = service.submit(GenerateRequest(prompt="y", steps=4, seed=1), tmp_path)
    assert service.cancel(queued)
    async for event in service.wait(long, events):
        if isinstance(event, Step):
            service.cancel(long)
    last = event
    after = service.submit(GenerateRequest(prompt="z", steps=2, seed=1), tmp_path)
    final = (await asyncio.wait_for(_collect(service, after, events), TIMEOUT))[-1]
    assert not service.cancel(after)  # finished jobs cannot be cancelled
    assert isinstance(last, Cancelled) and isinstance(final, Done)
    store = QueueStore(service.store.path)
    assert [store.get(j).state for j in (long, queued, after)] == ["cancelled", "cancelled", "done"]
    assert store.get(long).outputs == []  # nothing decoded or saved for the cancelled job


@pytest.mark.asyncio(loop_scope="session")  # on the shared job_service (conftest)
async def test_jobs_another_process_cancels_end_here_too(on_job_service, tmp_path):
    """`dreamtty cancel` of a job that a --local command runs writes "cancelled" to the queue: that command's
    job ran on to "done" (and a queued one was waited for for ever)."""
    from test_tui import NoWorkers

    service, events = on_job_service
    long = service.submit(GenerateRequest(prompt="x", steps=400, seed=1, count=3, max_batch=1), tmp_path)
    queued = service.submit(GenerateRequest(prompt="y", steps=4, seed=1), tmp_path)
    db = service.store.path
    other = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))  # as the one `dreamtty cancel` reaches
    followed = service.subscribe()  # the queued job's follower
    try:
        async for event in service.wait(long, events):
            if isinstance(event, Step) and (event.image, event.step) == (0, 1):
                assert other.cancel(long) and other.cancel(queued)
        ended = await asyncio.wait_for(_collect(service, queued, followed), TIMEOUT)
    finally:
        other.store.close()
        service.unsubscribe(followed)
    assert isinstance(event, Cancelled) and [type(e) for e in ended] == [Cancelled]
    store = QueueStore(service.store.path)
    assert [store.get(j).state for j in (long, queued)] == ["cancelled", "cancelled"] and store.get(long).outputs == []


async def test_a_job_another_process_cancels_before_this_service_looks_ends_here_too(db, tmp_path):
    """`dreamtty cancel` of a job just queued, before this service's next look at the queue: its follower is told
    (the job was never seen active, so its cancel was missed and the follower waited for ever)."""
    from test_tui import NoWorkers

    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    other = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    try:
        followed = service.subscribe()
        job = service.submit(GenerateRequest(prompt="x", steps=2, seed=1), tmp_path)
        assert other.cancel(job)
        service._notice_cancelled()  # the next round of its watch task
        ended = await asyncio.wait_for(_collect(service, job, followed), 10)
    finally:
        other.store.close()
        await service.close()
    assert [type(e) for e in ended] == [Queued, Cancelled]


async def test_killed_worker_is_retried_from_the_first_unsaved_image(running, db, tmp_path):
    service, events = running
    job = service.submit(GenerateRequest(prompt="x", steps=30, seed=11, count=3, max_batch=1), tmp_path)  # in turn
    seen = []
    async for event in service.wait(job, events):
        seen.append(event)
        if isinstance(event, Step) and event.image == 1 and not any(isinstance(e, Retrying) for e in seen):
            os.kill(service.slots[0].pid, signal.SIGKILL)  # mid image 2, image 1 saved
    retry = next(e for e in seen if isinstance(e, Retrying))
    assert retry.error.startswith("worker was killed by SIGKILL (out of memory? see dmesg)") and retry.first_image == 1
    assert isinstance(seen[-1], Done)
    saved = [e.path for e in seen if isinstance(e, ImageSaved)]
    assert len(saved) == 3 and seen[-1].paths == saved  # image 1 was not made twice
    assert _seeds(saved) == [11, 12, 13]
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == sorted(Path(p).name for p in saved)
    assert QueueStore(db).get(job).attempts == 1


async def test_a_job_that_kills_its_worker_twice_fails_and_the_queue_goes_on(running, db, tmp_path):
    service, events = running
    doomed = service.submit(GenerateRequest(prompt="x", steps=400, seed=1), tmp_path)
    survivor = service.submit(GenerateRequest(prompt="y", steps=3, seed=2), tmp_path)
    async for event in service.wait(doomed, events):
        if isinstance(event, Step) and event.step == 1:
            os.kill(service.slots[0].pid, signal.SIGTERM)  # unwinds, and says so (it exited 1, as on a crash)
    failed = event
    done = (await asyncio.wait_for(_collect(service, survivor, events), TIMEOUT))[-1]
    assert isinstance(failed, Failed) and "worker exited with code 143 (on SIGTERM), 2 times" in failed.error
    assert isinstance(done, Done)
    assert QueueStore(db).get(doomed).state == "failed"


def _planted(db: Path, tmp_path: Path, owner: str, count: int = 1, outputs: tuple[str, ...] = ()) -> int:
    """A job left running by a service that is gone (its owner renewed no lease)."""
    req = GenerateRequest(prompt="saved", steps=2, seed=3, count=count).resolved("demo").to_dict()
    store = QueueStore(db)
    job = store.add("generate", {"request": req, "out": str(tmp_path), "family": "demo"}, owner)
    store.set_state(job, "running")
    for path in outputs:
        store.add_output(job, path)
    store.close()
    return job


async def _recover_and_run(db: Path, jobs: list[int]) -> list:
    service = Service(devices="cpu", db_path=db, recover=True)
    events = service.subscribe()
    await service.start()
    try:
        return [(await asyncio.wait_for(_collect(service, job, events), TIMEOUT))[-1] for job in jobs]
    finally:
        await service.close()


async def test_queue_survives_restart(db, tmp_path, demo_dirs):
    first = _planted(db, tmp_path, "gone/1/a")
    second = _planted(db, tmp_path, "gone/1/a")
    QueueStore(db).set_state(second, "queued")
    finals = await _recover_and_run(db, [first, second])
    assert all(isinstance(f, Done) for f in finals)
    assert all(QueueStore(db).get(j).state == "done" for j in (first, second))


# column -> a value that does not read, and what the job's error says of it
_UNREADABLE = {
    "request": ('{"request": {"prompt": "half', "has a request that is not valid JSON"),
    "request ": ("[1, 2]", "has a request that is not a JSON object"),
    "request  ": ('{"request": "a string"}', "has no request"),
    "outputs": ('{"a": 1}', "has outputs that are not a JSON array"),
    "created": ("yesterday", "has an id, time, owner, error or attempt count of the wrong type"),
    "state": ("bogus", "has kind 'generate' and state 'bogus', not a job's"),
}


async def test_rows_that_do_not_read_fail_and_the_queue_goes_on(db, tmp_path, demo_dirs):
    """A row edited by hand (or by another program) fails with the reason, said once; the good job runs."""
    bad = {_planted(db, tmp_path, "gone/3/c"): column for column in _UNREADABLE}
    good = _planted(db, tmp_path, "gone/3/c")
    with sqlite3.connect(db) as conn:
        for job, column in bad.items():
            conn.execute(f"UPDATE jobs SET {column.strip()} = ? WHERE id = ?", (_UNREADABLE[column][0], job))
    [done] = await _recover_and_run(db, [good])
    assert isinstance(done, Done) and len(done.paths) == 1
    store = QueueStore(db)
    for job, column in bad.items():
        listed = store.get(job)
        assert (listed.state, listed.error) == ("failed", f"this job {_UNREADABLE[column][1]} in the queue file; "
                                                          "it cannot run")
    assert store.warnings == []  # said by the service that found them, once
    assert [j.id for j in store.jobs()] == [good, *sorted(bad, reverse=True)]


async def test_recovered_job_resumes_after_its_saved_images(db, tmp_path, demo_dirs):
    """Image 0 was saved before the owner died: the job makes images 1 and 2 only, with their own seeds."""
    first = tmp_path / "first.png"
    Image.new("RGB", (8, 8)).save(first)
    job = _planted(db, tmp_path, "gone/2/b", count=3, outputs=(str(first),))
    [done] = await _recover_and_run(db, [job])
    assert done.paths[0] == str(first) and len(done.paths) == 3
    assert _seeds(done.paths[1:]) == [4, 5]
    assert len(list(tmp_path.rglob("*.png"))) == 3


async def test_an_adopted_job_records_the_image_its_killed_worker_saved_and_makes_it_not_again(db, tmp_path,
                                                                                                demo_dirs):
    from test_outputs import killed_while_saving

    job = _planted(db, tmp_path, "gone/4/d", count=3)
    killed_while_saving(tmp_path, QueueStore(db).image_tag(job))  # linked to its name, not recorded
    [saved] = tmp_path.rglob("*.png")
    [done] = await _recover_and_run(db, [job])
    assert done.paths[0] == str(saved) and len(done.paths) == 3
    assert _seeds(done.paths[1:]) == [4, 5]
    assert sorted(tmp_path.rglob("*.png")) == sorted(map(Path, done.paths))
    assert not list(tmp_path.rglob("*.part"))


def test_an_image_is_recorded_once_and_each_queue_names_its_jobs_apart(db, tmp_path):
    job = _planted(db, tmp_path, "gone/5/e", count=3)
    store = QueueStore(db)
    for path in ("/o/a.png", "/o/a.png", "/o/b.png"):
        store.add_output(job, path)
    assert store.get(job).outputs == ["/o/a.png", "/o/b.png"]
    assert store.image_tag(job) == QueueStore(db).image_tag(job) != QueueStore(tmp_path / "q2").image_tag(job)


def _saves_then_dies(worker: int, device: str, jobs, events, cancel, log_path: str, db_path: str, *rest) -> None:
    """A worker that starts its job and saves its next image, then is killed before it records it."""
    from backend.events import dumps
    from backend.worker import save_output

    events.send_bytes(dumps(WorkerReady(worker=worker, device="cpu", cuda_count=0)).encode())
    [job] = jobs.get()
    events.send_bytes(dumps(Started(job=job["job"], worker=worker)).encode())
    request = GenerateRequest.from_dict(job["request"])
    store = QueueStore(Path(db_path))
    store.add_output = lambda *args: os._exit(9)
    save_output(store, job, worker, Image.new("RGB", (8, 8)), metadata.build(request, "demo", {}),
                job["first_image"], request.seed)


async def test_a_worker_killed_before_it_recorded_its_image_is_retried_after_it(monkeypatch, db, tmp_path, demo_dirs):
    from backend import pool

    monkeypatch.setattr(pool, "_worker_entry", _saves_then_dies)
    service = Service(devices="cpu", db_path=db)
    events = service.subscribe()
    await service.start()
    try:
        job = service.submit(GenerateRequest(prompt="x", steps=2, seed=5, count=3), tmp_path)
        seen = await asyncio.wait_for(_collect(service, job, events), TIMEOUT)
    finally:
        await service.close()
    retry, failed = [e for e in seen if isinstance(e, (Retrying, Failed))]
    assert retry.first_image == 1 and "worker exited with code 9, 2 times" in failed.error
    outputs = QueueStore(db).get(job).outputs
    assert len(outputs) == 2 and sorted(tmp_path.rglob("*.png")) == sorted(map(Path, outputs))
    assert not list(tmp_path.rglob("*.part"))


def test_a_live_owner_keeps_its_jobs_and_a_silent_one_loses_them(db, tmp_path):
    """Adoption follows the lease, not the pid: this very process's pid is alive, yet its lease ran out."""
    store = QueueStore(db)
    live, silent = f"host/{os.getpid()}/live", f"host/{os.getpid()}/silent"
    store.renew_lease(live)
    store.renew_lease(silent, now=0.0)  # no heartbeat since 1970
    kept = store.add("generate", {"request": {}}, live)
    lost = store.add("generate", {"request": {}}, silent)
    done = store.add("generate", {"request": {}}, silent)
    store.set_state(done, "done")
    # listed, a job a killed process left active says so (it was "running" for ever while no service ran)
    assert {job.id: job.orphaned for job in store.jobs()} == {kept: False, lost: True, done: False}
    assert store.get(lost).orphaned and not store.get(kept).orphaned  # GET /v1/jobs/ID says it too
    assert store.adopt_orphans("me") == [lost]
    assert store.get(kept).owner == live and store.get(lost).owner == "me"
    assert not any(job.orphaned for job in store.jobs())
    assert store.adopt_orphans("someone-else") == []  # adopting renewed the lease of "me"


def test_the_jobs_of_a_service_of_this_machine_whose_process_is_gone_are_adopted_at_once(db):
    """kill -9 leaves a service's lease fresh for LEASE_TTL: one of this machine whose process is gone is known
    dead, and a restarted service runs its jobs at once. One whose process lives (paused, or a reused pid), or of
    another machine, keeps its jobs until its lease runs out."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    owners = {"dead": f"{host}/{gone.pid}/a", "alive": f"{host}/{os.getppid()}/b",
              "elsewhere": f"not-{host}/{gone.pid}/c"}
    store = QueueStore(db)
    jobs = {name: store.add("generate", {"request": {}}, owner) for name, owner in owners.items()}
    for owner in owners.values():
        store.renew_lease(owner)
    assert [job.orphaned for job in store.jobs()] == [False] * 3  # listed, each lease is fresh
    assert store.adopt_orphans("me") == [jobs["dead"]]
    assert {name: store.get(job).owner for name, job in jobs.items()} == {**owners, "dead": "me"}


def test_a_service_that_lost_its_job_to_an_adopter_writes_nothing_over_it(db):
    """A service paused (or cut off from the queue file) past its lease lost its job to adopt_orphans; resumed, its
    writes to that job change nothing: it made the job's images a second time, and ended it over the adopter."""
    from backend.queue_store import JobTaken

    store = QueueStore(db)
    store.renew_lease("paused", now=0.0)
    job = store.add("generate", {"request": {}}, "paused")
    assert store.set_running([job], "paused") == {job} and store.add_output(job, "/out/a.png", "paused") is None
    assert store.adopt_orphans("adopter") == [job]
    with pytest.raises(JobTaken, match=rf"^another dreamtty service took it over .* wait {job}\)$"):  # "job N failed: "
        store.add_output(job, "/out/b.png", "paused")
    store.add_output(job, "/out/c.png", "adopter")  # the adopter settled the image the paused worker saved:
    store.add_output(job, "/out/c.png", "paused")  # no JobTaken, so the worker does not remove it
    assert not store.set_state(job, "done", owner="paused") and store.set_running([job], "paused") == set()
    store.retry(job, "paused")
    outputs = ["/out/a.png", "/out/c.png"]
    assert (store.get(job).state, store.get(job).outputs, store.get(job).attempts) == ("queued", outputs, 0)
    assert store.set_running([job], "adopter") == {job} and store.set_state(job, "done", owner="adopter")
    store.add_output(job, "/out/a.png", "adopter")  # recorded already: no error, not twice
    assert (store.get(job).state, store.get(job).outputs) == ("done", outputs)


async def test_a_worker_whose_job_was_taken_over_removes_its_image_and_stops(running, db, tmp_path):
    """The job's owner changes under a running worker (another service adopted it): its next image is not recorded
    but removed (the adopter makes it), and its service says why the job stopped here."""
    service, events = running
    job = service.submit(GenerateRequest(prompt="x", steps=4, seed=11, count=3, max_batch=1), tmp_path)
    seen = []
    async for event in service.wait(job, events):
        seen.append(event)
        if isinstance(event, ImageSaved):
            with sqlite3.connect(db) as other:  # as adopt_orphans would, by another service
                other.execute("UPDATE jobs SET owner = 'adopter', state = 'queued' WHERE id = ?", (job,))
    assert isinstance(seen[-1], Moved) and "another dreamtty service took it over" in seen[-1].message
    first = [e.path for e in seen if isinstance(e, ImageSaved)]
    assert len(first) == 1 and sorted(tmp_path.rglob("*.png")) == [Path(first[0])]
    after = QueueStore(db).get(job)
    assert (after.state, after.owner, after.outputs) == ("queued", "adopter", first)


async def test_a_database_error_does_not_stop_the_lease(db, monkeypatch):
    """A renewal that fails (the database locked past its timeout) is tried again on the next round."""
    import sqlite3
    import threading

    import backend.service as service_module
    from test_tui import NoWorkers

    renewals: list[str] = []

    def renew(store, owner, now=None):
        if threading.current_thread().name == "dreamtty-lease":
            renewals.append(owner)
        if 0 < len(renewals) <= 2:
            raise sqlite3.OperationalError("database is locked")
        original(store, owner, now)

    original = QueueStore.renew_lease
    monkeypatch.setattr(QueueStore, "renew_lease", renew)
    monkeypatch.setattr(service_module, "LEASE_RENEW", 0.01)
    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    try:
        for _ in range(500):
            if len(renewals) > 3:
                break
            await asyncio.sleep(0.01)
        assert len(renewals) > 3 and service._heartbeat.is_alive()
    finally:
        await service.close()


async def test_a_write_in_flight_as_the_service_closes_closes_its_connection_when_done(db):
    """close() leaves the connection of a write waiting for a locked queue file to it: it was left open."""
    import threading

    from test_tui import NoWorkers

    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    writing, go = threading.Event(), threading.Event()

    def slow(store: QueueStore) -> int:
        writing.set()
        go.wait(10)
        return len(store.jobs())

    write = asyncio.create_task(service._write_in_thread(slow, "again"))
    assert await asyncio.to_thread(writing.wait, 10)
    await service.close()
    go.set()
    assert await write == 0
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        service._thread_store._db.execute("SELECT 1")


async def test_bad_request_queues_nothing(db, tmp_path):
    service = Service(devices="cpu", db_path=db)
    with pytest.raises(Exception, match="steps"):
        service.submit(GenerateRequest(prompt="x", steps=-1), tmp_path)
    assert service.jobs() == []
    service.store.close()


def test_device_plan(db, monkeypatch):
    """--device auto adds one worker per extra GPU the first worker reports; explicit lists are kept."""
    spawned: list[str] = []
    monkeypatch.setattr(ProcessPool, "_spawn", lambda self, slot: (spawned.append(slot.device), self.slots.append(slot)))
    auto = ProcessPool("auto", db)
    for i, device in enumerate(auto.devices):
        auto._spawn(Slot(i, device))
    auto._add_gpu_workers(WorkerReady(worker=0, device="cuda:0", cuda_count=3))
    auto._add_gpu_workers(WorkerReady(worker=1, device="cuda:1", cuda_count=3))  # only the first worker counts
    assert spawned == ["auto", "cuda:1", "cuda:2"]
    explicit = ProcessPool("cuda:0, cuda:1", db)
    assert explicit.devices == ["cuda:0", "cuda:1"]
    explicit._add_gpu_workers(WorkerReady(worker=0, device="cuda:0", cuda_count=4))
    assert spawned == ["auto", "cuda:1", "cuda:2"]


def test_killed_cli_job_is_adopted_and_finishes_without_duplicates(tmp_path, demo_dirs):
    """kill -9 of a `dreamtty generate` after its first image: a recovering service makes the rest, once each."""
    from backend import locations

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tui.cli", "generate", "x", "--model", "demo", "--steps", "40", "-n", "3",
         "--max-batch", "1", "--seed", "21", "--device", "cpu", "--out", str(out), "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    job = None
    for line in proc.stdout:
        event = json.loads(line)
        job = event["job"] if event["type"] == "queued" else job
        if event["type"] == "image":
            proc.kill()
            break
    proc.wait(timeout=30)
    db = locations.queue_db()
    store = QueueStore(db)
    assert store.get(job).state == "running" and len(store.get(job).outputs) == 1
    store.close()  # its lease is fresh, but its process is gone: adopted at once
    [done] = asyncio.run(_recover_and_run(db, [job]))
    assert isinstance(done, Done) and len(done.paths) == 3
    assert _seeds(done.paths) == [21, 22, 23]
    assert len(list(out.rglob("*.png"))) == 3


def _deaf_worker(*args) -> None:
    """A worker stuck where SIGTERM does nothing (a driver call, a stopped process): only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(os.environ["DT_DEAF_READY"]).touch()
    time.sleep(600)


async def test_closing_the_pool_kills_a_worker_that_ignores_sigterm(monkeypatch, tmp_path):
    from backend import pool

    monkeypatch.setattr(pool, "_worker_entry", _deaf_worker)
    monkeypatch.setattr(pool, "JOIN_PATIENCE", 0.5)
    monkeypatch.setenv("DT_DEAF_READY", str(tmp_path / "ready"))
    workers = ProcessPool("cpu", tmp_path / "queue.sqlite3")
    workers.start(lambda event: None, lambda slot, job, why, counts: None)
    async with asyncio.timeout(60):
        while not (tmp_path / "ready").exists():
            await asyncio.sleep(0.05)
    began = time.monotonic()
    await workers.close()
    assert not workers._procs[workers.slots[0].id].process.is_alive() and time.monotonic() - began < 10


async def test_a_worker_that_dies_before_ready_is_restarted_after_growing_waits(monkeypatch, tmp_path):
    from backend import pool

    monkeypatch.setattr(pool, "_worker_entry", os._exit)  # called with the worker's arguments: exits at once
    monkeypatch.setattr(pool, "RESPAWN_BACKOFF", (1.0, 2.0))
    workers = ProcessPool("cpu", tmp_path / "queue.sqlite3")
    deaths: list[tuple[float, str]] = []
    said: list[Event] = []
    workers.start(said.append,
                  lambda slot, job, why, counts: deaths.append((asyncio.get_running_loop().time(), why)))
    try:
        async with asyncio.timeout(60):
            while len(deaths) < 4:
                await asyncio.sleep(0.05)
        warnings = workers.status()["warnings"]
    finally:
        await workers.close()
    gaps = [later - earlier for (earlier, _), (later, _) in zip(deaths, deaths[1:])]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0 and gaps[2] >= 2.0, gaps  # 1 s, then doubled up to the cap
    assert all(why == "worker exited with code 1" for _, why in deaths)  # a TypeError: os._exit takes one argument
    assert not workers.alive(workers.slots[0])
    # Its queued jobs waited in silence: that it cannot start is said once (the second death), and in the status.
    assert [(type(e).__name__, e.level) for e in said] == [("Log", "error")]
    assert warnings == [said[0].message] and said[0].message == (
        f"worker 0 cannot start: it exited with code 1 before it was ready, 2 or more times in a row (see "
        f"{workers.log_of(workers.slots[0])}); it is started again after growing waits, and queued jobs wait")


async def test_a_worker_of_code_changed_on_disk_exits_before_it_speaks_and_the_pool_says_restart(monkeypatch, tmp_path):
    """An upgrade in place under a running service: a worker it spawns later runs the new code, which may speak
    another protocol. It exits before its first event; the pool says once why, and restarts it after waits."""
    from backend import pool, versions

    monkeypatch.setattr(versions, "build", lambda: "0ld0ld0ld0ld")  # the code this service started with
    monkeypatch.setenv(versions.SERVICE_BUILD, "")  # the pool sets it: restored after the test
    monkeypatch.setattr(pool, "RESPAWN_BACKOFF", (0.2, 0.4))
    workers = ProcessPool("cpu", tmp_path / "queue.sqlite3")
    said: list[Event] = []
    deaths: list[str] = []
    workers.start(said.append, lambda slot, jobs, why, counts: deaths.append((why, counts)))
    try:
        async with asyncio.timeout(60):
            while len(deaths) < 3:
                await asyncio.sleep(0.05)
        warnings = workers.status()["warnings"]
    finally:
        await workers.close()
    assert not any(isinstance(event, WorkerReady) for event in said)
    assert [(type(e).__name__, e.level) for e in said] == [("Log", "error")]  # said once, not at each try
    why = said[0].message
    assert deaths == [(why, False)] * len(deaths) and warnings == [why]
    on_disk = versions.fingerprint(Path(versions.__file__).parent)
    assert why == (f"worker 0: dreamtty was changed on disk since this service started (build 0ld0ld0ld0ld, now "
                   f"{on_disk}): restart it to run jobs again (the service: dreamtty serve --stop, then start it as "
                   "before); queued jobs wait")


def test_the_fingerprint_of_the_code_leaves_out_hidden_and_unreadable_files(tmp_path):
    from backend.versions import fingerprint

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "sub" / "b.py").write_text("B = 2\n")
    (tmp_path / "notes.txt").write_text("not code")
    first = fingerprint(tmp_path)
    (tmp_path / ".#a.py").symlink_to("root@host.1234:1700000000")  # an editor's lock: a link to nowhere
    (tmp_path / ".hidden.py").write_text("C = 3\n")
    (tmp_path / "notes.txt").write_text("other notes")
    assert fingerprint(tmp_path) == first
    (tmp_path / "sub" / "b.py").write_text("B = 3\n")
    changed = fingerprint(tmp_path)
    (tmp_path / "sub" / "b.py").rename(tmp_path / "b.py")  # the same code at another place
    assert changed != first and fingerprint(tmp_path) not in (first, changed)


def test_a_worker_runs_only_the_code_of_the_service_that_spawned_it(monkeypatch):
    from backend import versions

    monkeypatch.delenv(versions.SERVICE_BUILD, raising=False)
    assert not versions.stale_worker()  # not spawned by a service (or by one of before this check)
    monkeypatch.setenv(versions.SERVICE_BUILD, versions.build())
    assert not versions.stale_worker()
    monkeypatch.setenv(versions.SERVICE_BUILD, "0ld0ld0ld0ld")
    assert versions.stale_worker()


def test_a_worker_takes_no_job_once_its_code_was_changed_on_disk(monkeypatch, tmp_path):
    """A running worker still imports some modules as a job first needs them: after an upgrade in place it would
    mix two versions. It exits as a worker of other code does, before it speaks of the job."""
    import queue

    from backend import versions, worker

    monkeypatch.setattr(worker, "_redirect_output", lambda path: None)
    monkeypatch.setattr(worker, "pipeline_cache", lambda device: (type("Cache", (), {"device": "cpu"}), 0))
    monkeypatch.setattr(worker, "run_jobs", lambda runs: pytest.fail("it ran a job"))
    monkeypatch.setattr(versions, "build", lambda: "0ld0ld0ld0ld")  # as it read its code when it started
    jobs, sent = queue.Queue(), []
    jobs.put([{"job": 1, "kind": "generate"}])
    events = type("Pipe", (), {"send_bytes": lambda self, data: sent.append(json.loads(data)["type"])})()
    with pytest.raises(SystemExit) as exit_:
        worker.worker_main(0, "cpu", jobs, events, [0], str(tmp_path / "w.log"), str(tmp_path / "q"), os.getppid())
    assert exit_.value.code == versions.STALE_EXIT and sent == ["ready"]
    monkeypatch.setattr(versions, "build", lambda: versions.fingerprint(Path(versions.__file__).parent))
    assert not versions.changed_on_disk()


def _says_then_dies(worker: int, device: str, jobs, events, *rest) -> None:
    """A worker that says it is ready and starts six jobs, then dies at once: its pipe still holds what it said."""
    from backend.events import dumps

    for event in (WorkerReady(worker=worker, device="cpu", cuda_count=0), *(Started(job=j, worker=worker)
                                                                          for j in range(1, 7))):
        events.send_bytes(dumps(event).encode())
    os._exit(9)


async def test_what_a_worker_said_before_it_died_comes_before_its_death(monkeypatch, tmp_path):
    """Else a job's start would come after its retry (setting a queued job running) or be lost."""
    from backend import pool

    monkeypatch.setattr(pool, "_worker_entry", _says_then_dies)
    workers = ProcessPool("cpu", tmp_path / "queue.sqlite3")
    seen: list[str] = []
    workers.start(lambda event: seen.append(type(event).__name__),
                  lambda slot, jobs, why, counts: seen.append("died"))
    try:
        async with asyncio.timeout(60):
            while seen.count("died") < 3:  # each restarted worker does the same
                await asyncio.sleep(0.05)
    finally:
        await workers.close()
    assert seen[:24] == ["WorkerReady", *["Started"] * 6, "died"] * 3


async def test_a_queue_write_that_fails_on_its_own_fault_does_not_hold_up_the_writes_after_it(db, caplog):
    """Only a queue that takes no writes made a write wait; any other fault (a row no version wrote) left it first
    in line for good, and every job end after it was neither written nor told."""
    from test_tui import NoWorkers

    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    try:
        written: list[int] = []
        service._when_writable(lambda: int("abc"))
        service._when_writable(lambda: written.append(1))
        assert written == [1] and service._unwritten == []
        assert "queue: a write failed; the writes after it go on" in caplog.text
    finally:
        await service.close()
