"""Training runs scheduled by the service: a run and generation jobs share a device one at a time,
the worker frees its pipelines for the run, and a restarted service takes over live and waiting runs.

The trainer is a stand-in (tests/fake_trainer.py) that trains until the test lets it finish; the
generation jobs run in a real worker process on the CPU with the demo model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import devices as devices_module
from backend.errors import RequestError
from backend.events import Cancelled, Done, Note, RunState, Started, Step, WorkerReady, WorkerReleased
from backend.queue_store import LEASE_TTL, QueueStore
from backend.request import GenerateRequest
from backend.run_schedule import ENDED, TRAINING, WAITING, resolve_devices, trainer_env
from backend.service import Service
from backend.training import runs
from backend.training.config import TrainRequest
from test_tui import NoWorkers

TIMEOUT = 120
FAKE_TRAINER = shlex.join([sys.executable, str(Path(__file__).with_name("fake_trainer.py"))])


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def train_request(photos: Path, run_dir: Path) -> TrainRequest:
    return TrainRequest(model="demo", instance_dir=str(photos), instance_prompt="a photo of sks toy", resolution=64,
                        max_steps=2, output=str(run_dir))


def queue_run(service: Service, photos: Path, run_dir: Path):
    return service.enqueue_run(service.prepare_run(train_request(photos, run_dir), "auto", FAKE_TRAINER))


async def next_event(events: asyncio.Queue, match) -> list:
    """The events up to and including the first that ``match`` accepts."""
    seen = []
    while True:
        event = await asyncio.wait_for(events.get(), TIMEOUT)
        seen.append(event)
        if match(event):
            return seen


def run_is(run_id: int, state: str):
    return lambda e: isinstance(e, RunState) and e.run == run_id and e.state == state


def job_is(job_id: int, kind):
    return lambda e: isinstance(e, kind) and getattr(e, "job", None) == job_id


def finish(run) -> None:
    (Path(run.path) / "GO").touch()


async def test_a_run_waits_for_the_job_then_holds_the_device_until_it_ends(tmp_path, photos, demo_dirs):
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3")
    events = service.subscribe()
    await service.start()
    try:
        await next_event(events, lambda e: isinstance(e, WorkerReady))
        job = service.submit(GenerateRequest(prompt="a red fox", steps=400, seed=1), tmp_path / "out")
        await next_event(events, job_is(job, Step))  # its model is loaded
        assert [m["model"] for m in service.status()["workers"][0]["models"]] == ["demo"]

        run = queue_run(service, photos, tmp_path / "run")
        assert (run.state, run.devices, run.waiting_for) == (WAITING, ["cpu"], f"the CPU: job {job} is running")
        assert runs.read_run_json(run.path)["state"] == runs.WAITING and not (Path(run.path) / runs.PID_FILE).exists()
        service.cancel(job)  # the job ends: the worker frees its models, then the trainer starts
        seen = await next_event(events, run_is(run.id, TRAINING))
        order = [type(e) for e in seen if isinstance(e, (Cancelled, WorkerReleased, RunState))]
        assert order.index(Cancelled) < order.index(WorkerReleased) < len(order) - 1
        assert next(e for e in seen if isinstance(e, WorkerReleased)).freed == 1
        worker = service.status()["workers"][0]
        assert worker["models"] == [] and worker["training"] == run.id
        assert service.status()["runs"] == {"training": 1, "waiting": 0}
        pid = int((Path(run.path) / runs.PID_FILE).read_text())
        assert runs.pid_alive(pid, run.path) and service.training.get(run.id).pid == pid
        for _ in range(100):
            if (Path(run.path) / "env.json").exists():
                break
            await asyncio.sleep(0.1)
        assert json.loads((Path(run.path) / "env.json").read_text()) == {"CUDA_VISIBLE_DEVICES": ""}

        # A job queued while the run trains waits, and says why.
        second = service.submit(GenerateRequest(prompt="a red fox", steps=2, seed=2), tmp_path / "out")
        note = (await next_event(events, job_is(second, Note)))[-1]
        assert note.message == "waiting for the CPU: training run run"
        await asyncio.sleep(2.0)
        assert service.store.get(second).state == "queued"
        finish(run)
        seen = await next_event(events, job_is(second, Done))
        ended = next(i for i, e in enumerate(seen) if run_is(run.id, ENDED)(e))
        assert ended < next(i for i, e in enumerate(seen) if job_is(second, Started)(e))
        assert seen[ended].outcome == "done" and service.training.get(run.id).outcome == "done"
        assert service.status()["workers"][0]["training"] is None
    finally:
        await service.close()


@pytest.fixture
async def without_workers(tmp_path, demo_dirs):
    """A started service whose pool has no worker (runs only) and its events; closed after the test."""
    db = tmp_path / "queue.sqlite3"
    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    events = service.subscribe()
    await service.start()
    yield service, events
    await service.close()


async def test_a_second_run_waits_for_the_first_and_can_leave_the_queue(without_workers, tmp_path, photos):
    service, events = without_workers
    first = queue_run(service, photos, tmp_path / "first")
    second = queue_run(service, photos, tmp_path / "second")
    assert first.state == TRAINING and second.state == WAITING
    assert second.waiting_for == "the CPU: training run first"
    assert [r.id for r in service.training.listing((WAITING,))] == [second.id]
    assert service.stop_run(second.id) and not service.stop_run(second.id)  # taken off the queue, once
    assert runs.read_run_json(second.path)["state"] == "stopped"
    assert service.training.get(second.id).outcome == "stopped"
    assert service.stop_run(first.id)  # a training run stops after its step, through its STOP file
    await next_event(events, run_is(first.id, ENDED))
    assert service.training.get(first.id).outcome == "stopped"



async def _retried_and_trained(service, events, photos: Path, run_dir: Path) -> None:
    """A stopped run that never started is started again (not refused as running), and trains to its end."""
    retry = replace(train_request(photos, run_dir), resume="latest")
    run = service.enqueue_run(service.prepare_run(retry, "auto", FAKE_TRAINER))
    assert run.state == TRAINING
    finish(run)
    await next_event(events, run_is(run.id, ENDED))


async def test_a_run_interrupted_while_its_folder_is_made_is_stopped_not_left_starting(
        without_workers, tmp_path, photos, monkeypatch):
    """Ctrl-C during ``dreamtty train --local``'s checks: the folder they made does not read as a run
    that is starting, which would refuse the retry."""
    from backend.client import LocalClient
    from backend.training import launch

    service, events = without_workers
    prepare = launch.prepare_run

    def slow_prepare(*args):
        prepared = prepare(*args)
        time.sleep(0.5)  # the run.json of a "starting" run is written; the answer is not back yet
        return prepared

    monkeypatch.setattr(launch, "prepare_run", slow_prepare)
    starting = asyncio.create_task(LocalClient(service).start_run(train_request(photos, tmp_path / "run"),
                                                                  launcher=FAKE_TRAINER))
    await asyncio.sleep(0.2)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert runs.effective_state(tmp_path / "run") == ("stopped", None)
    assert service.training.listing() == []  # nothing was queued
    assert runs.EventTail(tmp_path / "run").read()[-1].message == "interrupted before it started"
    monkeypatch.setattr(launch, "prepare_run", prepare)
    await _retried_and_trained(service, events, photos, tmp_path / "run")


async def test_a_restarted_service_takes_over_a_live_trainer_and_starts_the_waiting_run(tmp_path, photos, demo_dirs):
    db = tmp_path / "queue.sqlite3"
    first_service = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    await first_service.start()
    live = queue_run(first_service, photos, tmp_path / "live")
    waiting = queue_run(first_service, photos, tmp_path / "waiting")
    await first_service.close()  # the trainer lives on; the waiting run stays queued
    pid = int((Path(live.path) / runs.PID_FILE).read_text())
    try:
        assert runs.pid_alive(pid, live.path)
        service = Service(devices="cpu", db_path=db, recover=True)
        events = service.subscribe()
        await service.start()
        try:
            assert service.training.get(live.id).state == TRAINING and service.training.get(live.id).pid == pid
            assert service.training.get(waiting.id).state == WAITING
            await next_event(events, lambda e: isinstance(e, WorkerReady))
            job = service.submit(GenerateRequest(prompt="a red fox", steps=2, seed=2), tmp_path / "out")
            note = (await next_event(events, job_is(job, Note)))[-1]
            assert note.message == "waiting for the CPU: training run live"
            finish(live)
            await next_event(events, run_is(live.id, ENDED))
            started = (await next_event(events, run_is(waiting.id, TRAINING)))[-1]  # older than the job: first
            assert service.store.get(job).state == "queued" and runs.pid_alive(started.pid, started.path)
            finish(waiting)
            seen = await next_event(events, job_is(job, Done))
            assert any(run_is(waiting.id, ENDED)(e) for e in seen)
            assert [service.training.get(r.id).outcome for r in (live, waiting)] == ["done", "done"]
        finally:
            await service.close()
    finally:
        if runs.pid_alive(pid, live.path):
            os.kill(pid, signal.SIGKILL)


async def test_a_live_trainer_of_a_killed_service_holds_its_device_before_it_is_adopted(tmp_path, photos, demo_dirs):
    """A dead service's lease stays fresh for LEASE_TTL where its death cannot be seen (it ran on another machine;
    here, in this very process): its trainer still holds the device meanwhile."""
    db = tmp_path / "queue.sqlite3"
    killed = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    await killed.start()
    live = queue_run(killed, photos, tmp_path / "live")
    await killed.close()
    QueueStore(db).renew_lease(killed.owner, time.time() - LEASE_TTL + 6)  # it died without a word; adopted in 6 s
    service = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    events = service.subscribe()
    await service.start()
    try:
        assert service.training.get(live.id).owner == killed.owner  # not adopted yet
        second = queue_run(service, photos, tmp_path / "second")
        assert second.state == WAITING and second.waiting_for == "the CPU: training run live"
        finish(live)  # once that trainer ends, the device is free: the waiting run starts
        await next_event(events, run_is(second.id, TRAINING))
        finish(second)
    finally:
        await service.close()
        if runs.pid_alive(live.pid, live.path):
            os.kill(live.pid, signal.SIGKILL)


async def test_a_run_waiting_for_another_services_run_starts_once_that_ends_and_each_records_its_end(
        tmp_path, photos, demo_dirs):
    """Two --local trains at once: the second waited for ever for the CPU the first had let go (only a run of its
    own ending made its service look again), and a --local run's row said "training" after its command ended."""
    db = tmp_path / "queue.sqlite3"
    first = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    second = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    events = second.subscribe()
    await first.start()
    await second.start()
    try:
        holder = queue_run(first, photos, tmp_path / "first")
        waiter = queue_run(second, photos, tmp_path / "second")
        assert waiter.state == WAITING and waiter.waiting_for == "the CPU: training run first"
        finish(holder)
        first.training._trainers[holder.id].wait(TIMEOUT)  # not awaited: its service's watch must not see it end
    finally:
        await first.close()  # as the first --local command does once its run is done
    try:
        assert second.training.get(holder.id).state == ENDED
        await next_event(events, run_is(waiter.id, TRAINING))
    finally:
        finish(waiter)
        await second.close()


async def test_an_adopted_run_whose_trainer_ended_meanwhile_ends_at_once(tmp_path, photos, demo_dirs):
    db = tmp_path / "queue.sqlite3"
    first_service = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    await first_service.start()
    run = queue_run(first_service, photos, tmp_path / "run")
    await first_service.close()  # as a --local train does once its run says done
    finish(run)
    for _ in range(TIMEOUT * 10):
        if not runs.pid_alive(run.pid, run.path):
            break
        await asyncio.sleep(0.1)
    service = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    await service.start()
    try:  # ended before any job could be told it waits for the run
        assert service.training.get(run.id).state == ENDED and service.training.get(run.id).outcome == "done"
        assert service.training.holding() == {}
    finally:
        await service.close()


async def test_a_trainer_that_dies_fails_its_run_and_frees_the_device(without_workers, tmp_path, photos):
    service, events = without_workers
    run = queue_run(service, photos, tmp_path / "killed")
    waiting = queue_run(service, photos, tmp_path / "next")
    os.kill(run.pid, signal.SIGKILL)
    ended = (await next_event(events, run_is(run.id, ENDED)))[-1]
    assert ended.outcome == "failed"
    assert ended.error.startswith("the trainer was killed by SIGKILL (out of memory? see dmesg) before finishing; see ")
    assert runs.read_run_json(run.path)["state"] == "failed"
    log = (Path(run.path) / runs.LOG_FILE).read_text().splitlines()  # it could not say so itself
    assert log[-1] == "dreamtty: the trainer was killed by SIGKILL (out of memory? see dmesg) before finishing"
    await next_event(events, run_is(waiting.id, TRAINING))
    finish(waiting)
    await next_event(events, run_is(waiting.id, ENDED))


async def test_a_waiting_run_whose_folder_was_removed_fails_and_the_next_one_starts(without_workers, tmp_path, photos):
    service, events = without_workers
    first = queue_run(service, photos, tmp_path / "first")
    gone = queue_run(service, photos, tmp_path / "gone")
    after = queue_run(service, photos, tmp_path / "after")
    shutil.rmtree(gone.path)
    finish(first)
    ended = (await next_event(events, run_is(gone.id, ENDED)))[-1]
    assert ended.outcome == "failed" and ended.error == f"output: the run folder {gone.path} is gone; nothing was started"
    await next_event(events, run_is(after.id, TRAINING))
    finish(after)
    await next_event(events, run_is(after.id, ENDED))
    assert not Path(gone.path).exists()  # not made again


async def test_a_runs_row_that_does_not_read_ends_failed_and_the_service_starts(tmp_path, photos, demo_dirs):
    db = tmp_path / "queue.sqlite3"
    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    await service.start()
    bad = [queue_run(service, photos, tmp_path / name) for name in ("devices", "state", "pid")]
    await service.close()
    with sqlite3.connect(db) as conn:
        for run, (column, value) in zip(bad, [("devices", '["cpu'), ("state", "paused"), ("pid", "many")]):
            conn.execute(f"UPDATE runs SET {column} = ?, owner = 'gone' WHERE id = ?", (value, run.id))
    service = Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))
    await service.start()
    try:
        good = queue_run(service, photos, tmp_path / "good")
        assert good.state == TRAINING
        ended = [service.training.get(run.id) for run in bad]
        assert [(r.state, r.outcome) for r in ended] == [(ENDED, "failed")] * 3
        assert ended[0].error == "this run has devices that are not valid JSON in the queue file; it cannot start"
        assert ended[1].error.startswith("this run has a path, state, pid, time or text of the wrong type")
        finish(good)
    finally:
        await service.close()
        for run in bad:  # the first one's trainer started before its row was damaged
            (Path(run.path) / runs.STOP_FILE).touch()


def test_a_queue_file_of_an_older_version_gets_the_client_ref_column(tmp_path):
    """A runs table made before client_ref: its rows still read, and new rows keep their ref."""
    from backend.run_schedule import RunStore

    db = tmp_path / "queue.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, devices TEXT NOT "
                     "NULL, launcher TEXT, state TEXT NOT NULL, pid INTEGER, owner TEXT NOT NULL, created REAL NOT "
                     "NULL, updated REAL NOT NULL, outcome TEXT, error TEXT)")
        conn.execute("INSERT INTO runs (path, devices, state, owner, created, updated) "
                     "VALUES ('/r/old', '[\"cpu\"]', 'ended', 'gone', 1, 2)")
    with contextlib.closing(RunStore(db)) as store:
        new = store.add(tmp_path / "new", ["cpu"], None, "me", client_ref="abc")
        assert [(r.path, r.client_ref) for r in store.runs()] == [(str(tmp_path / "new"), "abc"), ("/r/old", None)]
    with contextlib.closing(RunStore(db)) as store:  # opened again: the column is there already
        assert store.get(new).client_ref == "abc"


def test_devices_of_a_run(monkeypatch):
    assert resolve_devices("auto", "cuda:1") == ["cuda:1"]
    assert resolve_devices("cuda", None) == ["cuda:0"]
    assert resolve_devices("cuda:0,cuda:2", None) == ["cuda:0", "cuda:2"]
    # another spelling of a GPU is that GPU: a run on cuda:00 waits for a job on cuda:0, as the schedule compares names
    assert resolve_devices("cuda:00, cuda:002", None) == ["cuda:0", "cuda:2"]
    assert devices_module.parse_devices("cuda,cuda:1") == ["cuda:0", "cuda:1"]  # the workers' devices too
    for text, error in (("gpu", "'gpu' is not allowed"), ("cuda:\u0663", "'cuda:\u0663' is not allowed"),
                        ("cuda:0,cuda:00", "'cuda:0' and 'cuda:00' are the same GPU (cuda:0); name each GPU once"),
                        ("cuda:0, ", "an empty entry in 'cuda:0, ' is not allowed"),
                        ("auto,cuda:1", "auto stands alone, not in a list of GPUs")):
        with pytest.raises(RequestError, match=f"^device: {re.escape(error)}"):
            resolve_devices(text, None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert trainer_env(["cpu"]) == {"CUDA_VISIBLE_DEVICES": ""}
    assert trainer_env(["cuda:0", "cuda:2"]) == {"CUDA_VISIBLE_DEVICES": "0,2"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")  # the service sees three GPUs: its cuda:1 is GPU 5
    assert trainer_env(["cuda:1"]) == {"CUDA_VISIBLE_DEVICES": "5"}


def test_bad_run_settings_make_nothing(tmp_path, photos, demo_dirs, monkeypatch):
    db = tmp_path / "queue.sqlite3"
    service = Service(devices="cpu", db_path=db, pool=NoWorkers("cpu", db))
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 2)
    for devices, launcher, field in (("gpu", None, "device"), ("cuda:2", None, "device"),
                                     ("auto", "accelerate 'launch", "launcher"), ("auto", "\x00", "launcher"),
                                     ("auto", "accelerate\ud800", "launcher")):  # Popen's and SQLite's errors
        with pytest.raises(Exception, match=f"^{field}: "):
            service.prepare_run(train_request(photos, tmp_path / "bad"), devices, launcher)
    assert not (tmp_path / "bad").exists() and service.training.listing() == []


async def test_a_run_whose_start_the_queue_cannot_record_waits_and_starts_once(without_workers, tmp_path, photos,
                                                                               monkeypatch):
    """The trainer was started before the run was recorded as training: a queue file locked then left the row
    "waiting", and the next dispatch started a second trainer in the same folder."""
    import sqlite3

    from backend.queue_store import QueueUnavailable
    from backend.run_schedule import RunStore
    from backend.training import launch

    service, events = without_workers
    real_update, real_start, started = RunStore.update, launch.start_trainer, []

    def locked_once(store, run_id, **values):
        if values.get("state") == TRAINING and not started and not getattr(locked_once, "done", False):
            locked_once.done = True
            raise QueueUnavailable(store.path, sqlite3.OperationalError("database is locked"))
        real_update(store, run_id, **values)

    monkeypatch.setattr(RunStore, "update", locked_once)
    monkeypatch.setattr(launch, "start_trainer", lambda *args, **kwargs: started.append(1) or real_start(*args,
                                                                                                         **kwargs))
    run = queue_run(service, photos, tmp_path / "run")
    said = (await next_event(events, lambda e: isinstance(e, RunState) and e.run == run.id and e.waiting_for))[-1]
    assert said.waiting_for.endswith("database is locked; another program holds it (a backup, an sqlite3 shell?); "
                                     "it starts once the queue file takes writes")
    await next_event(events, run_is(run.id, TRAINING))
    finish(service.training.get(run.id))
    await next_event(events, run_is(run.id, ENDED))
    assert started == [1]


async def test_a_run_the_queue_cannot_take_is_stopped_not_left_starting(without_workers, tmp_path, photos,
                                                                        monkeypatch):
    """A locked queue file refused the run: its folder said "starting", so the retry was refused as running."""
    import sqlite3

    from backend.queue_store import QueueUnavailable
    from backend.run_schedule import RunStore

    service, events = without_workers
    real_add = RunStore.add

    def locked(store, *args, **kwargs):
        raise QueueUnavailable(store.path, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(RunStore, "add", locked)
    with pytest.raises(QueueUnavailable):
        service.enqueue_run(service.prepare_run(train_request(photos, tmp_path / "run"), "auto", FAKE_TRAINER))
    assert runs.effective_state(tmp_path / "run") == ("stopped", None)
    assert runs.EventTail(tmp_path / "run").read()[-1].message.startswith("not queued: queue: cannot use ")
    monkeypatch.setattr(RunStore, "add", real_add)
    await _retried_and_trained(service, events, photos, tmp_path / "run")


def test_a_local_detached_run_that_must_wait_says_it_needs_a_service(tmp_path, photos, monkeypatch, capsys):
    """Its service (this process's) ends with the command: it said "queued: it starts when the CPU is free", and
    waited for a service that adopts it."""
    from tui import cli

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))  # its waiting row must not reach another test
    common = ["--local", "train", "--model", "demo", "--instance-dir", str(photos), "--instance-prompt",
              "a photo of sks toy", "--resolution", "64", "--detach", "--launcher", FAKE_TRAINER]
    assert cli.main([*common, "--output", str(tmp_path / "first")]) == 0
    try:
        assert "training in the background" in capsys.readouterr().err
        assert cli.main([*common, "--output", str(tmp_path / "second")]) == 0
        assert ("queued: it starts when the CPU is free and a dreamtty service runs (dreamtty serve --detach, or the "
                "TUI); ") in capsys.readouterr().err
    finally:
        (tmp_path / "first" / runs.STOP_FILE).touch()


async def test_idle_exit_waits_for_the_training_runs_it_holds(without_workers, tmp_path, photos, monkeypatch):
    """A service with a run training and one waiting behind it exited as idle: the waiting run never started."""
    from types import SimpleNamespace

    from backend import serve

    service, events = without_workers
    monkeypatch.setattr(serve, "IDLE_CHECK", 0.05)
    first, second = (queue_run(service, photos, tmp_path / name) for name in ("first", "second"))
    api = SimpleNamespace(streams=[], last_request=time.monotonic() - 60)
    stop = asyncio.Event()
    idle = asyncio.create_task(serve._exit_when_idle(service, api, 0.1, stop, lambda line: None))
    await asyncio.sleep(0.5)
    assert not stop.is_set()
    for run in (first, second):
        finish(service.training.get(run.id))
        await next_event(events, run_is(run.id, ENDED))
    await asyncio.wait_for(idle, 5)
    assert stop.is_set()

