"""Models screen (F4): the model library, the default model, and pulls from the Hugging Face Hub.

Shows what ``dreamtty models list`` shows. Scans and downloads run in threads,
so the UI never waits on the disk or the network; no torch is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Input, ProgressBar, Static
from tqdm import tqdm

from backend import config, downloads, library
from backend.errors import DreamttyError
from backend.events import ServiceReady, WorkerModels, WorkerReady, WorkerReleased
from backend.families import family_label
from backend.models import resolve_model
from backend.safetext import one_line
from tui.keymap import MODELS_KEYS, bindings
from tui.text import TextInput, cell, line, notify, plain
from tui.widgets.footer import KeysFooter
from tui.widgets.modebar import ModeBar

# The note's head ("pickle", "refiner") next to the name: the sources are long paths, and a note at the end was off
# an 80-column screen; the highlighted row's whole note is on the line under the table.
COLUMNS = ("kind", "name", "note", "family", "size", "source")


def _default_model_problem(cfg: config.Config, lib: library.Library) -> str | None:
    """Why the config's default model cannot be used (gone, damaged, a typo), saying where it is set; None when
    it can or none is set. Every job that names no model would fail with this. A checkpoint ``lib`` lists with
    no note is usable: the library is not scanned again for it."""
    if not cfg.default_model or any(e.kind == "checkpoint" and e.name == cfg.default_model and not e.note
                                    for e in lib.entries):
        return None
    try:
        resolve_model(cfg.default_model)
    except DreamttyError as exc:
        return f"{str(exc).removeprefix('model: ')} ({cfg.origin('default_model')})"
    return None


class _QuietTqdm(tqdm):
    """The Hub client's progress bars would draw over the TUI: keep them silent."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class ModelsPane(Vertical):
    """Everything shown on the Models screen. ``self.app.service`` is the backend service."""

    BINDINGS = bindings(MODELS_KEYS)
    DEFAULT_CSS = """
    ModelsPane #models-table { height: 1fr; }
    ModelsPane #models-detail { height: auto; max-height: 2; }
    ModelsPane #models-detail.-note { color: $warning; }
    ModelsPane #models-problems-box { height: auto; max-height: 4; }
    ModelsPane #models-problems { color: $warning; }
    ModelsPane #models-pull-row { height: auto; }
    ModelsPane #models-pull-row Input { width: 1fr; }
    ModelsPane #pull-status { height: auto; }
    ModelsPane #models-recommended-box { height: auto; max-height: 4; }
    """

    class DefaultChanged(Message):
        """The user made ``model`` the default model."""

        def __init__(self, model: str) -> None:
            super().__init__()
            self.model = model

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entries: list[library.Entry] = []
        self.pulling = False

    def compose(self) -> ComposeResult:
        yield Static("", id="models-info")
        yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="models-detail")
        with VerticalScroll(id="models-problems-box"):  # Tab reaches it: the arrow keys scroll every skipped file
            yield Static("", id="models-problems")
        with Horizontal(id="models-pull-row"):
            yield TextInput(placeholder="Hugging Face id, e.g. stabilityai/sdxl-turbo", compact=True, id="pull-id")
            yield TextInput(placeholder="one file (optional), e.g. sd_xl_turbo_1.0_fp16.safetensors", compact=True,
                            id="pull-file")
        yield ProgressBar(id="pull-progress", show_eta=True)
        yield Static("", id="pull-status")
        with VerticalScroll(id="models-recommended-box"):  # shown with no model besides the demo ones
            yield Static(plain(downloads.recommended_text()), id="models-recommended")

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.query_one("#pull-progress").display = False  # shown while a pull runs
        self.query_one("#pull-status").display = False
        self.query_one("#models-recommended-box").display = False
        self.action_refresh()

    # -- listing -------------------------------------------------------------------
    def action_refresh(self) -> None:
        self.query_one("#models-info", Static).update("Scanning model folders…")
        self.scan()

    @work(thread=True, exclusive=True, group="models-scan")
    def scan(self) -> None:
        cfg = config.load()
        lib = library.discover(cfg)
        self.app.call_from_thread(self._show, cfg, lib, _default_model_problem(cfg, lib))

    def _show(self, cfg: config.Config, lib: library.Library, default_problem: str | None = None) -> None:
        self.entries = lib.entries
        table = self.query_one(DataTable)
        table.clear()
        default = cfg.default_model or "demo"
        for e in lib.entries:
            size = downloads.human(e.size) if e.size else "-"
            marker = " ★" if e.kind == "checkpoint" and e.name == default else ""
            cells = (e.kind, e.name + marker, e.note.split(": ", 1)[0], family_label(e.family), size, e.source)
            table.add_row(*map(cell, cells))
        folders = ", ".join(one_line(p) for p in cfg.folders("checkpoints"))
        self.query_one("#models-info", Static).update(plain(  # one line: a name or path may hold a newline
            f"{len(lib.entries)} items · default model: {one_line(default)} · checkpoints in: {folders} "
            f"· config: {one_line(config.config_path())}"
        ))
        problems = "\n".join([*([f"default model: {one_line(default_problem)}"] if default_problem else []),
                              *(f"skipped: {one_line(p)}" for p in lib.problems)])
        self.query_one("#models-problems", Static).update(plain(problems))
        self.query_one("#models-problems-box").display = bool(problems)
        no_models = all(e.source == "built-in" for e in lib.of_kind("checkpoint"))  # as ``models list`` says
        self.query_one("#models-recommended-box").display = no_models
        self._show_detail()

    @on(DataTable.RowHighlighted, "#models-table")
    def _show_detail(self) -> None:
        """The highlighted entry's whole note under the table (else where it is)."""
        entry = self.selected()
        detail = self.query_one("#models-detail", Static)
        detail.update(Content(line(f"{entry.name}: {entry.note or entry.path or entry.source}") if entry else ""))
        detail.set_class(bool(entry and entry.note), "-note")

    def selected(self) -> library.Entry | None:
        table = self.query_one(DataTable)
        if not self.entries or table.cursor_row is None or not 0 <= table.cursor_row < len(self.entries):
            return None
        return self.entries[table.cursor_row]

    def action_set_default(self) -> None:
        entry = self.selected()
        if entry is None or entry.kind != "checkpoint":
            self.notify("Select a checkpoint to make it the default model", severity="warning")
            return
        if entry.note:
            notify(self, f"{one_line(entry.name)}: {entry.note}", severity="warning")
            return
        if entry.path and not os.path.exists(entry.path):  # removed since the scan: it would be a default unusable
            notify(self, f"{one_line(entry.name)}: {one_line(entry.path)} is gone since the scan; scanning again",
                   severity="warning")
            self.action_refresh()
            return
        try:
            path = config.set_value("default_model", entry.name)
        except DreamttyError as exc:
            notify(self, exc, severity="error")
            return
        self.post_message(self.DefaultChanged(entry.name))
        notify(self, f"default model: {one_line(entry.name)} (saved in {one_line(path)})")
        self.action_refresh()

    # -- pulling --------------------------------------------------------------------
    def action_focus_pull(self) -> None:
        self.query_one("#pull-id", Input).focus()

    @on(Input.Submitted, "#pull-id, #pull-file")
    def _submitted(self, _event: Input.Submitted) -> None:
        repo = self.query_one("#pull-id", Input).value.strip()
        if not repo:
            self.notify("Type a Hugging Face id first", severity="warning")
            return
        if self.pulling:
            self.notify("A download is already running", severity="warning")
            return
        self.pulling = True
        filename = self.query_one("#pull-file", Input).value.strip() or None
        self.query_one("#pull-progress").display = True
        self._status(f"Asking the Hub about {repo}…")
        self.pull(repo, filename)

    @work(thread=True, exclusive=True, group="models-pull")
    def pull(self, repo: str, filename: str | None) -> None:
        def progress(done: int, total: int, name: str) -> None:
            self.app.call_from_thread(self._progress, done, total, name)

        try:
            path = downloads.pull(repo, filename=filename, progress=progress, tqdm_class=_QuietTqdm)
        except DreamttyError as exc:
            self.app.call_from_thread(self._pulled, None, str(exc))
        except Exception as exc:  # anything unexpected still ends as one line, never a crashed UI
            self.app.call_from_thread(self._pulled, None, f"pull: {type(exc).__name__}: {exc}")
        else:
            self.app.call_from_thread(self._pulled, path, "")

    def _progress(self, done: int, total: int, name: str) -> None:
        self.query_one(ProgressBar).update(total=max(total, 1), progress=done)
        text = f"downloading {name} ({downloads.human(done)} of {downloads.human(total)} done)" if name else "verifying…"
        self._status(text)

    def _status(self, text: str) -> None:
        status = self.query_one("#pull-status", Static)
        status.update(plain(text))
        status.display = True

    def _pulled(self, path: Path | None, error: str) -> None:
        self.pulling = False
        self.query_one("#pull-progress").display = False
        if path is None:
            self._status(error)
            notify(self, error, severity="error", timeout=10)
            return
        self._status(f"done: {path}")
        notify(self, f"downloaded to {path}")
        self.action_refresh()


class ModelsScreen(Screen):
    """The Models mode (F4): the model library, and below it the service's workers and what they hold."""

    def compose(self) -> ComposeResult:
        yield ModeBar("models")
        yield ModelsPane(id="models-pane")
        yield Static("", id="service-workers")
        yield KeysFooter()

    def on_mount(self) -> None:
        self.app.job_events.subscribe(self, self._on_job_event)

    def on_screen_resume(self) -> None:
        self.show_workers()

    def _on_job_event(self, event) -> None:
        if isinstance(event, (WorkerReady, WorkerModels, WorkerReleased, ServiceReady)):
            self.show_workers()

    @work(exclusive=True, group="service-workers")
    async def show_workers(self) -> None:
        """The service's workers (devices, cluster nodes, loaded models, jobs), as ``serve --status`` says."""
        from tui.cli_serve import worker_lines

        try:
            text = "\n".join(["Workers", *worker_lines(await self.app.client.status())])
        except DreamttyError as exc:
            text = f"Workers: {exc}"
        self.query_one("#service-workers", Static).update(plain(text))
