"""The TUI with a real worker process on the demo model: one app run, the whole loop.

Fill the form, ctrl+g, live preview, a PNG carrying the form's parameters, the
gallery, copy path, load parameters back into the form, reproduce (same
pixels), cancel a running job.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from textual.widgets import Checkbox, Input, Select, TextArea

from backend import metadata
from backend.client import LocalClient
from backend.service import Service
from test_tui import opened, wait_for
from tui.app import DreamttyApp
from tui.screens.generate import GenerateScreen
from tui.screens.queue import QueueScreen
from tui.widgets.preview import ImagePreview
from tui.widgets.progress import JobProgress

TIMEOUT = 120  # the first job starts a worker that imports torch


def pngs(folder) -> list:
    return sorted(folder.rglob("*.png"))


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


async def test_generate_preview_gallery_load_reproduce_cancel(tmp_path, demo_dirs):
    out = tmp_path / "out"
    service = Service(devices="cpu", db_path=tmp_path / "queue.sqlite3", recover=True)
    events = service.subscribe()
    app = DreamttyApp(model="demo", out=out, client=LocalClient(service))
    async with opened(app, size=(120, 40)) as pilot:
        form = app.screen.form
        await pilot.press(*"a red fox")
        form.query_one("#negative_prompt", TextArea).text = "blurry"
        form.query_one("#sampler", Select).value = "euler"
        form.query_one("#steps", Input).value = "150"  # long enough for previews after the key-press hold-back
        form.query_one("#cfg", Input).value = "5"
        form.query_one("#seed-random", Checkbox).value = False
        await pilot.pause()
        form.query_one("#seed", Input).value = "1234"
        await pilot.press("ctrl+g")

        await wait_for(pilot, lambda: pngs(out), TIMEOUT, "the PNG")
        progress = app.screen.query_one(JobProgress)
        await wait_for(pilot, lambda: "done" in progress.status, TIMEOUT, "the job to finish")
        [png] = pngs(out)
        saved = metadata.read(png)["request"]
        assert (saved["prompt"], saved["negative_prompt"], saved["sampler"]) == ("a red fox", "blurry", "euler")
        assert (saved["steps"], saved["cfg"], saved["seed"], saved["model"]) == (150, 5.0, 1234, "demo")
        # Live previews arrived and were drawn in half-block cells, then the final image replaced them.
        kinds = [events.get_nowait().type for _ in range(events.qsize())]
        assert "preview" in kinds and kinds.index("preview") < kinds.index("image")
        preview = app.screen.query_one(ImagePreview)
        await wait_for(pilot, lambda: isinstance(preview.source, Image.Image) and preview.source.size == (128, 128),
                       what="the final image in the preview")
        assert preview.frames >= 2
        assert np.array_equal(np.asarray(preview.source), pixels(png))
        assert any("▄" in seg.text for strip in preview._lines for seg in strip)

        # Gallery: the image is there, newest first; copy its path.
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")
        queue = app.screen
        assert queue.selected_image() == str(png)
        await pilot.press("y")
        assert app.clipboard == str(png)

        # Load parameters: the form gets the image's values back.
        form.query_one("#prompt", TextArea).text = "something else"
        form.query_one("#steps", Input).value = "3"
        form.query_one("#seed-random", Checkbox).value = True
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the generate screen")
        assert form.query_one("#prompt", TextArea).text == "a red fox"
        assert form.query_one("#steps", Input).value == "150"
        assert not form.query_one("#seed-random", Checkbox).value and form.query_one("#seed", Input).value == "1234"
        assert form.read_request().sampler == "euler"

        # Reproduce from the gallery: a second PNG with the same pixels.
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, QueueScreen), what="the queue screen")
        await pilot.press("r")
        await wait_for(pilot, lambda: len(pngs(out)) == 2, TIMEOUT, "the reproduced PNG")
        first, second = pngs(out)
        assert np.array_equal(pixels(first), pixels(second))

        # Cancel: a long job, ctrl+x once it runs; it ends cancelled and writes nothing.
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, GenerateScreen), what="the generate screen")
        form.query_one("#steps", Input).value = "400"
        await pilot.press("ctrl+g")
        await wait_for(pilot, lambda: app.progress, TIMEOUT, "the long job to step")
        [job] = app.progress
        await pilot.press("ctrl+x")
        await wait_for(pilot, lambda: service.store.get(job).state == "cancelled", TIMEOUT, "the cancel")
        await wait_for(pilot, lambda: "cancelled" in app.screen.query_one(JobProgress).status, what="status")
        assert len(pngs(out)) == 2
