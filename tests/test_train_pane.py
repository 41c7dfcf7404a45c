"""The Train dashboard (Textual pilot): loss points, live tail, re-attach after a restart, start, stop, and
runs that wait for their device (a service in the test's process, without workers)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from textual.app import App, ComposeResult
from textual.widgets import Footer, Input, Log, OptionList, Select, Static
from textual_plotext import PlotextPlot

from backend.client import LocalClient
from backend.events import TrainLog, TrainState, TrainStep, TrainValidation
from backend.service import Service
from backend.training import launch, runs
from backend.config import config_path
from test_tui import NoWorkers, idle_service, make_app, opened, wait_for  # noqa: F401  (idle_service: a fixture)
from tui.keymap import TRAIN_KEYS
from tui.screens.train import TrainPane
from tui.widgets.preview import ImagePreview

BRAILLE = range(0x2801, 0x2900)


class PaneApp(App):
    """The Train pane over a service that schedules runs (its queue beside the runs folder)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        db = root.parent / "queue.sqlite3"
        self.client = LocalClient(Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db)))

    def compose(self) -> ComposeResult:
        yield TrainPane(runs_root=self.root, id="train-pane")
        yield Footer()

    async def on_mount(self) -> None:
        await self.client.start()

    async def on_unmount(self) -> None:
        await self.client.close()

    def key_for(self, binding_id: str) -> str:
        """The pane's keys as bound here: their defaults (DreamttyApp's follow the user's keymap)."""
        return next(key.key for key in TRAIN_KEYS if key.id == binding_id)


@contextlib.asynccontextmanager
async def opened_pane(tmp_path: Path):
    """The pane in its app over the runs folder ``tmp_path/runs``, after its first frame: (app, pilot, pane)."""
    app = PaneApp(tmp_path / "runs")
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await pilot.pause()
        yield app, pilot, pane


def _write_run(root: Path, name: str, state: str, losses: list[float], updated: float, validation: bool = False) -> Path:
    run_dir = root / name
    (run_dir / "validation").mkdir(parents=True)
    settings = {"model": "demo", "method": "lora", "max_steps": 10}
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": state, "settings": settings, "updated": updated})
    write = runs.EventWriter(run_dir)
    write(TrainState(state="running", max_steps=10))
    for step, loss in enumerate(losses, 1):
        write(TrainStep(step=step, max_steps=10, loss=loss, lr=1e-4, its=4.0, mem_gib=None))
    if validation:
        paths = []
        for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
            path = run_dir / "validation" / f"step-000005-{i}.png"
            Image.new("RGB", (64, 64), colour).save(path)
            paths.append(str(path))
        write(TrainValidation(step=5, images=paths))
    write(TrainLog(level="warning", message="instance_dir: skipping notes.txt: not an image"))
    return run_dir


def _text(widget) -> str:
    return str(widget.render())


async def _settle(pilot, pane, until, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        await pilot.pause(0.1)


async def test_pane_shows_loss_points_follows_and_reattaches(tmp_path):
    root = tmp_path / "runs"
    old = _write_run(root, "old-run", "stopped", [1.0, 0.9], updated=1.0)
    run_dir = _write_run(root, "new-run", "running", [0.8, 0.7, 0.6, 0.5, 0.4], updated=2.0, validation=True)

    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: pane.query_one(ImagePreview).frames > 0)
        assert pane.selected_run == run_dir.resolve()  # the newest run is shown
        assert pane.loss_points == [(1, 0.8), (2, 0.7), (3, 0.6), (4, 0.5), (5, 0.4)]
        stats = str(pane.query_one("#train-stats", Static).content)
        # run.json says running but no trainer process exists: it reads as failed, with the way out.
        assert "new-run  [failed]" in stats and "step 5/10  loss 0.4000  lr 1.00e-04  4.00 it/s" in stats
        assert "--resume latest" in stats
        plot = _text(pane.query_one("#train-loss", PlotextPlot))
        assert "loss" in plot and "smoothed" in plot and any(ord(ch) in BRAILLE for ch in plot)
        log = "\n".join(pane.query_one("#train-log", Log).lines)
        assert "warning: instance_dir: skipping notes.txt" in log and "validation images at step 5: 2" in log
        listed = [str(pane.query_one(OptionList).get_option_at_index(i).prompt) for i in range(2)]
        assert listed == ["✗ new-run  [failed]", "■ old-run  [stopped]"]

        # New events are picked up by the 0.5 s poll (incremental tail).
        write = runs.EventWriter(run_dir)
        write(TrainStep(step=6, max_steps=10, loss=0.35, lr=1e-4, its=4.0, mem_gib=3.5))
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 6)
        assert pane.loss_points[-1] == (6, 0.35)
        assert "GPU 3.5 GiB" in str(pane.query_one("#train-stats", Static).content)

        # Choosing the other run in the list shows its curve.
        pane.query_one(OptionList).focus()
        await pilot.press("down")
        await _settle(pilot, pane, lambda: pane.loss_points == [(1, 1.0), (2, 0.9)])  # read in a thread
        assert pane.selected_run == old.resolve()

    # The app restarts: the pane re-attaches by reading the run dirs.
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 6)
        assert pane.selected_run == run_dir.resolve()
        assert pane.loss_points[-1] == (6, 0.35)


async def test_the_pane_names_the_keys_of_the_users_keymap(idle_service, tmp_path, monkeypatch):
    """Remapped, the Train keys are named as bound: the hints said ctrl+s and ctrl+t, which no longer do that."""
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))  # no run of another test is selected
    config_path().write_text("keymap:\n  train.start: ctrl+b\n  train.stop: ctrl+k\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 44)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.screen.query(TrainPane), what="the Train screen")
        pane = app.screen.query_one(TrainPane)
        stats = lambda: str(pane.query_one("#train-stats", Static).content)  # noqa: E731
        assert stats() == f"No run selected. Fill in the form and press {app.key_for('train.start')}."
        assert app.key_for("train.start") != "ctrl+s"
        pane.selected_run = _write_run(pane.runs_root, "queued", runs.WAITING, [], updated=1.0)
        pane._update_stats()
        assert f"({app.key_for('train.stop')} takes it off the queue)" in stats() and "ctrl+t" not in stats()


async def test_a_long_runs_events_are_read_off_the_ui_thread(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    long_run = _write_run(root, "long-run", "stopped", [1.0, 0.9], updated=1.0)
    real_read, read_on = runs.EventTail.read, threading.Event()

    def slow_read(tail):  # as a file of tens of MB reads: until the test lets it
        read_on.wait(30)
        return real_read(tail)

    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: pane.loss_points == [(1, 1.0), (2, 0.9)])
        monkeypatch.setattr(runs.EventTail, "read", slow_read)
        pane.select_run(long_run)  # returns while the read waits
        await pilot.pause(0.2)
        assert pane.loss_points == [] and pane.selected_run == long_run.resolve()
        read_on.set()
        await _settle(pilot, pane, lambda: pane.loss_points == [(1, 1.0), (2, 0.9)])


class FakeProcess:
    pid = 4242

    def poll(self):
        return None


def _photos(tmp_path: Path) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((96, 96, 3), 40 * i, dtype=np.uint8)).save(photos / f"{i}.png")
    return photos


def _fake_trainer(monkeypatch) -> list[Path]:
    """Replace the trainer process with a stand-in that 'runs'; the run dirs it was started on."""
    started: list[Path] = []

    def fake_start(run_dir, launcher=None, env=None):
        started.append(Path(run_dir))
        (Path(run_dir) / runs.PID_FILE).write_text(str(FakeProcess.pid))
        return FakeProcess()

    monkeypatch.setattr(launch, "start_trainer", fake_start)
    monkeypatch.setattr(runs, "pid_alive", lambda pid, run_dir: pid == FakeProcess.pid)
    return started


async def test_start_and_stop_from_the_keyboard(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    photos = _photos(tmp_path)
    started = _fake_trainer(monkeypatch)
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await pilot.pause()
        # Inline validation while typing.
        pane.query_one("#train-rank", Input).focus()
        await pilot.press("x")
        rank_field = pane._field("rank")
        assert rank_field.error == "'x' is not a whole number"
        await pilot.press("backspace", "8")
        assert rank_field.error == ""
        # Missing instance folder: the error shows under its field, nothing starts.
        await pilot.press("ctrl+s")
        await _settle(pilot, pane, lambda: pane._field("instance_dir").error != "")
        assert "is required" in pane._field("instance_dir").error and started == []

        pane.query_one("#train-instance_dir", Input).value = str(photos)
        pane.query_one("#train-instance_prompt", Input).value = "a photo of sks toy"
        pane.query_one("#train-resolution", Input).value = "64"
        pane.query_one("#train-output", Input).value = str(tmp_path / "mine")
        pane.query_one("#train-lr_scheduler", Select).value = "cosine"
        pane.query_one("#train-lr_warmup_steps", Input).value = "3"
        await pilot.press("ctrl+s")
        await _settle(pilot, pane, lambda: pane.selected_run is not None and started != [])
        run_dir = (tmp_path / "mine").resolve()
        assert started == [run_dir] and pane.selected_run == run_dir
        settings = json.loads((run_dir / runs.RUN_JSON).read_text())["settings"]
        assert (settings["rank"], settings["resolution"], settings["instance_prompt"]) == (8, 64, "a photo of sks toy")
        assert (settings["lr_scheduler"], settings["lr_warmup_steps"]) == ("cosine", 3)
        assert run_dir in [r.path for r in runs.list_runs(root)]  # linked into the runs folder

        await pilot.press("ctrl+t")
        assert (run_dir / runs.STOP_FILE).exists()

        # A run started while that one still trains waits for the CPU; ctrl+t takes it off the queue.
        pane.query_one("#train-output", Input).value = str(tmp_path / "second")
        await pilot.press("ctrl+s")
        second = (tmp_path / "second").resolve()
        await _settle(pilot, pane, lambda: pane.selected_run == second)
        assert started == [run_dir] and runs.read_run_json(second)["state"] == "waiting"
        await pilot.press("ctrl+t")
        await _settle(pilot, pane, lambda: runs.read_run_json(second)["state"] == "stopped")
        assert started == [run_dir] and not (second / runs.STOP_FILE).exists()
        await _settle(pilot, pane, lambda: "[stopped]" in str(pane.query_one("#train-stats", Static).content))
        assert "state: stopped (taken off the queue before it started)" in pane.query_one("#train-log", Log).lines


async def test_form_checks_each_field_and_reports_every_bad_one(tmp_path, monkeypatch):
    started = _fake_trainer(monkeypatch)
    async with opened_pane(tmp_path) as (app, pilot, pane):
        # Range, multiple-of-8 and folder checks run while typing; an emptied input means the default.
        resolution = pane.query_one("#train-resolution", Input)
        resolution.focus()
        await pilot.press(*"65")
        assert pane._field("resolution").error == "65 is not a multiple of 8; try 64"
        await pilot.press("backspace", "backspace")
        assert pane._field("resolution").error == ""
        pane.query_one("#train-max_steps", Input).value = "-1"
        pane.query_one("#train-instance_dir", Input).value = str(tmp_path / "nowhere")
        pane.query_one("#train-lr", Input).value = "abc"
        await pilot.pause()
        await app.workers.wait_for_complete()  # the folder is checked in a thread
        await pilot.pause()
        assert pane._field("max_steps").error == "-1 is out of range; allowed 1..10000000"
        assert pane._field("instance_dir").error == f"{tmp_path / 'nowhere'} does not exist"
        assert pane._field("lr").error == "'abc' is not a number"
        # ctrl+s keeps every error (not only the first; an empty required one too) and focuses the first bad field.
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert {n: pane._field(n).error for n in ("instance_dir", "instance_prompt", "max_steps", "lr")} == {
            "instance_dir": f"{tmp_path / 'nowhere'} does not exist", "instance_prompt": "is required",
            "max_steps": "-1 is out of range; allowed 1..10000000", "lr": "'abc' is not a number"}
        assert app.focused is pane.query_one("#train-instance_dir", Input) and started == []


async def test_starting_a_run_shows_it_and_settles_then_resumes_a_stopped_run(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    old = _write_run(root, "old-run", "stopped", [1.0, 0.9], updated=1.0)
    photos = _photos(tmp_path)
    recorded = {"model": "demo", "method": "lora", "max_steps": 10, "instance_dir": str(photos),
                "instance_prompt": "a photo of sks toy", "resolution": 64, "seed": 5, "resume": None}
    runs.update_run_json(old, settings=recorded)
    started = _fake_trainer(monkeypatch)
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: pane.loss_points == [(1, 1.0), (2, 0.9)])
        for name, value in (("instance_dir", str(photos)), ("instance_prompt", "a photo of sks toy"),
                            ("resolution", "64"), ("output", str(tmp_path / "new"))):
            pane.query_one(f"#train-{name}", Input).value = value
        await pilot.press("ctrl+s")
        new = (tmp_path / "new").resolve()
        await _settle(pilot, pane, lambda: pane.selected_run == new)
        # The new run stays selected: no back-and-forth between the old and new run's highlight.
        selected = []
        monkeypatch.setattr(pane, "select_run", lambda run_dir: selected.append(run_dir))
        await pilot.pause(1.0)
        assert selected == [] and pane.selected_run == new
        plot = _text(pane.query_one("#train-loss", PlotextPlot))
        assert pane.loss_points == [] and not any(ord(ch) in BRAILLE for ch in plot)  # not the old run's curve
        monkeypatch.undo()
        started = _fake_trainer(monkeypatch)

        # ctrl+r continues the stopped run with its own settings from its newest checkpoint, once the
        # new run (which holds the CPU) has ended.
        await pilot.press("ctrl+r")  # the new run is live: nothing to resume
        assert started == []
        pane.select_run(old)
        await pilot.press("ctrl+r")
        stats = pane.query_one("#train-stats", Static)
        await _settle(pilot, pane, lambda: "waiting for the CPU: training run new;" in str(stats.content))
        assert "⧗ old-run  [waiting]" in str(stats.content) and started == []
        assert "⧗ old-run  [waiting]" in [str(o.prompt) for o in pane.query_one(OptionList).options]
        monkeypatch.setattr(FakeProcess, "poll", lambda self: 0)  # the new run's trainer ends
        await _settle(pilot, pane, lambda: started != [])
        assert started == [old.resolve()] and pane.selected_run == old.resolve()
        settings = json.loads((old / runs.RUN_JSON).read_text())["settings"]
        assert settings == {**settings, **recorded, "resume": "latest", "output": str(old.resolve())}


async def test_real_demo_run_from_the_form_streams_losses_and_stops(tmp_path, demo_dirs):
    """No fakes: ctrl+s starts the trainer process on the demo model, its losses reach the plot, ctrl+t stops it."""
    root = tmp_path / "runs"
    photos = _photos(tmp_path)
    app = PaneApp(root)
    run_dir = (tmp_path / "real").resolve()
    try:
        async with app.run_test(size=(140, 44)) as pilot:
            pane = app.query_one(TrainPane)
            await pilot.pause()
            for name, value in (("instance_dir", str(photos)), ("instance_prompt", "a photo of sks toy"),
                                ("resolution", "32"), ("max_steps", "10000"), ("checkpoint_every", "10000"),
                                ("seed", "3"), ("output", str(run_dir))):
                pane.query_one(f"#train-{name}", Input).value = value
            await pilot.press("ctrl+s")
            await _settle(pilot, pane, lambda: len(pane.loss_points) >= 3, timeout=180)
            assert len(pane.loss_points) >= 3, (run_dir / runs.LOG_FILE).read_text()[-2000:]
            assert [s for s, _ in pane.loss_points[:3]] == [1, 2, 3]
            assert all(np.isfinite(loss) and loss > 0 for _, loss in pane.loss_points)
            assert any(ord(ch) in BRAILLE for ch in _text(pane.query_one("#train-loss", PlotextPlot)))
            assert runs.read_run_json(run_dir)["state"] == "running"

            await pilot.press("ctrl+t")
            await _settle(pilot, pane, lambda: runs.read_run_json(run_dir).get("state") == "stopped", timeout=120)
            info = runs.read_run_json(run_dir)
            assert info["state"] == "stopped", (run_dir / runs.LOG_FILE).read_text()[-2000:]
            steps = [e.step for e in runs.EventTail(run_dir).read() if isinstance(e, TrainStep)]
            assert steps[-1] < 10000 and [s for s, _ in runs.list_checkpoints(run_dir)] == [steps[-1]]  # saved on stop
            stats = pane.query_one("#train-stats", Static)
            await _settle(pilot, pane, lambda: "[stopped]" in str(stats.content) and len(pane.loss_points) == len(steps))
            assert "[stopped]" in str(stats.content) and [s for s, _ in pane.loss_points] == steps
    finally:
        pid_file = run_dir / runs.PID_FILE
        if pid_file.exists() and runs.pid_alive(pid := int(pid_file.read_text()), run_dir):
            os.kill(pid, signal.SIGKILL)
