"""The top line: the four screens with their keys, and what the workers are doing."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from backend.safetext import visible

MODES = (("generate", "Generate"), ("queue", "Queue & gallery"), ("train", "Train"), ("models", "Models"))


class ModeBar(Static):
    """Tabs for the screens (the current one highlighted) and a one-line job status."""

    DEFAULT_CSS = """
    ModeBar { height: 1; background: $panel; }
    """

    def __init__(self, mode: str) -> None:
        super().__init__("")
        self.mode = mode

    def on_mount(self) -> None:
        self.app.job_events.subscribe(self, lambda _event: self.redraw())
        self.redraw()

    def redraw(self) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        for mode, label in MODES:
            key = self.app.key_for(f"screen.{mode}")
            style = "bold reverse" if mode == self.mode else ""
            text.append(f" {key} {label} ", style=style)
            text.append("│", style="dim")
        text.append(f" {visible(self.app.activity())}", style="italic")
        self.update(text, layout=False)  # one fixed line: no need to lay out the screen again
