"""Input completion from a list of choices that can change while the app runs, and of file paths."""

from __future__ import annotations

import asyncio
import os
from typing import Iterable

from textual.suggester import Suggester

from backend.safetext import CONTROL


class ChoiceSuggester(Suggester):
    """Suggests the first of ``choices`` that starts with what was typed (any case). A choice with a control
    character is not suggested: accepting it must give the choice itself, and Input draws it as it is."""

    def __init__(self, choices: Iterable[str] = ()) -> None:
        super().__init__(use_cache=False, case_sensitive=False)
        self.choices = list(choices)

    async def get_suggestion(self, value: str) -> str | None:
        return next((c for c in self.choices if _drawn_as_is(c) and c.casefold().startswith(value)), None)


def _drawn_as_is(text: str) -> bool:
    """Whether ``text`` holds no control character (nor tab or newline)."""
    return not CONTROL.search(text) and "\n" not in text and "\t" not in text


def complete_path(typed: str) -> str | None:
    """``typed`` completed with the first entry (by name) of its folder whose name starts as ``typed`` ends
    (hidden ones only when that starts with ``.``; none with control characters); a folder gets a trailing
    ``/``. ``~`` is expanded for listing only. Reads the file system."""
    folder, _, start = typed.rpartition(os.sep)
    folder = folder + os.sep if folder or typed.startswith(os.sep) else ""
    try:
        with os.scandir(os.path.expanduser(folder or ".")) as entries:
            names = sorted((e.name + os.sep if e.is_dir() else e.name) for e in entries
                           if e.name.startswith(start) and _drawn_as_is(e.name)
                           and (start.startswith(".") or not e.name.startswith(".")))
    except (OSError, ValueError):  # ValueError: a NUL pasted into the path
        return None
    return folder + names[0] if names else None


class PathSuggester(Suggester):
    """Suggests, for what was typed, the newest of ``choices`` (the gallery's images) that starts with it, else
    a file or folder path (listed in a thread). A path with a control character, tab or newline is not
    suggested: accepting a suggestion must give the path itself, and Input draws the suggestion as it is."""

    def __init__(self, choices: Iterable[str] = ()) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.choices = list(choices)

    async def get_suggestion(self, value: str) -> str | None:
        if not value:
            return None
        suggestion = next((c for c in self.choices if c.startswith(value) and _drawn_as_is(c)), None)
        if suggestion is None:
            suggestion = await asyncio.to_thread(complete_path, value)
        return suggestion if suggestion is not None and _drawn_as_is(suggestion) else None
