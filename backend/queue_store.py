"""The persistent job queue: one SQLite table under the user state dir.

Jobs survive the app or a worker dying: on restart, jobs that were queued or
running are queued again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, request TEXT NOT NULL,
                state TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
                error TEXT, outputs TEXT NOT NULL DEFAULT '[]', owner INTEGER NOT NULL DEFAULT 0)"""
        )

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


def _job(row: tuple) -> Job:
    id_, kind, payload, state, created, updated, error, outputs, owner = row
    return Job(id_, kind, json.loads(payload), state, created, updated, error, json.loads(outputs), owner)
