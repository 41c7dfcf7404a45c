"""Training runs as the service schedules them: a run asks for its devices and waits until no
generation worker holds them busy; while it trains, their workers get no job and hold no pipeline.

A run's own process, folder, ``events.jsonl``, resume and stop stay as ``backend.training`` makes
them. This module keeps the service's side: the ``runs`` table beside the jobs in the queue database
(its rows outlive the service: a run of a service that died is adopted, like its jobs, once that
service's lease ran out), the trainers the service started, and the workers it asked to free a
device. Which run starts when is decided by the service, in one place with its jobs
(``Service._dispatch``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from backend.errors import DreamttyError
from backend.events import Event, RunState, TrainState
from backend.devices import parse_devices, visible_gpus
from backend.queue_store import (LEASE_TTL, QueueUnavailable, connect, is_time, json_column, listing_sql, queue_access,
                                 readable_times)
from backend.training import launch, runs

WAITING, TRAINING, ENDED = "waiting", "training", "ended"
STATES = (WAITING, TRAINING, ENDED)
RELEASE_PATIENCE = 30.0  # seconds a run waits for its device's workers to free their pipelines, then starts anyway
log = logging.getLogger("dreamtty.runs")


@dataclass
class ScheduledRun:
    """A training run in the service's schedule."""

    id: int
    path: str  # the run folder
    devices: list[str]  # "cpu", or CUDA devices as the service's workers name them ("cuda:0")
    launcher: str | None  # e.g. "accelerate launch --num_processes 2"
    state: str  # waiting, training or ended
    pid: int | None  # of its trainer (or launcher), once started
    owner: str  # the service that schedules it
    created: float
    updated: float
    outcome: str | None = None  # once ended: the run's own state (done, failed, stopped)
    error: str | None = None
    client_ref: str | None = None  # from the client that queued it, which finds the run by it if the answer is lost
    waiting_for: str | None = None  # why it waits (said by its service; not stored)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScheduledRun":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def event(self) -> RunState:
        return RunState(run=self.id, path=self.path, state=self.state, devices=self.devices, pid=self.pid,
                        waiting_for=self.waiting_for, outcome=self.outcome, error=self.error)


# -- devices ----------------------------------------------------------------------------------
def resolve_devices(text: str, default: str | None) -> list[str]:
    """A run's ``--device``: ``auto`` is ``default`` (the device of the service's first worker) or,
    without one, the first GPU (the CPU on a machine without one). RequestError("device") when bad."""
    devices = parse_devices(text)
    if devices == ["auto"]:
        return [default or ("cpu" if visible_gpus() == 0 else "cuda:0")]
    return devices


def device_label(device: str) -> str:
    return "the CPU" if device == "cpu" else f"GPU {device}"


def trainer_env(devices: list[str]) -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` that shows the trainer its devices only (none: it trains on the CPU).
    The service's own ``CUDA_VISIBLE_DEVICES``, when set, maps its ``cuda:N`` to the GPUs it names."""
    if devices == ["cpu"]:
        return {"CUDA_VISIBLE_DEVICES": ""}
    indexes = [int(d.partition(":")[2] or 0) for d in devices]
    ours = os.environ.get("CUDA_VISIBLE_DEVICES")
    if ours is not None:
        entries = [e.strip() for e in ours.split(",")]
        return {"CUDA_VISIBLE_DEVICES": ",".join(entries[i] for i in indexes if i < len(entries))}
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, indexes))}


# -- the table (its schema is the queue file's, in backend.queue_store) -------------------------------
_SELECT = "id, path, devices, launcher, state, pid, owner, created, updated, outcome, error, client_ref"


class RunStore:
    """The ``runs`` table of the queue database at ``path`` (whose ``owners`` leases it shares)."""

    @queue_access
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = connect(path, check=False)  # checked by the service's QueueStore

    def close(self) -> None:
        self._db.close()

    @queue_access
    def add(self, path: Path, devices: list[str], launcher: str | None, owner: str,
            client_ref: str | None = None) -> int:
        now = time.time()
        cur = self._db.execute("INSERT INTO runs (path, devices, launcher, state, owner, created, updated, client_ref) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (str(path), json.dumps(devices), launcher, WAITING,
                                                                   owner, now, now, client_ref))
        return int(cur.lastrowid)

    @queue_access
    def get(self, run_id: int) -> ScheduledRun | None:
        row = self._db.execute(f"SELECT {_SELECT} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._run(row) if row else None

    @queue_access
    def runs(self, states: tuple[str, ...] | None = None, owner: str | None = None, limit: int = 200,
             oldest_first: bool = False) -> list[ScheduledRun]:
        query = listing_sql(_SELECT, "runs", states, owner, limit, oldest_first)
        found = [self._run(row) for row in self._db.execute(*query).fetchall()]
        return [run for run in found if not states or run.state in states]  # a row that did not read has ended

    def _run(self, row: tuple) -> ScheduledRun:
        """The run of ``row``. A row that does not read as one (edited by hand, or by another program) is
        ended as failed (once), saying why; the schedule goes on."""
        try:
            return _run(row)
        except ValueError as exc:
            run = _unreadable(row, str(exc))
            if (row[4], row[9], row[10]) != (run.state, run.outcome, run.error):
                self.update(run.id, state=run.state, outcome=run.outcome, error=run.error)
                log.warning("run %s %s in the queue file; ended it as failed", run.id, exc)
            return run

    @queue_access
    def update(self, run_id: int, **values) -> None:
        """Set ``state``, ``pid``, ``outcome`` or ``error``."""
        names = ", ".join(f"{name} = ?" for name in values)
        self._db.execute(f"UPDATE runs SET {names}, updated = ? WHERE id = ?", (*values.values(), time.time(), run_id))

    @queue_access
    def adopt_orphans(self, owner: str) -> list[int]:
        """Take over, for ``owner``, the waiting and training runs of services whose lease ran out
        (``backend.queue_store``'s ``owners``): they keep their state, and a trainer that still
        lives is watched again."""
        now = time.time()
        rows = self._db.execute(
            "UPDATE runs SET owner = ?1, updated = ?2 WHERE state IN ('waiting', 'training') AND owner != ?1 "
            "AND owner NOT IN (SELECT owner FROM owners WHERE heartbeat > ?2 - ?3) RETURNING id",
            (owner, now, LEASE_TTL)).fetchall()
        return sorted(r[0] for r in rows)


def _run(row: tuple) -> ScheduledRun:
    """The run of a ``runs`` row; ValueError saying which column does not read as what it should."""
    id_, path, devices, launcher, state, pid, owner, created, updated, outcome, error, client_ref = row
    devices = json_column(devices, "devices that are", list)
    if not devices or not all(isinstance(device, str) for device in devices):
        raise ValueError("has no devices")
    if not (isinstance(path, str) and state in STATES and is_time(created) and is_time(updated)
            and (pid is None or isinstance(pid, int))
            and all(value is None or isinstance(value, str) for value in (launcher, outcome, error, client_ref))):
        raise ValueError("has a path, state, pid, time or text of the wrong type")
    return ScheduledRun(id_, path, devices, launcher, state, pid, str(owner), created, updated, outcome, error,
                        client_ref)


def _unreadable(row: tuple, why: str) -> ScheduledRun:
    """An ended, failed run standing for ``row``, which does not read (``why``): it is listed, never started."""
    id_, path, _, _, _, _, owner, created, updated, *_ = row
    return ScheduledRun(id_, str(path), [], None, ENDED, None, str(owner), *readable_times(created, updated),
                        "failed", f"this run {why} in the queue file; it cannot start")


# -- one service's runs ---------------------------------------------------------------------------
class TrainingRuns:
    """The runs a service schedules: queued, started once their device's workers let go of it,
    watched, and ended. ``publish`` announces each change (a ``RunState`` event)."""

    def __init__(self, db_path: Path, owner: str, publish: Callable[[Event], None]) -> None:
        self.store = RunStore(db_path)
        self.owner = owner
        self._publish = publish
        self._trainers: dict[int, subprocess.Popen] = {}  # the trainers this service started
        self._releasing: dict[int, tuple[set[int], float]] = {}  # run -> workers still freeing its device, deadline
        self._waiting_for: dict[int, str] = {}

    def close(self) -> None:
        """Record the end of the runs whose trainer exited (a ``--local`` train ends right after its run: its
        row said "training" for ever); the others keep training."""
        with contextlib.suppress(DreamttyError):  # the queue file takes no writes: the next service ends them
            self._end_gone()
        self.store.close()

    def add(self, run_dir: Path, devices: list[str], launcher: str | None,
            client_ref: str | None = None) -> ScheduledRun:
        """Queue a prepared run (its folder says "waiting" until it starts). A queue file that takes no write
        leaves the folder "stopped", not "starting" (which would refuse the retry)."""
        try:
            run_id = self.store.add(run_dir, devices, launcher, self.owner, client_ref)
        except QueueUnavailable as exc:
            withdraw(run_dir, f"not queued: {exc}")
            raise
        _record(run_dir, state=runs.WAITING)
        run = self.store.get(run_id)
        self._publish(run.event())
        return run

    def get(self, run_id: int) -> ScheduledRun | None:
        run = self.store.get(run_id)
        return run and self._told(run)

    def listing(self, states: tuple[str, ...] | None = None, limit: int = 200) -> list[ScheduledRun]:
        """Every service's runs, newest first, with why each of this service's waiting runs waits."""
        return [self._told(run) for run in self.store.runs(states, limit=limit)]

    def _told(self, run: ScheduledRun) -> ScheduledRun:
        return replace(run, waiting_for=self._waiting_for.get(run.id)) if run.state == WAITING else run

    def busy(self) -> bool:
        """Whether this service has a run waiting for its devices or training."""
        return bool(self.store.runs((WAITING, TRAINING), self.owner, limit=1))

    def waiting(self) -> list[ScheduledRun]:
        """This service's runs that wait for their devices, oldest first."""
        return [run for run in self.store.runs((WAITING,), self.owner, oldest_first=True)
                if run.id not in self._releasing]

    def holding(self) -> dict[str, ScheduledRun]:
        """Device -> the run that trains on it, or is about to: this service's, or one whose service
        died and whose trainer lives on, until its lease runs out and it is adopted."""
        training = self.store.runs((TRAINING,))
        orphans = [run for run in training if run.owner != self.owner and runs.pid_alive(run.pid, run.path)]
        held = [*orphans, *(run for run in training if run.owner == self.owner), *map(self.store.get, self._releasing)]
        return {device: run for run in held for device in run.devices}

    def wait(self, run: ScheduledRun, why: str) -> None:
        """Say why ``run`` waits, when that changed."""
        if self._waiting_for.get(run.id) != why:
            self._waiting_for[run.id] = why
            self._publish(replace(run, waiting_for=why).event())

    def begin(self, run: ScheduledRun, workers: dict[int, str], release: Callable[[int], None]) -> bool:
        """Start ``run`` once ``workers`` (worker id -> device, those on its devices) have freed their pipelines.
        True when a run could not start (it ended failed): its devices are free again."""
        self._releasing[run.id] = (set(workers), time.monotonic() + RELEASE_PATIENCE)
        for worker, device in workers.items():
            self.wait(run, f"{device_label(device)}: its worker is freeing its models")
            release(worker)
        return self._launch_ready()

    def released(self, worker: int) -> bool:
        """``worker`` holds no pipeline any more (it freed them, or it was restarted). True as :meth:`begin`."""
        for pending, _ in self._releasing.values():
            pending.discard(worker)
        return self._launch_ready()

    def check(self) -> bool:
        """Start the runs whose workers took too long to let go; end those whose trainer is gone.
        True when a run ended (its devices are free again)."""
        return self._launch_ready() | self._end_gone()

    def _end_gone(self) -> bool:
        """End this service's runs whose trainer is gone; True when one was."""
        ended = False
        for run in self.store.runs((TRAINING,), self.owner):
            proc = self._trainers.get(run.id)
            code = proc.poll() if proc is not None else None
            if (proc is not None and code is not None) or (proc is None and not runs.pid_alive(run.pid, run.path)):
                self._trainer_gone(run, code)
                ended = True
        return ended

    def stop(self, run_id: int) -> bool:
        """Stop a run: a training one after its step (with a checkpoint), a waiting one at once, taken
        off the queue. False when it had already ended (or is unknown)."""
        run = self.store.get(run_id)
        if run is None or run.state == ENDED:
            return False
        if run.state == TRAINING:
            launch.request_stop(Path(run.path))
            return True
        self._releasing.pop(run.id, None)
        self._waiting_for.pop(run.id, None)
        withdraw(run.path, "taken off the queue before it started")
        self._end(run, "stopped", None)
        return True

    # -- internals ---------------------------------------------------------------------------
    def _launch_ready(self) -> bool:
        """Launch the runs whose workers let go (or took too long); True when one could not start."""
        now, failed = time.monotonic(), False
        for run_id, (pending, deadline) in list(self._releasing.items()):
            if not pending or now >= deadline:
                del self._releasing[run_id]
                failed |= not self._launch(self.store.get(run_id))
        return failed

    def _launch(self, run: ScheduledRun) -> bool:
        """Start ``run``'s trainer; False when it cannot start (its folder is gone, ...): the run ends failed. The
        run is claimed first: a queue file that takes no write then leaves it waiting (tried again at the next
        dispatch), where a trainer started first would have been started again, a second one in its folder."""
        self._waiting_for.pop(run.id, None)
        try:
            self.store.update(run.id, state=TRAINING)
        except QueueUnavailable as exc:
            self.wait(run, f"{exc}; it starts once the queue file takes writes")
            return True
        try:
            proc = launch.start_trainer(Path(run.path), run.launcher, env=trainer_env(run.devices))
        except DreamttyError as exc:  # start_trainer recorded it in run.json where it could
            self._end(run, "failed", str(exc))
            return False
        self._trainers[run.id] = proc  # watched here through it; its pid in the queue is for another service
        _record(run.path, state="starting")
        self.store.update(run.id, pid=proc.pid)
        self._publish(self.store.get(run.id).event())
        return True

    def _trainer_gone(self, run: ScheduledRun, code: int | None) -> None:
        """The run's trainer exited: a run it left "running" failed (it was killed, or crashed)."""
        self._trainers.pop(run.id, None)
        data = runs.record_trainer_gone(Path(run.path), code)
        self._end(run, data.get("state", "failed"), data.get("error"))

    def _end(self, run: ScheduledRun, outcome: str, error: str | None) -> None:
        self.store.update(run.id, state=ENDED, outcome=outcome, error=error)
        self._publish(self.store.get(run.id).event())


def withdraw(run_dir: str | Path, why: str) -> None:
    """Record a run that will not start as "stopped" (a waiting or "starting" one keeps a new start out
    of its folder), and tell its followers ``why``."""
    _record(run_dir, state="stopped", error=None)
    with contextlib.suppress(OSError):  # a full disk: run.json says it where it could
        runs.EventWriter(Path(run_dir))(TrainState(state="stopped", message=why))


def _record(run_dir: str | Path, **changes) -> dict:
    """Merge ``changes`` into the run's run.json; a folder that cannot be written (removed, a full
    disk) leaves the schedule as it is and is logged."""
    try:
        return runs.update_run_json(Path(run_dir), **changes)
    except OSError as exc:
        log.error("cannot record %s in %s: %s", changes, run_dir, exc)
        return {**runs.read_run_json(Path(run_dir)), **changes}
