"""Train screen (F3): DreamBooth training dashboard. Placeholder until training lands."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static


class TrainPane(Vertical):
    """Everything shown on the Train screen. ``self.app.service`` is the backend service."""

    def compose(self) -> ComposeResult:
        yield Static("Training: coming soon.", id="train-placeholder")
