"""The queue file taking no writes for a while (another program holds it locked, its disk is full): one line
naming it, what workers report waits in order, and the queue moves on by itself once it takes writes again.
A page of the file damaged: said in one line, and repaired keeping every row that still reads."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, suppress
from pathlib import Path

import pytest

from backend import events as ev, worker
from backend.errors import DreamttyError
from backend.queue_store import REPAIR, QueueDamaged, QueueStore, QueueUnavailable
from backend.run_schedule import WAITING, RunStore
from backend.service_files import hold_queue
from backend.service import Service
from test_job_groups import _StartedPool, _submit


def _hold(db) -> sqlite3.Connection:
    """Another program's connection that holds the queue file locked (as a backup or an sqlite3 shell)."""
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    return other


def _impatient(*stores) -> None:
    """SQLite waits 10 s for a lock by default; the test's stores give up at once."""
    for store in stores:
        store._db.execute("PRAGMA busy_timeout = 50")


def test_a_locked_queue_is_one_line_naming_the_file(tmp_path):
    db = tmp_path / "queue.sqlite3"
    with closing(QueueStore(db)) as store:
        job = store.add("generate", {"request": {}}, "me")
        _impatient(store)
        with closing(_hold(db)):
            with pytest.raises(QueueUnavailable) as raised:
                store.set_state(job, "running")
        assert str(raised.value) == (f"queue: cannot use {db}: database is locked; another program holds it "
                                     "(a backup, an sqlite3 shell?)")
        assert store.get(job).state == "queued"  # nothing half-written


async def test_what_a_worker_reports_waits_for_the_locked_queue_and_the_queue_moves_on(tmp_path, monkeypatch):
    monkeypatch.setattr("backend.service.WRITE_RETRY", 0.1)
    db = tmp_path / "queue.sqlite3"
    pool = _StartedPool(1)
    service = Service(devices="cpu", db_path=db, pool=pool)
    events = service.subscribe()
    first, second = _submit(service, seed=1), _submit(service, steps=6)  # not one group
    await service.start()
    try:
        assert pool.given == [(0, [first])]
        _impatient(service.store, service.training.store)
        other = _hold(db)
        service._handle(ev.Started(job=first, worker=0))
        service._handle(ev.Step(job=first, worker=0, image=0, count=1, step=1, total=2, its=1.0, eta=1.0))
        service._handle(ev.Done(job=first, worker=0))
        await asyncio.sleep(0.3)  # a few tries
        seen = [events.get_nowait() for _ in range(events.qsize())]
        warning = f"queue: cannot use {db}: database is locked; another program holds it (a backup, an sqlite3 shell?)"
        assert [(type(e), getattr(e, "message", None)) for e in seen] == [
            (ev.Log, f"{warning}; the jobs' states are written when it can be, and the queue goes on then"),
            (ev.Step, None)]  # said once; the step goes on, the start and the end wait
        assert pool.given == [(0, [first])] and pool.slots[0].jobs == [first]
        other.execute("COMMIT")
        other.close()
        deadline = time.monotonic() + 10
        while len(pool.given) < 2:
            assert time.monotonic() < deadline, "the queue did not move on"
            await asyncio.sleep(0.05)
        seen = [events.get_nowait() for _ in range(events.qsize())]
        assert [type(e) for e in seen] == [ev.Started, ev.Done, ev.Log]  # in order, then said once
        assert seen[-1].message == f"queue: {db} takes writes again; the jobs go on"
        assert service.store.get(first).state == "done" and pool.given[1] == (0, [second])
        assert service.store.get(second).state == "running"
    finally:
        await service.close()


class _Store:
    """A queue that takes no writes ``refusals`` times, then records."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.recorded = refusals, []

    def add_output(self, job_id: int, path: str, owner: str | None = None) -> None:
        if self.refusals:
            self.refusals -= 1
            raise QueueUnavailable("/q.sqlite3", sqlite3.OperationalError("database or disk is full"))
        self.recorded.append((job_id, path))


def test_a_saved_image_waits_for_its_record_then_fails_naming_it(monkeypatch):
    monkeypatch.setattr(worker, "RECORD_RETRY", 0.01)
    said: list[str] = []
    store = _Store(refusals=3)
    worker.record_output(store, 7, "/out/a.png", said.append)
    assert store.recorded == [(7, "/out/a.png")] and said == [
        "queue: cannot use /q.sqlite3: database or disk is full; free some space on its disk; the job waits until "
        "it can record its image"]
    monkeypatch.setattr(worker, "RECORD_PATIENCE", 0.05)
    with pytest.raises(DreamttyError, match=r"disk is full; free some space on its disk; the image /out/b.png is "
                                            r"saved but not recorded$"):
        worker.record_output(_Store(refusals=10**6), 7, "/out/b.png", said.append)


def test_a_saved_image_fails_at_once_on_a_damaged_queue(monkeypatch):
    """It waited RECORD_PATIENCE (10 minutes) for a file that mends only when the service starts again."""
    class Damaged:
        def add_output(self, job_id: int, path: str, owner: str | None = None) -> None:
            raise QueueDamaged(Path("/q.sqlite3"), sqlite3.DatabaseError("database disk image is malformed"))

    said: list[str] = []
    began = time.monotonic()
    with pytest.raises(DreamttyError, match=r"^queue: /q.sqlite3 is damaged .*; the image /out/a.png is saved but "
                                            r"not recorded$"):
        worker.record_output(Damaged(), 7, "/out/a.png", said.append)
    assert said == [] and time.monotonic() - began < worker.RECORD_RETRY


def _damage(db: Path, marker: str) -> None:
    """Overwrite the page of the closed queue ``db`` that holds ``marker`` with garbage, as a bad sector does."""
    data = db.read_bytes()
    size = int.from_bytes(data[16:18], "big")
    with open(db, "r+b") as file:
        file.seek(data.index(marker.encode()) // size * size)
        file.write(b"\xff" * size)


def _damage_in_use(db: Path, marker: str) -> None:
    """``_damage`` an open queue: another program's write then has its connections read the file again."""
    _damage(db, marker)
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("INSERT INTO owners VALUES ('other', 0)")


def _queue(db: Path, prompts: list[str], owner: str = "gone") -> list[int]:
    """A closed queue with a job of each of ``prompts``; their ids."""
    with closing(QueueStore(db)) as store:
        return [store.add("generate", {"request": {"prompt": prompt}}, owner) for prompt in prompts]


def test_a_damaged_page_is_named_in_one_line(tmp_path):
    db = tmp_path / "queue.sqlite3"
    _queue(db, [f"{i:04}" * 100 for i in range(30)])
    _damage(db, "0020" * 100)
    with closing(QueueStore(db)) as store:
        (warning,) = store.warnings
    assert re.fullmatch(rf"queue: {re.escape(str(db))} is damaged \(Page \d+: [^\n]+\); moved it to queue\.sqlite3"
                        r"\.corrupt-[-\d]+ and started a new queue with the \d+ jobs it could read", warning)


def test_a_damaged_queue_is_repaired_keeping_its_training_runs_and_leases(tmp_path):
    """Every table that still reads is carried over: a waiting run stays queued, and the jobs of a service that
    renews its lease are not adopted as if it were gone."""
    db = tmp_path / "queue.sqlite3"
    jobs = _queue(db, [f"{i:04}" * 100 for i in range(30)], owner="live")
    with closing(QueueStore(db)) as store, closing(RunStore(db)) as runs:
        store.renew_lease("live")
        run = runs.add(tmp_path / "run", ["cpu"], None, "live")
    _damage(db, "0020" * 100)
    with closing(QueueStore(db)) as store, closing(RunStore(db)) as runs:
        kept = store.jobs()
        assert store.warnings[0].endswith(f"started a new queue with the {len(kept)} jobs and 1 run it could read")
        assert 20 <= len(kept) < len(jobs) and {job.id for job in kept} < set(jobs)
        assert [(r.id, r.state, r.owner) for r in runs.runs()] == [(run, WAITING, "live")]
        assert not any(job.orphaned for job in kept)
        assert store.adopt_orphans("next") == [] and runs.adopt_orphans("next") == []


def _damaged_line(db: Path) -> str:
    return f"queue: {db} is damaged (database disk image is malformed); {REPAIR}"


def test_a_queue_damaged_in_use_is_one_line_saying_what_helps(tmp_path):
    db = tmp_path / "queue.sqlite3"
    _queue(db, [f"{i:04}" * 100 for i in range(30)])
    with closing(QueueStore(db)) as store:
        _damage_in_use(db, "0020" * 100)
        with pytest.raises(QueueDamaged) as raised:
            store.jobs()
        assert str(raised.value) == _damaged_line(db)
        with pytest.raises(QueueDamaged):  # another connection to it, for a thread
            QueueStore(db, checked=False)


async def test_the_api_answers_a_queue_damaged_in_use_in_one_line(tmp_path, caplog):
    from aiohttp.test_utils import TestClient, TestServer

    from backend.api import Api

    db = tmp_path / "queue.sqlite3"
    _queue(db, [f"{i:04}" * 100 for i in range(30)])
    service = Service(devices="cpu", db_path=db, pool=_StartedPool(1))
    try:
        _damage_in_use(db, "0020" * 100)
        async with TestClient(TestServer(Api(service, token="t").app), headers={"Authorization": "Bearer t"}) as http:
            async with http.get("/v1/jobs") as answer:
                assert (answer.status, await answer.json()) == (503, {"error": _damaged_line(db)})
        assert not [record for record in caplog.records if record.exc_info]  # no traceback in the service log
    finally:
        service.store.close()
        service.training.close()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the lease's thread lives on
async def test_what_a_worker_reports_to_a_damaged_queue_waits_with_what_helps_said_once(tmp_path):
    """A damaged queue's line says what helps (stop and start the service); "the jobs' states are written when it
    can be" after it was not so: the file is never written again until the service restarts. The thread that
    renews the service's lease died opening the damaged file."""
    db = tmp_path / "queue.sqlite3"
    _queue(db, [f"{i:04}" * 100 for i in range(30)])
    service = Service(devices="cpu", db_path=db, pool=_StartedPool(1))
    events = service.subscribe()
    await service.start()
    try:
        _damage_in_use(db, "0020" * 100)
        for job in range(1, 4):  # a write to a damaged page fails, and those after it wait
            service._handle(ev.Done(job=job, worker=0))
        seen = [events.get_nowait() for _ in range(events.qsize())]
        assert [e.message for e in seen if isinstance(e, ev.Log)] == [_damaged_line(db)]  # said once
    finally:
        with suppress(DreamttyError):
            await service.close()


def test_a_damaged_queue_that_a_service_runs_is_left_to_it(tmp_path):
    """A --local command (or dreamtty jobs with no service answering) does not move aside the file that a running
    service holds open: the service would go on with the file moved aside, and the two queues would diverge."""
    db = tmp_path / "queue.sqlite3"
    _queue(db, [f"{i:04}" * 100 for i in range(30)])
    _damage(db, "0020" * 100)
    holds = ("import os, sys; from pathlib import Path; from backend.service_files import hold_queue; "
             "hold_queue(Path(sys.argv[1]), {'pid': os.getpid()}); print(flush=True); sys.stdin.read()")
    service = subprocess.Popen(  # holds the queue as dreamtty serve does
        [sys.executable, "-c", holds, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
    try:
        service.stdout.readline()
        with pytest.raises(QueueDamaged, match=rf"^queue: {re.escape(str(db))} is damaged \(Page \d+: .*\); "
                                               rf"{re.escape(REPAIR)}$"):
            QueueStore(db)
        assert not list(tmp_path.glob("queue.sqlite3.corrupt-*"))
    finally:
        service.communicate(timeout=60)
    held = hold_queue(tmp_path, {"pid": os.getpid()})  # the service that holds it repairs it
    try:
        with closing(QueueStore(db)) as store:
            assert "moved it to" in store.warnings[0] and store.jobs()
    finally:
        os.close(held)
