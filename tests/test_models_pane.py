"""The Models pane (F4): the same list as ``models list``, set the default, pull in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Input, ProgressBar, Static

from backend import config, downloads
from backend.errors import DreamttyError
from test_tui import idle_service, make_app, opened, settle  # noqa: F401  (idle_service is a fixture)
from tui.screens.models import ModelsPane


class PaneApp(App):
    def compose(self) -> ComposeResult:
        yield ModelsPane(id="models-pane")


async def _wait(pilot, condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


def _rows(app) -> list[tuple]:
    table = app.query_one(DataTable)
    return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


async def test_pane_lists_sets_default_and_pulls_without_blocking(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(8)},
              str(ckpt / "my-xl.safetensors"))
    (ckpt / "broken.safetensors").write_bytes(b"\x00" * 4)
    cfg_file = _use_checkpoints(ckpt, tmp_path, monkeypatch)
    release = threading.Event()

    def fake_pull(repo, revision=None, filename=None, api=None, progress=None, tqdm_class=None):
        assert filename == "one.safetensors" and tqdm_class is not None
        progress(0, 1000, filename)
        assert release.wait(10)  # the UI keeps running while this thread waits
        progress(1000, 1000, "")
        return Path("/cache/one.safetensors")

    monkeypatch.setattr(downloads, "pull", fake_pull)
    app = PaneApp()
    async with app.run_test(size=(140, 40)) as pilot:
        await _wait(pilot, lambda: any(r[1] == "my-xl" for r in _rows(app)), "the scan")
        rows = _rows(app)
        assert ("checkpoint", "my-xl", "", "SDXL") == rows[[r[1] for r in rows].index("my-xl")][:4]
        assert "broken.safetensors" in str(app.query_one("#models-problems", Static).render())
        assert "demo ★" in [r[1] for r in rows]  # no default set yet: demo is the default, and marked
        table = app.query_one(DataTable)
        table.focus()
        table.move_cursor(row=[r[1] for r in rows].index("my-xl"))
        await pilot.press("d")
        assert config.load().default_model == "my-xl"
        assert yaml.safe_load(cfg_file.read_text())["paths"]["checkpoints"] == [str(ckpt)]  # other keys kept
        await _wait(pilot, lambda: any(r[1] == "my-xl ★" for r in _rows(app)), "the default marker")

        await pilot.press("p")
        assert app.focused.id == "pull-id"
        app.query_one("#pull-file", Input).value = "one.safetensors"
        await pilot.press(*"org/repo", "enter")
        await _wait(pilot, lambda: "downloading one.safetensors" in str(app.query_one("#pull-status").render()),
                    "progress")
        assert app.query_one(ProgressBar).total == 1000
        await pilot.press("r")  # the UI still answers keys while the download runs
        release.set()
        await _wait(pilot, lambda: "done: /cache/one.safetensors" in str(app.query_one("#pull-status").render()),
                    "the end of the pull")


async def test_pane_shows_pull_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMTTY_CHECKPOINTS", str(tmp_path))

    def failing(repo, **kwargs):
        raise DreamttyError("pull: HF_HUB_OFFLINE is set, so x/y cannot be downloaded")

    monkeypatch.setattr(downloads, "pull", failing)
    app = PaneApp()
    async with app.run_test(size=(140, 40)) as pilot:
        app.query_one("#pull-id", Input).focus()
        await pilot.press(*"x/y", "enter")
        await _wait(pilot, lambda: "HF_HUB_OFFLINE is set" in str(app.query_one("#pull-status").render()), "error")
        assert app.query_one(ModelsPane).pulling is False


def _use_checkpoints(ckpt: Path, tmp_path: Path, monkeypatch) -> Path:
    """A config file whose checkpoints folder is ``ckpt``, in use; its path."""
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({"paths": {"checkpoints": [str(ckpt)]}}))
    monkeypatch.setenv("DREAMTTY_CONFIG", str(cfg_file))
    return cfg_file


async def _open_models(pilot, app) -> None:
    await pilot.press("f4")
    await _wait(pilot, lambda: app.screen.query(ModelsPane), "the Models screen")


def _xl_checkpoint(path: Path) -> None:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(8)}, str(path))


async def test_the_models_table_shows_rows_at_80x24_and_recommends_only_without_models(idle_service, tmp_path,
                                                                                     monkeypatch):
    """At 80x24 the recommended models (10 lines there), the skipped files and the pull row left the table one
    row (its header); the recommended models showed even with checkpoints of the user's."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for i in range(8):
        (ckpt / f"broken{i}.safetensors").write_bytes(b"x")
    _use_checkpoints(ckpt, tmp_path, monkeypatch)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await _open_models(pilot, app)
        await settle(pilot)
        pane = app.screen.query_one(ModelsPane)
        await _wait(pilot, lambda: pane.entries, "the scan")
        await pilot.pause()
        assert app.screen.query_one(DataTable).size.height >= 6  # the header and 5 rows
        recommended = app.screen.query_one("#models-recommended-box")
        assert recommended.display and app.screen.query_one("#models-problems-box").display

        _xl_checkpoint(ckpt / "my-xl.safetensors")
        app.screen.query_one(DataTable).focus()
        await pilot.press("r")
        await _wait(pilot, lambda: any(e.name == "my-xl" for e in pane.entries), "the rescan")
        await pilot.pause()
        assert not recommended.display
        assert app.screen.query_one(DataTable).size.height >= 8


async def test_every_skipped_file_can_be_read_and_names_stay_on_one_line(tmp_path, monkeypatch):
    """The skipped files showed in a box of 6 lines that did not scroll: the 7th and later were out of reach.
    A name holding a newline showed its first line only (its row is one line)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for i in range(12):
        (ckpt / f"broken{i:02}.safetensors").write_bytes(b"x")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8)},
              str(ckpt / "two\nlines.safetensors"))
    _use_checkpoints(ckpt, tmp_path, monkeypatch)
    app = PaneApp()
    async with app.run_test(size=(140, 40)) as pilot:
        await _wait(pilot, lambda: any("two" in r[1] for r in _rows(app)), "the scan")
        assert "two\\nlines" in [r[1] for r in _rows(app)]
        box = app.query_one("#models-problems-box")
        await _wait(pilot, lambda: box.max_scroll_y > 0, "the skipped files laid out")  # more than fit: it scrolls
        assert box.size.height <= 6
        box.focus()
        await pilot.press("end")
        await _wait(pilot, lambda: box.scroll_y == box.max_scroll_y, "scrolled to the end")  # by the keyboard
        assert "broken11.safetensors" in str(app.query_one("#models-problems", Static).render())


async def test_the_info_line_keeps_a_default_model_and_folders_with_a_newline_on_one_line(tmp_path, monkeypatch):
    """The line above the table broke at a newline in the default model's name (and in the folder's and the
    config file's paths): written ``\\n``, as in the table. A default model that cannot be used (deleted, or
    mistyped in config.yaml) showed as the default with nothing amiss, and every job naming no model failed."""
    ckpt = tmp_path / "check\npoints"
    ckpt.mkdir()
    cfg_file = tmp_path / "conf\nig.yaml"
    cfg_file.write_text(yaml.safe_dump({"paths": {"checkpoints": [str(ckpt)]}, "default_model": "two\nlines"}))
    monkeypatch.setenv("DREAMTTY_CONFIG", str(cfg_file))
    app = PaneApp()
    async with app.run_test(size=(300, 40)) as pilot:
        info = app.query_one("#models-info", Static)
        await _wait(pilot, lambda: "items" in str(info.render()), "the scan")
        shown = str(info.render())
        assert "\n" not in shown and info.size.height == 1
        assert "default model: two\\nlines · " in shown
        assert f"checkpoints in: {tmp_path}/check\\npoints · config: {tmp_path}/conf\\nig.yaml" in shown
        assert str(app.query_one("#models-problems", Static).render()).startswith(
            "default model: two\\nlines does not exist; use demo, demo-xl, a checkpoint name (dreamtty models list), "
            f"a .safetensors file, a diffusers folder or a Hugging Face id (default_model of {tmp_path}/conf\\nig.yaml)")
        assert app.query_one("#models-problems-box").display
        cfg_file.write_text(yaml.safe_dump({"paths": {"checkpoints": [str(ckpt)]}, "default_model": "demo-xl"}))
        app.query_one(ModelsPane).action_refresh()
        await _wait(pilot, lambda: not app.query_one("#models-problems-box").display, "the rescan")


async def test_a_refiner_cannot_become_the_default_model(tmp_path, monkeypatch):
    """``d`` made an SDXL refiner the default: every later job without --model failed in its worker."""
    refiner = tmp_path / "ckpt" / "xl-refiner"
    refiner.mkdir(parents=True)
    (refiner / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": []}')
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump({"paths": {"checkpoints": [str(tmp_path / "ckpt")]}}))
    monkeypatch.setenv("DREAMTTY_CONFIG", str(cfg_file))
    app = PaneApp()
    async with app.run_test(size=(140, 40)) as pilot:
        await _wait(pilot, lambda: any(r[1] == "xl-refiner" for r in _rows(app)), "the scan")
        rows = _rows(app)
        assert rows[[r[1] for r in rows].index("xl-refiner")][2] == "refiner"
        table = app.query_one(DataTable)
        table.focus()
        table.move_cursor(row=[r[1] for r in rows].index("xl-refiner"))
        await pilot.press("d")
        await pilot.pause()
        assert config.load().default_model is None
        assert [n.message for n in app._notifications] == [
            "xl-refiner: refiner: use it with --refiner on an SDXL model"]


async def test_a_models_note_is_in_sight_at_80x24_and_whole_under_the_table(idle_service, tmp_path, monkeypatch):
    """The note column came last, after a long source path: off an 80-column screen. Its head is next to the
    name now, and the highlighted row's whole note (else its path) is on the line under the table."""
    ckpt = tmp_path / ("checkpoints-" + "x" * 60)
    ckpt.mkdir()
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}},
               ckpt / "old.ckpt")
    _xl_checkpoint(ckpt / "my-xl.safetensors")
    _use_checkpoints(ckpt, tmp_path, monkeypatch)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await _open_models(pilot, app)
        pane = app.screen.query_one(ModelsPane)
        await _wait(pilot, lambda: any(e.name == "old" for e in pane.entries), "the scan")
        await pilot.pause()
        table = app.screen.query_one(DataTable)
        note = list(table.columns.values())[[str(c.label) for c in table.columns.values()].index("note")]
        start = sum(c.get_render_width(table) for c in list(table.columns.values())[:2])
        assert start + note.get_render_width(table) <= table.size.width  # in sight
        rows = [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]
        assert rows[[r[1] for r in rows].index("old")][2] == "pickle"
        detail = app.screen.query_one("#models-detail", Static)
        table.move_cursor(row=[r[1] for r in rows].index("old"))
        await pilot.pause()
        assert str(detail.render()) == "old: pickle: refused unless --allow-pickle" and detail.has_class("-note")
        table.move_cursor(row=[r[1] for r in rows].index("my-xl"))
        await pilot.pause()
        assert str(detail.render()).startswith("my-xl: ") and str(detail.render()).endswith("my-xl.safetensors")
        assert not detail.has_class("-note")


async def test_a_checkpoint_deleted_since_the_scan_does_not_become_the_default(tmp_path, monkeypatch):
    """``d`` on a row whose file was deleted since the scan saved a default model that no job could use."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _xl_checkpoint(ckpt / "gone.safetensors")
    _use_checkpoints(ckpt, tmp_path, monkeypatch)
    app = PaneApp()
    async with app.run_test(size=(140, 40)) as pilot:
        await _wait(pilot, lambda: any(r[1] == "gone" for r in _rows(app)), "the scan")
        (ckpt / "gone.safetensors").unlink()
        table = app.query_one(DataTable)
        table.focus()
        table.move_cursor(row=[r[1] for r in _rows(app)].index("gone"))
        await pilot.press("d")
        await _wait(pilot, lambda: not any(r[1] == "gone" for r in _rows(app)), "the rescan")
        assert config.load().default_model is None
        assert [n.message for n in app._notifications] == [
            f"gone: {ckpt / 'gone.safetensors'} is gone since the scan; scanning again"]


def test_a_listed_default_model_is_not_looked_for_in_a_second_scan(monkeypatch):
    """The scan listed the library, then resolved the default model, which listed it all again."""
    from backend import library
    from tui.screens import models

    lib = library.Library()
    lib.entries += [library.Entry("checkpoint", "mine", "/m/mine.safetensors", "sd1", 1, "/m", "safetensors"),
                    library.Entry("checkpoint", "old", "/m/old.ckpt", "sd1", 1, "/m", "pickle", note="pickle")]
    looked: list[str] = []

    def resolve(name):
        looked.append(name)
        raise DreamttyError(f"model: {name} is a pickle")

    monkeypatch.setattr(models, "resolve_model", resolve)
    assert models._default_model_problem(config.Config(default_model="mine"), lib) is None and looked == []
    assert models._default_model_problem(config.Config(default_model="old"), lib).startswith("old is a pickle (")
    assert looked == ["old"]  # listed with a note: resolved for the whole reason
