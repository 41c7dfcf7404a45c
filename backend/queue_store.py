"""The persistent job queue: one SQLite table under the user state dir.

Jobs survive the app or a worker dying: on restart, jobs that were queued or
running are queued again. A queue file that is not a readable database is moved
aside (never deleted) and an empty queue takes its place.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from backend import locations
from backend.errors import DreamttyError

ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")


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
    owner: int

    @property
    def request(self) -> dict:
        return self.payload.get("request", {})


class QueueStore:
    """The jobs table in ``path``; ``warnings`` says when a damaged file was moved aside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []
        locations.make_folder(path.parent, "queue")
        try:
            self._db = self._open()
        except sqlite3.Error as exc:
            raise DreamttyError(f"queue: cannot open {path}: {exc}") from None

    def _open(self) -> sqlite3.Connection:
        """Connect; a damaged file is moved aside and replaced by an empty queue."""
        try:
            return _connect(self.path)
        except sqlite3.DatabaseError as exc:
            # Exactly DatabaseError is SQLITE_CORRUPT or SQLITE_NOTADB: the content is garbage.
            # Subclasses (OperationalError: locked, unreadable, read-only...) leave the file alone.
            if type(exc) is not sqlite3.DatabaseError:
                raise
            moved = _move_aside(self.path)
            self.warnings.append(f"queue: {self.path} is damaged ({exc}); moved it to {moved.name} "
                                 "and started an empty queue")
            return _connect(self.path)

    def close(self) -> None:
        self._db.close()

    def add(self, kind: str, payload: dict, owner: int) -> int:
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO jobs (kind, request, state, created, updated, owner) VALUES (?, ?, 'queued', ?, ?, ?)",
            (kind, json.dumps(payload), now, now, owner),
        )
        return int(cur.lastrowid)

    def set_state(self, job_id: int, state: str, error: str | None = None) -> None:
        self._db.execute(
            "UPDATE jobs SET state = ?, error = ?, updated = ? WHERE id = ?", (state, error, time.time(), job_id)
        )

    def add_output(self, job_id: int, path: str) -> None:
        job = self.get(job_id)
        if job is not None:
            self._db.execute(
                "UPDATE jobs SET outputs = ?, updated = ? WHERE id = ?",
                (json.dumps([*job.outputs, path]), time.time(), job_id),
            )

    def get(self, job_id: int) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, states: tuple[str, ...] | None = None, owner: int | None = None, limit: int = 500) -> list[Job]:
        sql, args = "SELECT * FROM jobs", []
        where = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self._db.execute(sql, args).fetchall()]

    def next_queued(self, owner: int) -> Job | None:
        row = self._db.execute(
            "SELECT * FROM jobs WHERE state = 'queued' AND owner = ? ORDER BY id LIMIT 1", (owner,)
        ).fetchone()
        return _job(row) if row else None

    def adopt_orphans(self, owner: int, alive) -> list[int]:
        """Requeue active jobs whose owner process is gone (``alive(pid)`` is False) under ``owner``."""
        adopted = []
        for job in self.jobs(ACTIVE):
            if job.owner != owner and not alive(job.owner):
                self._db.execute(
                    "UPDATE jobs SET state = 'queued', owner = ?, updated = ? WHERE id = ?", (owner, time.time(), job.id)
                )
                adopted.append(job.id)
        return sorted(adopted)


_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, request TEXT NOT NULL,
    state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    error TEXT, outputs TEXT NOT NULL DEFAULT '[]', owner INTEGER NOT NULL DEFAULT 0)"""


def _connect(path: Path) -> sqlite3.Connection:
    """Open (or create) the queue database and check it; raises sqlite3 errors."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        (result,) = db.execute("PRAGMA quick_check(1)").fetchone()
        if result != "ok":
            raise sqlite3.DatabaseError(result)
    except sqlite3.Error:
        db.close()
        raise
    return db


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


def _job(row: tuple) -> Job:
    id_, kind, payload, state, created, updated, error, outputs, owner = row
    return Job(id_, kind, json.loads(payload), state, created, updated, error, json.loads(outputs), owner)
