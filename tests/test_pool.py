"""Worker processes: started off the event loop, forked from a fork server with the service's environment of
the moment, tried again when they cannot start, and gone when their service is killed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backend import pool as pool_module
from backend.events import WorkerReady, dumps
from backend.pool import ProcessPool
from backend.worker import PARENT_CHECK

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork server is used on Linux")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """Workers as on a machine without a GPU: forked from the fork server."""
    monkeypatch.setattr(pool_module, "visible_gpus", lambda: 0)


async def _ready(pool: ProcessPool, died: list | None = None) -> None:
    """Start ``pool`` and wait for its worker's WorkerReady (deaths go to ``died``)."""
    ready = asyncio.Event()
    pool.start(lambda event: ready.set() if isinstance(event, WorkerReady) else None,
               lambda slot, jobs, why, counts: (died if died is not None else []).append(why))
    await asyncio.wait_for(ready.wait(), 60)


def _probe(worker: int, device: str, jobs, events, cancel, log_path: str, db_path: str, parent: int,
           nice: int) -> None:
    """A worker that writes what it started with beside its log, says it is ready and waits to be closed."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).with_suffix(".json").write_text(json.dumps(
        {"probe": os.environ.get("DREAMTTY_PROBE"), "folder": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
         "parent": parent}))
    events.send_bytes(dumps(WorkerReady(worker=worker, device="cpu", cuda_count=0)).encode())
    jobs.get()


async def test_a_worker_starts_with_the_services_environment_and_folder_of_the_moment(monkeypatch, tmp_path):
    monkeypatch.setattr(pool_module, "_worker_entry", _probe)
    seen = []
    for name in ("first", "second"):  # the fork server started by the first at the latest
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        monkeypatch.setenv("DREAMTTY_PROBE", name)
        monkeypatch.setenv("DREAMTTY_HOME", str(folder))
        pool = ProcessPool("cpu", tmp_path / "queue.sqlite3")
        await _ready(pool)
        await pool.close()
        seen.append(json.loads(next(folder.rglob("worker-0.json")).read_text()))
    assert [(s["probe"], s["folder"]) for s in seen] == [(n, str(tmp_path / n)) for n in ("first", "second")]
    assert all(s["parent"] == os.getpid() != s["ppid"] for s in seen)  # forked by the fork server, not by us


class _FlakyStart:
    """A start-method context whose first process start fails; it records the thread each start ran on."""

    def __init__(self, context) -> None:
        self.context = context
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name: str):
        return getattr(self.context, name)

    def Process(self, **kwargs):  # noqa: N802 - multiprocessing's name
        return _FlakyProcess(self, self.context.Process(**kwargs))


class _FlakyProcess:
    """A process whose ``start`` goes through ``_FlakyStart``."""

    def __init__(self, flaky: _FlakyStart, process) -> None:
        self.flaky, self.process = flaky, process

    def __getattr__(self, name: str):
        return getattr(self.process, name)

    def start(self) -> None:
        self.flaky.threads.append(threading.current_thread())
        if len(self.flaky.threads) == 1:
            raise OSError("the fork server is gone")
        self.process.start()


async def test_a_worker_starts_off_the_event_loop_and_one_that_cannot_start_is_tried_again(monkeypatch, tmp_path,
                                                                                          caplog):
    context = _FlakyStart(pool_module._context())
    monkeypatch.setattr(pool_module, "_context", lambda: context)
    monkeypatch.setattr(pool_module, "_worker_entry", _probe)
    monkeypatch.setattr(pool_module, "RESPAWN_BACKOFF", (0.05, 0.05))
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))
    died: list[str] = []
    pool = ProcessPool("cpu", tmp_path / "queue.sqlite3")
    try:
        with caplog.at_level(logging.WARNING, logger="dreamtty.pool"):
            await _ready(pool, died)
        assert pool.slots[0].pid == json.loads(next(tmp_path.rglob("worker-0.json")).read_text())["pid"]
    finally:
        await pool.close()
    assert len(context.threads) == 2 and threading.main_thread() not in context.threads
    assert died == ["worker ended"] and "worker 0 did not start: the fork server is gone" in caplog.text


SERVICE = """
import asyncio, sys
from pathlib import Path
from backend.events import WorkerReady
from backend.pool import ProcessPool
from backend.worker import PARENT_CHECK

async def main():
    pool = ProcessPool("cpu", Path(sys.argv[1]), nice=5)
    ready = asyncio.Event()
    pool.start(lambda event: ready.set() if isinstance(event, WorkerReady) else None, lambda *args: None)
    await ready.wait()
    print(pool.slots[0].pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process no one has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_an_idle_worker_exits_when_its_service_is_killed_and_its_fork_server_ran_at_its_niceness(tmp_path):
    service = subprocess.Popen([sys.executable, "-c", SERVICE, str(tmp_path / "queue.sqlite3")],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "DREAMTTY_HOME": str(tmp_path)})
    try:
        worker = int(service.stdout.readline())
        fork_server = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
        niceness = max(_nice(0), 5)  # it imported torch yielding the CPU, as its workers do, not the service
        assert (_nice(service.pid), _nice(fork_server), _nice(worker)) == (_nice(0), niceness, niceness)
        time.sleep(PARENT_CHECK * 1.5)
        assert _running(worker)  # while its service lives
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait()
    deadline = time.monotonic() + 15
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker)
