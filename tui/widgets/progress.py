"""Progress of one job: a bar plus "image i/n · step s/N · it/s · ETA"."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from tui.text import plain


def describe_step(event: dict) -> str:
    """One line for a ``step`` event."""
    image = f"image {event['image'] + 1}/{event['count']} · " if event.get("count", 1) > 1 else ""
    return f"{image}step {event['step']}/{event['total']} · {event['its']:.1f} it/s · ETA {format_eta(event['eta'])}"


def step_counts(event: dict) -> tuple[int, int]:
    """(steps done, steps in all) over every image of the job, from a ``step`` event."""
    return event["image"] * event["total"] + event["step"], event["count"] * event["total"]


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

    def compose(self) -> ComposeResult:
        yield Static("Idle: write a prompt and press ctrl+g.", classes="status")
        yield ProgressBar(total=1, show_eta=False, id="progress-bar")

    @property
    def status(self) -> str:
        return str(self.query_one(".status", Static).content)

    def set_status(self, text: str, failed: bool = False) -> None:
        """Show ``text`` (as text: it holds paths and error messages)."""
        self.query_one(".status", Static).update(plain(text), layout=False)  # fixed height: repaint only
        self.set_class(failed, "-failed")

    def follow(self, event: dict) -> None:
        """Update from a service event of the job shown."""
        bar = self.query_one(ProgressBar)
        kind, job = event["type"], event["job"]
        if kind == "queued":
            self.set_status(f"Job #{job} queued.")
        elif kind == "started":
            bar.update(total=1, progress=0)
            self.set_status(f"Job #{job} started: loading the model…")
        elif kind == "step":
            done, total = step_counts(event)
            bar.update(total=total, progress=done)
            self.set_status(f"Job #{job}: {describe_step(event)}")
        elif kind == "image":
            self.set_status(f"Job #{job}: saved {event['path']}")
        elif kind == "done":
            bar.update(progress=bar.total or 1)
            paths = event.get("paths") or []
            where = paths[-1] if len(paths) == 1 else f"{len(paths)} images, last {paths[-1]}" if paths else "no images"
            self.set_status(f"Job #{job} done: {where}")
        elif kind == "failed":
            self.set_status(f"Job #{job} failed: {event.get('error', '')}", failed=True)
        elif kind == "cancelled":
            self.set_status(f"Job #{job} cancelled.")
