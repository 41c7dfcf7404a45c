"""Hostile text (markup, escape sequences, control characters) through every screen and command that shows it.

Each test feeds the corpus in where a user, a file, an image or a model would, and asserts: no crash, the
text is shown (control characters written out as ``\\x1b``), and no raw control character reaches what
the app or the CLI writes to the terminal (the app's screen is read from its SVG screenshot).
"""

from __future__ import annotations

import html
import json
import os
import random
import re
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image
from textual.widgets import Button, DataTable, Input, Log, OptionList, Select, SelectionList, Static, TextArea

from backend import metadata
from backend.config import config_path
from backend.events import Failed, TrainError, TrainLog
from backend.families import MODEL_NAMES
from backend.request import GenerateRequest
from backend.safetext import first_line, visible
from backend.training import runs
from cli_helpers import dreamtty
from test_library import SD1_TEXT, _checkpoint, _write
from test_tui import field_of, idle_service, make_app, opened, settle, wait_for  # noqa: F401  (idle_service is a fixture)
from tui.cli_styles import NAME_COLUMN
from tui.screens.models import ModelsPane
from tui.screens.queue import QueueScreen
from tui.screens.train import TrainPane
from tui.text import LONG_WORD, NOTIFY_MAX, notify
from tui.widgets.preset_dialog import SavePresetDialog
from tui.widgets.progress import JobProgress

MARKUP = ("a cat [/] dog", "[/x]", "[bold red]x[link=https://e]y[/link]", "[sks]", "[$accent]v")
CONTROLS = ("\x1bc", "\x1b#8", "\x1b]52;c;aGk=\x07", "\x9b2J", "nul\x00", "del\x7f", "bare\rreturn", "\u202eevil",
            "fo\u200bx\ufeff")
TEXT = " ".join(MARKUP + CONTROLS)
PROMPT = TEXT.replace("]52", "\\]52")  # a prompt escapes a lone "]" (prompt syntax)
# How the controls of TEXT (and PROMPT) must read on screen and in the CLI's output.
SHOWN = ("\\x1bc", "\\x1b#8", "]52;c;aGk=\\x07", "\\x9b2J", "nul\\x00", "del\\x7f", "bare\\x0dreturn",
         "\\u202eevil", "fo\\u200bx\\ufeff")
# A file name can hold neither "/" nor NUL.
NAME = "evil [sks] [bold red]x \x1bc \x1b]52;c;aGk=\x07 \x9b2J \u202eend"
NAME_SHOWN = visible(NAME)
LONG = "long " * 1900  # within MAX_PROMPT_CHARS, far past any line
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e\u200b\ufeff]")  # what must never reach the terminal


def assert_clean(text: str, where: str) -> None:
    found = sorted(set(RAW.findall(text)))
    assert not found, f"raw control characters in {where}: {found!r}"


def assert_shown(text: str, parts: tuple[str, ...] = MARKUP + SHOWN) -> None:
    missing = [p for p in parts if p not in text]
    assert not missing, f"not shown: {missing!r}"


SVG_TEXT = re.compile(r'<text [^>]*clip-path="url\(#terminal-\d+-line-(\d+)\)"[^>]*>(.*?)</text>', re.DOTALL)


def screen_text(app) -> str:
    """The whole screen (toasts and dialogs included) as the terminal gets it, checked for raw controls,
    as lines of text (read from the SVG screenshot: one ``<text>`` per run of one style)."""
    svg = app.export_screenshot()
    assert_clean(svg, "the screen")
    lines: dict[int, str] = {}
    for line, text in SVG_TEXT.findall(svg):
        lines[int(line)] = lines.get(int(line), "") + html.unescape(text).replace("\xa0", " ")
    return "\n".join(lines[n] for n in sorted(lines))


def content(widget) -> str:
    return str(widget.content)


def rows(table: DataTable) -> list[str]:
    return [" | ".join(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


def hostile_png(path, request: GenerateRequest) -> None:
    request = request.per_image(0)
    meta = metadata.build(request, "demo", {"positive": request.prompt, "negative": request.negative_prompt})
    Image.new("RGB", (16, 16), (200, 40, 40)).save(path, pnginfo=metadata.png_info(meta))


# -- the app ---------------------------------------------------------------------------------------
async def test_prompt_through_form_queue_gallery_and_back(idle_service, tmp_path):
    config_path().write_text(yaml.safe_dump({TEXT: 1}))  # an unknown key: a config warning
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        form = app.screen.form
        form.query_one("#prompt", TextArea).text = PROMPT
        form.query_one("#negative_prompt", TextArea).text = LONG
        await pilot.pause()
        shown = screen_text(app)  # the editor draws each control as one symbol: ␛ for ESC
        assert "a cat [/] dog" in shown and "␛c" in shown
        await pilot.press("ctrl+g")
        done = idle_service.jobs()[0].id
        assert idle_service.jobs()[0].request["prompt"] == PROMPT  # the data is kept as typed
        form.query_one("#prompt", TextArea).text = "a second job"
        await pilot.press("ctrl+g")
        failed = idle_service.jobs()[0].id

        # What a worker would leave: an image (under a hostile name) for one job, a hostile error for the other.
        image = tmp_path / "out" / f"{NAME}.png"
        hostile_png(image, GenerateRequest.from_dict(idle_service.store.get(done).request))
        idle_service.store.add_output(done, str(image))
        idle_service.store.set_state(done, "done")
        idle_service.store.set_state(failed, "failed", error=TEXT)
        app.screen.query_one(JobProgress).follow(Failed(job=failed, error=TEXT))
        await pilot.pause()
        assert_shown(app.screen.query_one(JobProgress).status)
        screen_text(app)

        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")
        await pilot.pause()
        jobs = rows(app.screen.query_one("#jobs", DataTable))
        assert "a cat [/] dog [/x]" in jobs[0]  # the failed job's error, cut to 40 characters
        assert "a cat [/] dog" in jobs[1] and "[sks]" in jobs[1]
        gallery = rows(app.screen.query_one("#gallery", DataTable))
        assert gallery[0].startswith(f"{NAME_SHOWN}.png | ")
        params = content(app.screen.query_one("#image-params", Static))
        assert_shown(params)
        assert NAME_SHOWN in params
        shown = screen_text(app)
        assert "[sks]" in shown and "\\x1bc" in shown

        await pilot.press("y")  # copy the path: the notification shows it
        await pilot.press("l")  # load the parameters into the form
        await wait_for(pilot, lambda: not isinstance(app.screen, QueueScreen), what="the generate screen")
        await pilot.pause()
        assert form.query_one("#prompt", TextArea).text.startswith("a cat [/] dog")
        await pilot.pause(0.5)
        shown = screen_text(app)
        assert "Loaded the parameters of evil [sks]" in shown
        assert app.is_running


async def test_model_field_error_and_hint(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        model = app.screen.form.query_one("#model", Input)
        for value in ("demox[/]", NAME, TEXT):
            model.value = value
            await pilot.press("ctrl+g")
            await pilot.pause()
            error = field_of(app, "#model").error
            named = visible(value) in error or repr(value)[1:-1] in error
            assert named or ("\x00" in value and "holds a NUL character" in error), error  # NUL: refused unnamed
            screen_text(app)
        assert idle_service.jobs() == [] and app.is_running


async def test_style_pack_in_the_picker(idle_service, tmp_path, user_folder):
    styles = user_folder("styles")
    (styles / "hostile.json").write_text(json.dumps(
        [{"name": NAME, "prompt": f"{TEXT} {{prompt}}", "negative_prompt": TEXT},
         {"name": "odd\nrow", "prompt": "a\nb {prompt}"}]))
    (styles / f"{NAME}\nsecond line.json").write_text("[")  # a broken pack: its warning names the file
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        [warning] = [n.message for n in app._notifications if n.title == "styles"]
        assert f"{NAME_SHOWN}\\nsecond line.json" in warning and "\n" not in warning  # one line, as the CLI's
        picker = app.screen.form.query_one("#styles")
        picker.query_one("#style-search", Input).value = "evil"
        await pilot.pause()
        options = picker.query_one(SelectionList)
        assert options.option_count == 1 and str(options.get_option_at_index(0).prompt) == NAME_SHOWN
        options.focus()
        await pilot.press("space")
        await pilot.pause()
        template = content(picker.query_one(".style-template", Static))
        assert_shown(template)
        assert NAME_SHOWN in content(picker.query_one(".style-selected", Static))
        shown = screen_text(app)
        assert "evil [sks] [bold red]x" in shown and app.is_running


async def test_preset_description_and_save_dialog(idle_service, tmp_path, user_folder):
    presets = user_folder("presets")
    (presets / "hostile.yaml").write_text(yaml.safe_dump({"description": TEXT, "steps": 4}))
    (presets / "broken.yaml").write_text(f"steps: [{NAME}\n")  # listed with its parse error as description
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        select = app.screen.form.query_one("#preset", Select)
        select.value = "hostile"
        await pilot.pause()
        select.focus()
        await pilot.press("enter")  # open the list of presets
        await pilot.pause()
        shown = screen_text(app)
        assert "hostile: a cat [/] dog" in shown
        await pilot.press("escape")

        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, SavePresetDialog), what="the save-preset dialog")
        app.screen.query_one("#preset-name", Input).value = NAME
        await pilot.press("enter")
        await pilot.pause()
        assert "is not allowed" in app.screen.name_field.error
        screen_text(app)
        assert app.is_running


async def test_train_screen_log_runs_and_stats(idle_service, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setattr(runs, "runs_root", lambda: root)
    run_dir = root / NAME
    run_dir.mkdir(parents=True)
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "failed", "error": TEXT, "updated": 1.0,
                                                     "settings": {"model": TEXT, "method": "lora", "max_steps": 10}})
    write = runs.EventWriter(run_dir)
    write(TrainLog(level="warning", message=TEXT))
    write(TrainError(message=TEXT))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        await pilot.press("f3")
        pane = await _pane(pilot, app, TrainPane)
        log = pane.query_one("#train-log", Log)
        await wait_for(pilot, lambda: log.line_count >= 2, what="the log")
        assert_shown("\n".join(log.lines))
        assert NAME_SHOWN in str(pane.query_one("#train-runs", OptionList).get_option_at_index(0).prompt)
        assert_shown(content(pane.query_one("#train-stats", Static)))
        screen_text(app)
        assert app.is_running


async def test_stopping_a_run_that_already_ended_names_it_as_text(idle_service, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setattr(runs, "runs_root", lambda: root)
    run_dir = root / NAME
    run_dir.mkdir(parents=True)
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "waiting", "updated": 1.0,
                                                     "settings": {"model": "demo", "method": "lora", "max_steps": 10}})
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await pilot.press("f3")
        pane = await _pane(pilot, app, TrainPane)
        await wait_for(pilot, lambda: pane.selected_run is not None, what="the run")
        scheduled = SimpleNamespace(path=str(run_dir.resolve()), state="training", id=7)

        async def listed(*args, **kwargs):
            return [scheduled]

        async def ended(run_id):
            return False

        monkeypatch.setattr(app.client, "runs", listed)
        monkeypatch.setattr(app.client, "stop_run", ended)
        await pilot.press("ctrl+t")
        await settle(pilot)
        assert list(app._notifications)[-1].message == f"{NAME_SHOWN} has already ended"
        screen_text(app)


async def test_models_screen_with_hostile_file_names(idle_service, tmp_path):
    ckpt = tmp_path / "ckpt"
    _write(ckpt / f"{NAME}.safetensors", _checkpoint(SD1_TEXT))
    (ckpt / f"{NAME} broken.safetensors").write_bytes(b"\x00" * 4)
    config_path().write_text(yaml.safe_dump({"paths": {"checkpoints": [str(ckpt)]}}))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        await pilot.press("f4")
        pane = await _pane(pilot, app, ModelsPane)
        table = pane.query_one(DataTable)
        await wait_for(pilot, lambda: any(NAME_SHOWN in r for r in rows(table)), what="the scan")
        assert NAME_SHOWN in content(pane.query_one("#models-problems", Static))
        screen_text(app)
        assert app.is_running


async def _pane(pilot, app, kind):
    await wait_for(pilot, lambda: app.screen.query(kind), what=kind.__name__)
    return app.screen.query_one(kind)


async def test_notifications_are_text_and_cut(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        notify(app, TEXT, title=NAME)
        notify(app, LONG)
        await pilot.pause()
        messages = [(n.title, n.message) for n in app._notifications]
        assert (NAME_SHOWN, visible(TEXT)) in messages
        assert any(len(m) == NOTIFY_MAX and m.endswith("…") for _, m in messages)
        screen_text(app)


async def test_an_inline_error_naming_a_huge_path_is_cut(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45)) as pilot:
        await settle(pilot)
        field = app.screen.form.query_one("#steps").parent
        field.set_error(f"cannot read /{'a' * 10_000}.png: File name too long")
        await pilot.pause()
        shown = str(field.query_one(".field-error").render())
        # Not 10,000 characters pushing the form away, nor the path's first 400 without the reason.
        assert shown.startswith("cannot read /aaa") and shown.endswith("aaa.png: File name too long")
        assert "…" in shown and len(shown) < len("cannot read : File name too long") + LONG_WORD


async def test_keymap_from_the_config_file(idle_service, tmp_path):
    """Keys that no terminal sends are dropped, their defaults kept, and each is said, escaped."""
    config_path().write_text(yaml.safe_dump({"keymap": {"generate": "ctrl+g\nx", "screen.queue": "a\x1bc",
                                                        "mask.edit": "[b]x", "[b]\x1bc": "f9", "screen.train": "f8 "}}))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        await settle(pilot)  # the form loads styles and presets after the first frame
        await pilot.pause()
        [notice] = [n.message.splitlines() for n in app._notifications]  # one notice, a problem a line
        assert "• keymap.screen.queue: 'a\\x1bc' is not a key name (e.g. ctrl+g, f5, escape, x); keeping f2" in notice
        assert "• keymap: '[b]\\x1bc' is not a binding id (the ids are listed in docs/tui.md)" in notice
        refused = "• keymap.generate: 'ctrl+g\\nx' is not a key name (e.g. ctrl+g, f5, escape, x); keeping ctrl+g"
        assert refused in notice
        shown = screen_text(app)
        assert "F2 Queue & gallery │ F8 Train │ F4 Models" in shown  # the mode bar: the kept keys, on one line
        assert "Idle: write a prompt and press ^g." in shown  # not the refused key (it said ^g, a newline, x)
        assert str(app.screen.query_one("#in-edit-mask", Button).label) == "Edit mask (^t)"
        await pilot.press("ctrl+p")  # the command palette lists every key (its help line is markup)
        await pilot.pause(0.5)
        assert app.is_running


def test_a_keymap_entry_that_cannot_work_is_dropped_and_a_shared_key_is_said():
    from tui.keymap import check_keymap

    kept, warnings = check_keymap({"generate": "ctlr+g", "screen.models": "ctrl+q", "train.start": "f5,ctrl+plus",
                                   "help": "F5"})
    assert kept == {"screen.models": "ctrl+q", "train.start": "f5,ctrl+plus"}
    assert warnings == ["keymap.generate: 'ctlr+g' is not a key name (e.g. ctrl+g, f5, escape, x); keeping ctrl+g",
                        "keymap.help: 'F5' is not a key name (e.g. ctrl+g, f5, escape, x); keeping f12",
                        "keymap.screen.models: ctrl+q is also the key of quit"]


def test_a_key_that_types_text_is_refused_for_a_binding_that_works_in_text_boxes():
    """A priority binding reaches the app from the prompt too: on q, every q typed switched screens. A screen's
    own letter keys give way to a text box: kept."""
    from tui.keymap import check_keymap

    kept, warnings = check_keymap({"screen.queue": "q", "train.start": "f5,plus", "describe": "space",
                                   "gallery.load": "o", "mask.paint": "b"})
    assert kept == {"gallery.load": "o", "mask.paint": "b"}
    assert warnings == [
        "keymap.screen.queue: 'q' types text, and this binding would take it from every text box (use ctrl+, alt+ "
        "or an f key); keeping f2",
        "keymap.train.start: 'plus' types text, and this binding would take it from every text box (use ctrl+, "
        "alt+ or an f key); keeping ctrl+s",
        "keymap.describe: 'space' types text, and this binding would take it from every text box (use ctrl+, alt+ "
        "or an f key); keeping f6"]


def test_markup_reads_back_as_typed():
    from textual.content import Content

    from tui.text import markup

    rng = random.Random(13)
    samples = MARKUP + CONTROLS + ("x\\", "\\[b]", "a\\\\[/]", "[B]x[/B]", "[ bold]x")
    samples += tuple("".join(rng.choice("[]\\/$ab=@#\x1b") for _ in range(rng.randint(1, 12))) for _ in range(3000))
    for text in samples:
        assert Content.from_markup(markup(text)).plain == visible(text), repr(text)


def test_editors_draw_controls_as_one_symbol_each():
    from tui.text import pictures

    assert pictures("a\x1bb\x9b\x00\x7f\u202e\t\n") == "a␛b\ufffd␀␡\ufffd\t␊"  # a text box is one line


# -- the CLI ---------------------------------------------------------------------------------------
def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``dreamtty ARGV`` in this process, its output clean: (exit status, stdout, stderr)."""
    done = dreamtty(capsys, *argv)
    assert_clean(done.stdout, "stdout")
    assert_clean(done.stderr, "stderr")
    return done.returncode, done.stdout, done.stderr


def test_styles_list_and_show(capsys, user_folder):
    styles = user_folder("styles")
    (styles / "hostile.json").write_text(json.dumps(
        [{"name": NAME, "prompt": f"{TEXT} {{prompt}}", "negative_prompt": TEXT},
         {"name": "odd\nrow", "prompt": "a\nb {prompt}"}]))
    (styles / f"{NAME}.json").write_text("[")
    code, out, err = cli(capsys, "styles", "list", "--search", "evil")
    # its name cut to the list's column (``styles show`` gives it whole), the broken pack's warning whole
    assert code == 0 and f"{NAME_SHOWN[:NAME_COLUMN - 1]}…  hostile" in out and NAME_SHOWN in err
    code, out, _ = cli(capsys, "styles", "list", "--search", "odd")
    assert out.splitlines()[0].startswith("odd\\nrow ")  # a row per style: its newline shown as \n
    code, out, _ = cli(capsys, "styles", "show", "odd\nrow")
    assert out.splitlines()[0] == "name:     odd\\nrow" and "prompt:   a\\nb {prompt}" in out
    code, out, _ = cli(capsys, "styles", "show", NAME)
    assert code == 0 and NAME_SHOWN in out
    assert_shown(out)
    code, out, _ = cli(capsys, "styles", "show", NAME, "--json")
    assert code == 0 and json.loads(out)["prompt"] == f"{TEXT} {{prompt}}"
    code, out, _ = cli(capsys, "styles", "list", "--json")
    assert code == 0 and NAME in [s["name"] for s in json.loads(out)]
    code, _, err = cli(capsys, "styles", "show", TEXT)
    assert code == 2 and "unknown" in err


@pytest.mark.parametrize("field,value", [("model", NAME), ("loras", [[NAME, 1.0]]), ("vae", NAME)])
def test_reproduce_an_image_with_hostile_metadata(field, value, capsys, tmp_path):
    image = tmp_path / "evil.png"
    request = {"prompt": PROMPT, "model": "demo", "scheduler": "karras", "steps": 4, "seed": 1, field: value}
    hostile_png(image, GenerateRequest.from_dict(request))
    code, _, err = cli(capsys, "reproduce", str(image), "--out", str(tmp_path / "out"))
    assert code == 2 and NAME_SHOWN in err and len(err.splitlines()) == 1


def test_a_saved_paths_newline_keeps_it_one_line_on_stdout(capsys, tmp_path, demo_dirs):
    """Scripts read one path a line: a newline in --out must not make two; a tab is not shown as spaces."""
    code, out, _ = cli(capsys, "generate", "x", "--demo", "--steps", "1", "--size", "64x64", "--out",
                       str(tmp_path / "a\nb\tc"))
    (line,) = out.splitlines()
    assert code == 0 and line.startswith(f"{tmp_path}/a\\nb\\tc/") and line.endswith(".png")


def test_generate_errors_and_bad_arguments(capsys, tmp_path):
    code, _, err = cli(capsys, "generate", TEXT, "--model", NAME, "--out", str(tmp_path))
    assert code == 2 and NAME_SHOWN in err
    code, _, err = cli(capsys, "generate", "x", "--model", "m" * 100_000, "--out", str(tmp_path))
    assert code == 2 and len(err) < 2100 and " … (cut) … " in err  # not a megabyte of one line
    assert err.endswith(f"m does not exist; use {MODEL_NAMES}\n")  # what is wrong is not cut off
    code, _, err = cli(capsys, "generate", "x", "--lora", f"{NAME}:heavy")
    assert code == 2 and NAME_SHOWN in err
    code, _, err = cli(capsys, "samplers", TEXT)
    assert code == 2 and "unrecognized arguments" in err
    assert_shown(err)


def test_models_list_and_config_warnings(capsys, tmp_path, demo_dirs):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / f"{NAME}.safetensors").write_bytes(b"\x00" * 4)
    os.symlink(demo_dirs["demo"], ckpt / "new\nline")  # a diffusers folder
    config_path().write_text(yaml.safe_dump({"paths": {"checkpoints": [str(ckpt)]}, TEXT: 1}))
    code, out, err = cli(capsys, "models", "list")
    assert code == 0 and NAME_SHOWN in out and "unknown key" in err
    assert any(line.startswith("  new\\nline ") for line in out.splitlines())  # one row, \n shown
    code, out, _ = cli(capsys, "models", "list", "--json")
    assert code == 0 and any(NAME in p for p in json.loads(out)["problems"])


def test_train_follow_prints_hostile_events(capsys, tmp_path):
    from tui.cli_train import follow

    run_dir = tmp_path / NAME
    run_dir.mkdir()
    runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": "running", "settings": {}, "updated": 1.0})

    class Trainer:  # logs a hostile line and fails with a hostile error, then exits
        pid, returncode = 4242, 1

        def poll(self):
            write = runs.EventWriter(run_dir)
            write(TrainLog(level="warning", message=TEXT))
            runs.update_run_json(run_dir, state="failed", error=TEXT)
            return 1

    assert follow(run_dir, Trainer()) == 1
    _, err = capsys.readouterr()
    assert_clean(err, "stderr")
    assert_shown(err)


def test_jobs_lists_hostile_prompts_and_errors(capsys, tmp_path):
    from backend import locations
    from backend.queue_store import QueueStore

    store = QueueStore(locations.queue_db())
    request = GenerateRequest(prompt=PROMPT).to_dict()
    store.set_state(store.add("generate", {"request": request, "out": str(tmp_path)}, "gone/1/a"), "failed", TEXT)
    store.close()
    code, out, _ = cli(capsys, "jobs")  # no service runs: the queue is read here
    assert code == 0 and "failed" in out and "a cat [/] dog" in out
    assert_shown(out.split("\n", 2)[2], MARKUP + SHOWN)  # the error line, whole
    code, out, _ = cli(capsys, "jobs", "--json")
    assert code == 0 and json.loads(out)[0]["error"] == TEXT


def test_followed_events_print_as_text(capsys):
    """What ``generate``, ``wait`` and ``describe`` print of a job's events: notes, describe's text, saved paths,
    errors."""
    import asyncio

    from backend.events import ImageSaved, Note, TextOutput
    from tui.cli_jobs import follow

    class Replay:
        async def wait(self, job_id, events):
            for event in (Note(job=job_id, message=TEXT), TextOutput(job=job_id, image=0, text=TEXT),
                          ImageSaved(job=job_id, image=0, path=f"/out/{NAME}.png", seed=1),
                          Failed(job=job_id, error=TEXT)):
                yield event

    for as_json in (False, True):
        code, paths = asyncio.run(follow(Replay(), [7], None, as_json))
        out, err = capsys.readouterr()
        assert_clean(out, "stdout")
        assert_clean(err, "stderr")
        assert code == 1 and paths == [f"/out/{NAME}.png"]
        if not as_json:
            assert_shown(out)
            assert_shown(err)
            assert NAME_SHOWN in out and err.count("dreamtty: job 7") == 2
        else:
            assert [json.loads(line)["type"] for line in out.splitlines()] == ["note", "text", "image", "failed"]


def test_serve_status_shows_hostile_names_as_text():
    from tui.cli_serve import format_status, worker_lines

    worker = {"id": 0, "device": f"cuda:0 ({NAME})", "pid": 1, "job": None, "jobs": [], "ready": True, "loads": 1,
              "models": [{"model": NAME, "dtype": "float16", "bytes": 2**30}]}
    text = format_status({"pid": 1, "uptime": 5, "dreamtty": "0.1", "socket": f"/run/{NAME}", "queued": 0,
                          "running": 0, "streams": 1, "workers": [worker], "log": f"/log/{NAME}",
                          "cluster": NAME, "nodes": [{"host": NAME, "address": "10.0.0.2", "gpus": 1, "alive": True}]})
    assert_clean(text, "serve --status")
    assert text.count(NAME_SHOWN) == 6  # the socket, cluster, node, device, model and log, each written out
    forged = "m\nworker 9  cuda:0 (pid 1), idle; FORGED"  # a newline in a model's folder name
    worker["models"] = [{"model": forged, "dtype": "float16", "bytes": 2**30}]
    worker["pid"] = None  # a Ray actor (its pid is not known here): no "(pid None)"
    text = format_status({"pid": 1, "uptime": 5, "dreamtty": "0.1", "socket": "/run/s", "queued": 0, "running": 0,
                          "streams": 1, "workers": [worker], "log": "/log/l"})
    assert "m\\nworker 9" in text and not any(line.startswith("worker 9") for line in text.splitlines())
    shown = "\n".join(worker_lines({"workers": [worker]}))  # as the Models screen joins them
    assert "m\\nworker 9" in shown and not any(line.startswith("worker 9") for line in shown.splitlines())
    assert f"worker 0  cuda:0 ({NAME_SHOWN}), idle;" in text


def test_a_library_error_is_quoted_by_its_first_line():
    assert first_line(OSError("  cannot read\nTraceback ...\n")) == "cannot read"
    assert first_line(ValueError("x" * 500), 120) == "x" * 120 and first_line(KeyError()) == "KeyError"
    assert first_line(KeyError(), empty="") == ""



def test_a_key_holding_a_control_character_is_not_a_key_name():
    """``ctrl+\\x1b`` was kept, and the mode bar showed ``^\\x1b``."""
    from tui.keymap import check_keymap

    kept, warnings = check_keymap({"screen.queue": "ctrl+\x1b", "help": "f5,\u202ex", "cancel": "ctrl+k"})
    assert kept == {"cancel": "ctrl+k"}
    assert warnings == [
        "keymap.screen.queue: 'ctrl+\\x1b' is not a key name (e.g. ctrl+g, f5, escape, x); keeping f2",
        "keymap.help: '\\u202ex' is not a key name (e.g. ctrl+g, f5, escape, x); keeping f12"]


def test_a_name_cut_to_its_column_is_never_cut_inside_an_escape():
    """``styles list`` showed "zw\\u200…" for "zw\\u200b…": another code point, to the reader."""
    from backend.safetext import cut_line
    from backend.prompting.presets import PresetInfo
    from tui.screens.generate_form import PRESET_LABEL, _preset_options

    assert cut_line("ab\u200bcd", 6) == "ab…" and cut_line("ab\u200bcd", 9) == "ab\\u200b…"
    assert cut_line("a\nb", 4) == "a\\nb" and cut_line("", 1) == ""
    preset = PresetInfo("mine", "W" * 300 + "\x1b[31m", "user", True)
    label = str(_preset_options([preset])[0][0])  # the closed Preset field grew to 15 rows of W
    assert len(label) == PRESET_LABEL and label.startswith("mine: WWW") and label.endswith("W…")


def test_path_completion_of_a_pasted_nul_completes_nothing(tmp_path):
    """os.scandir raises ValueError for a NUL, which ended the app from the suggester's worker."""
    from tui.suggest import complete_path

    (tmp_path / "cat.png").write_bytes(b"")
    assert complete_path(f"{tmp_path}/c") == f"{tmp_path}/cat.png"
    assert complete_path(f"{tmp_path}\x00/c") is None
