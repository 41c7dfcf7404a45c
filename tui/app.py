"""The dreamtty Textual app: four modes (Generate, Queue & gallery, Train, Models) over one backend service.

The app talks to the service through a :class:`~backend.client.Client` (in this process, or
``dreamtty serve``) and never imports torch. Events arrive on an asyncio queue and are re-published to
the screens through ``job_events`` (a Textual Signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from textual import events, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.command import CommandPalette
from textual.containers import Grid
from textual.driver import Driver
from textual.screen import ModalScreen, Screen
from textual.signal import Signal
from textual.widgets import Button, Label

from backend import config
from backend.client import Client
from backend.errors import DreamttyError, RequestError
from backend.events import (FINAL_EVENTS, Event, Log, Queued, Retrying, ServiceLost, ServiceReady, Started, Step,
                            WorkerReady)
from backend.safetext import error_line, one_line
from backend.serve import WORKER_NICE
from tui import keymap
from tui.latency import (GC_TICK, TYPING_QUIET, TYPING_RECENT, TYPING_REDRAW_INTERVAL, KeyGate, QuietGC,
                         key_gated_driver)
from tui.screens.generate import GenerateScreen
from tui.text import line, markup, notify
from tui.widgets.footer import KeysFooter
from tui.widgets.progress import describe_step

if TYPE_CHECKING:
    from backend.request import GenerateRequest
    from tui.screens.models import ModelsPane

COLOR_SYSTEMS = {"truecolor": "truecolor", "256": "256"}
STEP_REDRAW_INTERVAL = 0.25  # seconds: progress is redrawn at most ~4 times a second (once while typing)
FIRST_FRAME_WAIT = 1.0  # seconds: what waits for the first frame starts by then whatever the screen
GIL_SWITCH_INTERVAL = 0.001  # seconds (Python's default: 0.005) the event loop waits for a busy preview thread
CONFIG_SHOWN = 3  # config problems a start-up notice lists at least; it counts the rest (the CLI prints them)
CONFIG_LINE = 110  # characters of each problem listed (cut in its middle)
STARTING = "starting the worker…"  # the worker state until one reports it is ready
LOST = "no service: trying again…"  # the worker state while the client has lost its service


def config_notice(problems: list[str], keymap_problems: list[str]) -> tuple[str, str | list[str]]:
    """(title, message) of the one start-up notice for the config's problems: the keymap's first (only the TUI
    reads them: all listed), then the file's in their order up to ``CONFIG_SHOWN`` listed, and how many more
    (the CLI prints those). One line each, without the "config: " the title says."""
    every = [*keymap_problems, *(problem.removeprefix("config: ") for problem in problems)]
    if len(every) == 1:
        return "config", line(every[0])
    shown = max(CONFIG_SHOWN, len(keymap_problems))
    listed = [f"• {error_line(problem, CONFIG_LINE)}" for problem in every[:shown]]
    if len(every) > shown:
        listed.append(f"and {len(every) - shown} more (dreamtty config check prints them all, whole)")
    elif any(len(one_line(problem)) > CONFIG_LINE for problem in every):
        listed.append("(dreamtty config check prints them whole)")
    return f"config: {len(every)} problems", listed


def shown_later(module: str, screen: str) -> Callable[[], Screen]:
    """A mode's screen, imported when first shown: the first frame needs only the Generate screen
    (the others bring the gallery, plot libraries and the Hub client)."""
    return lambda: getattr(importlib.import_module(module), screen)()


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
        yield KeysFooter()  # the dialog's keys, not the screen's under it

    def on_mount(self) -> None:
        self.query_one("#stay", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "quit")

    def action_answer(self, quit_app: bool) -> None:
        self.dismiss(quit_app)


class DreamttyApp(App):
    """The TUI on ``client``: a service in this process (``--local``) or the running ``dreamtty serve``."""

    CSS_PATH = "app.tcss"
    TITLE = "dreamtty"
    MODES = {"generate": GenerateScreen, "queue": shown_later("tui.screens.queue", "QueueScreen"),
             "train": shown_later("tui.screens.train", "TrainScreen"),
             "models": shown_later("tui.screens.models", "ModelsScreen")}
    DEFAULT_MODE = "generate"
    # Escape hides a shown keys panel before a dialog or the mask editor takes it (as its cancel key).
    BINDINGS = [*keymap.bindings(keymap.APP_KEYS),
                Binding("escape", "hide_help_panel", "Hide keys", show=False, priority=True,
                        tooltip="Hide this keys panel")]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]

    def __init__(self, client: Client, model: str | None = None, out: Path | None = None) -> None:
        self.key_gate = KeyGate()  # before App.__init__, which asks get_driver_class() for the driver
        super().__init__()
        self.animation_level = "none"  # no smooth scrolling: less to send over SSH, and no lag
        self.config = config.load()
        # the keys of the user's keymap that work (the screens show them as they compose), and why others do not
        self.config.keymap, self._keymap_warnings = keymap.check_keymap(self.config.keymap)
        self.default_model = model or self.config.default_model  # None: the request's own default
        self.model_given = model is not None
        self.default_preset = self.config.default_preset
        self.out_dir = out or self.config.outputs
        self.client = client
        self.job_events: Signal[Event] = Signal(self, "job-events")
        self.active: dict[int, str] = {}  # job id -> queued | running (every client's jobs on the service)
        self.left_going = 0  # jobs queued or running as a TUI attached to the service quit: they go on there
        self.submitted: set[int] = set()  # the jobs this TUI queued (ctrl+x cancels only these)
        self.progress: dict[int, Step] = {}  # job id -> its last step event
        self.worker_state = STARTING
        self.generate_screen: GenerateScreen | None = None  # set when it mounts (the default mode)
        self.last_key = 0.0  # monotonic time of the last key press
        self._gc: QuietGC | None = None  # started after the first paint
        self._after_first_frame: list[Callable[[], object]] | None = []  # None once the first frame is whole

    # -- lifecycle -----------------------------------------------------------
    def on_mount(self) -> None:
        self.after_first_frame(self._start_quiet_gc)
        self.set_timer(FIRST_FRAME_WAIT, self.first_frame_shown)  # a screen without a footer
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.set_keymap(self.config.keymap)
        if self.config.warnings or self._keymap_warnings:
            title, message = config_notice(self.config.warnings, self._keymap_warnings)
            notify(self, message, title=title, severity="warning", timeout=20)
        self.run_worker(self._consume_events(self.client.subscribe()), group="events", name="events")
        # The worker process (it imports torch) starts once the first frame is on the screen.
        self.after_first_frame(self.run_worker, self._start_service, group="service", name="service")

    def after_first_frame(self, callback: Callable, *args, **kwargs) -> None:
        """Call ``callback`` once the first frame is whole on the terminal (the footer's keys too), so that
        the work the first screen does without never delays it; later, after the next refresh."""
        if self._after_first_frame is None:
            self.call_after_refresh(callback, *args, **kwargs)
        else:
            self._after_first_frame.append(partial(callback, *args, **kwargs))

    def first_frame_shown(self) -> None:
        """The first frame is whole (``KeysFooter``): start what waited for it."""
        waiting, self._after_first_frame = self._after_first_frame, None
        for callback in waiting or ():
            self.call_later(callback)

    async def _start_service(self) -> None:
        try:
            await self.client.start()
        except DreamttyError as exc:  # e.g. the service cannot start: said in one line, the form still works
            self.worker_state = "no service"
            notify(self, exc, title="service", severity="error", timeout=30)
            self.job_events.publish(ServiceReady())
            return
        finally:  # what the queue read here, or a service started for the app, found damaged
            for warning in self.client.warnings:
                notify(self, warning, title="queue", severity="warning", timeout=20)
        try:
            await self._read_service()
        except DreamttyError as exc:  # lost at once, or an answer of another make: said, the form still works
            notify(self, exc, title="service", severity="error", timeout=30)
        self.job_events.publish(ServiceReady())

    async def _read_service(self) -> None:
        """The service's active jobs and whether a worker is ready: attached to a running service, or back
        after it was lost, the events before are not replayed (those seen meanwhile are newer: kept)."""
        states = await self.client.active_states()
        ready = [worker for worker in (await self.client.status())["workers"] if worker["ready"]]
        for job_id, state in states.items():
            self.active.setdefault(job_id, state)
        if ready:
            self.worker_state = f"worker ready on {ready[0]['device']}"
        elif self.worker_state == LOST:
            self.worker_state = STARTING

    async def _consume_events(self, events) -> None:
        last_step = 0.0
        while True:
            event = await events.get()
            if isinstance(event, ServiceLost):
                self.active, self.progress, self.worker_state = {}, {}, LOST
                notify(self, event.message, title="service", severity="warning", timeout=10)
            elif isinstance(event, ServiceReady):
                with contextlib.suppress(DreamttyError):  # lost again already: its ServiceLost follows
                    await self._read_service()
                notify(self, "service: connected again", title="service", timeout=5)
            elif isinstance(event, Log) and event.job is None and event.level in ("warning", "error"):
                notify(self, event.message, title="service", severity=event.level, timeout=30)
            self._track(event)
            if isinstance(event, Step) and event.step < event.total:
                now = time.monotonic()
                if now - last_step < self.redraw_interval(STEP_REDRAW_INTERVAL):
                    continue  # kept in self.progress; the screens skip this redraw
                last_step = now
            self.job_events.publish(event)

    def _track(self, event: Event) -> None:
        if isinstance(event, WorkerReady):
            self.worker_state = f"worker ready on {event.device}"
        elif isinstance(event, (Queued, Retrying)):
            self.active[event.job] = "queued"
        elif isinstance(event, Started):
            self.active[event.job] = "running"
        elif isinstance(event, Step):
            self.progress[event.job] = event
        elif isinstance(event, FINAL_EVENTS):
            self.active.pop(event.job, None)
            self.progress.pop(event.job, None)

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, events.Key):
            self.last_key = time.monotonic()
            self.key_gate.close()  # again: the key's time to paint counts from here
        await super().on_event(event)

    def get_driver_class(self) -> type[Driver]:
        return key_gated_driver(super().get_driver_class(), self.key_gate)

    def typing(self) -> float:
        """Seconds until the user counts as no longer typing (0 when not typing)."""
        return max(0.0, self.last_key + TYPING_QUIET - time.monotonic())

    def redraw_interval(self, normal: float) -> float:
        """Least seconds between redraws of progress or live frames: ``normal``, or longer after recent keys."""
        return TYPING_REDRAW_INTERVAL if time.monotonic() - self.last_key < TYPING_RECENT else normal

    def _start_quiet_gc(self) -> None:
        self._gc = QuietGC()
        self.set_interval(GC_TICK, lambda: self._gc.tick(self.last_key))

    async def on_unmount(self) -> None:
        if self._gc is not None:
            self._gc.stop()
        sys.setswitchinterval(self._switch_interval)
        await self.client.close()

    # -- helpers for screens -------------------------------------------------
    def activity(self) -> str:
        """One line: how many jobs wait, then the first running job (and how many more run, a group's) and its
        progress, whose details a narrow line cuts first; else the worker's state."""
        parts = []
        queued = sum(1 for s in self.active.values() if s == "queued")
        if queued:
            parts.append(f"{queued} queued")
        running = [job for job, state in sorted(self.active.items()) if state == "running"]
        if running:
            step = self.progress.get(running[0])
            more = f" (+{len(running) - 1} running)" if len(running) > 1 else ""
            parts.append(f"job #{running[0]}{more}: {describe_step(step) if step else 'starting'}")
        return " · ".join(parts) or self.worker_state

    def key_for(self, binding_id: str, default: str | None = None) -> str:
        """How the key bound to ``binding_id`` is shown (after the user's keymap); ``default``: its own key."""
        key = (self.config.keymap.get(binding_id) or default
               or next(k.key for k in keymap.ALL_KEYS if k.id == binding_id))
        shown = self.get_key_display(Binding(key.split(",")[0], ""))
        return shown.upper() if re.fullmatch(r"f\d+", shown) else shown  # f1 -> F1 (but f stays f)

    def get_key_display(self, binding: Binding) -> str:
        """Keys come from the user's keymap: shown on one line, control characters visible (footer, keys panel, mode
        bar)."""
        return one_line(super().get_key_display(binding))

    def on_models_pane_default_changed(self, message: ModelsPane.DefaultChanged) -> None:
        self.default_model = message.model
        if self.generate_screen is not None and self.generate_screen.form_mounted.is_set():  # else mounted with it
            self.generate_screen.form.follow_default_model(message.model)

    @work(thread=True, group="load-parameters")
    def load_into_form(self, path: str) -> None:
        """Put the parameters saved in image ``path`` (ours, or A1111's or Fooocus's: the closest request, with
        warnings saying what differs, without the LoRAs and VAE the service lacks) into the Generate form and show
        it (read in a thread)."""
        from backend import metadata

        try:
            image = metadata.ImageMetadata(path)
            request, warnings = image.request()
        except DreamttyError as exc:
            self.call_from_thread(notify, self, exc, severity="error")
            return
        self.call_from_thread(self._loaded_into_form, request, Path(path).name, warnings, not image.ours)

    async def _loaded_into_form(self, request: GenerateRequest, name: str, warnings: list[str],
                                foreign: bool = False) -> None:
        from backend import jobkinds

        if foreign:  # as dreamtty reproduce: another machine's files are left out, said
            with contextlib.suppress(DreamttyError):  # no service now: the form says it when the job is queued
                request, left = await self.client.closest(request)
                warnings = [*warnings, *left]
        (await self.generate_screen.ready_form()).fill(request.to_dict(), kind=jobkinds.kind_of(request).name)
        self.switch_mode("generate")
        notify(self, f"Loaded the parameters of {name}.")
        for warning in warnings:
            notify(self, warning, title=name, severity="warning", timeout=15)

    async def use_as_input(self, path: str) -> None:
        """Put image ``path`` in the Generate screen's Input image section and show it."""
        (await self.generate_screen.ready_form()).use_input_image(path)
        self.switch_mode("generate")

    @property
    def masks_dir(self) -> Path:
        """Where the mask editor saves masks: ``<outputs>/masks`` (jobs refer to them, for reproduce)."""
        return (self.out_dir or self.config.outputs_dir()) / "masks"

    @work(group="submit")
    async def queue_request(self, build: Callable[[], GenerateRequest], failed: Callable[[DreamttyError], None],
                            queued: Callable[[int], None]) -> None:
        """Build a request in a thread (it may read an image) and queue it (the client checks it off the event
        loop: that resolves the model, may scan the model library and reads wildcard and style files), then
        call ``queued(job)``. On bad input ``failed(error)`` is called instead and nothing is queued."""
        try:
            job = await self.client.submit(await asyncio.to_thread(build), self.out_dir)
        except DreamttyError as exc:
            failed(exc)
            return
        self.submitted.add(job)
        queued(job)

    # -- actions ---------------------------------------------------------------
    def action_generate(self) -> None:
        self.generate_screen.submit()

    async def action_cancel_running(self) -> None:
        """Cancel the newest running job this TUI queued; another client's (the CLI's, another terminal's)
        only from the Queue screen, where it is selected by its id."""
        running = [job for job, state in self.active.items() if state == "running"]
        job = max((job for job in running if job in self.submitted), default=None)
        if job is None:
            others = f"; {len(running)} of other clients run (cancel them on the Queue screen)" if running else ""
            self.notify(f"No job of this terminal is running{others}.", severity="warning")
            return
        try:
            cancelling = await self.client.cancel(job)
        except DreamttyError as exc:  # no service answers, or the queue file takes no writes
            notify(self, exc, title=f"cannot cancel job #{job}", severity="error")
            return
        if cancelling:
            self.notify(f"Cancelling job #{job}.")

    async def action_switch_mode(self, mode: str) -> None:
        """Switch to ``mode``, closing the command palette or the quit question first: either would stay open in
        the mode left (Textual allows one palette: opening another there crashed the app; a second quit question
        could be asked). Leaving the question is staying."""
        if CommandPalette.is_open(self) or isinstance(self.screen, ConfirmQuit):
            await self.screen.dismiss()
        await super().action_switch_mode(mode)

    async def action_quit(self) -> None:
        if isinstance(self.screen, ConfirmQuit):
            return  # already asked
        if self.client.jobs_survive_close:  # nothing stops: the service runs the jobs (said after the exit)
            self.left_going = len(self.active)
            self.exit()
            return
        try:
            active = len(await self.client.active_jobs())
        except DreamttyError as exc:  # the queue file cannot be read: the jobs may be there, so ask
            notify(self, exc, title="queue", severity="error")
            active = len(self.active)
        if not active:
            self._exit_after_notice()
            return

        def answered(quit_app: bool | None) -> None:
            if quit_app:
                self._exit_after_notice()

        self.push_screen(ConfirmQuit(active), answered)

    def _exit_after_notice(self) -> None:
        """Stopping the workers takes a moment (on unmount): say so on screen first."""
        self.notify("Stopping the workers…", title="dreamtty")
        self.call_after_refresh(self.exit)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Escape is the keys panel's only while one is shown (else the screen's and its widgets'). Behind a dialog
        no job is queued or cancelled (ctrl+g queued one behind the quit dialog, which counted one job fewer)."""
        if action in ("generate", "cancel_running") and isinstance(self.screen, ModalScreen):
            return False
        return action != "hide_help_panel" or bool(self.screen.query("HelpPanel"))

    async def action_toggle_help(self) -> None:
        if self.screen.query("HelpPanel"):
            await self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def action_show_help_panel(self) -> None:
        """Show the keys panel, whose list tab reaches and the keys then scroll (``tui.widgets.keys_help``)."""
        from tui.widgets.keys_help import KeysHelp

        if not self.screen.query("HelpPanel"):
            self.screen.mount(KeysHelp(self.screen.focused))

    async def action_hide_help_panel(self) -> None:
        """Hide the keys panel; focus goes back where it was when the panel was shown (``KeysHelp.hide``)."""
        for panel in self.screen.query("KeysHelp"):
            await panel.hide()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Textual's commands plus every binding with an id: the app's and those of the screen's widgets, each
        titled with its footer name and what it does (``Reproduce: Queue the selected image's parameters again``),
        so that either finds it."""
        yield from super().get_system_commands(screen)
        seen = {"quit"}  # Textual's own "Quit" command already calls action_quit
        for node in (self, *screen.walk_children(with_self=True)):
            for binding in getattr(node, "BINDINGS", ()):
                if isinstance(binding, Binding) and binding.id and binding.id not in seen:
                    seen.add(binding.id)
                    key = self.key_for(binding.id, binding.key)
                    title = f"{binding.description}: {binding.tooltip}" if binding.tooltip else binding.description
                    yield SystemCommand(title, markup(f"key: {key}"),
                                        partial(self.run_action, binding.action, node))


def goes_on(count: int) -> str:
    """What a TUI attached to the service says as it quits with ``count`` jobs queued or running."""
    jobs = "1 job queued or running goes" if count == 1 else f"{count} jobs queued or running go"
    return f"dreamtty: {jobs} on in the service (dreamtty jobs lists them; dreamtty attach shows them)"


def use_color_system(choice: str) -> None:
    """``--color``: force Textual's colour depth (over SSH COLORTERM is often lost); NO_COLOR still wins."""
    system = COLOR_SYSTEMS.get(choice)
    if system is None:
        return
    import textual.constants

    os.environ["TEXTUAL_COLOR_SYSTEM"] = system
    textual.constants.COLOR_SYSTEM = system  # read when the App is created; textual is already imported


def run_app(args, report: Callable[[list[str]], None], attach: bool = False) -> int:
    """Entry point for ``dreamtty`` without a subcommand, and for ``dreamtty attach`` (the running
    service, never a new one). The app shows the queue's warnings (a damaged file moved aside);
    ``report`` gets them too once it has closed, so that they stay on the terminal."""
    from backend.client import connect

    if not os.environ.get("TEXTUAL_DRIVER") and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise RequestError("terminal", "the TUI needs a terminal on stdin and stdout; in a script, use a command "
                                       "such as dreamtty generate (dreamtty --help lists them)")
    use_color_system(args.color)
    client = connect(args.device, local=args.local, tui=True, start=not attach, cluster=args.cluster,
                     nice=WORKER_NICE)
    app = DreamttyApp(client, model=args.model, out=args.out)
    app.run()
    report(app.client.warnings)
    if app.left_going:
        print(goes_on(app.left_going), file=sys.stderr)
    return app.return_code or 0
