"""Saving the Generate form as a preset from the TUI (ctrl+o): the YAML written, the picker, bad names, escape."""

from __future__ import annotations

import pytest
from textual.widgets import Input, Select

from backend.prompting.datafiles import user_dir
from backend.prompting.presets import load_preset
from test_tui import field_of, idle_service, make_app, opened, settle, wait_for  # noqa: F401  (idle_service is a fixture)
from tui.screens.generate import GenerateScreen
from tui.widgets.preset_dialog import SavePresetDialog


@pytest.fixture
def own_config_dir(tmp_path, monkeypatch):
    """Saved presets go to this test's own ``<config dir>/presets``, not the session-wide home."""
    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    return user_dir("presets")


async def open_dialog(pilot, app) -> SavePresetDialog:
    await pilot.press("ctrl+o")
    await wait_for(pilot, lambda: isinstance(app.screen, SavePresetDialog), what="the save-preset dialog")
    return app.screen


async def close(pilot, app) -> None:
    await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the dialog to close")


async def test_save_form_as_preset_lists_selects_and_asks_before_overwriting(idle_service, tmp_path,
                                                                            own_config_dir):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        form = app.screen.form
        await settle(pilot)
        await pilot.press(*"a lighthouse")  # the prompt is per job: not part of the preset
        form.query_one("#sampler", Select).value = "euler"
        form.query_one("#cfg", Input).value = "4.5"
        form.query_one("#count", Input).value = "3"
        form.query_one("#g-sharpness", Input).value = "4"
        await pilot.pause()

        dialog = await open_dialog(pilot, app)
        assert app.focused.id == "preset-name"
        await pilot.pause()
        assert "Cancel" in [key.description for key in dialog.query("FooterKey")]  # its keys, not the form's
        await pilot.press(*"my-look")
        await pilot.press("tab", *"cheap ink", "enter")  # enter in the description saves too
        await close(pilot, app)
        await settle(pilot)

        path = own_config_dir / "my-look.yaml"
        assert path.is_file()
        saved = load_preset("my-look")
        assert (saved["sampler"], saved["cfg"], saved["count"], saved["model"]) == ("euler", 4.5, 3, "demo")
        assert saved["guidance"] == {"sharpness": 4.0}
        assert saved["steps"] is None  # left empty in the form: the model's default
        assert (saved["width"], saved["height"]) == (128, 128)
        assert "prompt" not in saved and "seed" not in saved
        assert "description: cheap ink" in path.read_text()
        # The picker lists the new preset and has it selected; the form kept its values.
        picker = form.query_one("#preset", Select)
        assert "my-look" in [value for _, value in picker._options] and picker.value == "my-look"
        assert form.read_request().preset == "my-look" and form.read_request().prompt == "a lighthouse"

        # Saving again under the same name asks first; enter again overwrites.
        form.query_one("#cfg", Input).value = "9"
        dialog = await open_dialog(pilot, app)
        await pilot.press(*"my-look", "enter")
        assert "exists" in dialog.name_field.error and "enter again" in dialog.name_field.error
        assert load_preset("my-look")["cfg"] == 4.5
        await pilot.press("enter")
        await close(pilot, app)
        assert load_preset("my-look")["cfg"] == 9.0


async def test_bad_name_bad_form_and_escape_save_nothing(idle_service, tmp_path, own_config_dir):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        form = app.screen.form
        dialog = await open_dialog(pilot, app)
        await pilot.press("enter")
        assert "type a name" in dialog.name_field.error
        await pilot.press(*"my look", "enter")
        assert "not allowed" in dialog.name_field.error
        await pilot.press(*["backspace"] * len("my look"), *"sd15", "enter")  # a shipped name: asked first
        assert "shipped preset" in dialog.name_field.error and "enter again" in dialog.name_field.error
        assert isinstance(app.screen, SavePresetDialog)
        await pilot.press("escape")
        await close(pilot, app)
        assert not own_config_dir.exists() or not list(own_config_dir.iterdir())
        assert form.query_one("#preset", Select).value == Select.NULL

        # A bad form value is shown under its field, as for ctrl+g; no dialog opens.
        form.query_one("#cfg", Input).value = "99"
        await pilot.press("ctrl+o")
        await settle(pilot)
        assert isinstance(app.screen, GenerateScreen)
        assert "out of range" in field_of(app, "#cfg").error
        assert not own_config_dir.exists()


async def test_escape_with_the_keys_panel_shown_hides_it_and_keeps_the_name(idle_service, tmp_path, own_config_dir):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        dialog = await open_dialog(pilot, app)
        await pilot.press(*"mine", "f12")
        await wait_for(pilot, lambda: dialog.query("HelpPanel"), what="the keys panel")
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is dialog and not dialog.query("HelpPanel")
        assert dialog.query_one("#preset-name", Input).value == "mine"
        await pilot.press("escape")  # a second one cancels
        await close(pilot, app)


async def test_save_preset_key_is_remappable_and_in_the_palette(idle_service, tmp_path, own_config_dir):
    from backend.config import config_path

    config_path().write_text("keymap:\n  preset.save: f9\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        commands = {c.title: c.help for c in app.get_system_commands(app.screen)}
        assert commands["Save preset: Save the Generate form as a preset"] == "key: F9"
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, GenerateScreen)
        await pilot.press("f9")
        await wait_for(pilot, lambda: isinstance(app.screen, SavePresetDialog), what="the dialog on f9")


async def test_a_preset_error_goes_when_another_preset_is_chosen(idle_service, tmp_path, user_folder):
    presets = user_folder("presets")
    (presets / "words.yaml").write_text("steps: many\n")
    (presets / "list.yaml").write_text("- not a mapping\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45)) as pilot:
        await settle(pilot)
        preset = app.screen.form.query_one("#preset", Select)
        preset.value = "words"
        await settle(pilot)
        assert field_of(app, "#steps").error
        preset.value = "list"
        await settle(pilot)
        assert field_of(app, "#steps").error == "" and field_of(app, "#preset").error


async def test_names_are_taken_in_any_case_and_odd_names_are_refused_in_one_line(idle_service, tmp_path,
                                                                                 own_config_dir):
    """Presets are matched in any case: ``FAST`` hid the shipped fast, and ``mine`` was written beside
    ``Mine.yaml`` (which then vanished), without a question. ``x.yaml`` became ``x.yaml.yaml``, and a name too
    long for a file showed ``[Errno 36] ...``."""
    own_config_dir.mkdir(parents=True)
    (own_config_dir / "Mine.yaml").write_text("steps: 4\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        dialog = await open_dialog(pilot, app)
        await pilot.press(*"FAST", "enter")
        assert "'fast' is a shipped preset" in dialog.name_field.error and "enter again" in dialog.name_field.error
        await pilot.press(*["backspace"] * 4, *"mine", "enter")
        assert "/Mine.yaml exists; enter again to overwrite it" in dialog.name_field.error
        assert load_preset("mine") == {"steps": 4}
        await pilot.press("enter")  # again: written over Mine.yaml, not beside it
        await close(pilot, app)
        assert [p.name for p in own_config_dir.iterdir()] == ["Mine.yaml"]
        assert load_preset("mine")["steps"] is None

        dialog = await open_dialog(pilot, app)
        dialog.query_one("#preset-name", Input).value = "x" * 250  # as pasted: 251 key presses took 25 s
        await pilot.press("end", "x", "enter")
        assert dialog.name_field.error == "the name is 251 characters long; at most 250"
        await pilot.press("backspace", *".yaml", "enter")
        await close(pilot, app)
        assert sorted(p.name for p in own_config_dir.iterdir()) == ["Mine.yaml", "x" * 250 + ".yaml"]
