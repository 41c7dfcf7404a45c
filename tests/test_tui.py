"""The TUI without worker processes: form, inline errors, keys, keymap, quit dialog, layout, preview cells."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sqlite3
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from rich_pixels import HalfcellRenderer
from textual import events
from textual.app import App
from textual.drivers.headless_driver import HeadlessDriver
from textual.widgets import Checkbox, DataTable, Input, Select, Static, TextArea

from backend import metadata
from backend.config import config_path
from backend.events import Cancelled, Done, Log, Preview, Started, Step, WorkerModels
from backend.request import GenerateRequest
from backend.client import LocalClient
from backend.pool import ProcessPool, Slot
from backend.queue_store import QueueUnavailable
from backend.service import Service
import tui.app
import tui.screens.generate
import tui.screens.queue
from tui.app import ConfirmQuit, DreamttyApp, use_color_system
from tui.screens import generate_form
from tui.screens.generate import GenerateScreen
from tui.screens.models import ModelsPane
from tui.screens.queue import QueueScreen
from tui.widgets.field import Field
from tui import latency
from tui.latency import KeyGate, key_gated_driver
from tui.half_blocks import HalfBlockRenderer, fit, half_block_lines
from tui.widgets.preview import ImagePreview
from tui.widgets.style_picker import StylePicker


class NoWorkers(ProcessPool):
    """A pool that starts no worker process: jobs stay queued."""

    def _spawn(self, slot) -> None:
        pass


@pytest.fixture
def idle_service(tmp_path):
    """A real Service (queue, validation) without workers."""
    db = tmp_path / "queue.sqlite3"
    return Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db))


def make_app(service, tmp_path, model: str | None = "demo") -> DreamttyApp:
    return DreamttyApp(model=model, out=tmp_path / "out", client=LocalClient(service))


@asynccontextmanager
async def opened(app: App, **kwargs):
    """``app.run_test(**kwargs)``, from when dreamtty's Generate form is there with every field (it is mounted
    just after the first frame, its collapsed groups after it)."""
    async with app.run_test(**kwargs) as pilot:
        screen = getattr(app, "generate_screen", None)
        if screen is not None:
            await asyncio.wait_for(screen.ready_form(), 30)  # 10 s ran out once with both cores busy
            await pilot.pause()
        yield pilot


async def settle(pilot) -> None:
    """Wait until the app's workers have ended (loads after the first frame, checks and reads off the event
    loop) and what they handed back is on the screen. The service's event stream never ends: not waited for."""
    app = pilot.app
    await pilot.pause()  # messages already posted may start workers
    while running := [w for w in app.workers if not w.is_finished and w.group != "events"]:
        await app.workers.wait_for_complete(running)
        await pilot.pause()


async def wait_for(pilot, condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def to_queue(pilot, app) -> None:
    """F2, once the Queue screen is shown."""
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")


def field_of(app, selector: str) -> Field:
    return next(a for a in app.screen.query_one(selector).ancestors if isinstance(a, Field))


async def test_the_first_frame_comes_before_the_form_and_keys_typed_meanwhile_are_kept(idle_service, tmp_path,
                                                                                       monkeypatch):
    """The first frame shows the screen without its form (tui.screens.generate): text typed before the form
    is there goes into its prompt, and ctrl+g pressed then queues the job once the form can be read."""
    started: list = []
    monkeypatch.setattr(DreamttyApp, "first_frame_shown", lambda self: started.append(self))
    app = make_app(idle_service, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = app.screen
        assert not screen.query("GenerateForm") and screen.query_one("#form-placeholder")
        await pilot.press(*"a red fox", "ctrl+g")
        await pilot.pause()
        assert idle_service.jobs() == []  # the job waits for the form
        monkeypatch.undo()
        started[0].first_frame_shown()
        await asyncio.wait_for(screen.form_mounted.wait(), 10)
        await settle(pilot)
        assert app.focused.id == "prompt" and screen.query_one("#prompt", TextArea).text == "a red fox"
        assert not screen.query("#form-placeholder")
        [job] = idle_service.jobs()
        assert job.request["prompt"] == "a red fox"


async def test_bad_input_shows_inline_error_and_queues_nothing(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        assert isinstance(app.screen, GenerateScreen)
        assert app.focused.id == "prompt"  # the prompt has focus when the app opens
        await settle(pilot)
        assert app.screen.form.scroll_y == 0  # with its label in view
        await pilot.press(*"a fox")
        app.screen.query_one("#steps", Input).value = "abc"
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert "not a whole number" in field_of(app, "#steps").error
        assert app.focused.id == "steps"
        assert idle_service.jobs() == []

        app.screen.query_one("#steps", Input).value = "6"
        app.screen.query_one("#cfg", Input).value = "99"  # a range the service checks
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert field_of(app, "#steps").error == ""
        assert "out of range" in field_of(app, "#cfg").error
        app.screen.query_one("#cfg", Input).value = "5"
        app.screen.query_one("#g-sharpness", Input).value = "99"  # inside the collapsed Guidance group
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert "sharpness" not in field_of(app, "#cfg").error
        assert "out of range" in field_of(app, "#g-sharpness").error
        assert not app.screen.query_one("#guidance").collapsed
        app.screen.query_one("#model", Input).value = "/no/such/model"
        app.screen.query_one("#g-sharpness", Input).value = "0"
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert "does not exist" in field_of(app, "#model").error
        assert idle_service.jobs() == []
        # An empty Model queued the request's default (demo), while its hint said it was empty
        app.screen.query_one("#model", Input).value = " "
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert field_of(app, "#model").error.startswith("empty; use demo")
        assert idle_service.jobs() == []
        # A model's problem under the field is one line, the path cut in its middle (it filled the screen)
        app.screen.query_one("#model", Input).value = "/no/" + "x" * 3000
        await settle(pilot)
        hint = str(field_of(app, "#model").query_one(".field-hint").render())
        assert "\n" not in hint and len(hint) <= 400
        assert "…" in hint and "does not exist" in hint
        assert "0..30, 0 = off" in str(field_of(app, "#g-sharpness").query_one(".field-hint").render())

        app.screen.query_one("#model", Input).value = "demo"
        await pilot.press("ctrl+g")
        await settle(pilot)
        jobs = idle_service.jobs()
        assert len(jobs) == 1 and jobs[0].request["prompt"] == "a fox" and jobs[0].request["steps"] == 6
        assert all(f.error == "" for f in app.screen.query(Field))


async def test_a_bad_default_model_from_the_config_is_said_once_with_where_it_came_from(idle_service, tmp_path):
    """The Model field's hint and the error of a failed generate said the same twice; now once, naming the
    config file's default_model as its origin (as the CLI does), and the hint is back once the error goes."""
    config_path().write_text("default_model: sd_xl_base_1.0\n")
    app = make_app(idle_service, tmp_path, model=None)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        field = field_of(app, "#model")
        hint = field.query_one(".field-hint", Static)
        origin = f" (default_model of {config_path()})"
        assert str(hint.render()).startswith("sd_xl_base_1.0 does not exist; ")
        assert str(hint.render()).endswith(origin) and hint.display
        await pilot.press(*"a fox", "ctrl+g")
        await settle(pilot)
        assert field.error.startswith("sd_xl_base_1.0 does not exist; ") and field.error.endswith(origin)
        assert not hint.display  # said once: as the error
        assert idle_service.jobs() == []
        app.screen.query_one("#model", Input).value = "nope"  # typed: no origin to name, the error goes
        await settle(pilot)
        assert field.error == "" and hint.display
        assert str(hint.render()).startswith("nope does not exist; ") and "default_model" not in str(hint.render())


async def test_ctrl_x_cancels_only_a_job_of_this_terminal(idle_service, tmp_path):
    """Another client's running job (the CLI's) is left alone; this TUI's own is cancelled."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40), notifications=True) as pilot:
        await settle(pilot)
        theirs = idle_service.submit(GenerateRequest(prompt="theirs", model="demo"), tmp_path)
        await settle(pilot)  # its Queued event reached the app
        app._track(Started(job=theirs, worker=0))
        await pilot.press("ctrl+x")
        await settle(pilot)
        assert idle_service.store.get(theirs).state == "queued"
        assert "No job of this terminal is running; 1 of other clients run" in [n.message for n in app._notifications][-1]
        await pilot.press(*"mine", "ctrl+g")
        await settle(pilot)
        [mine] = app.submitted
        app._track(Started(job=mine, worker=0))
        real_cancel = app.client.cancel

        async def locked(job):  # the queue file locked by another program: the error ended the app
            raise QueueUnavailable(idle_service.store.path, sqlite3.OperationalError("database is locked"))

        app.client.cancel = locked
        await pilot.press("ctrl+x")
        await settle(pilot)
        assert app.is_running and idle_service.store.get(mine).state == "queued"
        said = app._notifications
        assert [(n.title, n.severity) for n in said][-1] == (f"cannot cancel job #{mine}", "error")
        assert list(said)[-1].message.endswith("database is locked; another program holds it (a backup, an sqlite3 "
                                               "shell?)")
        app.client.cancel = real_cancel
        await pilot.press("ctrl+x")
        await settle(pilot)
        assert idle_service.store.get(mine).state == "cancelled"
        assert idle_service.store.get(theirs).state == "queued"


async def test_form_controls_presets_and_performance(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        form = app.screen.form
        await settle(pilot)
        # The schedule list follows the sampler.
        form.query_one("#sampler", Select).value = "euler_a"
        await pilot.pause()
        scheduler = form.query_one("#scheduler", Select)
        assert scheduler.value == "normal" and "karras" not in [v for _, v in scheduler._options]
        # Extreme speed is refused for a model whose name is not few-step, and says why.
        form.query_one("#performance", Select).value = "extreme"
        await pilot.pause()
        assert field_of(app, "#performance").error == ("Extreme speed needs a model or LoRA named LCM, turbo, "
                                                       "lightning or hyper (a few-step one); neither the model nor "
                                                       "the LoRAs are")
        assert form.query_one("#performance", Select).value != "extreme"
        form.query_one("#performance", Select).value = "quality"
        await pilot.pause()
        assert form.query_one("#steps", Input).value == "60" and field_of(app, "#performance").error == ""
        form.query_one("#model", Input).value = "latent-consistency/lcm-sdxl"
        form.query_one("#performance", Select).value = "extreme"
        await pilot.pause()
        assert form.query_one("#steps", Input).value == "8"
        assert form.query_one("#sampler", Select).value == "lcm"
        # A preset fills the form; the model named on the command line stays.
        form.query_one("#model", Input).value = "demo"
        form.query_one("#preset", Select).value = "sd15"
        await settle(pilot)
        request = form.read_request()
        assert request.preset == "sd15" and request.model == "demo"
        assert request.sampler != "lcm"
        # Unticking "random" enables the seed; a custom size is read as WxH.
        form.query_one("#seed-random", Checkbox).value = False
        await pilot.pause()
        assert not form.query_one("#seed", Input).disabled
        form.query_one("#seed", Input).value = "77"
        form.query_one("#size", Select).value = "custom"
        await pilot.pause()
        form.query_one("#size-custom", Input).value = "192x64"
        request = form.read_request()
        assert (request.seed, request.width, request.height) == (77, 192, 64)
        # fill() is what "load parameters from an image" uses.
        form.fill({"prompt": "loaded", "seed": -1, "width": 256, "height": 256, "styles": ["Random Style"],
                   "guidance": {"sharpness": 3.0, "freeu": ()}})
        request = form.read_request()
        assert request.prompt == "loaded" and request.seed == -1 and (request.width, request.height) == (256, 256)
        assert request.styles == ["Random Style"]
        assert request.guidance.sharpness == 3.0 and request.guidance.freeu == ()


async def test_style_picker_searches_and_shows_templates(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        picker = app.screen.query_one("#styles")
        search = picker.query_one("#style-search", Input)
        search.focus()
        await pilot.press(*"clay")
        options = picker.query_one("#style-list")
        names = [options.get_option_at_index(i).value for i in range(options.option_count)]
        assert names and all("clay" in (n + picker.library[n].prompt).lower() for n in names)
        await pilot.press("tab", "space")  # into the list, toggle the highlighted style
        assert picker.selected == [names[0]]
        assert picker.library[names[0]].prompt.split("{prompt}")[0][:10] in str(
            picker.query_one(".style-template").content)
        assert app.screen.form.read_request().styles == [names[0]]


async def test_a_search_that_empties_the_style_list_at_once_keeps_the_app_running(idle_service, tmp_path):
    """Typed fast (or pasted), a search that matched and then matches nothing used to leave a highlight
    message for an option that was gone: Textual's SelectionList died on it, then the app."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        picker = app.screen.query_one("#styles")
        search = picker.query_one("#style-search", Input)
        search.value = "clay"
        search.value = "clayzzzz"  # both changes are handled before the list's own messages
        await pilot.pause(0.5)
        search.value = ""
        await pilot.pause(0.5)
        assert app.is_running and picker.query_one("#style-list").option_count > 0
        assert picker.query_one(".style-template").content  # the first style's template


async def test_first_screen_takes_keys_while_the_styles_still_load(idle_service, tmp_path, monkeypatch):
    """Styles load after the first frame (a large pack takes seconds): the prompt takes keys meanwhile,
    and a search typed before the styles are there filters them once they are."""
    release, load_styles = threading.Event(), generate_form.load_styles
    monkeypatch.setattr(generate_form, "load_styles", lambda: release.wait(10) and load_styles())
    app = make_app(idle_service, tmp_path)
    try:
        async with opened(app, size=(120, 40)) as pilot:
            picker = app.screen.query_one(StylePicker)
            await pilot.press(*"a fox")
            picker.query_one("#style-search", Input).focus()
            await pilot.press(*"clay")
            await pilot.pause()
            assert app.screen.query_one("#prompt", TextArea).text == "a fox"
            assert picker.library == {} and picker.query_one("#style-list").option_count == 0
            release.set()
            await settle(pilot)
            options = picker.query_one("#style-list")
            names = [options.get_option_at_index(i).value for i in range(options.option_count)]
            assert names and all("clay" in (n + picker.library[n].prompt).lower() for n in names)
            assert len(picker.library) > len(names)
    finally:
        release.set()


async def test_ctrl_g_checks_the_request_off_the_event_loop(idle_service, tmp_path, monkeypatch):
    """The check may scan the model library and read wildcard and style files: keys are taken meanwhile,
    and the job is queued once it ends."""
    release, validate = threading.Event(), idle_service.validate
    monkeypatch.setattr(idle_service, "validate", lambda request: release.wait(10) and validate(request))
    app = make_app(idle_service, tmp_path)
    try:
        async with opened(app, size=(120, 40)) as pilot:
            await settle(pilot)
            await pilot.press(*"a fox", "ctrl+g", *" and")
            await pilot.pause()
            assert app.screen.query_one("#prompt", TextArea).text == "a fox and" and idle_service.jobs() == []
            release.set()
            await settle(pilot)
            assert [job.request["prompt"] for job in idle_service.jobs()] == ["a fox"]
    finally:
        release.set()


async def test_a_damaged_queue_file_is_reported_in_the_app(tmp_path, monkeypatch):
    db = tmp_path / "queue.sqlite3"
    db.write_bytes(b"garbage" * 100)
    app = make_app(Service(devices="cpu", db_path=db, recover=True, pool=NoWorkers("cpu", db)), tmp_path)
    async with opened(app, size=(120, 40), notifications=True) as pilot:
        await wait_for(pilot, lambda: app.screen.query("Toast"), what="a notification")
        toasts = [str(toast.render()) for toast in app.screen.query("Toast")]
        assert any(f"{db} is damaged" in t and "moved it to" in t for t in toasts), toasts


async def test_keys_keymap_modes_palette_and_quit_dialog(idle_service, tmp_path):
    config_path().write_text("keymap:\n  generate: f5\n  screen.queue: f8\n")  # the test's own config file
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        assert app.screen.query_one("JobProgress").status == "Idle: write a prompt and press F5."  # the key bound now
        await pilot.press(*"remapped")
        await pilot.press("f5")
        await settle(pilot)
        assert [j.request["prompt"] for j in idle_service.jobs()] == ["remapped"]
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")
        assert app.key_for("screen.queue") in str(app.screen.query_one("ModeBar").content)
        queue_titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Reproduce: Queue the selected image's parameters again" in queue_titles
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the generate screen")
        assert app.screen.query_one("#prompt", TextArea).text == "remapped"  # the mode kept its state
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Generate: Queue a generation with the Generate form" in titles
        assert "Cancel job: Cancel this terminal's newest running job" in titles
        # A job is queued: quitting asks first; "n" stays, "y" quits.
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the quit dialog")
        await pilot.pause()
        # its own keys at the bottom, not the screen's under it (which said ^g Generate)
        assert [key.description for key in app.screen.query("FooterKey")] == ["Quit", "Stay"]
        queued = len(idle_service.jobs())
        await pilot.press("f5", "ctrl+x")  # nothing queued or cancelled behind the question (it counts the jobs)
        await settle(pilot)
        assert len(idle_service.jobs()) == queued and isinstance(app.screen, ConfirmQuit)
        assert [job.state for job in idle_service.jobs()] == ["queued"] * queued
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the dialog to close")
        assert app.is_running
        await pilot.press("ctrl+q", "y")
        await wait_for(pilot, lambda: not app.is_running, what="exit")


async def test_a_screen_key_remapped_to_a_letter_is_refused_and_the_prompt_gets_the_letter(idle_service, tmp_path):
    """With screen.queue: q, "quiet" typed in the prompt switched to the Queue screen (and its letter keys)."""
    config_path().write_text("keymap:\n  screen.queue: q\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24), notifications=True) as pilot:
        await pilot.press(*"quiet")
        await settle(pilot)
        assert isinstance(app.screen, GenerateScreen) and app.screen.query_one("#prompt", TextArea).text == "quiet"
        assert [n.message for n in app._notifications] == [
            "keymap.screen.queue: 'q' types text, and this binding would take it from every text box (use ctrl+, "
            "alt+ or an f key); keeping f2"]


async def test_the_configs_problems_are_one_notice_the_first_listed_the_rest_counted(idle_service, tmp_path):
    """Six problems at 80x24: one toast (six stacked toasts hid the first ones), the keymap's and the first
    of the file's listed a line each without a second "config", the rest counted and where to read them."""
    kinds = ("checkpoints", "loras", "vae", "embeddings", "upscalers")
    folders = "".join(f"  {kind}: {tmp_path / 'nope' / kind}\n" for kind in kinds)
    config_path().write_text(f"paths:\n{folders}keymap:\n  generate: ctlr+g\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24), notifications=True) as pilot:
        await pilot.pause()
        [(title, message)] = [(n.title, n.message) for n in app._notifications]
        assert title == "config: 6 problems"
        keys, checkpoints, loras, more = message.splitlines()
        assert keys == "• keymap.generate: 'ctlr+g' is not a key name (e.g. ctrl+g, f5, escape, x); keeping ctrl+g"
        for listed, kind in ((checkpoints, "checkpoints"), (loras, "loras")):  # a long path is cut, not why
            assert listed.startswith(f"• paths.{kind}: /")
            assert listed.endswith(" does not exist; nothing is found there")
            assert len(listed) <= 2 + tui.app.CONFIG_LINE
        assert more == "and 3 more (dreamtty config check prints them all, whole)"
        [toast] = app.screen.query("Toast")
        assert toast.region.y >= 0 and toast.region.bottom <= 24  # whole on the screen


async def test_a_tui_attached_to_the_service_quits_at_once_and_says_its_jobs_go_on(idle_service, tmp_path,
                                                                                monkeypatch):
    """Quitting stops nothing when the service runs the jobs: no question, and a line on the terminal after."""
    from tui.app import goes_on

    app = make_app(idle_service, tmp_path)
    monkeypatch.setattr(app.client, "jobs_survive_close", True)  # as a RemoteClient's
    async with opened(app, size=(120, 40)) as pilot:
        app.active.update({7: "running", 8: "queued"})
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: not app.is_running, what="exit")
    assert app.left_going == 2
    assert goes_on(2) == ("dreamtty: 2 jobs queued or running go on in the service (dreamtty jobs lists them; "
                          "dreamtty attach shows them)")
    assert goes_on(1).startswith("dreamtty: 1 job queued or running goes on in the service")


async def test_the_palette_finds_an_action_by_its_footer_name(idle_service, tmp_path):
    """"reproduce" found nothing: the commands were titled with their help only, which does not say it."""
    from textual.command import CommandPalette

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await to_queue(pilot, app)
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press(*"reproduce")
        found = app.screen.query_one("CommandList")
        shown = lambda: [str(found.get_option_at_index(i).prompt) for i in range(found.option_count)]  # noqa: E731
        await wait_for(pilot, lambda: any("Reproduce: Queue the selected image" in s for s in shown()),
                       what="the Reproduce command")


async def test_one_command_palette_and_one_quit_dialog_at_a_time(idle_service, tmp_path):
    from textual.command import CommandPalette

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette")
        await pilot.press("f3")  # a mode key closes the palette before switching
        await wait_for(pilot, lambda: type(app.screen).__name__ == "TrainScreen", what="the train screen")
        await pilot.press("ctrl+p")
        await wait_for(pilot, lambda: isinstance(app.screen, CommandPalette), what="the palette again")
        await pilot.press("escape", "f1", *"x", "ctrl+g")
        await settle(pilot)
        assert [type(s).__name__ for s in app.screen_stack] == ["GenerateScreen"]
        await pilot.press("ctrl+q", "ctrl+q", "ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the quit dialog")
        assert [type(s).__name__ for s in app.screen_stack] == ["GenerateScreen", "ConfirmQuit"]
        await pilot.press("f2")  # a mode key is an answer too: stay (the question is not left behind in F1)
        await wait_for(pilot, lambda: type(app.screen).__name__ == "QueueScreen", what="the queue screen")
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmQuit), what="the quit dialog in F2")
        await pilot.press("n", "f1")
        await settle(pilot)
        assert [type(s).__name__ for s in app.screen_stack] == ["GenerateScreen"] and app.is_running


async def test_small_terminal_tab_order_scrolls_and_wide_layout(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await settle(pilot)
        app.screen.query_one("#guidance").collapsed = False
        await pilot.pause()
        chain = [w.id for w in app.screen.focus_chain]
        assert chain[0] == "prompt"
        assert {"negative_prompt", "style-search", "style-list", "preset", "model", "performance", "sampler",
                "scheduler", "steps", "cfg", "count", "seed-random", "size", "loras", "expand", "g-apg"} <= set(chain)
        for _ in range(12):  # well below the first screenful
            await pilot.press("tab")
        await pilot.pause()
        assert app.focused.id == chain[12]
        assert app.focused.region.overlaps(app.screen.region), "the form scrolls to the focused field"
        await pilot.press("shift+tab")
        assert app.focused.id == chain[11]
        await pilot.resize_terminal(200, 60)
        await pilot.pause()
        assert app.screen.query_one("#output").size.width >= 80


async def test_docs_list_the_forms_groups_in_the_forms_order(idle_service, tmp_path):
    """docs/tui.md's Generate section names the collapsed groups in the order the form shows them (and tab
    reaches them)."""
    docs = (Path(__file__).parent.parent / "docs" / "tui.md").read_text()
    documented = re.findall(r"^- \*\*([^*]+)\*\* \(collapsed", docs, flags=re.MULTILINE)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)):
        shown = [group.title for group in app.screen.form.query("Collapsible")]
    assert documented == shown


async def test_at_80x24_image_prompt_rows_and_guidance_hints_read_whole(idle_service, tmp_path):
    """An image prompt's four fields in a row left each 8 columns: "Referenc", a type broken over five lines
    mid-word; the PAG hint broke "Perturbed-Attentio / n". Now a row's image has a line, its type one line, and
    every hint's words fit in their field (hints wrap at words)."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await settle(pilot)
        for group in ("#image-prompts", "#guidance"):
            app.screen.query_one(group).collapsed = False
        await pilot.pause()
        groups = [app.screen.query_one(g) for g in ("#references", "#guidance")]
        fields = [f for group in groups for f in group.query(Field)]
        assert len(fields) > 20
        for field in fields:
            assert field.content_size.width >= len(field.label), field.label
            hint = field.query_one(".field-hint")
            if hint.display:
                assert max(map(len, field.hint.split())) <= hint.content_size.width, field.hint
        for row in range(4):
            assert app.screen.query_one(f"#ref-{row}-type SelectCurrent").size.height == 1, row


async def test_a_very_narrow_terminal_keeps_the_form_usable(idle_service, tmp_path):
    """The output pane gives way: the prompt is never 0 wide (TextArea crashed), nor a Select's list."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        for size in ((40, 24), (20, 5), (10, 3), (38, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause()
            assert app.screen.form.query_one("#prompt").content_size.width > 0, size
        app.screen.form.query_one("#performance", Select).focus()
        await pilot.press("enter", "pageup", "escape")
        await pilot.pause()
        assert app.is_running


def test_color_option_sets_textual_color_system(monkeypatch):
    import textual.constants

    monkeypatch.setattr(textual.constants, "COLOR_SYSTEM", textual.constants.COLOR_SYSTEM)
    monkeypatch.setenv("TEXTUAL_COLOR_SYSTEM", "auto")  # so the test's change is undone afterwards
    monkeypatch.delenv("TEXTUAL_COLOR_SYSTEM")
    use_color_system("auto")
    assert "TEXTUAL_COLOR_SYSTEM" not in os.environ
    use_color_system("256")
    assert DreamttyApp(client=object()).console.color_system == "256"
    use_color_system("truecolor")
    assert DreamttyApp(client=object()).console.color_system == "truecolor"
    monkeypatch.setenv("NO_COLOR", "1")
    assert DreamttyApp(client=object()).no_color


def test_half_block_lines_fit_and_filter():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 16, 64, 32))  # top half red, bottom half blue
    lines = half_block_lines(image, (20, 10))
    assert fit(image.size, (20, 10)) == (20, 10)
    assert len(lines) == 5 and sum(len(s.text) for s in lines[0]) == 20
    assert {s.text for line in lines for s in line} == {"▄"}
    top, bottom = lines[0][0].style, lines[-1][0].style
    assert top.bgcolor.triplet == (255, 0, 0) and bottom.color.triplet == (0, 0, 255)
    assert fit((128, 256), (40, 10)) == (10, 20)
    # A one-pixel checkerboard shrunk 4x: a good filter gives grey, nearest-neighbour black or white.
    checker = Image.new("L", (80, 40))
    checker.putdata([255 * ((x + y) % 2) for y in range(40) for x in range(80)])
    cells = half_block_lines(checker, (20, 10))
    greys = [seg.style.color.triplet.red for line in cells for seg in line]
    assert all(60 < g < 200 for g in greys)


def test_half_block_renderer_matches_rich_pixels():
    """Our faster renderer draws the same cells as rich-pixels' stock one (odd heights padded the same way)."""
    rng = random.Random(0)
    image = Image.new("RGB", (7, 5))
    image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(35)])
    ours = HalfBlockRenderer().render(image, None)
    stock = HalfcellRenderer().render(image, None)
    assert [s.text for s in ours] == [s.text for s in stock]
    assert [(s.style.color.triplet, s.style.bgcolor.triplet) for s in ours if s.style] == \
           [(s.style.color.triplet, s.style.bgcolor.triplet) for s in stock if s.text == "▄"]


async def test_key_gated_driver_and_preview_waiting_for_a_pending_key(idle_service, tmp_path, monkeypatch):
    gate = KeyGate()
    assert gate.remaining() == 0
    driver = key_gated_driver(HeadlessDriver, gate)(make_app(idle_service, tmp_path))
    driver.process_message(events.Key("a", "a"))
    assert 0 < gate.remaining() <= latency.KEY_PRIORITY

    monkeypatch.setattr(latency, "KEY_PRIORITY", 1.0)  # a key that takes long to paint
    now = [1000.0]  # the gate's clock, moved by hand: a slow machine does not open it early
    monkeypatch.setattr(latency, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=time.sleep))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        preview = app.screen.query_one(ImagePreview)
        await pilot.press("x")
        preview.show(Image.new("RGB", (64, 64), (200, 30, 30)))
        await pilot.pause(0.5)
        assert preview.frames == 0  # the frame waits while the key is painted
        now[0] += 1.0
        await wait_for(pilot, lambda: preview.frames == 1, what="the frame after the key")
        middle = preview.render_line(preview.size.height // 2)
        assert any(seg.text == "▄" and seg.style.color.triplet == (200, 30, 30) for seg in middle)


async def test_model_field_completes_finished_full_runs_only(idle_service, tmp_path, monkeypatch):
    from backend.training import runs

    monkeypatch.setenv("DREAMTTY_HOME", str(tmp_path / "home"))
    for name, state, output in (("dog", "done", runs.MODEL_DIR + "/model_index.json"),
                                ("cat", "done", runs.LORA_FILE), ("owl", "stopped", runs.MODEL_DIR + "/model_index.json")):
        run_dir = runs.runs_root() / name
        (run_dir / output).parent.mkdir(parents=True)
        (run_dir / output).write_text("{}")
        runs.write_json_atomic(run_dir / runs.RUN_JSON, {"state": state, "settings": {}})
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        model = app.screen.form.query_one("#model", Input)
        trained = lambda: [c for c in model.suggester.choices if c.startswith(str(runs.runs_root()))]  # noqa: E731
        await wait_for(pilot, trained, what="the trained runs among the model choices")
        assert trained() == [str(runs.runs_root() / "dog")]  # not the LoRA run, nor the stopped one


async def test_form_follows_a_new_default_model_unless_another_was_typed(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path, model=None)
    async with opened(app, size=(120, 40)) as pilot:
        form = app.screen.form
        model = form.query_one("#model", Input)
        assert model.value == "demo"
        await wait_for(pilot, lambda: "demo-xl" in model.suggester.choices, what="the model choices")
        assert await model.suggester.get_suggestion("demo-x") == "demo-xl"

        await app.switch_mode("models")
        app.screen.query_one(ModelsPane).post_message(ModelsPane.DefaultChanged("demo-xl"))
        await wait_for(pilot, lambda: form.family == "demo-xl", what="the SDXL family")
        assert model.value == "demo-xl" and app.default_model == "demo-xl"

        model.value = "my-own-model"  # typed by the user: a new default leaves it alone
        app.screen.query_one(ModelsPane).post_message(ModelsPane.DefaultChanged("demo"))
        await wait_for(pilot, lambda: app.default_model == "demo", what="the new default")
        await settle(pilot)
        assert model.value == "my-own-model"


class FakeClock:
    """The monotonic clock the redraw throttles read, moved by hand, with the timers set against it:
    the counts of frames and redraws below do not depend on how busy the machine is."""

    def __init__(self, monkeypatch) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, object]] = []
        for module in (tui.app, tui.screens.generate):
            monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: self.now))

    def set_timer(self, delay: float, callback) -> None:
        self.timers.append((self.now + delay, callback))

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted((t for t in self.timers if t[0] <= self.now), key=lambda t: t[0])
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, callback in due:
            callback()


async def test_live_frames_slow_down_while_the_user_types(idle_service, tmp_path, monkeypatch):
    """Every live frame is drawn; while keys were pressed in the last 3 s, one a second (the newest)."""
    clock = FakeClock(monkeypatch)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)):
        screen = app.screen
        monkeypatch.setattr(screen, "set_timer", clock.set_timer)
        drawn: list[int] = []
        monkeypatch.setattr(screen.query_one(ImagePreview), "show",
                            lambda image, limit=None: drawn.append(image.getpixel((0, 0))[0]))
        screen.handle_job_event(Started(job=1))

        def frames(count: int) -> list[int]:
            """Frames 0..count-1 arrive 0.125 s apart; the ones drawn."""
            before = len(drawn)
            for i in range(count):
                rgb = bytes([i, 100, 200]) * 64
                screen.handle_job_event(Preview(job=1, image=0, width=8, height=8, rgb=rgb))
                clock.advance(0.125)
            return drawn[before:]

        app.last_key = 0.0  # no key for long
        assert frames(8) == list(range(8))
        app.last_key = clock.now - 0.5  # a key half a second ago
        assert frames(16) == [6, 14]  # 1 s after the last frame drawn, then 1 s later: the newest frame each time


async def test_the_preview_follows_a_groups_mates_once_the_followed_job_ended(idle_service, tmp_path, monkeypatch):
    """A group's jobs start together (backend.job_groups): the screen follows the last to start, and once that one
    ended, the mate whose steps come next."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)):
        screen = app.screen
        drawn: list[int] = []
        monkeypatch.setattr(screen.query_one(ImagePreview), "show",
                            lambda image, limit=None: drawn.append(image.getpixel((0, 0))[0]))
        frame = lambda job, red: Preview(job=job, image=0, width=8, height=8, rgb=bytes([red, 0, 0]) * 64)  # noqa: E731
        for job in (1, 2):
            screen.handle_job_event(Started(job=job))
        screen.handle_job_event(frame(1, 10))
        screen.handle_job_event(frame(2, 20))
        screen.handle_job_event(Done(job=2))
        screen.handle_job_event(Step(job=1, image=0, count=1, step=3, total=4, its=1.0, eta=1.0, done=3))
        screen.handle_job_event(frame(1, 30))
        assert drawn == [20, 30] and screen.following == 1


class Drained(Exception):
    pass


async def test_progress_redraws_slow_down_while_the_user_types(idle_service, tmp_path, monkeypatch):
    """Step events are redrawn 4 times a second, once a second while keys were pressed in the last 3 s."""
    clock = FakeClock(monkeypatch)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)):
        shown: list[int] = []
        app.job_events.subscribe(app.screen, lambda event: shown.append(event.step), immediate=True)

        class Steps:
            """The worker's event queue: one step every 0.125 s on the fake clock; a key is pressed at step 9."""

            def __init__(self, count: int) -> None:
                self.steps = list(range(1, count + 1))

            async def get(self) -> Step:
                if not self.steps:
                    raise Drained
                clock.advance(0.125)
                step = self.steps.pop(0)
                if step == 9:
                    app.last_key = clock.now
                return Step(job=1, step=step, total=100, image=0, count=1, its=8.0, eta=1.0)

        app.last_key = 0.0
        with pytest.raises(Drained):
            await app._consume_events(Steps(24))
        # every 0.25 s (steps 1-7), then every 1 s after the last redraw (steps 15, 23) once a key was pressed
        assert shown == [1, 3, 5, 7, 15, 23]
        assert app.progress[1].step == 24  # skipped redraws still update the job's progress


async def test_a_services_warning_is_a_notification_of_plain_text(idle_service, tmp_path):
    """Why a worker cannot start (backend.pool) reaches an attached TUI; the service's info lines do not."""
    app = make_app(idle_service, tmp_path)
    why = "worker 0: dreamtty was changed on disk [b](build 0ld)[/b]: restart the service"
    said = [Log(message=why, level="error"), Log(message="queue: takes writes again"), Log(message="x", job=3)]

    class Said:
        async def get(self) -> Log:
            if not said:
                raise Drained
            return said.pop(0)

    async with opened(app, size=(120, 40), notifications=True) as pilot:
        with pytest.raises(Drained):
            await app._consume_events(Said())
        await pilot.pause()
        shown = [(n.title, n.message, n.severity, n.markup) for n in app._notifications]
        assert shown == [("service", why, "error", False)]


async def test_a_long_queue_keeps_the_running_job_and_the_images_in_sight(idle_service, tmp_path, monkeypatch):
    """Past the rows the tables read (the newest jobs), the running job still heads the jobs table, and
    the gallery reads the jobs that saved images, not the newest ones, which may have none."""
    from tui.screens import queue

    monkeypatch.setattr(queue, "JOB_ROWS", 3)
    monkeypatch.setattr(queue, "GALLERY_ROWS", 2)
    store, request = idle_service.store, {"request": GenerateRequest(prompt="p").to_dict()}
    drawn, running = store.add("generate", request, "gone"), store.add("generate", request, "gone")
    Image.new("RGB", (8, 8)).save(tmp_path / "kept.png")
    store.add_output(drawn, str(tmp_path / "kept.png"))
    store.set_state(drawn, "done")
    for _ in range(5):
        store.set_state(store.add("generate", request, "gone"), "cancelled")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        store.set_running([running])  # once the service adopted the jobs of the owner gone
        await to_queue(pilot, app)
        gallery, jobs = (app.screen.query_one(f"#{name}", DataTable) for name in ("gallery", "jobs"))
        await wait_for(pilot, lambda: gallery.row_count and jobs.row_count, what="both tables")
        assert [key.value for key in jobs.rows][0] == str(running) and jobs.row_count == 4
        assert [key.value for key in gallery.rows] == [str(tmp_path / "kept.png")]


def test_the_mode_bar_names_one_running_job_and_counts_the_rest(idle_service, tmp_path):
    """A group of eight running jobs leaves room for the queued count (it fell off a 120-column line), which comes
    first: a narrow line cuts the step's details (at 80 columns, "images 3–4/5" left no room for it)."""
    app = make_app(idle_service, tmp_path)
    app.active = {job: "running" for job in range(10, 18)} | {20: "queued", 21: "queued"}
    app.progress[10] = Step(job=10, step=4, total=20, image=0, count=1, its=2.0, eta=8.0)
    assert app.activity() == "2 queued · job #10 (+7 running): step 4/20 · 2.0 it/s · ETA 8s"


async def test_the_queue_screen_reads_its_tables_once_for_a_burst_and_not_while_hidden(idle_service, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(tui.screens.queue, "REFRESH_DELAY", 1.0)  # the burst fits in it on a loaded machine too
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await to_queue(pilot, app)
        screen, reads = app.screen, []
        screen.refresh_jobs = lambda: reads.append("jobs")
        for job in range(1, 101):  # a hundred jobs cancelled at once
            app.job_events.publish(Cancelled(job=job))
        await wait_for(pilot, lambda: reads, what="the read")
        await pilot.pause(0.3)
        assert reads == ["jobs"]
        await pilot.press("f1")
        await settle(pilot)
        app.job_events.publish(Cancelled(job=101))
        await pilot.pause(0.4)
        assert reads == ["jobs"]  # not while the Generate screen shows
        await pilot.press("f2")
        await wait_for(pilot, lambda: reads == ["jobs", "jobs"], what="the read on return")


async def test_gallery_entry_whose_file_was_deleted_shows_a_line_not_a_crash(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await to_queue(pilot, app)
        gone = tmp_path / "out" / "gone.png"
        app.screen._show_image(str(gone))  # what highlighting a row of a deleted image does
        await settle(pilot)
        text = str(app.screen.query_one("#image-params").content)
        assert text == f"{gone}\n\ncannot read it: No such file or directory" and app.is_running


async def test_gallery_image_with_malformed_metadata_shows_its_path_and_one_line(idle_service, tmp_path):
    meta = metadata.build(GenerateRequest(prompt="older"), "demo", {})
    del meta["request"]["scheduler"]  # an older or foreign writer's metadata
    info = PngInfo()
    info.add_text("dreamtty", json.dumps(meta))
    older = tmp_path / "older.png"
    Image.new("RGB", (8, 8)).save(older, pnginfo=info)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await to_queue(pilot, app)
        app.screen._show_image(str(older))  # what highlighting its row does
        await settle(pilot)
        text = str(app.screen.query_one("#image-params").content)
        assert text.startswith(f"{older}\n") and text.endswith("\n\ncannot show its parameters: KeyError: 'scheduler'")


async def test_bad_preset_and_custom_size_errors_point_at_the_right_field(idle_service, tmp_path, user_folder):
    presets = user_folder("presets")
    (presets / "typo.yaml").write_text("sampler: foo\n")
    (presets / "broken.yaml").write_text("steps: [1,\n")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        form = app.screen.form
        await settle(pilot)
        # A preset with an unknown sampler: the error sits under Sampler; the preset is not applied.
        form.query_one("#preset", Select).value = "typo"
        await settle(pilot)
        assert "unknown 'foo'" in field_of(app, "#sampler").error
        assert form.query_one("#preset", Select).value == Select.NULL and form.read_request().sampler == "dpmpp_2m"
        # An unreadable preset: the error under Preset, and the form does not claim that preset.
        form.query_one("#preset", Select).value = "broken"
        await settle(pilot)
        assert "not valid YAML" in field_of(app, "#preset").error
        assert form.read_request().preset is None
        # A bad custom size focuses the WxH box, and its error goes away once it is edited.
        form.query_one("#size", Select).value = "custom"
        await pilot.pause()
        form.query_one("#size-custom", Input).value = "65x64"
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert "65 is not allowed" in field_of(app, "#size").error and app.focused.id == "size-custom"
        await pilot.press("backspace")
        await pilot.pause()
        assert field_of(app, "#size").error == "" and idle_service.jobs() == []
        form.query_one("#size-custom", Input).value = "65y64"  # an error naming the field "size", as the list's id
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert "is not WxH" in field_of(app, "#size").error and app.focused.id == "size-custom"


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_a_wrapped_error_shows_whole_after_the_focus_moves_to_its_field(idle_service, tmp_path, size):
    """The form scrolled to the field before the error and the opened group were laid out (and Textual leaves out
    the group's padding): "allowed 0..30" stayed below the form."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=size) as pilot:
        form = app.screen.form
        form.query_one("#g-sharpness", Input).value = "99"
        await pilot.press("ctrl+g")
        await settle(pilot)
        await pilot.pause()
        field = field_of(app, "#g-sharpness")
        assert field.error == "99.0 is out of range; allowed 0..30" and app.focused.id == "g-sharpness"
        assert form.scrollable_content_region.contains_region(field.query_one(".field-error").region)


async def test_f12_shows_the_keys_and_escape_hides_them(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await pilot.press("f12")
        await wait_for(pilot, lambda: app.screen.query("HelpPanel"), what="the keys panel")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.screen.query("HelpPanel"), what="the panel to close")
        await pilot.press("f12", "f12")
        await pilot.pause()
        assert not app.screen.query("HelpPanel") and app.focused.id == "prompt"


async def test_hiding_the_keys_panel_gives_focus_back_to_the_widget_that_had_it(idle_service, tmp_path):
    """Its list focused, escape or F12 sent focus to the widget before the panel (the Guidance group's title,
    far down the form; on the Queue screen, the parameters instead of the gallery)."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        for hide in ("escape", "f12"):
            assert app.focused.id == "prompt"
            await pilot.press("f12", "shift+tab")
            await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "keys-help", what="the list")
            await pilot.press(hide)
            await wait_for(pilot, lambda: not app.screen.query("HelpPanel"), what="the panel to close")
            await pilot.pause()
            assert app.focused.id == "prompt", hide
        await to_queue(pilot, app)
        await settle(pilot)
        gallery = app.focused
        await pilot.press("f12")
        await wait_for(pilot, lambda: app.screen.query("KeyPanel"), what="the keys panel")
        for _ in range(8):
            if app.focused.id == "keys-help":
                break
            await pilot.press("tab")
        await pilot.press("escape")
        await wait_for(pilot, lambda: not app.screen.query("HelpPanel"), what="the panel to close")
        await pilot.pause()
        assert app.focused is gallery


async def test_f12_keys_of_the_queue_screen_scroll_by_keyboard(idle_service, tmp_path):
    """The list is longer than the screen: tab reaches it, and end scrolls to its last key (escape: described)."""
    from test_hostile_text import screen_text

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await to_queue(pilot, app)
        await pilot.press("f12")
        await wait_for(pilot, lambda: app.screen.query("KeyPanel"), what="the keys panel")
        panel = app.screen.query_one("KeyPanel")
        for _ in range(5):
            if app.focused is panel:
                break
            await pilot.press("tab")
        assert app.focused is panel
        await pilot.press("end")
        await pilot.pause()
        shown = screen_text(app)
        assert panel.scroll_y > 0 and "Use as input" in shown and "Hide keys" in shown


async def test_train_screen_opens_with_its_first_label_in_view(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(110, 34)) as pilot:
        await pilot.press("f3")
        await wait_for(pilot, lambda: app.focused is not None and app.focused.id == "train-model", what="the form")
        await pilot.pause()
        assert app.screen.query_one("#train-form").scroll_y == 0


async def test_a_service_that_cannot_start_is_one_line_and_the_form_stays(idle_service, tmp_path):
    from backend.errors import DreamttyError

    class Unstartable(LocalClient):
        async def start(self) -> None:
            raise DreamttyError("runtime dir: cannot create /nowhere: Permission denied")

    app = DreamttyApp(model="demo", out=tmp_path / "out", client=Unstartable(idle_service))
    async with opened(app, size=(120, 40), notifications=True) as pilot:
        await wait_for(pilot, lambda: app.screen.query("Toast"), what="a notification")
        assert any("cannot create /nowhere" in str(t.render()) for t in app.screen.query("Toast"))
        assert app.is_running and app.worker_state == "no service"


async def test_the_queue_screen_without_a_service_says_so_in_one_line(idle_service, tmp_path, monkeypatch):
    from backend.errors import DreamttyError

    idle_service.submit(GenerateRequest(prompt="queued", model="demo"), tmp_path)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40), notifications=True) as pilot:
        await to_queue(pilot, app)
        await settle(pilot)
        error = app.screen.query_one("#queue-error", Static)
        assert not error.display

        async def ended(job_id):
            return False

        monkeypatch.setattr(app.client, "cancel", ended)
        await pilot.press("c")  # it said "Select a queued or running job to cancel." of the job selected
        await settle(pilot)
        assert list(app._notifications)[-1].message.endswith(" has ended: nothing to cancel.")

        async def gone(*args, **kwargs):
            raise DreamttyError("service: none is running at /run/x.sock")

        monkeypatch.setattr(app.client, "cancel", gone)
        await pilot.press("c")  # cancel the selected job
        await settle(pilot)
        assert app.is_running and list(app._notifications)[-1].message == "service: none is running at /run/x.sock"
        monkeypatch.setattr(app.client, "jobs", gone)
        app.screen.refresh_jobs()
        app.screen.refresh_gallery()
        await settle(pilot)
        assert error.display and str(error.content) == "service: none is running at /run/x.sock"
        assert app.screen.query_one("#jobs", DataTable).row_count == 0  # no row of a state that may be stale
class SlotsWithoutProcesses:
    """A pool of one worker slot that never starts (backend.pool.WorkerPool): the service lists it as starting."""

    def __init__(self) -> None:
        self.slots = [Slot(0, "cpu")]

    def alive(self, slot) -> bool:
        return False

    def status(self) -> dict:
        return {"workers": []}

    def start(self, on_event, on_died) -> None: ...

    def run(self, slot, jobs) -> None: ...

    def cancel(self, slot, job) -> None: ...

    def release(self, slot) -> None: ...

    async def close(self) -> None: ...


async def test_models_screen_shows_the_workers_and_what_they_hold(tmp_path):
    db = tmp_path / "queue.sqlite3"
    service = Service(devices="cpu", db_path=db, recover=True, pool=SlotsWithoutProcesses())
    app = make_app(service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await pilot.press("f4")
        shown = lambda: str(app.screen.query_one("#service-workers", Static).render())  # noqa: E731
        await wait_for(pilot, lambda: "worker 0  cpu" in shown(), what="the worker list")
        assert "Workers" in shown() and "starting; no model" in shown()
        # the list follows the workers' events: a worker that loads a model
        service._models[0] = WorkerModels(worker=0, models=[{"model": "demo\x1b[2J", "dtype": "float32",
                                                                 "bytes": 5 * 2**20}], loads=1)
        app.job_events.publish(WorkerModels(worker=0))
        await wait_for(pilot, lambda: "demo\\x1b[2J (float32, 5.2 MB)" in shown(), what="the loaded model")


async def test_a_dialog_shrinks_beside_the_keys_panel_at_80_columns(idle_service, tmp_path):
    """F12 in a dialog at 80x24: the dialog kept its 60 (64) columns and the panel hid its right side."""
    from tui.widgets.preset_dialog import SavePresetDialog

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await settle(pilot)
        for dialog, box in ((ConfirmQuit(2), "#confirm-quit"), (SavePresetDialog({}, []), "#save-preset")):
            app.push_screen(dialog)
            await pilot.pause()
            await pilot.press("f12")
            await pilot.pause()
            assert app.screen.query_one(box).region.right <= app.screen.query_one("HelpPanel").region.x, box
            await pilot.press("escape", "escape")  # the panel, then the dialog
            await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the dialog to close")
