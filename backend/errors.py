"""Errors shown to users as one line, never as a traceback."""

from __future__ import annotations


class DreamttyError(Exception):
    """Base class: ``str(err)`` is the one-line message for the user."""


class RequestError(DreamttyError, ValueError):
    """A request field holds a value that is not allowed."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class ModelError(DreamttyError):
    """A model cannot be found, read or loaded."""
