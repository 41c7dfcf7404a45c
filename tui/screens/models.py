"""Models screen (F4): the model library. Placeholder until the model library lands."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static


class ModelsPane(Vertical):
    """Everything shown on the Models screen. ``self.app.service`` is the backend service."""

    def compose(self) -> ComposeResult:
        yield Static("Model library: coming soon.", id="models-placeholder")
