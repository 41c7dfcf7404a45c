"""The Train dashboard on damaged or hostile input (Textual pilot): absurd numbers in events.jsonl, validation
images PIL cannot read, a symlink loop in the runs folder, a slow runs folder, bad saved settings on resume, a
model the service refuses, and a resume right after a stop."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

from PIL import Image
from textual.widgets import Input, Log, OptionList, Static

import test_tui
import tui.screens.train
from backend.events import TrainClassImages, TrainStep
from backend.training import runs
from test_train_pane import BRAILLE, PaneApp, _fake_trainer, opened_pane, _photos, _settle, _text, _write_run
from test_tui import make_app, opened, settle, wait_for
from tui.screens.train import TrainPane, TrainScreen
from tui.widgets.preview import ImagePreview

idle_service = test_tui.idle_service  # a fixture
HUGE = "9" * 400  # a whole number no float holds


def _append(run_dir: Path, *lines: str) -> None:
    with open(run_dir / runs.EVENTS, "a", encoding="utf-8") as events:
        events.writelines(line + "\n" for line in lines)


def _step(step: int | str, loss: float = 0.5, its: float = 2.0, max_steps: int | str = 10) -> str:
    """A train-step line as another tool may write it: NaN and infinities as JSON's extensions, any whole number."""
    return (f'{{"v": 1, "type": "train-step", "step": {step}, "max_steps": {max_steps}, "loss": {json.dumps(loss)}, '
            f'"lr": 0.0001, "its": {json.dumps(its)}}}')


def _stats(pane: TrainPane) -> str:
    return str(pane.query_one("#train-stats", Static).content)


async def _opened_on(pilot, pane: TrainPane, run_dir: Path) -> None:
    await _settle(pilot, pane, lambda: pane.selected_run == run_dir.resolve() and pane.loss_points)


def test_progress_reads_absurd_numbers_as_unknown_and_shows_large_ones_compactly():
    progress = runs.RunProgress()
    progress.apply(TrainStep(step=3, max_steps=10, loss=1e300, lr=1e-4, its=math.nan, mem_gib=1e308))
    progress.apply(TrainStep(step=10**400, max_steps=10, loss=0.1, lr=1e-4, its=1.0))  # left out
    assert progress.summary() == "step 3/10  loss 1e+300  lr 1.00e-04  GPU 1e+308 GiB"
    progress.apply(TrainStep(step=4, max_steps=10**400, loss=10**400, lr=1e-4, its=1e-308))
    assert progress.summary() == "step 4/10  loss nan  lr 1.00e-04  0.00 it/s  ETA ?"
    assert progress.apply(TrainClassImages(done=-5, total=10**400)) == "class images: ?/?"
    assert progress.class_images is None
    assert [runs.format_duration(s) for s in (math.nan, math.inf, -3.0, 1e300, 3725.0)] == [
        "?", "?", "?", "2.78e+296 hours", "1:02:05"]


async def test_a_nan_or_tiny_speed_shows_no_eta_and_the_app_keeps_running(tmp_path):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "run", "stopped", [1.0], updated=1.0)
    _append(run_dir, _step(2, its=math.nan))  # read with the run, in a thread
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 2)
        assert "step 2/10  loss 0.5000  lr 1.00e-04" in _stats(pane) and "it/s" not in _stats(pane)
        _append(run_dir, _step(3, its=1e-308))  # followed by the poll: an endless ETA
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 3)
        await pilot.pause()
        assert app.is_running


async def test_extreme_losses_and_step_numbers_keep_the_plot_drawing(tmp_path):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "run", "stopped", [1.0, 0.9], updated=1.0)
    _append(run_dir, _step(3, loss=math.inf), _step(4, loss=-math.inf), _step(5, loss=1e308))
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 5)
        _append(run_dir, _step(6, loss=-1e308), _step(HUGE), _step(7, loss=0.8, max_steps=HUGE))
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 7)
        await pilot.pause()
        assert app.is_running
        assert [s for s, _ in pane.loss_points] == [1, 2, 3, 4, 5, 6, 7]  # the 400-digit step is left out
        assert "step 7/10  loss 0.8000" in _stats(pane)
        assert any(ord(ch) in BRAILLE for ch in _text(pane.query_one("#train-loss")))  # the sane points


async def test_huge_numbers_are_shown_compactly_and_bad_counts_as_a_question_mark(tmp_path):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "run", "stopped", [1.0], updated=1.0)
    _append(run_dir, _step(2, loss=1e300), '{"v": 1, "type": "train-class-images", "done": -5, "total": ' + HUGE + "}")
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _settle(pilot, pane, lambda: len(pane.loss_points) == 2)
        assert "step 2/10  loss 1e+300  lr 1.00e-04" in _stats(pane)
        assert "class images: ?/?" in pane.query_one("#train-log", Log).lines
        assert "generating class images" not in _stats(pane)


async def test_validation_images_pil_cannot_read_are_skipped(tmp_path):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "run", "stopped", [1.0], updated=1.0)
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    Image.new("RGB", (32, 32), (0, 200, 0)).save(good)
    Image.new("1", (20000, 10000)).save(bomb)  # 25 kB on disk, 200 megapixels decoded
    validation = {"v": 1, "type": "train-validation", "step": 1}
    _append(run_dir, json.dumps({**validation, "images": [str(tmp_path / "a\0b.png"), str(good)]}))
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        preview = pane.query_one(ImagePreview)
        await _settle(pilot, pane, lambda: preview.source is not None)
        assert preview.source.size == (32, 32)  # the good image alone
        _append(run_dir, json.dumps({**validation, "step": 2, "images": [str(bomb), str(good)]}))
        await _settle(pilot, pane, lambda: len(pane.query_one("#train-log", Log).lines) > 3)
        await pilot.pause()
        assert app.is_running and preview.source.size == (32, 32)


async def test_a_symlink_loop_in_the_runs_folder_is_left_out(tmp_path):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "good", "stopped", [1.0], updated=1.0)
    (root / "loop").symlink_to(root / "loop")
    assert [r.path for r in runs.list_runs(root)] == [run_dir]
    app = PaneApp(root)
    async with app.run_test(size=(140, 44)) as pilot:
        pane = app.query_one(TrainPane)
        await _opened_on(pilot, pane, run_dir)
        assert [str(o.prompt) for o in pane.query_one(OptionList).options] == ["■ good  [stopped]"]


async def test_the_runs_folder_is_read_off_the_ui_thread(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "run", "stopped", [1.0], updated=1.0)
    real_list, entered, released, returned = runs.list_runs, threading.Event(), threading.Event(), threading.Event()

    def slow_list(*args):  # as a thousand run folders read
        entered.set()
        released.wait(10)
        found = real_list(*args)
        returned.set()
        return found

    monkeypatch.setattr(runs, "list_runs", slow_list)
    app = PaneApp(root)
    try:
        async with app.run_test(size=(140, 44)) as pilot:
            pane = app.query_one(TrainPane)
            await _settle(pilot, pane, entered.is_set)
            pane.query_one("#train-rank", Input).focus()
            await pilot.press("8")
            assert pane.query_one("#train-rank", Input).value == "8" and not returned.is_set()  # typed meanwhile
            released.set()
            await _opened_on(pilot, pane, run_dir)
    finally:
        released.set()


async def test_the_runs_folder_is_not_read_while_another_screen_shows(idle_service, tmp_path, monkeypatch):
    scans = []
    real_list = runs.list_runs
    monkeypatch.setattr(runs, "list_runs", lambda *args: scans.append(1) or real_list(*args))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainScreen), what="the train screen")
        await wait_for(pilot, lambda: len(scans) >= 2, what="a rescan")
        await pilot.press("f1")
        await settle(pilot)
        before = len(scans)
        await pilot.pause(tui.screens.train.POLL_S * (tui.screens.train.RESCAN_EVERY + 1))  # a rescan's time
        assert len(scans) == before


async def test_a_bad_saved_setting_on_resume_names_the_run_on_one_line_not_the_forms_field(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    run_dir = _write_run(root, "old-run", "stopped", [1.0, 0.9], updated=1.0)
    saved = {"model": "demo", "method": "lora", "max_steps": 10, "instance_dir": str(_photos(tmp_path)),
             "instance_prompt": "a photo of sks toy", "resolution": 64}
    runs.update_run_json(run_dir, settings={**saved, "max_steps": "abc"})
    started = _fake_trainer(monkeypatch)
    app = PaneApp(root)
    async with app.run_test(size=(140, 44), notifications=True) as pilot:
        pane = app.query_one(TrainPane)
        form_error = pane.query_one("#train-form-error", Static)
        await _opened_on(pilot, pane, run_dir)
        await pilot.press("ctrl+r")
        await pilot.pause()
        said = "the saved settings of old-run: max_steps: 'abc' is not a whole number"
        assert str(form_error.content) == said and [n.message for n in app._notifications] == [said]
        assert pane._field("max_steps").error == "" and started == []

        runs.update_run_json(run_dir, settings={**saved, "instance_dir": str(tmp_path / "gone\nnow")})
        await pilot.press("ctrl+r")  # refused by the service: the folder is gone
        await _settle(pilot, pane, lambda: "gone" in str(form_error.content))
        said = f"the saved settings of old-run: instance_dir: {tmp_path}/gone\\nnow does not exist"
        assert str(form_error.content) == said and list(app._notifications)[-1].message == said
        assert pane._field("instance_dir").error == "" and started == []


async def test_a_model_the_service_refuses_shows_under_the_model_field(tmp_path, monkeypatch):
    started = _fake_trainer(monkeypatch)
    async with opened_pane(tmp_path) as (app, pilot, pane):
        for name, value in (("model", "/nonexistent/model"), ("instance_dir", str(_photos(tmp_path))),
                            ("instance_prompt", "a photo of sks toy"), ("resolution", "64")):
            pane.query_one(f"#train-{name}", Input).value = value
        pane.query_one("#train-rank", Input).focus()
        await pilot.press("ctrl+s")
        await _settle(pilot, pane, lambda: pane._field("model").error)
        assert pane._field("model").error.startswith("/nonexistent/model does not exist; use demo")
        assert str(pane.query_one("#train-form-error", Static).content) == ""
        assert app.focused is pane.query_one("#train-model", Input) and started == []


def _waits(app) -> list[str]:
    return [n.message for n in app._notifications if " waits for " in n.message]


async def test_a_resume_right_after_a_stop_waits_for_its_previous_trainer_not_for_itself(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    started = _fake_trainer(monkeypatch)
    app = PaneApp(root)
    async with app.run_test(size=(140, 44), notifications=True) as pilot:
        pane = app.query_one(TrainPane)
        await pilot.pause()
        for name, value in (("instance_dir", str(_photos(tmp_path))), ("instance_prompt", "a photo of sks toy"),
                            ("resolution", "64"), ("output", str(tmp_path / "runA"))):
            pane.query_one(f"#train-{name}", Input).value = value
        await pilot.press("ctrl+s")
        run_dir = (tmp_path / "runA").resolve()
        await _settle(pilot, pane, lambda: pane.selected_run == run_dir and started)
        await pilot.press("ctrl+t")
        runs.update_run_json(run_dir, state="stopped")  # as its trainer writes before it exits
        await _settle(pilot, pane, lambda: "[stopped]" in _stats(pane))
        await pilot.press("ctrl+r")  # its trainer is still exiting
        await _settle(pilot, pane, lambda: _waits(app))
        assert _waits(app) == ["runA waits for its previous trainer to exit; it starts when that is free"]
        await _settle(pilot, pane, lambda: "waiting for its previous trainer to exit" in _stats(pane))
        assert "training run runA" not in _stats(pane)


def test_a_run_waits_for_its_previous_trainer_only_while_that_one_trains():
    """An ended record of the folder, updated after the resume was queued, hid the service's own reason."""
    from backend.run_schedule import ScheduledRun
    from tui.screens.train import waiting_for

    def record(id: int, state: str, why: str | None = None) -> ScheduledRun:
        return ScheduledRun(id, "/runs/a", ["cpu"], None, state, None, "s", created=10.0, updated=20.0, waiting_for=why)

    waiting = record(2, "waiting", "the CPU: job 7 is running")
    assert waiting_for(waiting, [record(1, "training"), waiting]) == "its previous trainer to exit"
    assert waiting_for(waiting, [record(1, "ended"), waiting]) == "the CPU: job 7 is running"


async def test_names_states_and_messages_with_newlines_are_one_line_each(tmp_path, monkeypatch):
    """A folder named with a newline was two rows of the run list (the second read "nl  [failed]"), a message
    with newlines several log lines, and run.json's state was shown whole."""
    from backend.events import TrainError, TrainLog

    root = tmp_path / "runs"
    odd = _write_run(root, "ev\nnl", "failed", [0.5], updated=2.0)
    runs.update_run_json(odd, error="out of\nmemory")
    write = runs.EventWriter(odd)
    write(TrainLog(level="warning", message="a\nb"))
    write(TrainError(message="c\nd"))
    _write_run(root, "long-state", "x" * 100_000, [0.5], updated=1.0)
    stopped: list = []
    monkeypatch.setattr(tui.screens.train, "request_stop", stopped.append)
    async with opened_pane(tmp_path) as (app, pilot, pane):
        await _opened_on(pilot, pane, odd)
        await _settle(pilot, pane, lambda: pane.query_one(OptionList).option_count == 2)
        listed = [str(pane.query_one(OptionList).get_option_at_index(i).prompt) for i in range(2)]
        assert listed[0] == "✗ ev\\nnl  [failed]"
        assert listed[1].startswith("? long-state  [xxx") and listed[1].endswith("…]") and len(listed[1]) < 60
        log = pane.query_one("#train-log", Log)
        await _settle(pilot, pane, lambda: log.line_count >= 3)
        assert [line for line in log.lines if "\\n" in line] == ["warning: a\\nb", "error: c\\nd"]
        assert _stats(pane).splitlines()[0] == "✗ ev\\nnl  [failed]  lora on demo"
        assert "error: out of\\nmemory" in _stats(pane).splitlines()
        runs.update_run_json(odd, state="waiting")
        await pilot.press("ctrl+t")
        await _settle(pilot, pane, lambda: stopped)
        assert [n.message for n in app._notifications][-1] == "took ev\\nnl off the queue before it started"
