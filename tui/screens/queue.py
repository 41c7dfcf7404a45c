"""Queue & gallery screen (F2): jobs with state, progress and ETA; finished images, newest first.

From an image: load its parameters into the Generate form, reproduce it, copy its path, use it as the
Generate screen's input image, or queue a job on it with its own settings and a new seed: vary, upscale,
outpaint, and inpaint (after painting a mask).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from functools import partial
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Label, Static

from backend import jobkinds, metadata
from backend.errors import DreamttyError, RequestError
from backend.events import (FINAL_EVENTS, Event, Forgotten, ImageSaved, Queued, Retrying, ServiceLost, ServiceReady,
                            Started, Step)
from backend.jobkinds.image_input import ImageInputRequest
from backend.jobkinds.inpaint import InpaintRequest
from backend.queue_store import ACTIVE, Job
from backend.safetext import summary
from tui import keymap
from tui.image_jobs import OPERATIONS, ImageJob, gallery_request
from tui.text import cell, notify, plain
from tui.widgets.footer import KeysFooter
from tui.widgets.modebar import ModeBar
from tui.widgets.preview import ImagePreview
from tui.widgets.progress import format_eta, step_counts

JOB_ROWS = 60  # the newest jobs the jobs table lists, after the running ones
GALLERY_ROWS = 500
PROMPT_WIDTH = 61  # characters of a prompt in the job and gallery tables
REFRESH_DELAY = 0.1  # seconds of job events a table's one new read covers
_REFRESH_ON = (Queued, Started, Retrying, *FINAL_EVENTS, ServiceLost, ServiceReady, Forgotten)


def gallery_entries(jobs: list[Job]) -> list[tuple[str, dict]]:
    """(path, per-image request dict) of every image the jobs wrote that still exists, newest first.

    Reads the file system: call it off the event loop."""
    out = []
    for job in jobs:  # newest job first
        try:
            request = jobkinds.get(job.kind).request(job.request)
        except RequestError:  # a job of another dreamtty version
            continue
        for i in reversed(range(len(job.outputs))):
            if Path(job.outputs[i]).exists():
                out.append((job.outputs[i], request.per_image(i).to_dict()))
    return out[:GALLERY_ROWS]


def step_cells(step: Step) -> tuple[str, str]:
    """(progress, ETA) cells of a running job from its last ``step`` event."""
    done, total = step_counts(step)
    return f"{done}/{total}", format_eta(step.eta)


def _prompt_cell(request: dict) -> str:
    return summary(request.get("prompt", ""), PROMPT_WIDTH) or "(empty)"


def _job_cell(job: Job) -> str:
    """The jobs table's Prompt cell: the prompt, or what a job that makes text (describe) describes."""
    if jobkinds.makes_text(job.kind):
        return f"describe {Path(str(job.request.get('image') or '')).name}"
    return _prompt_cell(job.request)


class QueueScreen(Screen):
    """Two tables (jobs, images) on the left; the selected image and its parameters on the right."""

    BINDINGS = keymap.bindings(keymap.QUEUE_KEYS)
    AUTO_FOCUS = "#gallery"

    def __init__(self) -> None:
        super().__init__()
        self._image_wanted: str | None = None  # the image whose parameters are being read
        self._stale: set[str] = set()  # tables whose jobs changed while another screen showed: read on return
        self._due: set[str] = set()  # tables to be read again shortly

    def compose(self) -> ComposeResult:
        yield ModeBar("queue")
        with Horizontal(id="queue-body"):
            with Vertical(id="queue-lists"):
                yield Static(id="queue-error")
                yield Label("Jobs", classes="section")
                yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
                yield Label("Images, newest first", classes="section")
                yield DataTable(id="gallery", cursor_type="row", zebra_stripes=True)
            with Vertical(id="queue-detail"):
                yield ImagePreview(id="gallery-preview")
                with VerticalScroll(id="params-scroll"):
                    yield Static("No image selected.", id="image-params")
        yield KeysFooter()

    def on_mount(self) -> None:
        jobs = self.query_one("#jobs", DataTable)
        jobs.add_column("Job", key="job")
        jobs.add_column("State", key="state")
        jobs.add_column("Progress", key="progress")
        jobs.add_column("ETA", key="eta")
        jobs.add_column("Prompt", key="prompt")
        gallery = self.query_one("#gallery", DataTable)
        for name in ("Image", "Seed", "Size", "Sampler", "Steps", "Prompt"):
            gallery.add_column(name, key=name.lower())
        self.app.job_events.subscribe(self, self.handle_job_event)
        self.refresh_jobs()
        self.refresh_gallery()

    # -- tables ------------------------------------------------------------
    def _progress_cells(self, job: Job) -> tuple[str, str]:
        step = self.app.progress.get(job.id)
        if job.state == "running" and step:
            return step_cells(step)
        if job.state == "done":
            made = len(job.outputs)
            return ("text" if jobkinds.makes_text(job.kind) else f"{made} image{'s' * (made != 1)}"), ""
        return ("" if job.state in ACTIVE else (job.error or "")[:40]), ""

    async def _jobs(self, limit: int, states: tuple[str, ...] | None = None,
                    with_images: bool = False) -> list[Job] | None:
        """The service's newest ``limit`` jobs (see ``Client.jobs``), or None with the reason shown above the tables."""
        try:
            jobs = await self.app.client.jobs(limit, states, with_images)
        except DreamttyError as exc:  # no service (yet)
            self._show_error(str(exc))
            return None
        self._show_error("")
        return jobs

    def _show_error(self, message: str) -> None:
        error = self.query_one("#queue-error", Static)
        error.update(plain(message))
        error.display = bool(message)

    @work(exclusive=True, group="refresh-jobs")
    async def refresh_jobs(self) -> None:
        """The running jobs first (however many are queued after them), then the newest JOB_ROWS others."""
        running = await self._jobs(JOB_ROWS, ("running",))
        newest = None if running is None else await self._jobs(JOB_ROWS)
        if newest is None:  # why is said above the table; states read before may be stale now
            self.query_one("#jobs", DataTable).clear()
            return
        shown = {job.id for job in running}  # a job may end between the two reads: listed once
        all_jobs = [*running, *(job for job in newest if job.id not in shown)]
        table = self.query_one("#jobs", DataTable)
        selected = self._selected_key(table)
        table.clear()
        for job in all_jobs:
            progress, eta = self._progress_cells(job)
            cells = (f"#{job.id}", job.state, progress, eta, _job_cell(job))
            table.add_row(*map(cell, cells), key=str(job.id))
        self._restore_cursor(table, selected)

    @work(exclusive=True, group="refresh-gallery")
    async def refresh_gallery(self) -> None:
        jobs = await self._jobs(GALLERY_ROWS, with_images=True)
        if jobs is None:
            return
        entries = await asyncio.to_thread(gallery_entries, jobs)
        table = self.query_one("#gallery", DataTable)
        selected = self._selected_key(table)
        table.clear()
        for path, request in entries:
            cells = (Path(path).name, request["seed"], f"{request['width']}×{request['height']}", request["sampler"],
                     request["steps"], _prompt_cell(request))
            table.add_row(*map(cell, cells), key=path)
        self._restore_cursor(table, selected)
        if table.row_count and selected is None:
            self._show_image(self.selected_image())

    @staticmethod
    def _selected_key(table: DataTable) -> str | None:
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    @staticmethod
    def _restore_cursor(table: DataTable, key: str | None) -> None:
        if key is not None and key in table.rows:
            table.move_cursor(row=table.get_row_index(key), animate=False)

    def handle_job_event(self, event: Event) -> None:
        if isinstance(event, _REFRESH_ON):
            self._refresh("jobs")
        if isinstance(event, (ImageSaved, Forgotten, ServiceReady)):  # the images of the jobs the service lists
            self._refresh("gallery")
        if isinstance(event, Step):
            table = self.query_one("#jobs", DataTable)
            job = event.job
            if str(job) in table.rows:
                progress, eta = step_cells(event)
                table.update_cell(str(job), "progress", progress, update_width=True)
                table.update_cell(str(job), "eta", eta, update_width=True)

    def _refresh(self, table: str) -> None:
        """Read the jobs of ``table`` (jobs, gallery) again: once for the events of the next REFRESH_DELAY
        seconds (a thousand jobs cancelled at once), or once this screen shows again when another one shows."""
        if not self.is_current:
            self._stale.add(table)
        elif table not in self._due:
            self._due.add(table)
            self.set_timer(REFRESH_DELAY, partial(self._read_again, table))

    def _read_again(self, table: str) -> None:
        self._due.discard(table)
        {"jobs": self.refresh_jobs, "gallery": self.refresh_gallery}[table]()

    def on_screen_resume(self) -> None:
        stale, self._stale = self._stale, set()
        for table in stale:
            self._refresh(table)

    # -- selection ----------------------------------------------------------
    def selected_image(self) -> str | None:
        return self._selected_key(self.query_one("#gallery", DataTable))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "gallery" and event.row_key is not None:
            self._show_image(event.row_key.value)

    def _show_image(self, path: str | None) -> None:
        self._image_wanted = path
        if path is None:
            self.query_one("#image-params", Static).update("No image selected.")
        else:
            self._read_image(path)

    @work(thread=True, exclusive=True, group="gallery-image", exit_on_error=False)
    def _read_image(self, path: str) -> None:
        """Read the image's time and parameters in a thread, then show them with the image."""
        try:
            stamp = dt.datetime.fromtimestamp(Path(path).stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        except OSError as exc:  # deleted or moved since the gallery listed it
            self.app.call_from_thread(self._image_read, path, False, f"{path}\n\ncannot read it: {exc.strerror or exc}")
            return
        try:
            text = metadata.parameters_text(path)
        except DreamttyError as exc:
            text = str(exc)
        self.app.call_from_thread(self._image_read, path, True, f"{path}\n{stamp}\n\n{text}")

    def _image_read(self, path: str, readable: bool, params: str) -> None:
        if path != self._image_wanted:
            return  # another image was selected since
        self.query_one("#gallery-preview", ImagePreview).show(path if readable else None)
        self.query_one("#image-params", Static).update(plain(params))

    def _image_or_warn(self) -> str | None:
        path = self.selected_image()
        if path is None:
            self.notify("No image selected: pick one in the images table.", severity="warning")
        return path

    # -- actions -----------------------------------------------------------
    async def action_cancel_selected(self) -> None:
        key = self._selected_key(self.query_one("#jobs", DataTable))
        try:
            cancelled = key is not None and await self.app.client.cancel(int(key))
        except DreamttyError as exc:
            notify(self, exc, title="cancel", severity="error")
            return
        if cancelled:
            notify(self, f"Cancelling job #{key}.")
        elif key is not None:
            notify(self, f"Job #{key} has ended: nothing to cancel.", severity="warning")
        else:
            self.notify("Select a queued or running job to cancel.", severity="warning")

    def action_load_parameters(self) -> None:
        path = self._image_or_warn()
        if path is not None:
            self.app.load_into_form(path)

    def action_reproduce(self) -> None:
        path = self._image_or_warn()
        if path is not None:
            self.app.queue_request(partial(metadata.request_from_image, path),
                                   lambda exc: notify(self, exc, severity="error"),
                                   lambda job: notify(self, f"Job #{job} queued: reproducing {Path(path).name}."))

    def action_copy_path(self) -> None:
        path = self._image_or_warn()
        if path is not None:
            self.app.copy_to_clipboard(path)
            notify(self, f"Copied: {path}", title="path")

    async def action_use_as_input(self) -> None:
        path = self._image_or_warn()
        if path is not None:
            await self.app.use_as_input(path)

    def action_describe(self) -> None:
        """Describe the selected image into the Generate screen's prompt (shown there)."""
        path = self._image_or_warn()
        if path is not None:
            self.app.generate_screen.describe(path)
            self.app.switch_mode("generate")

    def action_on_image(self, name: str) -> None:
        """Queue operation ``name`` (:data:`tui.image_jobs.OPERATIONS`) on the selected image."""
        path = self._image_or_warn()
        if path is not None:
            self._queue_on_image(name, path)

    def _queue_on_image(self, name: str, path: str, values: dict | None = None) -> None:
        label = OPERATIONS[name].label
        built: list[ImageJob] = []  # the job, once built: a refusal of a setting the image carried says so

        def failed(exc: DreamttyError) -> None:
            notify(self, built[0].explained(exc) if built else exc, title=label, severity="error")

        self.app.queue_request(partial(self._request_on_image, name, path, values, built.append), failed,
                               lambda job: notify(self, f"Job #{job} queued: {label} of {Path(path).name}."))

    def _request_on_image(self, name: str, path: str, values: dict | None,
                          keep: Callable[[ImageJob], None]) -> ImageInputRequest:
        """The job of operation ``name`` on ``path`` (in a thread), given to ``keep``; what its metadata gives
        that is not used is said, as the CLI's verbs say it."""
        job = gallery_request(name, path, values)
        keep(job)
        for warning in job.warnings:
            self.app.call_from_thread(notify, self, warning, title=Path(path).name, severity="warning", timeout=15)
        return job.request

    def action_inpaint(self) -> None:
        """Open the mask editor on the selected image; the mask it saves is inpainted at once."""
        from tui.widgets.mask_editor import open_mask_editor

        path = self._image_or_warn()
        if path is not None:
            open_mask_editor(self, path, None, InpaintRequest.feather,
                             lambda exc: notify(self, exc, title="inpaint", severity="error"),
                             lambda mask: self._queue_on_image("inpaint", path, {"mask": str(mask.path),
                                                                                 "feather": mask.feather}))
