"""Input completion from a list of choices that can change while the app runs."""

from __future__ import annotations

from typing import Iterable

from textual.suggester import Suggester

from backend.safetext import visible


class ChoiceSuggester(Suggester):
    """Suggests the first of ``choices`` that starts with what was typed (any case), control characters visible."""

    def __init__(self, choices: Iterable[str] = ()) -> None:
        super().__init__(use_cache=False, case_sensitive=False)
        self.choices = list(choices)

    async def get_suggestion(self, value: str) -> str | None:
        return next((visible(c) for c in self.choices if c.casefold().startswith(value)), None)
