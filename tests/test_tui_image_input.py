"""Image input in the TUI: the gallery's keys, the Generate screen's Input image section and the mask editor.

Jobs are queued on a real Service without workers (``idle_service``), so each test reads the request
that was queued: its kind, the source image's settings, the new seed, the mask file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from textual.widgets import Collapsible, DataTable, Input, Select, Static

from backend import metadata
from backend.client import LocalClient
from backend.request import GenerateRequest
from backend.service import Service
from image_helpers import dreamtty_png, gradient, write_mask
from test_hostile_text import NAME, NAME_SHOWN, screen_text
from test_tui import field_of, idle_service, make_app, opened, settle, wait_for  # noqa: F401  (idle_service: a fixture)
from tui import keymap
from tui.app import DreamttyApp
from tui.mask import Mask, block, cell_pixels, disc, preview_index, preview_size
from tui.screens.generate import GenerateScreen
from tui.screens.queue import QueueScreen
from tui.widgets.field import Field
from tui.widgets.mask_editor import MaskEditor
from tui.widgets.preset_dialog import SavePresetDialog

SOURCE = {"prompt": "a red fox [in snow]", "negative_prompt": "blurry", "model": "demo", "sampler": "euler",
          "scheduler": "karras", "steps": 6, "cfg": 5.5, "seed": 1234, "styles": ["Watercolor"], "width": 128,
          "height": 96, "loras": []}
WORKER_TIMEOUT = 120  # the first job starts a worker that imports torch
KEPT = ("prompt", "negative_prompt", "model", "sampler", "scheduler", "steps", "cfg", "styles")  # from the source


def source_png(path: Path, size: tuple[int, int] = (128, 96), **changes) -> Path:
    """A PNG with dreamtty metadata, as a text-to-image job of the demo model would have saved it."""
    return dreamtty_png(path, size, **{**SOURCE, **changes})


def in_gallery(service, path: Path) -> None:
    """Record ``path`` as the image of a finished job, so the gallery lists it."""
    payload = {"request": GenerateRequest.from_dict(SOURCE).to_dict(), "out": str(path.parent), "family": "demo"}
    job = service.store.add("generate", payload, "a service before")
    service.store.add_output(job, str(path))
    service.store.set_state(job, "done")


def last_job(service):
    return service.jobs()[0]


@contextlib.asynccontextmanager
async def gallery_of(service, tmp_path: Path, image: Path):
    """The app on the gallery, ``image`` listed there, its toasts kept: (app, pilot)."""
    in_gallery(service, image)
    app = make_app(service, tmp_path)
    async with opened(app, size=(120, 40), notifications=True) as pilot:
        await settle(pilot)
        await to_gallery(pilot, app)
        yield app, pilot


async def to_gallery(pilot, app) -> QueueScreen:
    await pilot.press("f2")
    await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")
    await wait_for(pilot, lambda: app.screen.query_one("#gallery", DataTable).row_count, what="the gallery")
    await settle(pilot)
    return app.screen


# -- the mapping of cells to image pixels ------------------------------------------------------------
def test_cells_map_to_image_pixels_exactly():
    assert preview_size((640, 480), (80, 24)) == (64, 48)  # fitted in 24 rows of two pixels
    assert preview_size((64, 48), (200, 60)) == (64, 48)  # never enlarged
    assert preview_size((100, 51), (200, 60)) == (100, 50)  # an even number of pixel rows
    assert cell_pixels(3, 5) == ((3, 10), (3, 11))
    # 10 image pixels on 4 preview pixels: blocks of 3, 2, 3, 2 (x·w // W), and back the same way.
    assert preview_index(10, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert [list(block(i, 10, 4)) for i in range(4)] == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    for size, preview in ((10, 4), (7, 7), (1000, 77), (513, 2)):
        index = preview_index(size, preview)
        for i in range(preview):
            assert list(block(i, size, preview)) == np.flatnonzero(index == i).tolist()


def test_mask_paints_whole_blocks_and_reports_coverage():
    mask = Mask((10, 6), (4, 2))  # blocks: x 3,2,3,2 pixels; y 3,3
    mask.paint([(1, 1)], radius=0)
    expected = np.zeros((6, 10), dtype=bool)
    expected[3:6, 3:5] = True
    assert np.array_equal(mask.pixels, expected)
    coverage = mask.coverage()
    assert coverage[1, 1] == 1.0 and coverage.sum() == 1.0
    mask.preview_size = (10, 6)  # a bigger terminal: the mask stays, the mapping changes
    assert mask.coverage()[3:6, 3:5].all() and mask.coverage().sum() == 6


def test_mask_edits_match_a_preview_sized_model_and_keep_the_coverage_exact():
    rng = np.random.default_rng(3)
    mask, model = Mask((37, 23), (11, 8)), np.zeros((8, 11), dtype=bool)  # model: what each preview pixel shows
    for _ in range(300):
        op, value = rng.integers(4), bool(rng.integers(2))
        x, y, radius = int(rng.integers(-2, 13)), int(rng.integers(-2, 10)), int(rng.integers(0, 3))
        if op == 0:
            mask.paint([(x, y)], radius, value)
            for dx, dy in disc(radius):
                if 0 <= x + dx < 11 and 0 <= y + dy < 8:
                    model[y + dy, x + dx] = value
        elif op == 1:
            other = (int(rng.integers(-2, 13)), int(rng.integers(-2, 10)))
            mask.fill_rectangle((x, y), other, value)
            (x0, x1), (y0, y1) = sorted((x, other[0])), sorted((y, other[1]))
            model[max(0, y0):max(0, y1 + 1), max(0, x0):max(0, x1 + 1)] = value
        elif op == 2:
            mask.invert()
            model = ~model
        assert np.array_equal(mask.pixels, model[np.ix_(preview_index(23, 8), preview_index(37, 11))])
        assert np.array_equal(mask.coverage(), model.astype(float))
        assert mask.share() == pytest.approx(mask.pixels.mean())
    start = rng.random((23, 37)) > 0.5  # a mask read from a file: blocks partly masked
    assert np.allclose(Mask((37, 23), (11, 8), start).coverage(),
                       [[start[np.ix_(block(j, 23, 8), block(i, 37, 11))].mean() for i in range(11)] for j in range(8)])


# -- the gallery's keys ----------------------------------------------------------------------------------
GALLERY_KEYS = [  # a key, the kind it queues, fields of its request
    ("v", "img2img", {"strength": 0.5, "width": 128, "height": 96}),
    ("V", "img2img", {"strength": 0.85}),
    ("u", "upscale", {"scale": 1.5, "width": 192, "height": 144, "strength": 0.382}),
    ("U", "upscale", {"scale": 2.0, "width": 256, "height": 192}),
    ("H", "outpaint", {"left": 40, "right": 0, "width": 168, "height": 96}),  # 30% of 128, up to a multiple of 8
    ("L", "outpaint", {"right": 40, "left": 0}),
    ("K", "outpaint", {"top": 32, "height": 128, "width": 128}),  # 30% of 96 = 28.8 -> 29 -> 32
    ("J", "outpaint", {"bottom": 32}),
]


async def test_gallery_keys_queue_the_job_with_the_images_settings_and_a_new_seed(idle_service, tmp_path):
    """Each key in turn, in one app, on the same gallery image."""
    image = source_png(tmp_path / "fox.png")
    in_gallery(idle_service, image)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        await to_gallery(pilot, app)
        for jobs, (key, kind, fields) in enumerate(GALLERY_KEYS, start=2):  # job 1: the source image's
            await pilot.press(key)
            await wait_for(pilot, lambda n=jobs: len(idle_service.jobs()) == n, what=f"the job of {key}")
            job = last_job(idle_service)
            assert job.kind == kind, key
            request = job.request
            assert {name: request[name] for name in KEPT} == {name: SOURCE[name] for name in KEPT}, key
            assert request["seed"] != SOURCE["seed"], key
            assert request["image"] == str(image) and request["image_hash"], key
            assert {name: request[name] for name in fields} == fields, key


async def test_gallery_key_on_a_missing_image_says_so_and_queues_nothing(idle_service, tmp_path):
    image = source_png(tmp_path / "fox.png")
    async with gallery_of(idle_service, tmp_path, image) as (app, pilot):
        image.unlink()
        await pilot.press("v")
        await pilot.press("H")
        await settle(pilot)
        messages = [n.message for n in app._notifications]
        assert any("fox.png is missing" in m for m in messages), messages
        assert len(idle_service.jobs()) == 1
        # Every gallery key is in the command palette, the ones the footer leaves out too.
        commands = {command.title for command in app.get_system_commands(app.screen)}
        assert {f"{key.description}: {key.help}" for key in keymap.QUEUE_KEYS} <= commands


async def test_gallery_key_on_an_image_whose_settings_are_unusable_says_so(idle_service, tmp_path):
    """A recorded value that does not read: refused as the image's own setting, as the CLI's verbs do (every
    setting, the prompt too, was dropped with a warning); its text is data, not markup."""
    import json

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("dreamtty", json.dumps({"version": 1, "kind": "generate", "request": {**SOURCE, "steps": "[/]x"}}))
    image = tmp_path / "odd.png"
    gradient(128, 96).save(image, pnginfo=info)
    async with gallery_of(idle_service, tmp_path, image) as (app, pilot):
        await pilot.press("v")
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications), what="the refusal")
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(idle_service.jobs()) == 1
    assert errors[0] == (f"steps: '[/]x' is not a whole number (the setting of the input image {image}; give another "
                         "value to override it)")


async def test_gallery_key_refused_for_a_setting_the_image_carried_says_so(idle_service, tmp_path):
    """A refusal when the job is queued (the image's model is gone) did not say the value was the image's own
    setting, which the user never typed (the CLI's verbs say so)."""
    image = source_png(tmp_path / "fox.png", model=str(tmp_path / "gone"))
    async with gallery_of(idle_service, tmp_path, image) as (app, pilot):
        await pilot.press("v")
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications), what="the refusal")
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(idle_service.jobs()) == 1
    assert errors[0].startswith(f"model: {tmp_path / 'gone'} does not exist"), errors
    assert errors[0].endswith(f"(the setting of the input image {image}; give another value to override it)")


# -- the mask editor -------------------------------------------------------------------------------------
def expected_mask(image_size: tuple[int, int], preview: tuple[int, int], painted: set[tuple[int, int]]) -> np.ndarray:
    """The image-sized mask whose pixels belong to the ``painted`` preview pixels (x·w // W, y·h // H)."""
    (width, height), (w, h) = image_size, preview
    return np.array([[(x * w // width, y * h // height) in painted for x in range(width)] for y in range(height)])


def saved_mask(path: str) -> np.ndarray:
    with Image.open(path) as mask:
        assert mask.mode == "L"
        return np.asarray(mask) == 255


async def open_editor(pilot, app, tmp_path, size=(128, 96)) -> tuple[MaskEditor, Path]:
    """The gallery's inpaint key on a fresh source image: the mask editor, laid out."""
    image = source_png(tmp_path / "fox.png", size)
    in_gallery(app.client.service, image)
    await settle(pilot)
    await to_gallery(pilot, app)
    await pilot.press("i")
    await wait_for(pilot, lambda: isinstance(app.screen, MaskEditor), what="the mask editor")
    editor = app.screen
    await wait_for(pilot, lambda: editor.canvas.mask.preview_size != (1, 2), what="the preview")
    await pilot.pause()
    return editor, image


async def test_mask_editor_paints_from_keys_and_the_gallery_inpaints_with_it(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        editor, image = await open_editor(pilot, app, tmp_path)
        canvas = editor.canvas
        w, h = canvas.mask.preview_size
        assert (w, h) == preview_size((128, 96), (canvas.size.width, canvas.size.height)) and w < 128  # scaled down
        cx, cy = canvas.cursor
        assert (cx, cy) == (w // 2, h // 2)
        await pilot.press("minus", "minus")  # the smallest brush: one preview pixel
        await pilot.press("l", "l", "l", "j", "j", "space")  # hjkl move one preview pixel
        await pilot.press("p", "h", "h")  # pen down: painting along the way
        await pilot.press("p")  # erasing (where the brush is)
        await pilot.press("p", "K")  # pen up; shift moves 8
        painted = {(cx + 3, cy + 2), (cx + 2, cy + 2)}
        assert canvas.cursor == (cx + 1, cy + 2 - 8)
        await pilot.press("plus", "space")  # a brush of radius 1: 3x3
        painted |= {(cx + 1 + dx, cy - 6 + dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
        status = str(editor.query_one("#mask-status", Static).content)
        assert "size 3" in status and "pen up" in status
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(idle_service.jobs()) == 2, what="the inpaint job")
        job = last_job(idle_service)
        assert not isinstance(app.screen, MaskEditor)
    assert job.kind == "inpaint"
    request = job.request
    assert request["image"] == str(image) and request["prompt"] == SOURCE["prompt"] and request["seed"] != 1234
    assert request["mask"].startswith(str(tmp_path / "out" / "masks")) and request["mask_hash"]
    assert request["feather"] == 8 and request["mode"] == "fill"
    assert np.array_equal(saved_mask(request["mask"]), expected_mask((128, 96), (w, h), painted))


async def test_escape_with_the_keys_panel_shown_hides_it_and_keeps_the_mask(idle_service, tmp_path):
    """F12 in the editor, then escape (as docs/tui.md says to hide the keys): the editor closed, the mask lost."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        editor, _ = await open_editor(pilot, app, tmp_path)
        await pilot.press("space", "f12")
        await wait_for(pilot, lambda: editor.query("HelpPanel"), what="the keys panel")
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is editor and not editor.query("HelpPanel") and editor.canvas.mask.pixels.any()
        await pilot.press("escape")  # a second one cancels
        await wait_for(pilot, lambda: not isinstance(app.screen, MaskEditor), what="the editor to close")


async def test_mask_editor_rectangle_invert_clear_and_feather(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        editor, _ = await open_editor(pilot, app, tmp_path)
        canvas = editor.canvas
        size = canvas.mask.preview_size
        cx, cy = canvas.cursor
        rectangle = {(x, y) for x in range(cx - 6, cx + 1) for y in range(cy, cy + 4)}
        await pilot.press("r", "H", "l", "l", "down", "down", "down", "space")  # from a corner to the other
        assert canvas.anchor is None
        assert np.array_equal(canvas.mask.pixels, expected_mask((128, 96), size, rectangle))
        await pilot.press("i")  # invert
        assert np.array_equal(canvas.mask.pixels, ~expected_mask((128, 96), size, rectangle))
        await pilot.press("c", "enter")  # clear: an empty mask is refused in one line, the editor stays
        await settle(pilot)
        assert "all black" in str(editor.query_one("#mask-error", Static).content)
        assert isinstance(app.screen, MaskEditor) and len(idle_service.jobs()) == 1
        await pilot.press("r", "L", "x")  # a rectangle erased from nothing: still nothing
        assert not canvas.mask.pixels.any()
        await pilot.press("r", "j", "l", "space", "f", "f", "F")  # 2x2 preview pixels; feather 8 + 4 + 4 - 4
        assert "feather 12 px" in str(editor.query_one("#mask-status", Static).content)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(idle_service.jobs()) == 2, what="the inpaint job")
        request = last_job(idle_service).request
    assert request["feather"] == 12
    square = {(x, y) for x in (cx + 2, cx + 3) for y in (cy + 3, cy + 4)}
    assert np.array_equal(saved_mask(request["mask"]), expected_mask((128, 96), size, square))


async def test_mask_editor_paints_with_the_mouse(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        editor, _ = await open_editor(pilot, app, tmp_path, size=(200, 64))
        canvas = editor.canvas
        size = canvas.mask.preview_size
        assert size == (canvas.size.width, 64 * canvas.size.width // 200 // 2 * 2)  # as wide as the canvas
        ox, oy = canvas.offset
        assert oy > 0
        await pilot.press("minus", "minus")
        await pilot.click(canvas, offset=(ox + 5, oy + 2))  # a cell: two preview pixels, one above the other
        await pilot.mouse_down(canvas, offset=(ox + 10, oy + 4))  # a drag paints each cell it passes
        await pilot.hover(canvas, offset=(ox + 11, oy + 4))
        await pilot.hover(canvas, offset=(ox + 12, oy + 5))
        await pilot.mouse_up(canvas, offset=(ox + 12, oy + 5))
        await pilot.hover(canvas, offset=(ox + 20, oy + 5))  # the button is up: nothing painted
        await pilot.click(canvas, offset=(ox + 11, oy + 4), button=3)  # the right button erases
        await pilot.click(canvas, offset=(0, 0))  # outside the image: nothing
        await pilot.pause()
        painted = {(5, 4), (5, 5), (10, 8), (10, 9), (12, 10), (12, 11)}
        assert np.array_equal(canvas.mask.pixels, expected_mask((200, 64), size, painted))


# -- the Generate screen's Input image section -----------------------------------------------------------
async def input_section(pilot, app, image: Path | str, operation: str, **settings):
    """The form with ``image`` and ``operation`` chosen in its Input image section, and ``settings`` typed."""
    await settle(pilot)
    form = app.screen.form
    form.query_one("#input-image", Collapsible).collapsed = False
    section = form.input_section
    section.query_one("#in-image", Input).value = str(image)
    section.query_one("#in-operation", Select).value = operation
    for name, value in settings.items():
        section.query_one(f"#in-{name}").value = value
    await pilot.pause()
    return form


def form_reset(app):
    """A function that sets the form's Input image section, size and focus back to what they are now and clears
    its errors: taken as the app opens, each case of a test starts from the form as it opened."""
    form = app.screen.form
    controls = [*form.input_section.query("Input, Select, Checkbox"), form.query_one("#size", Select)]
    values, focused = [control.value for control in controls], app.focused

    def reset() -> None:
        for control, value in zip(controls, values):
            control.value = value
        form.clear_errors()
        focused.focus()

    return reset


QUEUED_KINDS = [  # an operation, the settings typed, fields of its request
    ("img2img", {"strength": "strong"}, {"strength": 0.85, "width": 128, "height": 96}),
    ("upscale", {"scale": "1.5", "fast": True}, {"scale": 1.5, "fast": True, "upscaler": "lanczos", "width": 192}),
    ("inpaint", {"box": "8,8,32,16", "mode": "detail"}, {"box": [8, 8, 32, 16], "mode": "detail", "strength": 0.5,
                                                         "feather": 8, "mask": None}),
    ("outpaint", {"left": "16", "bottom": "20", "feather": "4"}, {"left": 16, "bottom": 24, "width": 144,
                                                                  "height": 120, "feather": 4}),
]


async def test_input_image_section_queues_each_kind(idle_service, tmp_path):
    """Each operation in turn, in one app, from the form as it opened."""
    image = source_png(tmp_path / "fox.png")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        reset = form_reset(app)
        for jobs, (operation, settings, expected) in enumerate(QUEUED_KINDS, start=1):
            reset()
            form = await input_section(pilot, app, image, operation, **settings)
            assert form.query_one("#size", Select).value == "input", operation  # the image's size
            form.query_one("#prompt").text = "a fox in the form"  # the form's settings, as shown, not the image's
            await pilot.press("ctrl+g")
            await wait_for(pilot, lambda n=jobs: len(idle_service.jobs()) == n, what=f"the {operation} job")
            job = last_job(idle_service)
            assert not any(f.error for f in form.query("Field")), operation
            assert job.kind == operation
            assert job.request["image"] == str(image) and job.request["prompt"] == "a fox in the form", operation
            assert {name: job.request[name] for name in expected} == expected, operation


async def test_input_image_section_paints_a_mask_and_inpaints_with_it(idle_service, tmp_path):
    image = source_png(tmp_path / "fox.png")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        form = await input_section(pilot, app, image, "img2img", box="1,1,4,4")
        await pilot.press("ctrl+t")  # the mask editor on the input image
        await wait_for(pilot, lambda: isinstance(app.screen, MaskEditor), what="the mask editor")
        await wait_for(pilot, lambda: app.screen.canvas.mask.preview_size != (1, 2), what="the preview")
        canvas = app.screen.canvas
        size, (cx, cy) = canvas.mask.preview_size, canvas.cursor
        await pilot.press("space", "f", "enter")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the form")
        section = form.input_section
        assert section.operation == "inpaint" and section.query_one("#in-box", Input).value == ""
        mask = section.mask
        assert Path(mask).parent == tmp_path / "out" / "masks"
        radius2 = {(cx + dx, cy + dy) for dx in range(-2, 3) for dy in range(-2, 3) if dx * dx + dy * dy <= 6}
        assert np.array_equal(saved_mask(mask), expected_mask((128, 96), size, radius2))

        await pilot.press("ctrl+t")  # again: the editor starts from the mask in the field
        await wait_for(pilot, lambda: isinstance(app.screen, MaskEditor), what="the mask editor")
        await wait_for(pilot, lambda: app.screen.canvas.mask.preview_size != (1, 2), what="the preview")
        assert np.array_equal(app.screen.canvas.mask.pixels, saved_mask(mask))
        await pilot.press("escape")  # cancelled: the field keeps its mask
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: idle_service.jobs(), what="the job")
        request = last_job(idle_service).request
        assert request["mask"] == mask and request["feather"] == 12 and request["box"] is None

        # Another image: the editor starts blank, not from the mask painted on the fox (resized to fit)
        section.query_one("#in-image", Input).value = str(source_png(tmp_path / "owl.png", size=(64, 64)))
        await pilot.pause()
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, MaskEditor), what="the mask editor")
        await wait_for(pilot, lambda: app.screen.canvas.mask.preview_size != (1, 2), what="the preview")
        assert not app.screen.canvas.mask.pixels.any()
        await pilot.press("escape")


BAD_SETTINGS = [  # an operation, its image and settings, the field that shows the error, its message
    ("img2img", "missing.png", {}, "#in-image", "missing.png is missing"),
    ("upscale", "broken.png", {}, "#in-image", "is not an image PIL can read"),
    ("inpaint", "fox.png", {"mask": "black.png"}, "#in-mask", "is all black"),
    ("inpaint", "fox.png", {}, "#in-mask", "give a mask image or a box"),
    ("inpaint", "fox.png", {"box": "0,0,500,5"}, "#in-box", "is not inside the 128x96 image"),
    ("inpaint", "fox.png", {"box": "0,0,128,96"}, "#in-box", "0,0,128,96 is the whole 128x96 image"),
    ("img2img", "fox.png", {"strength": "1.5"}, "#in-strength", "out of range"),
    ("outpaint", "fox.png", {}, "#in-left", "nothing to add"),
    ("outpaint", "fox.png", {"top": "-8"}, "#in-top", "negative"),
    ("generate", "fox.png", {}, "#size", "needs an operation"),
]


async def test_bad_input_image_settings_show_an_error_next_to_the_field(idle_service, tmp_path):
    """Each case in turn, in one app, from the form as it opened; a failure names its case."""
    source_png(tmp_path / "fox.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_mask(tmp_path / "black.png", (0, 0, 0, 0), (128, 96))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        reset = form_reset(app)
        for case in BAD_SETTINGS:
            operation, image, settings, selector, message = case
            reset()
            settings = {k: str(tmp_path / v) if k == "mask" else v for k, v in settings.items()}
            form = await input_section(pilot, app, tmp_path / image,
                                       "img2img" if operation == "generate" else operation, **settings)
            if operation == "generate":  # the input image's size, then no operation
                form.query_one("#in-operation", Select).value = "generate"
                await pilot.pause()
                assert form.query_one("#size", Select).value == "128x128", case  # back to the family's default
                form.query_one("#size", Select).value = "input"
                await pilot.pause()
            await pilot.press("ctrl+g")
            await settle(pilot)
            assert message in field_of(app, selector).error, case
            assert [f for f in form.query("Field") if f.error] == [field_of(app, selector)], case
            assert app.focused is form.query_one(selector), case
            assert idle_service.jobs() == [], case


async def test_a_newline_in_the_image_path_is_drawn_as_a_symbol_and_its_error_is_one_line(idle_service, tmp_path):
    """A path from metadata (F7, l) may hold a newline: the text box stays one line, and so does its error."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        form = await input_section(pilot, app, "line1\nline2.png", "img2img")
        box = form.query_one("#in-image", Input)
        assert "line1\u240aline2.png" in box.render_line(0).text
        await pilot.press("ctrl+g")
        await settle(pilot)
        error = field_of(app, "#in-image").error
        assert "line1\\nline2.png is missing" in error and "\n" not in error and idle_service.jobs() == []


async def retype_last_character(pilot, app, selector: str) -> None:
    """Focus the text box and, by keys, delete its last character and type it again."""
    box = app.screen.query_one(selector, Input)
    box.focus()
    last = box.value[-1]
    await pilot.press("end", "backspace", last)


async def test_a_recorded_hash_of_a_changed_file_is_dropped_once_its_path_is_edited(idle_service, tmp_path):
    """A loaded job's input changed since it was made: refused, until the user edits the path (or the operation);
    then the file is used as it is now. The same for a reference image."""
    image = source_png(tmp_path / "src.png")
    recorded = {"image": str(image), "image_hash": "0" * 12,
                "image_prompts": [{"path": str(image), "hash": "0" * 12, "type": "canny", "model": "demo-canny"}]}
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        await settle(pilot)
        form = app.screen.form
        form.fill(recorded, kind="img2img")
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert "changed since the job was made" in field_of(app, "#in-image").error and idle_service.jobs() == []
        await retype_last_character(pilot, app, "#in-image")
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert not field_of(app, "#in-image").error
        assert "changed since the job was made" in row_of(app, "#ref-0-path").error and idle_service.jobs() == []
        await retype_last_character(pilot, app, "#ref-0-path")
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: idle_service.jobs(), what="the job")
        assert last_job(idle_service).kind == "img2img"

        form.fill(recorded, kind="img2img")  # loaded again: changing the operation drops the hashes too
        assert form.input_section.read()[1]["image_hash"] == "0" * 12
        assert form.references.read()[0]["model"] == "demo-canny"  # the model it named: until its type changes
        form.query_one("#ref-0-type", Select).value = "depth"
        await pilot.pause()
        assert form.references.read()[0]["model"] is None
        form.query_one("#in-operation", Select).value = "upscale"
        await pilot.pause()
        assert form.input_section.read()[1]["image_hash"] is None


async def test_a_preset_is_saved_without_the_input_image(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await input_section(pilot, app, tmp_path / "missing.png", "upscale")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, SavePresetDialog), what="the save-preset dialog")
        assert "image" not in app.screen.request and app.screen.request["width"] is None  # the image's size: none


async def test_mask_editor_on_a_missing_image_says_so_next_to_the_field(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        form = await input_section(pilot, app, "", "inpaint")
        form.query_one("#input-image", Collapsible).collapsed = True
        await pilot.press("ctrl+t")
        await settle(pilot)
        assert "is empty; give an image file" in field_of(app, "#in-image").error
        assert not form.query_one("#input-image", Collapsible).collapsed  # opened to show it
        assert isinstance(app.screen, GenerateScreen)


async def test_gallery_images_complete_in_the_image_field_and_e_puts_one_there(idle_service, tmp_path):
    image = source_png(tmp_path / "fox.png")
    (tmp_path / "foxes").mkdir()
    in_gallery(idle_service, image)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        field = app.screen.form.query_one("#in-image", Input)
        suggester = field.suggester
        assert await suggester.get_suggestion(str(tmp_path / "f")) == str(image)  # the gallery's first
        assert await suggester.get_suggestion(str(tmp_path / "foxe")) == str(tmp_path / "foxes") + "/"  # files
        assert await suggester.get_suggestion(str(tmp_path / "zz")) is None
        await to_gallery(pilot, app)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the form")
        assert field.value == str(image) and not app.screen.query_one("#input-image", Collapsible).collapsed


async def test_l_on_an_image_jobs_result_opens_the_input_image_section_it_fills(idle_service, tmp_path):
    """What ctrl+g then queues (a vary, not a text to image) is in sight."""
    from backend.jobkinds.img2img import Img2ImgRequest

    source = source_png(tmp_path / "fox.png")
    request = Img2ImgRequest.from_dict({**SOURCE, "image": str(source), "strength": 0.7})
    meta = metadata.build(request, "demo", {"positive": request.prompt, "negative": ""}, kind="img2img")
    varied = tmp_path / "varied.png"
    gradient(128, 96).save(varied, pnginfo=metadata.png_info(meta))
    in_gallery(idle_service, varied)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await settle(pilot)
        await to_gallery(pilot, app)
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the form")
        form = app.screen.form
        await wait_for(pilot, lambda: form.input_section.operation == "img2img", what="the operation")
        assert not form.query_one("#input-image", Collapsible).collapsed
        assert form.input_section.image == str(source)


async def test_hostile_file_names_are_shown_as_text(idle_service, tmp_path):
    image = source_png(tmp_path / f"{NAME}.png")
    (tmp_path / f"{NAME} broken.png").write_bytes(b"not an image")
    in_gallery(idle_service, image)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(140, 45), notifications=True) as pilot:
        form = await input_section(pilot, app, tmp_path / f"{NAME} broken.png", "img2img")
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert NAME_SHOWN in field_of(app, "#in-image").error
        screen_text(app)
        assert await form.query_one("#in-image", Input).suggester.get_suggestion(str(tmp_path / "evil")) is None

        await to_gallery(pilot, app)
        await pilot.press("v")  # queued: the notification names the file
        await wait_for(pilot, lambda: len(idle_service.jobs()) == 2, what="the job")
        assert last_job(idle_service).request["image"] == str(image)  # the path itself, as data
        await pilot.press("i")
        await wait_for(pilot, lambda: isinstance(app.screen, MaskEditor), what="the mask editor")
        await pilot.pause()
        assert NAME_SHOWN in str(app.screen.query_one("#mask-title", Static).content)
        shown = screen_text(app)
        assert "evil [sks] [bold red]x" in shown and app.is_running


async def test_an_inpaint_painted_in_the_editor_runs_and_keeps_every_pixel_outside_the_mask(tmp_path, demo_dirs):
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3", recover=True)  # with a worker
    app = DreamttyApp(model="demo", out=tmp_path / "out", client=LocalClient(service))
    async with opened(app, size=(100, 40)) as pilot:
        editor, image = await open_editor(pilot, app, tmp_path)
        await pilot.press("r", "L", "J", "space", "enter")  # a square of 9x9 preview pixels
        await wait_for(pilot, lambda: len(service.jobs()) == 2, what="the inpaint job")
        job = last_job(service).id
        await wait_for(pilot, lambda: service.store.get(job).state in ("done", "failed"), WORKER_TIMEOUT, "the job")
        done = service.store.get(job)
    assert done.state == "done", done.error
    mask = saved_mask(done.request["mask"])
    with Image.open(image) as source, Image.open(done.outputs[0]) as result:
        before, after = np.asarray(source.convert("RGB")), np.asarray(result.convert("RGB"))
    assert np.array_equal(after[~mask], before[~mask]) and not np.array_equal(after[mask], before[mask])


async def test_f7_loads_the_parameters_of_an_a1111_input_image_with_its_warnings(idle_service, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from test_a1111 import A1111_TEXT

    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    image = tmp_path / "from-a1111.png"
    Image.new("RGB", (64, 64)).save(image, pnginfo=info)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        form = await input_section(pilot, app, image, "img2img")
        await pilot.press("f7")
        prompt = lambda: form.query_one("#prompt").text  # noqa: E731
        await wait_for(pilot, lambda: prompt().startswith("masterpiece, a  red fox"), what="the A1111 prompt")
        assert form.query_one("#model", Input).value == "sd_xl_base_1.0"
        assert form.query_one("#steps", Input).value == "3" and form.query_one("#seed", Input).value == "1234567"
        messages = [(n.title, n.message) for n in app._notifications]
        assert ("", "Loaded the parameters of from-a1111.png.") in messages
        said = [message for title, message in messages if title == "from-a1111.png"]  # its warnings: what differs
        assert len(said) == 3 and said[-1] == ("not carried over: VAE: sdxl_vae.safetensors (not here; the model's "
                                               "own is used)")  # as reproduce: the queued job would be refused
        assert form.query_one("#vae", Input).value == ""
        form.query_one("#in-image", Input).value = ""
        await pilot.press("f7")
        await wait_for(pilot, lambda: "give an image whose parameters to load" in screen_text(app), what="the error")
        form.query_one("#in-image", Input).value = "~nosuchuser-dt/cat.png"  # Path.expanduser's RuntimeError ended
        await pilot.press("f7")  # the app
        await wait_for(pilot, lambda: any(n.message == "image: ~nosuchuser-dt/cat.png is missing"
                                          for n in app._notifications), what="the error")


async def test_image_prompt_rows_queue_their_references_and_refuse_a_bad_weight(idle_service, tmp_path):
    edges, face = source_png(tmp_path / "edges.png"), source_png(tmp_path / "face.png")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        await settle(pilot)
        form = app.screen.form
        form.query_one("#image-prompts", Collapsible).collapsed = False
        form.query_one("#ref-0-path", Input).value = str(edges)
        form.query_one("#ref-0-type", Select).value = "canny"
        form.query_one("#ref-0-weight", Input).value = "3"
        form.query_one("#ref-1-path", Input).value = str(face)
        form.query_one("#ref-1-type", Select).value = "face"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: row_of(app, "#ref-0-weight").error, what="the weight's error")
        assert row_of(app, "#ref-0-weight").error == "Reference 1: weight 3 is out of range; allowed 0..2"
        assert idle_service.jobs() == []
        form.query_one("#ref-0-weight", Input).value = "0.8"
        form.query_one("#ref-0-stop", Input).value = "0.6"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: idle_service.jobs(), what="the job")
        references = last_job(idle_service).request["image_prompts"]
    assert [(p["path"], p["type"], p["weight"], p["stop"]) for p in references] \
        == [(str(edges), "canny", 0.8, 0.6), (str(face), "face", 0.75, 0.9)]  # the face takes its type's defaults


def row_of(app, selector: str) -> Field:
    """The image-prompt row (its Field) holding the box ``selector``."""
    return [a for a in app.screen.query_one(selector).ancestors if isinstance(a, Field)][-1]


BAD_REFERENCES = [  # the third row's weight, stop and path; the box that shows the error, its message
    ("[/]", "", "fox.png", "#ref-2-weight", "Reference 3: weight '[/]' is not a number; allowed 0..2"),
    ("nan", "", "fox.png", "#ref-2-weight", "Reference 3: weight 'nan' is not a finite number; allowed 0..2"),
    ("", "2", "fox.png", "#ref-2-stop", "Reference 3: stop 2 is out of range; allowed 0..1"),
    ("", "", "gone.png", "#ref-2-path", "Reference 3: {tmp}/gone.png is missing"),
]


async def test_an_image_prompt_error_is_shown_under_its_rows_box(idle_service, tmp_path):
    """Rows 1 and 3 filled (2 empty): an error of the third row names it as labelled, under the bad box, focused."""
    source_png(tmp_path / "fox.png")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        await settle(pilot)
        form = app.screen.form
        form.query_one("#image-prompts", Collapsible).collapsed = False
        form.query_one("#ref-0-path", Input).value = str(tmp_path / "fox.png")
        for case in BAD_REFERENCES:
            weight, stop, path, selector, message = case
            for name, value in (("weight", weight), ("stop", stop), ("path", str(tmp_path / path))):
                form.query_one(f"#ref-2-{name}", Input).value = value
            await pilot.press("ctrl+g")
            await settle(pilot)
            row = row_of(app, selector)
            assert [(f, f.error) for f in form.query("Field") if f.error] == [(row, message.format(tmp=tmp_path))], case
            assert len(row.query(Input)) == 3, case  # under the whole row, not its few-column box
            assert app.focused is form.query_one(selector), case
            assert idle_service.jobs() == [], case
        form.query_one("#ref-0-path", Input).value = str(tmp_path / "gone.png")  # the same file twice: the first row
        await pilot.press("ctrl+g")
        await settle(pilot)
        assert row_of(app, "#ref-0-path").error.startswith("Reference 1: ") and not row_of(app, "#ref-2-path").error


async def test_describe_keys_queue_a_describe_job_of_the_image(idle_service, tmp_path):
    image = source_png(tmp_path / "fox.png")
    in_gallery(idle_service, image)
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        form = await input_section(pilot, app, image, "img2img")
        form.query_one("#prompt").focus()  # a priority key: the prompt does not take it (docs/tui.md, Keys)
        await pilot.press("f6")
        await wait_for(pilot, lambda: any(j.kind == "describe" for j in idle_service.jobs()), what="describe (F6)")
        await to_gallery(pilot, app)
        await pilot.press(app.key_for("gallery.describe"))
        await wait_for(pilot, lambda: sum(j.kind == "describe" for j in idle_service.jobs()) == 2,
                       what="describe (d in the gallery)")
        assert [j.request["image"] for j in idle_service.jobs() if j.kind == "describe"] == [str(image)] * 2
        await to_gallery(pilot, app)
        jobs = app.screen.query_one("#jobs", DataTable)
        assert [str(jobs.get_cell(str(j.id), "prompt")) for j in idle_service.jobs()[:2]] == ["describe fox.png"] * 2


async def test_f6_on_a_bad_input_image_shows_the_error_under_the_image_field(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        form = await input_section(pilot, app, tmp_path / "gone [bold].png", "img2img")
        form.query_one("#input-image", Collapsible).collapsed = True
        form.query_one("#prompt").focus()
        await pilot.press("f6")
        await settle(pilot)
        assert "gone [bold].png is missing" in field_of(app, "#in-image").error and idle_service.jobs() == []
        assert app.focused is form.query_one("#in-image") and not form.query_one("#input-image").collapsed


async def test_a_describe_jobs_end_says_what_it_described(idle_service, tmp_path):
    from backend.events import Done, Started, TextOutput
    from tui.widgets.progress import JobProgress

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        progress = app.screen.query_one(JobProgress)
        for event in (Started(job=2), TextOutput(job=2, image=0, text="a red fox,\n  in snow"), Done(job=2)):
            progress.follow(event)
        await pilot.pause()
        assert progress.status == "Job #2 done: described: a red fox, in snow"
        progress.follow(Done(job=3))  # another job that saved nothing
        assert progress.status == "Job #3 done: no images"


# -- redrawn right after a resize --------------------------------------------------------------
def _picture_at(widget) -> tuple[int, int, int, int] | None:
    """(first column, row, last column + 1, strip width) of the first row of half-block cells a widget draws."""
    for y in range(widget.size.height):
        strip = widget.render_line(y)
        if "▄" in strip.text:
            return strip.text.index("▄"), y, strip.text.rindex("▄") + 1, strip.cell_length
    return None


async def _mask_editor_on(pilot, app, image: Path) -> MaskEditor:
    in_gallery(app.client.service, image)
    await settle(pilot)
    await to_gallery(pilot, app)
    await pilot.press("i")
    await wait_for(pilot, lambda: isinstance(app.screen, MaskEditor), what="the mask editor")
    await wait_for(pilot, lambda: app.screen.canvas.ready, what="the preview")
    return app.screen


async def test_the_mask_editor_centres_its_picture_anew_after_a_resize(idle_service, tmp_path):
    """A small image keeps its preview size: it is drawn where the brush and the mouse now map it."""
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        canvas = (await _mask_editor_on(pilot, app, source_png(tmp_path / "small.png", (32, 32)))).canvas
        await pilot.resize_terminal(160, 50)
        await pilot.pause(0.3)
        await settle(pilot)
        assert _picture_at(canvas)[:2] == canvas.offset != (33, 8)
        await pilot.click(canvas, offset=canvas.offset)  # the picture's top left cell, as drawn
        await pilot.pause()
        assert canvas.mask.pixels.any()


async def test_a_rescale_for_an_older_size_that_comes_last_is_dropped(idle_service, tmp_path, monkeypatch):
    """Two quick resizes: the preview made for the first (slow: a large image) may come after the second's."""
    import threading
    import time

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        canvas = (await _mask_editor_on(pilot, app, source_png(tmp_path / "big.png", (1600, 1200)))).canvas
        mapping, started = Mask.mapping, threading.Event()

        def slow_for_big(self, size):
            if size[0] > 150:
                started.set()
                time.sleep(1.0)
            return mapping(self, size)

        monkeypatch.setattr(Mask, "mapping", slow_for_big)
        await pilot.resize_terminal(250, 80)
        await wait_for(pilot, started.is_set, what="the large preview's mapping")
        await pilot.resize_terminal(60, 20)
        await pilot.pause(1.5)
        await settle(pilot)
        assert canvas.ready and canvas.mask.preview_size == preview_size((1600, 1200), tuple(canvas.size))


async def test_an_image_one_pixel_tall_is_refused_by_the_mask_editor_in_one_line(idle_service, tmp_path):
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(100, 40)) as pilot:
        thin = source_png(tmp_path / "thin.png", (200, 1))
        in_gallery(app.client.service, thin)
        await settle(pilot)
        await to_gallery(pilot, app)
        await pilot.press("i")
        await wait_for(pilot, lambda: any("the mask editor needs at least 2 pixel rows" in n.message
                                          for n in app._notifications), what="the refusal")
        assert not isinstance(app.screen, MaskEditor)


async def test_a_live_frame_is_centred_anew_when_its_panel_shrinks(idle_service, tmp_path):
    from tui.screens.generate import LIVE_PREVIEW_CELLS
    from tui.widgets.preview import ImagePreview

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(200, 60)) as pilot:
        preview = app.screen.query_one(ImagePreview)
        preview.show(Image.new("RGB", (64, 64), (200, 30, 30)), LIVE_PREVIEW_CELLS)  # as a job's live frame is
        await wait_for(pilot, lambda: preview.frames == 1, what="the frame")
        await pilot.resize_terminal(150, 45)  # the panel shrinks; the frame's 48x24 cells still fit
        await wait_for(pilot, lambda: preview.frames == 2, what="the frame redrawn")
        first, _, last, width = _picture_at(preview)
        assert width == preview.size.width and first == (preview.size.width - (last - first)) // 2


async def test_a_filled_reference_without_a_known_type_is_an_image_one_not_the_rows_last(idle_service, tmp_path):
    """Filling the rows again (a loaded image's references) sets every row's type: one that is missing or
    unknown is the default, ``image``, where the row kept the type it showed before."""
    from tui.widgets.reference_images import ReferenceImages

    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        await settle(pilot)
        rows = app.screen.query_one(ReferenceImages)
        rows.fill([{"path": "/a.png", "type": "canny"}, {"path": "/b.png", "type": "depth"}])
        await settle(pilot)
        rows.fill([{"path": "/a.png"}, {"path": "/b.png", "type": "sketch"}])
        await settle(pilot)
        assert [(r["path"], r["type"]) for r in rows.read()] == [("/a.png", "image"), ("/b.png", "image")]


async def test_jobs_another_client_forgets_leave_the_queue_and_the_gallery_at_once(idle_service, tmp_path):
    """``dreamtty jobs --forget`` in another terminal: the tables listed the forgotten jobs and their images until
    some other job event came."""
    in_gallery(idle_service, source_png(tmp_path / "fox.png"))
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(120, 40)) as pilot:
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")
        tables = [app.screen.query_one(f"#{name}", DataTable) for name in ("jobs", "gallery")]
        await wait_for(pilot, lambda: [t.row_count for t in tables] == [1, 1], what="the job and its image")
        assert await LocalClient(idle_service).forget_ended(0) == 1  # as the API's forget does for another client
        await wait_for(pilot, lambda: [t.row_count for t in tables] == [0, 0], what="the tables read again")


@pytest.mark.parametrize("collapsed", [True, False])
async def test_an_image_prompt_rows_error_is_in_view_at_80_columns(idle_service, tmp_path, collapsed):
    """At 80x24 with Image prompts collapsed, the error of a row in the middle opened the group but stayed below
    the form: the row's label turned red and its message could not be seen."""
    source_png(tmp_path / "fox.png")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(80, 24)) as pilot:
        await settle(pilot)
        form = app.screen.form
        await pilot.press(*"a fox")
        form.query_one("#ref-2-path", Input).value = str(tmp_path / "fox.png")
        form.query_one("#ref-2-weight", Input).value = "3"
        form.query_one("#image-prompts", Collapsible).collapsed = collapsed
        await pilot.pause()
        await pilot.press("ctrl+g")
        await settle(pilot)
        await pilot.pause(0.3)
        error = row_of(app, "#ref-2-weight").query_one(".field-error")
        assert str(error.content).startswith("Reference 3: weight 3 is out of range")
        assert form.scrollable_content_region.contains_region(error.region) and app.focused.id == "ref-2-weight"


async def test_a_setting_hidden_by_another_operation_does_not_keep_the_focus(idle_service, tmp_path):
    """A mask painted while the Upscaler box had focus switched to inpaint and hid it: keys typed went into it."""
    image = source_png(tmp_path / "photo.png")
    app = make_app(idle_service, tmp_path)
    async with opened(app, size=(160, 50)) as pilot:
        form = await input_section(pilot, app, image, "upscale")
        form.query_one("#in-upscaler", Input).focus()
        await pilot.pause()
        form.input_section.use_mask(str(source_png(tmp_path / "mask.png")), 4)
        await pilot.pause()
        assert form.input_section.operation == "inpaint" and app.focused.id == "in-operation"
