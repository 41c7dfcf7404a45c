"""kill -9 of the TUI in a real terminal mid-job: the next start resumes at the first image not yet saved,
with the right seeds, and no image is made twice."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from backend import metadata
from backend.queue_store import QueueStore
from backend.request import GenerateRequest
from test_e2e_tmux import Tmux, _command

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def test_killed_tui_resumes_its_job_without_duplicates(tmp_path, demo_dirs):
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "demo-models").symlink_to(demo_dirs["demo"].parent)
    out = tmp_path / "out"
    db = home / "state" / "queue.sqlite3"
    db.parent.mkdir(parents=True)
    # in turn, each slow enough that the kill lands before the next two are saved, on a fast CPU too
    request = GenerateRequest(prompt="a fox", steps=100, seed=31, count=3, max_batch=1).resolved("demo")
    store = QueueStore(db)  # a job left by a dreamtty that is gone: the TUI adopts it at start
    job = store.add("generate", {"request": request.to_dict(), "out": str(out), "family": "demo"}, "gone/1/x")
    store.close()
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "DREAMTTY_HOME": str(home), "TERM": "xterm-256color"}
    env.pop("DREAMTTY_OUTPUTS", None)
    tmux = Tmux(env)
    pngs = lambda: sorted(out.rglob("*.png"))  # noqa: E731
    try:
        tmux("new-session", "-d", "-s", "app", "-x", "160", "-y", "48", _command(out))
        tmux.wait(lambda: len(pngs()) >= 1, "the first image")
        pid = int(tmux("display", "-p", "-t", "app", "#{pane_pid}").stdout)
        os.kill(pid, signal.SIGKILL)  # the TUI, mid-job: its worker notices and exits
        tmux("kill-server")
        time.sleep(1)
        store = QueueStore(db)
        saved = store.get(job).outputs
        assert store.get(job).state == "running" and 1 <= len(saved) < 3
        store.close()  # its lease is fresh, but its process is gone: the next start adopts the job at once

        tmux("new-session", "-d", "-s", "app", "-x", "160", "-y", "48", _command(out))
        tmux.wait(lambda: QueueStore(db).get(job).state == "done", "the job to finish after the restart")
        outputs = QueueStore(db).get(job).outputs
        assert outputs[:len(saved)] == saved and len(outputs) == 3
        assert [metadata.read(p)["request"]["seed"] for p in outputs] == [31, 32, 33]
        assert [str(p) for p in pngs()] == sorted(outputs)  # nothing made twice
    finally:
        tmux("kill-server")
