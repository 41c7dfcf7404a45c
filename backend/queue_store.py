"""The persistent job queue: SQLite under the user state dir, shared by every dreamtty process.

Each service that queues jobs owns them under a random owner id and renews a lease on them
(a heartbeat time in the ``owners`` table). Jobs whose owner's lease ran out (the process was
killed, whatever became of its pid) are adopted by a recovering service and queued again; they
resume at their first image not yet saved, since workers record each saved image here at once.
A queue file that is not a readable database is moved aside (never deleted), unless another process's
service holds it, and a new queue with the rows that still read from it (jobs, training runs, leases)
takes its place; a row that does not read as a job (edited by hand, or by another program) is marked
failed with the reason, and the queue goes on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import sqlite3
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from backend import events, locations
from backend.errors import DreamttyError, RequestError, Transient
from backend.processes import process_exists
from backend.safetext import first_line, summary
from backend.service_files import queue_holder
from backend.values import is_whole

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
LEASE_TTL = 15.0  # seconds without a heartbeat before an owner's jobs may be adopted
MAX_ID = 2**63 - 1  # SQLite's largest INTEGER: no job (nor run) has a larger id
SALVAGE_MISSES = 1000  # rowids in a row that do not read before the salvage of a damaged queue's table gives up
MAX_COPY = 1 << 34  # a damaged queue whose header claims more than this (16 GiB) is read as it is


class QueueUnavailable(Transient):
    """The queue file takes no reads or writes for now: another program holds it locked past SQLite's wait,
    its disk is full or read-only. One line naming the file, with what helps."""

    _HINTS = {"database is locked": "another program holds it (a backup, an sqlite3 shell?)",
              "database or disk is full": "free some space on its disk",
              "attempt to write a readonly database": "the file or its folder is read-only"}

    def __init__(self, path: Path, exc: sqlite3.Error) -> None:
        hint = self._HINTS.get(str(exc))
        super().__init__(f"queue: cannot use {path}: {exc}" + (f"; {hint}" if hint else ""))


# What mends a queue file damaged in use: the next process to open it while no service holds it repairs it.
REPAIR = ("stop what uses it (dreamtty serve --stop; quit a TUI or command run with --local) and start it again: "
          "it repairs the file, keeping the jobs and runs that still read")


class QueueDamaged(QueueUnavailable):
    """The queue file in use is damaged (SQLite reads garbage in it): one line naming it, with what helps.
    A process that opens it while no service holds it repairs it (``QueueStore._open``)."""

    def __init__(self, path: Path, exc: sqlite3.Error) -> None:  # a message of its own: not QueueUnavailable's
        DreamttyError.__init__(self, f"queue: {path} is damaged ({first_line(exc)}); {REPAIR}")


class JobTaken(DreamttyError):
    """Another service adopted the job while its owner renewed no lease (see ``QueueStore.adopt_orphans``)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"another dreamtty service took it over while this one renewed no lease for {LEASE_TTL:g} s "
                         "(it was paused, or the queue file took no writes); it goes on there "
                         f"(dreamtty wait {job_id})")


def queue_access(method):
    """A store method (of an object with ``path``) whose SQLite errors of access raise QueueUnavailable, and of
    a damaged file QueueDamaged."""

    @functools.wraps(method)
    def reach(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise QueueUnavailable(self.path, exc) from None
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):  # a bug (an integrity or programming error): as it is
                raise
            raise QueueDamaged(self.path, exc) from None

    return reach


def _damaged(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file's content is garbage: exactly DatabaseError is SQLITE_CORRUPT or SQLITE_NOTADB.
    Its subclasses (OperationalError: locked, unreadable, read-only...) say nothing against the file."""
    return type(exc) is sqlite3.DatabaseError


def check_limit(limit: int, what: str, given: str | None = None) -> int:
    """``limit`` of a listing of ``what``s, when it is 1..MAX_ID; RequestError naming ``limit`` otherwise,
    with the ``given`` text it was read from (one past MAX_ID stands for any larger number)."""
    if not 1 <= limit <= MAX_ID:
        raise RequestError("limit", f"{summary(given or limit, 40)} is out of range; give 1 to {MAX_ID} {what}s")
    return limit


@dataclass
class Job:
    id: int
    kind: str
    payload: dict  # {"request": ..., "out": ..., "family": ...} for generate jobs
    state: str
    created: float
    updated: float
    error: str | None
    outputs: list[str]
    owner: str
    attempts: int = 0  # times a worker died while running it
    # active, and its owner renews no lease (a process killed): the next recovering service runs it again
    orphaned: bool = False

    @property
    def request(self) -> dict:
        return self.payload.get("request", {})

    @property
    def texts(self) -> list[str]:
        """The results of a kind that makes text (describe), in order."""
        return self.payload.get("texts", [])

    def to_dict(self) -> dict:
        """The job as JSON (the API's form)."""
        return {**asdict(self), "texts": self.texts}

    def end_event(self) -> events.JobEvent | None:
        """The event that ended the job, as read back (None while it is queued or running)."""
        if self.state == "done":
            return events.Done(job=self.id, paths=self.outputs)
        if self.state == "failed":
            return events.Failed(job=self.id, error=self.error or "failed")
        return events.Cancelled(job=self.id) if self.state == "cancelled" else None

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        """The job of ``to_dict``'s JSON; TypeError or ValueError when it does not read as one."""
        return _checked(cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data}))


class QueueStore:
    """The jobs table in ``path``; ``warnings`` says when a damaged file was moved aside or a row that does
    not read as a job was marked failed.

    ``checked`` False: another connection to a queue this process opened (and checked) already, for a thread
    of its own: a damaged file is an error, not moved aside a second time, and no row is read.
    """

    def __init__(self, path: Path, checked: bool = True) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]  # see image_tag
        locations.make_folder(path.parent, "queue")
        try:
            self._db = self._open() if checked else connect(path)
        except sqlite3.Error as exc:
            if _damaged(exc):  # found by a connection of a queue checked already (``checked`` False)
                raise QueueDamaged(path, exc) from None
            raise DreamttyError(f"queue: cannot open {path}: {exc}") from None
        if checked:  # the rows a worker may be given, checked now so that their warnings are said at start
            self._jobs(self._db.execute(f"SELECT {_SELECT} FROM jobs WHERE state NOT IN ({_FINAL_SQL})"))

    def _open(self) -> sqlite3.Connection:
        """Connect; a damaged file is moved aside and replaced by a queue of the rows that still read from it, unless
        a service holds the queue (``backend.service_files.hold_queue``): it would go on with the file moved aside."""
        try:
            return connect(self.path)
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):  # left alone
                raise
            if queue_holder(self.path.parent) is not None:
                raise QueueDamaged(self.path, exc) from None
            moved = _move_aside(self.path)
            db = connect(self.path)
            counts = _salvage(moved, db)
            kept = " and ".join(f"{n} {table if n != 1 else table[:-1]}" for table in ("jobs", "runs")
                                if (n := counts.get(table)))
            self.warnings.append(f"queue: {self.path} is damaged ({exc}); moved it to {moved.name} and started "
                                 + (f"a new queue with the {kept} it could read" if kept else "an empty queue"))
            return db

    def close(self) -> None:
        self._db.close()

    def image_tag(self, job_id: int) -> str:
        """Names job ``job_id`` of this queue among the images being saved (``backend.outputs.save_image``)."""
        return f"{self._name}-{job_id}"

    @queue_access
    def add(self, kind: str, payload: dict, owner: str) -> int:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO jobs (kind, request, state, created, updated, owner) VALUES (?, ?, 'queued', ?, ?, ?)",
            (kind, json.dumps(payload), now, now, str(owner)),
        )
        return int(cur.lastrowid)

    # A service's writes to its own jobs name it as ``owner``: they are made only while it owns the job. A service
    # that renewed no lease for LEASE_TTL (paused, or cut off from the queue file) may have lost it to
    # adopt_orphans, and must not write over the adopter's state, nor record images the adopter makes again.
    @queue_access
    def retry(self, job_id: int, owner: str | None = None) -> None:
        """Queue a job again after its worker died, counting the attempt."""
        self._db.execute("UPDATE jobs SET state = 'queued', attempts = attempts + 1, updated = ? WHERE id = ?"
                         + _OWNED, (time.time(), job_id, *_owner(owner)))

    @queue_access
    def set_state(self, job_id: int, state: str, error: str | None = None, owner: str | None = None) -> bool:
        """Set a job's state (with ``owner``: while it owns the job); whether it was set."""
        return self._db.execute("UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?" + _OWNED,
                                (state, error, time.time(), job_id, *_owner(owner))).rowcount > 0

    @queue_access
    def cancel_queued(self) -> list[int]:
        """Cancel every queued job in one write; their ids, oldest first."""
        rows = self._db.execute("UPDATE jobs SET state = 'cancelled', error = NULL, updated = ? WHERE state = 'queued' "
                                "RETURNING id", (time.time(),)).fetchall()
        return sorted(row[0] for row in rows)

    @queue_access
    def forget_ended(self, before: float) -> int:
        """Delete the jobs that ended before the time ``before`` (their images stay on disk); how many."""
        return self._db.execute(f"DELETE FROM jobs WHERE state IN ({_FINAL_SQL}) AND updated < ?", (before,)).rowcount

    @queue_access
    def set_running(self, job_ids: list[int], owner: str | None = None) -> set[int]:
        """Mark the queued ones of ``job_ids`` (with ``owner``: that it owns) running, in one statement (none when
        the queue takes no writes); the ids marked: another process may have cancelled one since it was read."""
        marks = ",".join("?" * len(job_ids))
        return {row[0] for row in self._db.execute(
            f"UPDATE jobs SET state = 'running', updated = ? WHERE id IN ({marks}) AND state = 'queued'{_OWNED} "
            "RETURNING id", (time.time(), *job_ids, *_owner(owner)))}

    @queue_access
    def add_output(self, job_id: int, path: str, owner: str | None = None) -> None:
        """Record a saved image, once (in one statement: other processes write this table too). With ``owner``,
        JobTaken when another service owns the job now and has not recorded the image itself (its adopter records
        what a paused worker saved: ``backend.outputs.settle``)."""
        recorded = self._db.execute(
            "UPDATE jobs SET outputs = json_insert(outputs, '$[#]', ?1), updated = ?2 WHERE id = ?3 "
            "AND NOT EXISTS (SELECT 1 FROM json_each(outputs) WHERE value = ?1)" + _OWNED,
            (path, time.time(), job_id, *_owner(owner)),
        ).rowcount
        if owner is not None and not recorded and self._db.execute(
                "SELECT 1 FROM jobs WHERE id = ?1 AND owner != ?2 "
                "AND NOT EXISTS (SELECT 1 FROM json_each(outputs) WHERE value = ?3)",
                (job_id, str(owner), path)).fetchone():
            raise JobTaken(job_id)

    @queue_access
    def add_text(self, job_id: int, image: int, text: str) -> None:
        """Record the text a job made as its result ``image`` (kept in its payload's ``texts``), once."""
        texts = "COALESCE(json_extract(request, '$.texts'), '[]')"
        self._db.execute(
            f"UPDATE jobs SET request = json_set(request, '$.texts', json_insert({texts}, '$[#]', ?1)), updated = ?2 "
            f"WHERE id = ?3 AND json_array_length({texts}) = ?4",
            (text, time.time(), job_id, image),
        )

    @queue_access
    def get(self, job_id: int) -> Job | None:
        if not 0 <= job_id <= MAX_ID:
            return None
        row = self._db.execute(f"SELECT {_SELECT} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._mark_orphans([self._job(row)])[0] if row else None

    @queue_access
    def jobs(self, states: tuple[str, ...] | None = None, owner: str | None = None, limit: int | None = None,
             oldest_first: bool = False, with_images: bool = False) -> list[Job]:
        """Jobs newest first (or oldest): those in ``states`` of ``owner`` (all when None), with saved images only
        when ``with_images``, at most ``limit`` (None: all)."""
        query = listing_sql(_SELECT, "jobs", states, owner, limit, oldest_first,
                            ["outputs != '[]'"] if with_images else [])
        jobs = self._jobs(self._db.execute(*query).fetchall())
        if owner is None:  # an owner's own listing (the service's dispatch) has no use for it
            self._mark_orphans(jobs)
        return [job for job in jobs if not states or job.state in states]  # a row that did not read is failed now

    def _mark_orphans(self, jobs: list[Job]) -> list[Job]:
        """``jobs``, each active one whose owner renews no lease marked ``orphaned``."""
        live = {owner for (owner,) in self._db.execute("SELECT owner FROM owners WHERE heartbeat > ?",
                                                        (time.time() - LEASE_TTL,))}
        for job in jobs:
            job.orphaned = job.state in ACTIVE and job.owner not in live
        return jobs

    @queue_access
    def states(self, states: tuple[str, ...] | None, limit: int | None = None,
               oldest_first: bool = True, owner: str | None = None) -> dict[int, str]:
        """The state of each job in ``states`` (all when None) of ``owner`` (any when None) by id, oldest first
        (or newest), at most ``limit`` (None: all); no job is read whole."""
        return dict(self._db.execute(*listing_sql("id, state", "jobs", states, owner, limit, oldest_first)))

    @queue_access
    def states_of(self, job_ids: set[int]) -> dict[int, str]:
        """The state of each of ``job_ids`` that is in the queue, by id (any number: one JSON argument)."""
        return dict(self._db.execute("SELECT id, state FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
                                     (json.dumps(sorted(job_ids)),)))

    @queue_access
    def counts(self, owner: str) -> dict[str, int]:
        """How many jobs of ``owner`` are in each active state."""
        sql = f"SELECT state, COUNT(*) FROM jobs WHERE state IN ({_ACTIVE_SQL}) AND owner = ? GROUP BY state"
        return {state: 0 for state in ACTIVE} | dict(self._db.execute(sql, (str(owner),)).fetchall())

    @queue_access
    def next_queued(self, owner: str) -> Job | None:
        while row := self._db.execute(
            f"SELECT {_SELECT} FROM jobs WHERE state = 'queued' AND owner = ? ORDER BY id LIMIT 1", (str(owner),)
        ).fetchone():
            if (job := self._job(row)).state == "queued":  # else it did not read, and is failed now
                return job
        return None

    def _jobs(self, rows) -> list[Job]:
        return [self._job(row) for row in rows]

    def _job(self, row: tuple) -> Job:
        """The job of ``row``. A row that does not read as one is marked failed (once), saying why."""
        try:
            return _job(row)
        except ValueError as exc:
            job = _unreadable(row, str(exc))
            if (row[3], row[6]) != (job.state, job.error):
                self.set_state(job.id, job.state, job.error)
                self.warnings.append(f"queue: job {job.id} {exc} in {self.path}; marked it failed")
            return job

    @queue_access
    def renew_lease(self, owner: str, now: float | None = None) -> None:
        """Heartbeat: ``owner`` is alive and keeps its jobs for another ``LEASE_TTL`` seconds."""
        self._db.execute("INSERT INTO owners (owner, heartbeat) VALUES (?, ?) "
                         "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat",
                         (str(owner), time.time() if now is None else now))

    @queue_access
    def drop_lease(self, owner: str) -> None:
        self._db.execute("DELETE FROM owners WHERE owner = ?", (str(owner),))

    @queue_access
    def adopt_orphans(self, owner: str) -> list[int]:
        """Queue again, under ``owner``, the active jobs whose owner renewed no lease for LEASE_TTL seconds, or
        whose owner was a process of this machine that is gone (killed: its jobs run again at once, not once its
        lease ran out; the training runs, adopted next, too).

        One statement, so two services recovering at once never both take a job; the adopter's own
        lease is renewed first, so its new jobs are not adopted in turn.
        """
        now = time.time()
        gone = [row for row in self._db.execute("SELECT owner FROM owners WHERE owner != ?", (str(owner),))
                if _process_gone(row[0])]
        self._db.executemany("DELETE FROM owners WHERE owner = ?", gone)
        self.renew_lease(owner, now)
        rows = self._db.execute(
            "UPDATE jobs SET state = 'queued', owner = ?1, updated = ?2 WHERE state IN ('queued', 'running') "
            "AND owner != ?1 AND owner NOT IN (SELECT owner FROM owners WHERE heartbeat > ?2 - ?3) RETURNING id",
            (str(owner), now, LEASE_TTL),
        ).fetchall()
        self._db.execute("DELETE FROM owners WHERE heartbeat <= ? - ?", (now, LEASE_TTL))
        return sorted(r[0] for r in rows)


def new_owner_id() -> str:
    """An owner id for a service's jobs, ``HOST/PID/RANDOM``: never numeric, never reused (unlike a pid)."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


def _process_gone(owner: str) -> bool:
    """Whether ``owner`` (:func:`new_owner_id`) was a process of this machine that no longer exists. One that
    exists (maybe under a reused pid), or of another machine, is not known to be gone: its lease runs out."""
    host, pid = (owner.split("/") + [""])[:2]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not process_exists(int(pid))


_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, request TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    error TEXT, outputs TEXT NOT NULL DEFAULT '[]', owner TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, heartbeat REAL NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL, devices TEXT NOT NULL, launcher TEXT,
    state TEXT NOT NULL, pid INTEGER, owner TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    outcome TEXT, error TEXT, client_ref TEXT)"""  # the training runs (backend.run_schedule.RunStore)
_TABLES = ("jobs", "runs", "owners")
_ADDED = {"jobs": ("attempts", "INTEGER NOT NULL DEFAULT 0"), "runs": ("client_ref", "TEXT")}  # since a version
_SELECT = "id, kind, request, state, created, updated, error, outputs, owner, attempts"
_OWNED = " AND (? IS NULL OR owner = ?)"  # with _owner(owner)'s two values: a write only to a job ``owner`` owns


def _owner(owner: str | None) -> tuple[str | None, str | None]:
    return (None, None) if owner is None else (str(owner), str(owner))

_FINAL_SQL = ", ".join(f"'{state}'" for state in FINAL)
_ACTIVE_SQL = ", ".join(f"'{state}'" for state in ACTIVE)


def connect(path: Path, check: bool = True) -> sqlite3.Connection:
    """Open (or create) the queue database with its tables, and ``check`` it; raises sqlite3 errors. The file
    is made 0600 (prompts are private), and SQLite gives its -wal and -shm files the same mode."""
    _make_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        for table, (column, kind) in _ADDED.items():  # a queue file of an older version
            if column not in _columns(db, table):
                with contextlib.suppress(sqlite3.OperationalError):  # another process added it meanwhile
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        (result,) = db.execute("PRAGMA quick_check(1)").fetchone() if check else ("ok",)
        if result != "ok":  # "*** in database main ***\nPage 6: ...": the line that names the fault
            raise sqlite3.DatabaseError(next((line for line in result.splitlines() if not line.startswith("***")),
                                             "database disk image is malformed"))
    except sqlite3.Error:
        db.close()
        raise
    return db


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _make_private(path: Path) -> None:
    """Create ``path`` 0600 when missing; take group and others' access away from it (and its -wal
    and -shm files) when a queue of ours was made before. Errors are left to sqlite3.connect. An
    existing file is never opened: closing it would drop the SQLite locks of this process's connections."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):
            file = Path(f"{path}{suffix}")
            if file.stat().st_uid == os.getuid():
                file.chmod(0o600)


def _move_aside(path: Path) -> Path:
    """Rename ``path`` and its -wal/-shm files to ``<name>.corrupt-<time>``; never overwrites."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    try:
        for suffix in ("", "-wal", "-shm"):  # a stale WAL would be replayed into the new queue
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{target}{suffix}")
    except OSError as exc:
        raise DreamttyError(f"queue: {path} is damaged and cannot be moved aside: {exc.strerror}") from None
    return target


def _salvage(damaged: Path, db: sqlite3.Connection) -> dict[str, int]:
    """Copy the rows of each table of the ``damaged`` queue file that still read into ``db`` (jobs and runs
    with their ids, owners with their leases); how many of each. It is read from a copy made whole
    (:func:`_whole_copy`)."""
    with tempfile.TemporaryDirectory(dir=damaged.parent) as folder:
        try:
            old = sqlite3.connect(_whole_copy(damaged, Path(folder) / "queue.sqlite3"))
        except (OSError, sqlite3.Error):
            return {}
        with contextlib.closing(old):
            return {table: _copy_rows(old, db, table) for table in _TABLES}


def _copy_rows(old: sqlite3.Connection, db: sqlite3.Connection, table: str) -> int:
    """Copy the rows of ``old``'s ``table`` that read into ``db``'s, in the columns both have; how many. A row on a
    page that does not read is stepped over, and after SALVAGE_MISSES in a row that do not read the rest is given up."""
    try:
        have = _columns(old, table)
    except sqlite3.DatabaseError:  # its schema does not read
        return 0
    columns = [column for column in _columns(db, table) if column in have]
    if not columns:  # a file without the table
        return 0
    insert = f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    kept, last, misses = 0, 0, 0
    while misses < SALVAGE_MISSES:
        try:
            for rowid, *row in old.execute(f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid > ? "
                                           "ORDER BY rowid", (last,)):
                last, misses = rowid, 0
                with contextlib.suppress(sqlite3.Error):  # e.g. a NULL where the table wants a value
                    kept += db.execute(insert, row).rowcount
            break
        except sqlite3.OperationalError:  # not a table of this schema
            break
        except sqlite3.DatabaseError:  # a damaged page: try past the row after the last one read
            last, misses = last + 1, misses + 1
    return kept


def _whole_copy(damaged: Path, copy: Path) -> Path:
    """``damaged`` (and its -wal) copied to ``copy``, lengthened with zeros to the size its header gives:
    SQLite reads nothing of a file cut short, but a page of zeros only fails the rows on it."""
    shutil.copyfile(damaged, copy)
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(f"{damaged}-wal", f"{copy}-wal")
    with open(copy, "rb") as file:
        header = file.read(32).ljust(32, b"\0")  # a file shorter than its header claims no size
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size  # the format writes 65536 as 1
    pages = int.from_bytes(header[28:32], "big")
    if page_size & (page_size - 1) == 0 and 512 <= page_size and copy.stat().st_size < pages * page_size <= MAX_COPY:
        os.truncate(copy, pages * page_size)  # a sparse file: the zeros take no disk
    return copy


def _job(row: tuple) -> Job:
    """The job of a ``jobs`` row; ValueError saying which column does not read as what it should."""
    id_, kind, payload, state, created, updated, error, outputs, owner, attempts = row
    payload = json_column(payload, "a request that is", dict)
    if not isinstance(payload.get("request"), dict):
        raise ValueError("has no request")
    outputs = json_column(outputs, "outputs that are", list)
    return _checked(Job(id_, kind, payload, state, created, updated, error, outputs, str(owner), attempts))


def _checked(job: Job) -> Job:
    """``job``, when each of its fields is of its type; ValueError saying which is not. (A job listed failed
    for a row that did not read has an empty payload.)"""
    if not isinstance(job.payload, dict) or not isinstance(job.payload.get("request", {}), dict):
        raise ValueError("has a payload that is not a job's")
    if not isinstance(job.outputs, list) or not all(isinstance(path, str) for path in job.outputs):
        raise ValueError("has outputs that are not paths")
    if not isinstance(job.kind, str) or job.state not in ACTIVE + FINAL:
        raise ValueError(f"has kind {job.kind!r} and state {job.state!r}, not a job's")
    if not (is_time(job.created) and is_time(job.updated) and is_whole(job.attempts) and is_whole(job.id)
            and isinstance(job.owner, str) and (job.error is None or isinstance(job.error, str))
            and isinstance(job.orphaned, bool)):
        raise ValueError("has an id, time, owner, error or attempt count of the wrong type")
    return job


def listing_sql(columns: str, table: str, states: tuple[str, ...] | None, owner: str | None, limit: int | None,
                oldest_first: bool = False, where: list[str] | None = None) -> tuple[str, list]:
    """The query (and its arguments) of ``table``'s rows in ``states`` of ``owner`` (all when None) that meet
    the conditions ``where`` too, newest first (or oldest), at most ``limit`` (None: all)."""
    where, args = list(where or []), []
    if states:
        where.append(f"state IN ({','.join('?' * len(states))})")
        args += list(states)
    if owner is not None:
        where.append("owner = ?")
        args.append(str(owner))
    sql = f"SELECT {columns} FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
    # SQLite: a negative LIMIT is none
    return f"{sql} ORDER BY id {'ASC' if oldest_first else 'DESC'} LIMIT ?", [*args, -1 if limit is None else limit]


def json_column(text, what: str, kind: type):
    """The JSON ``kind`` (dict or list) in a column; ValueError "has ``what`` not ..." when it is not one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise ValueError(f"has {what} not valid JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"has {what} not a JSON {'object' if kind is dict else 'array'}")
    return value


def is_time(value) -> bool:
    """Whether a column holds a time (seconds since the epoch) as SQLite gives it: a finite number."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def readable_times(created, updated) -> tuple[float, float]:
    """(created, updated) of a row that does not read: each one that is not a time is the other (or 0)."""
    when = updated if is_time(updated) else created if is_time(created) else 0.0
    return (created if is_time(created) else when), when


def _unreadable(row: tuple, why: str) -> Job:
    """A failed job standing for ``row``, which does not read (``why``): it is listed, never run."""
    id_, kind, _, _, created, updated, _, _, owner, _ = row
    return Job(id_, str(kind), {}, "failed", *readable_times(created, updated),
               f"this job {why} in the queue file; it cannot run", [], str(owner))
