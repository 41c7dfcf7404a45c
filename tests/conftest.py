"""Shared fixtures: an isolated DREAMTTY_HOME with the tiny demo models built once per session."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import pytest_asyncio

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread per process: tests run on 2 shared cores, where torch's
# default threading oversubscribes them badly. Worker processes inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# pytest-xdist sets COLUMNS=80 and LINES=24 in its workers; the apps that tests start in a terminal
# (tmux, the browser's pty) would take them for their size instead of the terminal's own.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

# The slowest files first: the two test processes (pytest-xdist, a file each) take files in collection
# order, so the long ones start at once instead of leaving one process working alone at the end.
SLOW_FIRST = ("test_serve.py", "test_service.py", "test_tui_image_input.py", "test_image_prompt_jobs.py",
              "test_ray_pool.py", "test_image_jobs.py", "test_cli.py", "test_run_schedule.py", "test_train_pane.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture
def two_process_launcher() -> list[str]:
    """``torch.distributed.run`` for two processes on 127.0.0.1 at a free port (gloo on the CPU)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


@pytest.fixture(scope="session")
def dreamtty_home(tmp_path_factory) -> Path:
    """A session-wide DREAMTTY_HOME; demo models are built there on first use."""
    home = tmp_path_factory.mktemp("dreamtty-home")
    os.environ["DREAMTTY_HOME"] = str(home)
    return home


@pytest.fixture(autouse=True)
def _isolated_home(dreamtty_home, monkeypatch, tmp_path):
    """Every test sees the session home, its own outputs dir and its own (empty) config file, and
    runs jobs in-process (``DREAMTTY_LOCAL``: no background service; tests/test_serve.py starts its own).

    Setting DREAMTTY_CONFIG through monkeypatch also undoes ``--config`` set by an in-process CLI run.
    """
    monkeypatch.setenv("DREAMTTY_LOCAL", "1")
    monkeypatch.setenv("DREAMTTY_HOME", str(dreamtty_home))
    monkeypatch.setenv("DREAMTTY_OUTPUTS", str(tmp_path / "outputs"))
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    monkeypatch.setenv("DREAMTTY_CONFIG", str(config))


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A fresh DREAMTTY_HOME for this test; ``user_folder(kind)`` makes and returns its empty
    ``<config dir>/<kind>`` folder (user styles, presets, wildcards)."""
    from backend.prompting.datafiles import user_dir

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path))

    def make(kind: str) -> Path:
        user_dir(kind).mkdir(parents=True)
        return user_dir(kind)

    return make


@pytest.fixture(scope="session")
def demo_dirs(dreamtty_home) -> dict[str, Path]:
    from backend.engine.demo_models import ensure_demo

    return {name: ensure_demo(name) for name in ("demo", "demo-xl")}


def _load(name: str):
    import torch

    from backend.engine.loader import load_pipeline
    from backend.models import resolve_model

    return load_pipeline(resolve_model(name), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def sd_pipe(demo_dirs):
    """The tiny SD1-style demo pipeline (fp32, CPU). Do not mutate it in tests."""
    return _load("demo")


@pytest.fixture(scope="session")
def xl_pipe(demo_dirs):
    """The tiny SDXL-style demo pipeline (fp32, CPU). Do not mutate it in tests."""
    return _load("demo-xl")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def job_service(tmp_path_factory, demo_dirs):
    """A started CPU service with a worker, shared by the tests that only run jobs on it: a worker's first job
    imports torch and diffusers (~6 s each time a test starts a service of its own). Its worker starts with an
    empty config. A test using it is marked ``asyncio(loop_scope="session")`` and follows only its own jobs."""
    from backend.service import Service

    folder = tmp_path_factory.mktemp("job-service")
    (folder / "config.yaml").write_text("{}\n")
    with pytest.MonkeyPatch.context() as env:  # what the worker process starts with
        env.setenv("DREAMTTY_CONFIG", str(folder / "config.yaml"))
        env.setenv("DREAMTTY_OUTPUTS", str(folder / "outputs"))
        service = Service(devices="cpu", db_path=folder / "queue.sqlite3")
        await service.start()
    yield service
    await service.close()


@pytest_asyncio.fixture(loop_scope="session")
async def on_job_service(job_service):
    """``job_service`` and a queue of its events from now on (dropped after the test)."""
    events = job_service.subscribe()
    yield job_service, events
    job_service.unsubscribe(events)
