"""Train screen (F3): start DreamBooth runs and watch them live.

Runs are given to the service (the app's client), which starts each one's trainer as its own
process once its device is free of generation jobs; this pane lists which runs wait and why. It
reads their run directories: ``run.json`` for the state and ``events.jsonl`` (tailed every 0.5 s)
for the loss curve, lr, speed, ETA, GPU memory, validation images and log. So it re-attaches to
running and past runs whenever it is opened, also after the app restarts. No torch here.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Checkbox, Input, Log, OptionList, Select, Static
from textual.widgets.option_list import Option, OptionDoesNotExist
from textual.worker import Worker, get_current_worker
from textual_plotext import PlotextPlot

from backend.errors import DreamttyError, RequestError, field_and_message
from backend.events import TrainResume, TrainStep
from backend.input_images import UNREADABLE
from backend.run_schedule import ENDED, TRAINING, ScheduledRun
from backend.safetext import one_line
from backend.training import runs
from backend.training.config import LR_SCHEDULES, METHODS, PRECISIONS, REQUIRED, TrainRequest, check_field
from backend.training.images import check_folder
from backend.training.launch import request_stop, resume_settings
from tui.keymap import TRAIN_KEYS, bindings
from tui.text import TextInput, line, notify, plain
from tui.widgets.field import Field
from tui.widgets.footer import KeysFooter
from tui.widgets.modebar import ModeBar
from tui.widgets.preview import ImagePreview

POLL_S = 0.5
RESCAN_EVERY = 4  # polls between rescans of the runs folder
MAX_PLOT_POINTS = 400
MAX_PLOT_LOSS = 1e100  # a loss past this is left out of the plot (plotext overflows near 1e308)
STATE_MARKS = {"waiting": "⧗", "starting": "…", "running": "▶", "done": "✓", "failed": "✗", "stopped": "■"}
STATE_MOST = 24  # characters of a run's state shown: run.json may hold any text there

# Text inputs of the form: (field, label, placeholder). Empty = the TrainRequest default.
_TEXT_FIELDS = (
    ("model", "Base model", "demo, a diffusers folder or a hub id"),
    ("instance_dir", "Instance images folder", "3-20 photos of the subject"),
    ("instance_prompt", "Instance prompt", "a photo of sks dog"),
    ("class_prompt", "Class prompt (prior preservation)", "a photo of dog; empty = off"),
)
_D = TrainRequest()  # the defaults the placeholders say
_ROWS = (
    (("rank", "LoRA rank", f"{_D.rank}"), ("max_steps", "Max steps", f"{_D.max_steps}")),
    (("lr", "Learning rate", "auto"), ("resolution", "Resolution", "model's")),
    (("batch_size", "Batch size", f"{_D.batch_size}"), ("num_class_images", "Class images", f"{_D.num_class_images}")),
    (("checkpoint_every", "Checkpoint every", f"{_D.checkpoint_every}"), ("seed", "Seed", "random")),
    (("validation_every", "Validation every", f"{_D.validation_every}"), ("grad_accum", "Grad accumulation",
                                                                        f"{_D.grad_accum}")),
)
_TAIL_FIELDS = (
    ("validation_prompt", "Validation prompt", "empty = no validation images"),
    ("output", "Run folder", "empty = a new folder in the runs folder"),
)
_SWITCHES = (
    ("train_text_encoder", "Train text encoder"),
    ("gradient_checkpointing", "Gradient checkpointing"),
    ("use_8bit_adam", "8-bit Adam (bitsandbytes)"),
    ("cache_latents", "Cache latents"),
    ("random_flip", "Random flip"),
    ("center_crop", "Center crop"),
)
_FORM_FIELDS = {f.name for f in fields(TrainRequest)}
RESUMABLE_STATES = ("stopped", "failed")


def live_error(name: str, value: object) -> str | None:
    """What is wrong with one form value on its own (empty text is fine: the default applies)."""
    if isinstance(value, str) and not value.strip():
        return None
    try:
        check_field(name, value)
        if name == "instance_dir":
            check_folder(str(value).strip())
    except RequestError as exc:
        return exc.message
    return None


def field_errors(exc: DreamttyError) -> dict[str, str]:
    """The request field ``exc`` is about and its message ({} when none): a RequestError's, or the one that starts
    the text of another error (the service refuses a model with ``model: ... does not exist``)."""
    name, message = field_and_message(exc)
    return {name: message} if isinstance(exc, RequestError) or (name in _FORM_FIELDS and message) else {}


_NOT_SAVED = {"output", "resume"}  # what a resume gives, besides the run's saved settings


def waiting_for(run: ScheduledRun | None, schedule: Iterable[ScheduledRun]) -> str:
    """What ``run`` waits for. The trainer of its own folder, still exiting (stopped a moment ago), is said as
    such: the service names it as a run it waits for."""
    if run is None:
        return "its device"
    if any(other.path == run.path and other.id != run.id and other.state == TRAINING for other in schedule):
        return "its previous trainer to exit"
    return run.waiting_for or "its device"


def heading(info: runs.RunInfo) -> str:
    """A run's mark, folder name and state on one line: a name may hold a newline, and run.json's state is any
    text (cut to ``STATE_MOST``)."""
    state = str(info.state)
    return f"{STATE_MARKS.get(state, '?')} {one_line(info.name)}  [{line(state, STATE_MOST)}]"


def _input_field(name: str, label: str, placeholder: str, value: str = "") -> Field:
    return Field(label, TextInput(value=value, placeholder=placeholder, compact=True, id=f"train-{name}"),
                 names=(name,), id=f"train-field-{name}")


def _select(name: str, options: list[tuple[str, str]], value: str) -> Select:
    return Select(options, value=value, allow_blank=False, compact=True, id=f"train-{name}")


def _open_rgb(path: str) -> Image.Image | None:
    """The image at ``path`` in RGB; None when PIL cannot read it or it is past PIL's pixel limit."""
    try:
        with Image.open(path) as img:  # the size is read before the pixels: warnings filters are process-wide
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                return None
            return img.convert("RGB")
    except UNREADABLE:
        return None


def side_by_side(paths: Sequence[str]) -> Image.Image | None:
    """The images at ``paths`` in one row (skipping unreadable ones)."""
    images = [img for path in paths if (img := _open_rgb(path)) is not None]
    if not images:
        return None
    height = min(i.height for i in images)
    images = [i.resize((max(1, i.width * height // i.height), height), Image.Resampling.LANCZOS) for i in images]
    row = Image.new("RGB", (sum(i.width for i in images), height))
    x = 0
    for img in images:
        row.paste(img, (x, 0))
        x += img.width
    return row


class TrainPane(Vertical):
    """Everything shown on the Train screen.

    ``runs_root``: the folder whose run dirs are listed (default ``data_dir()/runs``);
    ``extra_runs``: run dirs elsewhere to list too (e.g. a ``--output`` given to the app).
    """

    BINDINGS = bindings(TRAIN_KEYS)
    DEFAULT_CSS = """
    TrainPane { height: 1fr; }
    #train-body { height: 1fr; }
    #train-left { width: 40%; max-width: 52; border-right: tall $panel; }
    #train-form { height: 2fr; padding: 0 1; }
    #train-runs { height: 1fr; border-top: tall $panel; }
    #train-right { width: 1fr; padding: 0 1; }
    #train-stats { height: auto; }
    #train-loss { height: 1fr; min-height: 8; }
    #train-bottom { height: 1fr; }
    #train-validation { width: 2fr; }
    #train-log { width: 3fr; }
    #train-form-error { color: $error; height: auto; }
    .train-row { height: auto; }
    .train-row > Field { width: 1fr; margin-right: 1; }
    #train-log { border: round $panel; }
    #train-log:focus { border: round $accent; }
    .train-section { text-style: bold; }
    """

    def __init__(self, runs_root: Path | None = None, extra_runs: Sequence[Path] = (), *,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.runs_root = Path(runs_root) if runs_root else runs.runs_root()
        self.extra_runs = [Path(p) for p in extra_runs]
        self.selected_run: Path | None = None
        self.progress = runs.RunProgress()
        self.run_infos: list[runs.RunInfo] = []
        self._tail: runs.EventTail | None = None
        self._reads = 0  # runs chosen so far: only the last one's read is shown
        self.schedule: list[ScheduledRun] = []  # the service's runs, newest first
        self.scheduled: dict[Path, ScheduledRun] = {}  # run folder -> its place in the service's schedule
        self._polls = 0
        self._scan: Worker | None = None  # the newest read of the runs folder
        self._shown_validation: list[str] = []
        self._listed: list[tuple[str, str]] = []

    # -- layout ----------------------------------------------------------------
    def compose(self) -> ComposeResult:
        model = str(getattr(self.app, "default_model", "demo") or "demo")
        with Horizontal(id="train-body"):
            with Vertical(id="train-left"):
                with VerticalScroll(id="train-form", can_focus=False):  # tab goes field to field
                    yield Static("New run", classes="train-section")
                    for name, label, hint in _TEXT_FIELDS:
                        yield _input_field(name, label, hint, model if name == "model" else "")
                    with Horizontal(classes="train-row"):
                        yield Field("Method", _select("method", [(m, m) for m in METHODS], "lora"),
                                    names=("method",))
                        yield Field("Precision", _select("mixed_precision", [("accelerate's", "auto")]
                                                         + [(p, p) for p in PRECISIONS], "auto"),
                                    names=("mixed_precision",))
                    with Horizontal(classes="train-row"):
                        yield Field("LR schedule", _select("lr_scheduler", [(s, s) for s in LR_SCHEDULES], "constant"),
                                    names=("lr_scheduler",))
                        yield _input_field("lr_warmup_steps", "Warmup steps", "0")
                    for row in _ROWS:
                        with Horizontal(classes="train-row"):
                            for name, label, hint in row:
                                yield _input_field(name, label, hint)
                    for name, label, hint in _TAIL_FIELDS:
                        yield _input_field(name, label, hint)
                    for name, label in _SWITCHES:
                        yield Checkbox(label, compact=True, id=f"train-{name}")
                    yield Static("", id="train-form-error")
                yield OptionList(id="train-runs")
            with Vertical(id="train-right"):
                yield Static(plain(f"No run selected. Fill in the form and press {self.app.key_for('train.start')}."),
                             id="train-stats")
                yield PlotextPlot(id="train-loss")
                with Horizontal(id="train-bottom"):
                    yield ImagePreview(id="train-validation")
                    yield Log(id="train-log", max_lines=2000)

    def on_mount(self) -> None:
        self.query_one("#train-runs", OptionList).border_title = "Runs"
        self.query_one("#train-log", Log).border_title = "Log"
        plt = self.query_one("#train-loss", PlotextPlot).plt
        plt.title("loss")
        plt.xlabel("step")
        self.rescan()
        self.set_interval(POLL_S, self.poll)
        form = self.query_one("#train-form", VerticalScroll)
        self.call_after_refresh(form.scroll_home, animate=False)  # focusing the first field hid its label

    # -- the form ----------------------------------------------------------------
    def form_values(self) -> dict:
        """The form as TrainRequest keys; empty inputs are left out (their defaults apply)."""
        values: dict = {}
        for name in _FORM_FIELDS:
            found = self.query(f"#train-{name}")
            if not found:
                continue
            widget = found.first()
            if isinstance(widget, Input):
                if widget.value.strip():
                    values[name] = widget.value.strip()
            elif isinstance(widget, Checkbox):
                values[name] = widget.value
            elif isinstance(widget, Select) and widget.value != "auto":
                values[name] = widget.value
        return values

    def _field(self, name: str) -> Field | None:
        found = [f for f in self.query(Field) if name in f.names]
        return found[0] if found else None

    @on(Input.Changed)
    def _check_input(self, event: Input.Changed) -> None:
        name = (event.input.id or "").removeprefix("train-")
        if name == "instance_dir":
            self._check_folder(event.value)
        elif (field := self._field(name)) is not None:
            field.set_error(live_error(name, event.value))

    @work(thread=True, exclusive=True, group="train-folder", exit_on_error=False)
    def _check_folder(self, value: str) -> None:
        """The instance folder's check looks at the disk (maybe a slow mount): in a thread."""
        self.app.call_from_thread(self._folder_checked, value, live_error("instance_dir", value))

    def _folder_checked(self, value: str, error: str | None) -> None:
        if value == self.query_one("#train-instance_dir", Input).value:  # else typed on since
            self._field("instance_dir").set_error(error)

    def show_errors(self, errors: dict[str, str], summary: str, loose: str = "") -> None:
        """Each of ``errors`` (field -> message) under its field, ``loose`` text under the form, focus
        on the first bad field, and ``summary`` in a notification."""
        fields_shown = list(self.query(Field))
        for field in fields_shown:
            field.set_error(next((errors[n] for n in field.names if n in errors), None))
        placed = {n for f in fields_shown for n in f.names}
        lines = [loose] if loose else []
        lines += [f"{name}: {message}" for name, message in errors.items() if name not in placed]
        self.query_one("#train-form-error", Static).update(plain("\n".join(map(line, lines))))
        first = next((f for f in fields_shown if f.error), None)
        if first is not None and first.widgets:
            self.query_one("#train-form", VerticalScroll).scroll_to_widget(first)
            first.widgets[0].focus()
        notify(self, line(summary), title="cannot start", severity="error")

    def show_error(self, exc: DreamttyError, run: str | None = None) -> None:
        """Show ``exc`` under the field it names (else under the form) and in a notification. With ``run``, a
        setting it names is that run's saved one, not the form's: said under the form, naming the run."""
        errors = field_errors(exc)
        if not errors:
            self.show_errors({}, str(exc), loose=str(exc))
        elif run is None or errors.keys() <= _NOT_SAVED:  # the run's folder or checkpoint, not a saved setting
            self.show_errors(errors, str(exc))
        else:
            message = f"the saved settings of {run}: {exc}"
            self.show_errors({}, message, loose=message)

    # -- start and stop ------------------------------------------------------------
    def action_start_run(self) -> None:
        values = self.form_values()
        errors = {name: error for name, value in values.items() if (error := live_error(name, value))}
        errors |= {name: "is required" for name in REQUIRED if name not in values}
        if errors:
            self.show_errors(errors, f"fix {len(errors)} setting(s): {', '.join(errors)}")
            return
        try:
            request = TrainRequest.from_dict(values)
        except RequestError as exc:  # what the per-field checks do not cover
            self.show_error(exc)
            return
        self._start(request)

    def action_resume_run(self) -> None:
        info = runs.read_run(self.selected_run) if self.selected_run else None
        if info is None or info.state not in RESUMABLE_STATES:
            self.notify("select a stopped or failed run to resume", severity="warning")
            return
        try:
            request = TrainRequest.from_dict(resume_settings(info.path))
        except RequestError as exc:
            self.show_error(exc, run=info.name)
            return
        self._start(request, resumed=info.name)

    def _start(self, request: TrainRequest, resumed: str | None = None) -> None:
        self.query_one("#train-form-error", Static).update("checking the settings…")
        self._prepare_and_start(request, resumed)

    @work(exclusive=True, group="train-start", exit_on_error=False)
    async def _prepare_and_start(self, request: TrainRequest, resumed: str | None) -> None:
        """Give the run to the service (which checks it off its event loop and makes its folder). ``resumed``: the
        name of the run whose saved settings ``request`` holds (None: the form's)."""
        try:
            run, warnings = await self.app.client.start_run(request, runs_root=self.runs_root)
        except DreamttyError as exc:
            self.show_error(exc, run=resumed)
            return
        self.query_one("#train-form-error", Static).update("")
        for field in self.query(Field):
            field.set_error(None)
        for warning in warnings:
            notify(self, warning, title="warning", severity="warning", timeout=10)
        await self._fetch_schedule()
        self.scheduled[Path(run.path)] = run
        if run.state == TRAINING:
            notify(self, f"training started: {run.path}", title="train")
        elif run.state == ENDED:  # its trainer could not start (said in its log too)
            notify(self, f"{run.name} could not start: {run.error}", title="train", severity="error")
        else:
            notify(self, f"{run.name} waits for {waiting_for(run, self.schedule)}; it starts when that is free",
                    title="train")
        self.rescan()
        self.select_run(Path(run.path))

    @work(exclusive=True, group="train-schedule", exit_on_error=False)
    async def _read_schedule(self) -> None:
        await self._fetch_schedule()
        self._update_stats()

    async def _fetch_schedule(self) -> None:
        """Where the runs stand in the service's schedule (which wait, and for what)."""
        try:
            self.schedule = await self.app.client.runs()
        except DreamttyError:  # no service (yet): the folders still say what they can
            return
        self.scheduled = {Path(run.path): run for run in reversed(self.schedule)}  # a folder's newest record wins

    async def action_stop_run(self) -> None:
        info = runs.read_run(self.selected_run) if self.selected_run else None
        if info is None or info.state not in (*runs.LIVE_STATES, runs.WAITING):
            self.notify("no running or waiting run selected", severity="warning")
            return
        try:
            scheduled = next((run for run in await self.app.client.runs()
                              if Path(run.path) == info.path and run.state != ENDED), None)
            if scheduled is None:  # a run started before the service scheduled runs
                request_stop(info.path)
            elif not await self.app.client.stop_run(scheduled.id):
                notify(self, f"{info.name} has already ended", severity="warning")
                return
        except DreamttyError as exc:
            notify(self, exc, title="cannot stop", severity="error")
            return
        if info.state == runs.WAITING:
            notify(self, f"took {info.name} off the queue before it started", title="train")
        else:
            notify(self, f"stopping {info.name} after its current step (a checkpoint is saved)", title="train")
        self.rescan()

    # -- runs list -----------------------------------------------------------------
    def rescan(self) -> None:
        """List the runs in the runs folder (and extra dirs) again, newest first: in a thread (a thousand runs
        take a while to read). The first list shows its newest run."""
        self._scan = self._scan_runs()

    @work(thread=True, exclusive=True, group="train-rescan", exit_on_error=False)
    def _scan_runs(self) -> None:
        found = runs.list_runs(self.runs_root, self.extra_runs)
        if not get_current_worker().is_cancelled:  # else a newer scan (after a start or stop) follows
            self.app.call_from_thread(self._list_runs, found)

    def _list_runs(self, found: list[runs.RunInfo]) -> None:
        self.run_infos = found
        if self.selected_run is None and found:
            self.select_run(found[0].path)
        listed = [(str(r.path), r.state) for r in self.run_infos]
        if listed == self._listed:
            return
        self._listed = listed
        options = self.query_one("#train-runs", OptionList)
        with options.prevent(OptionList.OptionHighlighted):
            options.clear_options()
            options.add_options(
                [Option(plain(heading(r)), id=str(r.path)) for r in self.run_infos]
            )
        self._highlight()

    def _highlight(self) -> None:
        """Keep the list's cursor on the selected run."""
        options = self.query_one("#train-runs", OptionList)
        try:
            index = options.get_option_index(str(self.selected_run))
        except OptionDoesNotExist:
            return
        if options.highlighted != index:
            with options.prevent(OptionList.OptionHighlighted):  # code moved it, not the user
                options.highlighted = index

    @on(OptionList.OptionSelected, "#train-runs")
    @on(OptionList.OptionHighlighted, "#train-runs")
    def _run_chosen(self, event) -> None:
        if event.option.id and Path(event.option.id) != self.selected_run:
            self.select_run(Path(event.option.id))

    def select_run(self, run_dir: Path) -> None:
        """Show ``run_dir``: its events are read from the start in a thread (a long run's file holds tens of
        MB), then the poll follows new ones."""
        self.selected_run = Path(run_dir).resolve()
        self._tail = None
        self.progress = runs.RunProgress()
        self._shown_validation = []
        self.query_one("#train-log", Log).clear()
        self.query_one("#train-validation", ImagePreview).show(None)
        self._highlight()
        self._draw_plot()
        self._reads += 1
        self._read_run(self.selected_run, self._reads)

    @work(thread=True, exclusive=True, group="train-run", exit_on_error=False)
    def _read_run(self, run_dir: Path, read: int) -> None:
        tail, progress = runs.EventTail(run_dir), runs.RunProgress.of_run(run_dir)
        lines, _ = _fold(tail.read(), progress)  # a progress of its own: nothing else sees it meanwhile
        self.app.call_from_thread(self._run_read, read, tail, progress, lines)

    def _run_read(self, read: int, tail: runs.EventTail, progress: runs.RunProgress, lines: list[str]) -> None:
        if read != self._reads:  # another run (or this one again) was chosen meanwhile: that read counts
            return
        self._tail, self.progress = tail, progress
        self._show(lines, new_steps=True)

    # -- following the selected run ---------------------------------------------------
    @property
    def loss_points(self) -> list[tuple[int, float]]:
        return sorted(self.progress.losses.items())

    def poll(self) -> None:
        """Follow the selected run's events; every RESCAN_EVERY polls, the runs and the schedule too. Not while
        another screen shows."""
        if not self.screen.is_current:
            return
        self._polls += 1
        if self._polls % RESCAN_EVERY == 1:
            if self._scan is None or self._scan.is_finished:  # a slow disk: one scan at a time
                self.rescan()
            self._read_schedule()
        if self._tail is None:  # none selected, or its events are being read
            return
        self._show(*_fold(self._tail.read(), self.progress))

    def _show(self, lines: list[str], new_steps: bool) -> None:
        if lines:
            self.query_one("#train-log", Log).write_lines(lines)
        if new_steps:
            self._draw_plot()
        if self.progress.validation != self._shown_validation:
            self._shown_validation = list(self.progress.validation)
            self.query_one("#train-validation", ImagePreview).show(side_by_side(self._shown_validation))
        self._update_stats()

    def _update_stats(self) -> None:
        info = runs.read_run(self.selected_run) if self.selected_run else None
        if info is None:
            return
        settings = info.settings
        lines = [f"{heading(info)}  {settings.get('method', '')} on {settings.get('model', '')}",
                 self.progress.summary()]
        if self.progress.class_images and self.progress.class_images[0] < self.progress.class_images[1]:
            lines.append("generating class images: {}/{}".format(*self.progress.class_images))
        scheduled = self.scheduled.get(info.path)
        if info.state == runs.WAITING:
            lines.append(f"waiting for {waiting_for(scheduled, self.schedule)}; "
                         f"it starts when that is free ({self.app.key_for('train.stop')} takes it off the queue)")
        if info.error:
            lines.append(f"error: {info.error}")
        self.query_one("#train-stats", Static).update(plain("\n".join(map(line, lines))))  # a line each

    def _draw_plot(self) -> None:
        points = [(s, v) for s, v in self.loss_points if abs(v) <= MAX_PLOT_LOSS]  # NaN and infinities too
        plot = self.query_one("#train-loss", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        if points:
            stride = max(1, len(points) // MAX_PLOT_POINTS)
            steps = [s for s, _ in points]
            values = [v for _, v in points]
            plt.plot(steps[::stride], values[::stride], label="loss", marker="braille")
            plt.plot(steps[::stride], runs.smooth(values)[::stride], label="smoothed", marker="braille")
        plot.refresh()


def _fold(events: list, progress: runs.RunProgress) -> tuple[list[str], bool]:
    """Apply ``events`` to ``progress``: the log lines they make, and whether a step came (the plot changes)."""
    lines, new_steps = [], False
    for event in events:
        line = progress.apply(event)
        new_steps |= isinstance(event, (TrainStep, TrainResume))
        if line:
            lines.append(one_line(line))  # one log line, a message's newlines written as \n
    return lines, new_steps


class TrainScreen(Screen):
    """The Train mode (F3)."""

    def compose(self) -> ComposeResult:
        yield ModeBar("train")
        yield TrainPane(id="train-pane")
        yield KeysFooter()
