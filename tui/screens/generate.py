"""Generate screen (F1): the request form, the running job's progress and its live preview.

The first frame shows the screen without its form (``tui.screens.generate_form``, imported and mounted just
after it): a terminal shows dreamtty about as soon as it shows a minimal Textual app. Keys typed before the
form is there go into its prompt.
"""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from textual import events, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Input, Static, TextArea

from backend.errors import DreamttyError, RequestError
from backend.events import (FINAL_EVENTS, Event, ImageSaved, JobEvent, Preview, Queued, ServiceLost, ServiceReady,
                            Started, Step, TextOutput)
from tui import keymap
from tui.text import notify
from tui.widgets.footer import KeysFooter
from tui.widgets.modebar import ModeBar
from tui.widgets.preview import ImagePreview
from tui.widgets.progress import JobProgress

if TYPE_CHECKING:
    from PIL import Image

    from backend.prompting.presets import PresetInfo
    from backend.request import GenerateRequest
    from tui.screens.generate_form import GenerateForm

LIVE_PREVIEW_CELLS = (48, 24)  # live frames stay small (~45 KB of ANSI each) for slow SSH links; the final is full size


class GenerateScreen(Screen):
    """The form on the left; progress and the live preview of the job being followed on the right."""

    AUTO_FOCUS = None  # the prompt, once the form is mounted
    BINDINGS = keymap.bindings(keymap.GENERATE_KEYS)
    DEFAULT_CSS = """
    #form-placeholder { width: 1fr; padding: 0 1; color: $text-muted; }
    """

    def __init__(self) -> None:
        super().__init__()
        self.following: int | None = None  # job whose progress and preview are shown
        self.following_done = True
        self.submitted: set[int] = set()
        self.describing: set[int] = set()  # describe jobs whose text goes into the prompt
        # an image and its cell limit waiting for the user to stop typing
        self.pending_preview: tuple[Image.Image | str, tuple[int, int] | None] | None = None
        self._last_live_frame = 0.0  # monotonic time the last live frame was drawn
        self.form_mounted = asyncio.Event()
        self._early_keys: list[str] = []  # typed before the form was there: they go into its prompt

    def compose(self) -> ComposeResult:
        yield ModeBar("generate")
        with Horizontal(id="generate-body"):
            yield Static("loading the form…", id="form-placeholder")
            with Vertical(id="output"):
                yield JobProgress(id="job-progress")
                yield ImagePreview(id="preview")
        yield KeysFooter()

    def on_mount(self) -> None:
        self.app.generate_screen = self
        self.app.job_events.subscribe(self, self.handle_job_event)
        self.app.after_first_frame(self._mount_form)

    async def _mount_form(self) -> None:
        from backend.request import GenerateRequest
        from tui.screens.generate_form import GenerateForm

        model = self.app.default_model or GenerateRequest.model
        form = GenerateForm(model, self.app.model_given, self.app.default_preset, id="form")
        await self.query_one("#form-placeholder").remove()
        await self.query_one("#generate-body").mount(form, before="#output")
        prompt = form.query_one("#prompt", TextArea)
        if self._early_keys:
            prompt.insert("".join(self._early_keys))
        self.set_focus(prompt)
        self.call_after_refresh(form.scroll_home, animate=False)  # focusing the prompt hid its label
        self.form_mounted.set()

    def on_key(self, event: events.Key) -> None:
        if not self.form_mounted.is_set() and event.is_printable and event.character:
            self._early_keys.append(event.character)
            event.stop()

    @property
    def form(self) -> GenerateForm:
        from tui.screens.generate_form import GenerateForm

        return self.query_one(GenerateForm)

    async def ready_form(self) -> GenerateForm:
        """The form, once mounted with every field and the default preset (a key pressed at once waits here:
        in a worker, never in a message handler, which would hold up the form's own mounting)."""
        await self.form_mounted.wait()
        await self.form.ready.wait()
        return self.form

    async def _read_form(self, input_image: bool = True) -> GenerateRequest | None:
        """The form's request; on bad input show the error inline and return None."""
        form = await self.ready_form()
        form.clear_errors()
        try:
            return form.read_request(input_image)
        except DreamttyError as exc:
            self._rejected(exc)
            return None

    def _rejected(self, exc: DreamttyError) -> None:
        self.form.show_error(exc)
        if self.app.current_mode != "generate":
            self.app.switch_mode("generate")  # show the field with the error

    @work(group="form-actions")
    async def submit(self) -> None:
        """Queue the form as a job, checked in a thread; on bad input show the error inline and queue nothing."""
        request = await self._read_form()
        if request is not None:
            self.app.queue_request(lambda: request, self._rejected, self._queued)

    def _queued(self, job: int) -> None:
        self.submitted.add(job)
        self.notify(f"Job #{job} queued.")

    @work(group="form-actions")
    async def action_save_preset(self) -> None:
        """Ask for a name and save the form as a user preset; a bad form value is shown and nothing saved. The
        Input image section is not part of a preset."""
        request = await self._read_form(input_image=False)
        if request is not None:
            self._check_preset(request)

    @work(exclusive=True, group="save-preset")
    async def _check_preset(self, request: GenerateRequest) -> None:
        """The form checked as for queueing; fields left empty (steps: the model's default) stay empty."""
        try:
            resolved = await self.app.client.validate(request)
        except DreamttyError as exc:
            self._rejected(exc)
            return
        empty = {k for k, v in request.to_dict().items() if v is None}
        values = {k: None if k in empty else v for k, v in resolved.to_dict().items()}
        from backend.prompting.presets import list_presets

        self._ask_preset_name(values, await asyncio.to_thread(list_presets))

    def _ask_preset_name(self, values: dict, presets: list[PresetInfo]) -> None:
        from tui.widgets.preset_dialog import SavePresetDialog

        self.app.push_screen(SavePresetDialog(values, presets), self._preset_saved)

    @work(group="form-actions")
    async def action_edit_mask(self) -> None:
        """Open the mask editor on the Input image (starting from its mask); the mask saved is used for inpaint."""
        from tui.widgets.mask_editor import open_mask_editor

        form = await self.ready_form()
        form.clear_errors()
        section = form.input_section
        open_mask_editor(self, section.image, section.mask_to_edit(), section.feather(), self._rejected,
                         lambda mask: section.use_mask(str(mask.path), mask.feather))

    @work(group="form-actions")
    async def action_describe_input(self) -> None:
        """Describe the Input image; a bad one is shown under its field, as ctrl+g shows it."""
        self.describe((await self.ready_form()).input_section.image, self._rejected)

    @work(group="form-actions")
    async def action_load_input_parameters(self) -> None:
        path = (await self.ready_form()).input_section.image
        if not path:
            self._rejected(RequestError("image", "give an image whose parameters to load (the Input image's path)"))
            return
        self.app.load_into_form(os.path.expanduser(path))

    def describe(self, path: str, failed: Callable[[DreamttyError], None] | None = None) -> None:
        """Describe image ``path`` with the captioner (a describe job); its text replaces the prompt. On bad input
        ``failed(error)`` is called (None: a notification says it)."""
        if not path:
            self._rejected(RequestError("image", "give an image to describe (the Input image's path)"))
            return
        from backend import request_builder
        from backend.jobkinds.describe import DescribeRequest

        model = self.form.query_one("#model", Input).value.strip()
        build = lambda: request_builder.build({"image": path, "model": model}, defaults={}, kind=DescribeRequest)  # noqa: E731
        self.app.queue_request(build, failed or partial(notify, self, title="describe", severity="error"),
                               self.describing.add)

    @on(Button.Pressed, "#in-edit-mask")
    def _edit_mask_pressed(self) -> None:
        self.action_edit_mask()

    @work(exclusive=True, group="follow-again")
    async def _follow_again(self, event: ServiceLost | ServiceReady) -> None:
        """The job shown while the service was away: its progress is stale once it is lost, and once it is back
        the job is read again (it may have ended meanwhile: cancelled by another client)."""
        progress, job_id = self.query_one(JobProgress), self.following
        if isinstance(event, ServiceLost):
            progress.set_status(f"Job #{job_id}: no service; it stays queued, and shows here again once it is back")
            return
        try:
            job = await self.app.client.job(job_id)
        except DreamttyError:  # lost again: its ServiceLost follows
            return
        if job is None or job_id != self.following:
            return
        if (end := job.end_event()) is not None:
            self.handle_job_event(end)
        else:
            progress.set_status(f"Job #{job_id} {job.state}.")

    def _preset_saved(self, path: Path | None) -> None:
        if path is None:
            return
        self.form.load_presets(path.stem)
        notify(self, f"Preset {path.stem!r} written to {path}.", title="preset saved")

    def handle_job_event(self, event: Event) -> None:
        if isinstance(event, (ServiceLost, ServiceReady)) and self.following is not None and not self.following_done:
            self._follow_again(event)
        if not isinstance(event, JobEvent):
            return
        job = event.job
        # follow the job that starts now; once it ended, whichever steps next (the mates of a group go on)
        if isinstance(event, Started) or (isinstance(event, (Queued, Step)) and self.following_done):
            self.following, self.following_done = job, False
        if isinstance(event, Queued) and job in self.submitted:
            self.form.query_one("#seed", Input).parent.set_hint(f"last seed: {event.request['seed']}")
        if isinstance(event, TextOutput) and job in self.describing:
            self.describing.discard(job)
            self.form.query_one("#prompt", TextArea).text = event.text
            notify(self, f"Prompt from job #{job}'s description.", title="describe")
        if isinstance(event, ImageSaved):
            for section in self.query("InputImageSection"):  # mounted after the first frame
                section.add_to_gallery(event.path)
        if job != self.following:
            return
        self.following_done = isinstance(event, FINAL_EVENTS)
        self.query_one(JobProgress).follow(event)
        if isinstance(event, Preview):
            from PIL import Image

            self._show_when_not_typing(Image.frombytes("RGB", (event.width, event.height), event.rgb),
                                       LIVE_PREVIEW_CELLS)
        elif isinstance(event, ImageSaved):
            self._show_when_not_typing(event.path, None)

    def _show_when_not_typing(self, image: Image.Image | str, limit: tuple[int, int] | None) -> None:
        """Show ``image`` (a live frame, or the final image's path) now, or once the user stops typing."""
        waiting = self.pending_preview is not None
        self.pending_preview = (image, limit)
        if not waiting:
            self._draw_pending_preview()

    def _draw_pending_preview(self) -> None:
        wait = self.app.typing()
        live = self.pending_preview[1] is not None
        if live:  # after recent keys, fewer frames
            wait = max(wait, self._last_live_frame + self.app.redraw_interval(0.0) - time.monotonic())
        if wait > 0:
            self.set_timer(wait, self._draw_pending_preview)
            return
        self.query_one(ImagePreview).show(*self.pending_preview)
        if live:
            self._last_live_frame = time.monotonic()
        self.pending_preview = None
