"""The Generate screen's "Image prompts": up to four reference images that steer a new image, a row each
(image, type, weight, stop), read as the request's ``image_prompts`` and filled from a request.

An empty weight or stop is the type's default (Fooocus's). A reference's recorded hash is kept until its
path is edited, so reproducing a loaded image still notices a changed file, and editing the path uses the
file as it is now.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Select

from backend.image_prompts import FIELD, MAX_IMAGE_PROMPTS, TYPES
from tui.suggest import PathSuggester
from tui.widgets.field import Field, field_input, field_select


def _number(value: object) -> str:
    return "" if value is None else f"{value:g}"


class ReferenceImages(Vertical):
    """One row per reference image; rows with no image are left out."""

    DEFAULT_CSS = "ReferenceImages { height: auto; }"

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._hashes: dict[int, str | None] = {}  # row -> its recorded hash

    def compose(self) -> ComposeResult:
        types = [(f"{t.name}: {t.about}", t.name) for t in TYPES.values()]
        for row in range(MAX_IMAGE_PROMPTS):
            with Horizontal(classes="row"):
                yield Field(f"Reference {row + 1}", field_input(f"ref-{row}-path", placeholder="image path",
                                                                suggester=PathSuggester()),
                            names=(FIELD,) if row == 0 else ())  # errors name image_prompt: shown on the first row
                yield Field("Type", field_select(f"ref-{row}-type", types, "image"))
                yield Field("Weight", field_input(f"ref-{row}-weight", placeholder="type's"), hint="0..2")
                yield Field("Stop", field_input(f"ref-{row}-stop", placeholder="type's"), hint="0..1 of the steps")

    def _input(self, row: int, name: str) -> Input:
        return self.query_one(f"#ref-{row}-{name}", Input)

    def set_gallery(self, paths: list[str]) -> None:
        """The gallery's images, completed first in every row's image field."""
        for row in range(MAX_IMAGE_PROMPTS):
            self._input(row, "path").suggester.choices = list(paths)

    def read(self) -> list[dict]:
        """The references as request values (texts; empty = the type's default)."""
        out = []
        for row in range(MAX_IMAGE_PROMPTS):
            path = self._input(row, "path").value.strip()
            if not path:
                continue
            out.append({
                "path": path, "type": str(self.query_one(f"#ref-{row}-type", Select).value),
                "weight": self._input(row, "weight").value.strip() or None,
                "stop": self._input(row, "stop").value.strip() or None,
                "hash": self._hashes.get(row),
            })
        return out

    def fill(self, prompts: list[dict]) -> None:
        """Show ``prompts`` (as from a request's ``to_dict``); rows beyond them are emptied."""
        self._hashes.clear()
        for row in range(MAX_IMAGE_PROMPTS):
            prompt = prompts[row] if row < len(prompts) else {}
            self._input(row, "path").value = prompt.get("path", "")
            if prompt.get("type") in TYPES:
                self.query_one(f"#ref-{row}-type", Select).value = prompt["type"]
            self._input(row, "weight").value = _number(prompt.get("weight"))
            self._input(row, "stop").value = _number(prompt.get("stop"))
            if prompt:
                self._hashes[row] = prompt.get("hash")

    @on(Input.Changed)
    def _path_edited(self, event: Input.Changed) -> None:
        """A row's path edited: its file is hashed anew when queued (a changed file is no longer refused)."""
        _, row, name = event.input.id.split("-")
        if name == "path":
            self._hashes.pop(int(row), None)
