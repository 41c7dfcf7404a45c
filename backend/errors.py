"""Errors shown to users as one line, never as a traceback."""

from __future__ import annotations


class DreamttyError(Exception):
    """Base class: ``str(err)`` is the one-line message for the user."""


class RequestError(DreamttyError, ValueError):
    """A request field holds a value that is not allowed.

    ``field`` is named as the CLI flag is: ``lora``, ``image_prompt`` and ``device`` are given once per
    item. :attr:`json_key` is the request key that holds them, as the HTTP API names it.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    @property
    def json_key(self) -> str:
        return _JSON_KEYS.get(self.field, self.field)

    @classmethod
    def from_json_key(cls, key: str, message: str) -> RequestError:
        """The error an API answer names by its JSON key, with the field as the CLI names it."""
        return cls(next((field for field, k in _JSON_KEYS.items() if k == key), key), message)


_JSON_KEYS = {"lora": "loras", "image_prompt": "image_prompts", "device": "devices"}


class Transient(DreamttyError):
    """A fault that passes: nothing queued is lost, and a command exits 3 (a script may try again later), not 2
    (bad input); the API answers 503."""


class ServiceUnavailable(Transient):
    """No service answers: none runs, or the one in use was lost (or is stopping)."""


class ModelError(DreamttyError):
    """A model cannot be found, read or loaded."""


def field_and_message(exc: Exception) -> tuple[str | None, str]:
    """The request field ``exc`` is about and what it says of it: a RequestError's own, else the ``field: message``
    its text starts with (the service refuses a model with ``model: ... does not exist``); (None, its text) when it
    names no field."""
    if isinstance(exc, RequestError):
        return exc.field, exc.message
    field, sep, message = str(exc).partition(": ")
    return (field, message) if sep and field and " " not in field else (None, str(exc))


def noted(exc: DreamttyError, note: str) -> DreamttyError:
    """``exc`` as the same kind of error (and field) with ``note`` at the end of its message: where a value the
    user did not type came from."""
    if isinstance(exc, RequestError):
        return RequestError(exc.field, exc.message + note)
    return type(exc)(f"{exc}{note}")
