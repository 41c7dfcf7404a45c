"""Progress of one job: a bar plus "image i/n · step s/N · it/s · ETA"; at its end what it made."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from backend.events import (Cancelled, Done, Failed, ImageSaved, JobEvent, Moved, Note, Queued, Retrying, Started,
                            Step, TextOutput)
from backend.safetext import summary
from tui.text import plain


def describe_step(event: Step) -> str:
    """One line for a ``step`` event: the images of its batch, all of them advancing at once (any of their
    events reads the same)."""
    image = f"{_images(event)}/{event.count} · " if event.count > 1 else ""
    return f"{image}step {event.step}/{event.total} · {event.its:.1f} it/s · ETA {format_eta(event.eta)}"


def _images(event: Step) -> str:
    if event.batch == 1 or event.done is None:
        return f"image {event.image + 1}"
    first = (event.done - event.batch * event.step) // event.total  # done counts the batches before this one whole
    return f"images {first + 1}–{first + event.batch}"


def step_counts(event: Step) -> tuple[int, int]:
    """(steps done, steps in all) over every image of the job, from a ``step`` event (images denoised together
    all advance at once: the event counts them)."""
    done = event.image * event.total + event.step if event.done is None else event.done
    return done, event.count * event.total


TEXT_WIDTH = 80  # characters of a describe job's text in the status line


def format_eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class JobProgress(Vertical):
    """Follows the events of the job being shown."""

    DEFAULT_CSS = """
    JobProgress { height: auto; }
    JobProgress ProgressBar { width: 1fr; }
    JobProgress ProgressBar Bar { width: 1fr; }
    JobProgress .status { height: 2; }
    JobProgress.-failed .status { color: $error; }
    """

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._text: tuple[int, str] | None = None  # the last job that made a text (describe), and the text

    def compose(self) -> ComposeResult:
        yield Static(plain(f"Idle: write a prompt and press {self.app.key_for('generate')}."), classes="status")
        yield ProgressBar(total=1, show_eta=False, id="progress-bar")

    @property
    def status(self) -> str:
        return str(self.query_one(".status", Static).content)

    def set_status(self, text: str, failed: bool = False) -> None:
        """Show ``text`` (as text: it holds paths and error messages)."""
        self.query_one(".status", Static).update(plain(text), layout=False)  # fixed height: repaint only
        self.set_class(failed, "-failed")

    def follow(self, event: JobEvent) -> None:
        """Update from a service event of the job shown."""
        bar = self.query_one(ProgressBar)
        job = event.job
        if isinstance(event, Queued):
            self.set_status(f"Job #{job} queued.")
        elif isinstance(event, Started):
            bar.update(total=1, progress=0)
            self.set_status(f"Job #{job} started: loading the model…")
        elif isinstance(event, Note):
            self.set_status(f"Job #{job}: {event.message}")
        elif isinstance(event, Retrying):
            self.set_status(f"Job #{job}: {event.error}; trying again from image {event.first_image + 1}")
        elif isinstance(event, Step):
            done, total = step_counts(event)
            bar.update(total=total, progress=done)
            self.set_status(f"Job #{job}: {describe_step(event)}")
        elif isinstance(event, ImageSaved):
            self.set_status(f"Job #{job}: saved {event.path}")
        elif isinstance(event, TextOutput):
            self._text = job, summary(event.text, TEXT_WIDTH)
        elif isinstance(event, Done):
            bar.update(progress=bar.total or 1)
            self.set_status(f"Job #{job} done: {self._made(event)}")
        elif isinstance(event, Failed):
            self.set_status(f"Job #{job} failed: {event.error}", failed=True)
        elif isinstance(event, Cancelled):
            self.set_status(f"Job #{job} cancelled.")
        elif isinstance(event, Moved):
            self.set_status(f"Job #{job} moved: {event.message}")

    def _made(self, event: Done) -> str:
        """What the job ``event`` ends made: its images, or the text of a describe job."""
        paths = event.paths
        if paths:
            return paths[-1] if len(paths) == 1 else f"{len(paths)} images, last {paths[-1]}"
        if self._text is not None and self._text[0] == event.job:
            return f"described: {self._text[1]}"
        return "no images"
