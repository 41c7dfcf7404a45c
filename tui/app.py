"""The dreamtty Textual app: four modes (Generate, Queue & gallery, Train, Models) over one backend service.

The app never imports torch: generation runs in the service's worker
processes, whose events arrive on an asyncio queue and are re-published to
the screens through ``job_events`` (a Textual Signal).
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Iterable

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Grid
from textual.screen import ModalScreen, Screen
from textual.signal import Signal
from textual.widgets import Button, Footer, Label

from backend import config, metadata
from backend.errors import DreamttyError
from backend.queue_store import ACTIVE, FINAL
from backend.request import GenerateRequest
from backend.service import Service
from tui import keymap
from tui.screens.generate import GenerateScreen
from tui.screens.models import ModelsPane
from tui.screens.queue import QueueScreen
from tui.screens.train import TrainPane
from tui.widgets.modebar import ModeBar
from tui.widgets.progress import describe_step

COLOR_SYSTEMS = {"truecolor": "truecolor", "256": "256"}


class TrainScreen(Screen):
    def compose(self) -> ComposeResult:
        yield ModeBar("train")
        yield TrainPane(id="train-pane")
        yield Footer()


class ModelsScreen(Screen):
    def compose(self) -> ComposeResult:
        yield ModeBar("models")
        yield ModelsPane(id="models-pane")
        yield Footer()


class ConfirmQuit(ModalScreen[bool]):
    """Asked when jobs are still queued or running."""

    BINDINGS = [Binding("y", "answer(True)", "Quit"), Binding("n,escape", "answer(False)", "Stay")]

    def __init__(self, active: int) -> None:
        super().__init__()
        self.active = active

    def compose(self) -> ComposeResult:
        with Grid(id="confirm-quit"):
            yield Label(
                f"{self.active} job{'s are' if self.active != 1 else ' is'} queued or running. Quit anyway? "
                "They stop now and are queued again the next time dreamtty starts.",
                id="confirm-question",
            )
            yield Button("Quit (y)", variant="error", id="quit")
            yield Button("Stay (n)", variant="primary", id="stay")

    def on_mount(self) -> None:
        self.query_one("#stay", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "quit")

    def action_answer(self, quit_app: bool) -> None:
        self.dismiss(quit_app)


class DreamttyApp(App):
    """``service`` defaults to ``Service(devices=device, recover=True)``, started on mount."""

    CSS_PATH = "app.tcss"
    TITLE = "dreamtty"
    MODES = {"generate": GenerateScreen, "queue": QueueScreen, "train": TrainScreen, "models": ModelsScreen}
    DEFAULT_MODE = "generate"
    BINDINGS = keymap.bindings(keymap.APP_KEYS)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]

    def __init__(self, model: str | None = None, out: Path | None = None, device: str = "auto",
                 service: Service | None = None) -> None:
        super().__init__()
        self.animation_level = "none"  # no smooth scrolling: less to send over SSH, and no lag
        self.config = config.load()
        self.default_model = model or self.config.default_model or GenerateRequest.model
        self.model_given = model is not None
        self.default_preset = self.config.default_preset
        self.out_dir = out or self.config.outputs
        self.service = service or Service(devices=device, recover=True)
        self.job_events: Signal[dict] = Signal(self, "job-events")
        self.active: dict[int, str] = {}  # job id -> queued | running (this session's jobs)
        self.progress: dict[int, dict] = {}  # job id -> its last step event
        self.worker_state = "starting the worker…"
        self.generate_screen: GenerateScreen | None = None  # set when it mounts (the default mode)

    # -- lifecycle -----------------------------------------------------------
    def on_mount(self) -> None:
        self.set_keymap(self.config.keymap)
        for warning in self.config.warnings:
            self.notify(warning, title="config", severity="warning", timeout=10)
        self.run_worker(self._consume_events(self.service.subscribe()), group="events", name="events")
        self.run_worker(self._start_service(), group="service", name="service")

    async def _start_service(self) -> None:
        await self.service.start()
        for job in self.service.store.jobs(ACTIVE, owner=self.service.owner):
            self.active.setdefault(job.id, job.state)
        self.job_events.publish({"type": "service-started"})

    async def _consume_events(self, events) -> None:
        while True:
            event = await events.get()
            self._track(event)
            self.job_events.publish(event)

    def _track(self, event: dict) -> None:
        kind, job = event["type"], event.get("job")
        if kind == "ready":
            self.worker_state = f"worker ready on {event.get('device', '?')}"
        elif kind in ("queued", "started"):
            self.active[job] = "queued" if kind == "queued" else "running"
        elif kind == "step":
            self.progress[job] = event
        elif kind in FINAL:
            self.active.pop(job, None)
            self.progress.pop(job, None)

    async def on_unmount(self) -> None:
        await self.service.close()

    # -- helpers for screens -------------------------------------------------
    def activity(self) -> str:
        """One line: the running job's progress and how many wait, else the worker's state."""
        parts = []
        for job, state in sorted(self.active.items()):
            if state == "running":
                step = self.progress.get(job)
                parts.append(f"job #{job}: {describe_step(step) if step else 'starting'}")
        queued = sum(1 for s in self.active.values() if s == "queued")
        if queued:
            parts.append(f"{queued} queued")
        return " · ".join(parts) or self.worker_state

    def key_for(self, binding_id: str) -> str:
        """How the key bound to ``binding_id`` is shown (after the user's keymap)."""
        key = self.config.keymap.get(binding_id) or next(k.key for k in keymap.ALL_KEYS if k.id == binding_id)
        return self.get_key_display(Binding(key.split(",")[0], ""))

    def load_into_form(self, path: str) -> None:
        """Put the parameters saved in image ``path`` into the Generate form and show it."""
        try:
            request = metadata.request_from_image(path)
        except DreamttyError as exc:
            self.notify(str(exc), severity="error")
            return
        self.generate_screen.form.fill(request.to_dict())
        self.switch_mode("generate")
        self.notify(f"Loaded the parameters of {Path(path).name}.")

    # -- actions ---------------------------------------------------------------
    def action_generate(self) -> None:
        job = self.generate_screen.submit()
        if job is not None:
            self.notify(f"Job #{job} queued.")
        elif self.current_mode != "generate":
            self.switch_mode("generate")  # show the field with the error

    def action_cancel_running(self) -> None:
        job = self.service.running_job()
        if job is None:
            self.notify("No job is running.", severity="warning")
        elif self.service.cancel(job):
            self.notify(f"Cancelling job #{job}.")

    async def action_quit(self) -> None:
        active = len(self.service.store.jobs(ACTIVE, owner=self.service.owner))
        if not active:
            self.exit()
            return

        def answered(quit_app: bool | None) -> None:
            if quit_app:
                self.exit()

        self.push_screen(ConfirmQuit(active), answered)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for key in keymap.APP_KEYS:
            if key.id != "quit":
                yield SystemCommand(key.help, f"key: {self.key_for(key.id)}", partial(self.run_action, key.action))
        if isinstance(screen, QueueScreen):
            for key in keymap.QUEUE_KEYS:
                yield SystemCommand(key.help, f"key: {self.key_for(key.id)}",
                                    partial(self.run_action, key.action, screen))


def use_color_system(choice: str) -> None:
    """``--color``: force Textual's colour depth (over SSH COLORTERM is often lost); NO_COLOR still wins."""
    system = COLOR_SYSTEMS.get(choice)
    if system is None:
        return
    import textual.constants

    os.environ["TEXTUAL_COLOR_SYSTEM"] = system
    textual.constants.COLOR_SYSTEM = system  # read when the App is created; textual is already imported


def run_app(args) -> int:
    """Entry point for ``dreamtty`` without a subcommand."""
    use_color_system(args.color)
    app = DreamttyApp(model=args.model, out=args.out, device=args.device)
    app.run()
    return app.return_code or 0
