"""The Generate screen's "Image prompts": up to four reference images that steer a new image, a row each
(image, type, weight, stop), read as the request's ``image_prompts`` and filled from a request.

An empty weight or stop is the type's default (Fooocus's). A bad weight or stop, and a file the service
refuses, is shown under its row, naming the row as labelled. A reference's recorded hash is kept until its
path is edited, so reproducing a loaded image still notices a changed file, and editing the path uses the
file as it is now; the model it named (a loaded image's) is kept until its type is changed.
"""

from __future__ import annotations

import re

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Select

from backend.errors import RequestError
from backend.image_prompts import FIELD, MAX_IMAGE_PROMPTS, MAX_WEIGHT, TYPES, setting_value
from backend.values import absolute
from tui.suggest import PathSuggester
from tui.widgets.field import Field, field_input, field_select


def _number(value: object) -> str:
    return "" if value is None else f"{value:g}"


class ReferenceImages(Vertical):
    """One row per reference image; rows with no image are left out."""

    DEFAULT_CSS = """
    ReferenceImages { height: auto; }
    ReferenceImages .reference-row { margin: 0; }
    ReferenceImages SelectCurrent Static#label { text-wrap: nowrap; text-overflow: ellipsis; }  /* a type: a line */
    """

    def __init__(self, id: str | None = None) -> None:
        super().__init__(id=id)
        self._hashes: dict[int, str | None] = {}  # row -> its recorded hash
        self._models: dict[int, str | None] = {}  # row -> the IP-Adapter or ControlNet it names

    def compose(self) -> ComposeResult:
        types = [(f"{t.name}: {t.about}", t.name) for t in TYPES.values()]
        for row in range(MAX_IMAGE_PROMPTS):
            path = f"ref-{row}-path"
            # A row's errors go under the whole row, a line wide: a weight's box is a few columns. The service's
            # errors name image_prompt: those not placed on a row are shown under the first.
            yield Field("", Horizontal(
                Field(f"Reference {row + 1}", field_input(path, placeholder="image path", suggester=PathSuggester())),
                Field("Type", field_select(f"ref-{row}-type", types, "image")),
                Field("Weight", field_input(f"ref-{row}-weight", placeholder="type's"), hint=f"0..{MAX_WEIGHT:g}"),
                Field("Stop", field_input(f"ref-{row}-stop", placeholder="type's"), hint="0..1 of the steps"),
                classes="row"), names=(path, f"ref-{row}-weight", f"ref-{row}-stop", *([FIELD] if row == 0 else [])),
                classes="reference-row")

    def _input(self, row: int, name: str) -> Input:
        return self.query_one(f"#ref-{row}-{name}", Input)

    def set_gallery(self, paths: list[str]) -> None:
        """The gallery's images, completed first in every row's image field."""
        for row in range(MAX_IMAGE_PROMPTS):
            self._input(row, "path").suggester.choices = list(paths)

    def read(self) -> list[dict]:
        """The references as request values (texts; empty = the type's default); RequestError naming the box
        of a weight or stop that is not a number in range."""
        out = []
        for row in range(MAX_IMAGE_PROMPTS):
            path = self._input(row, "path").value.strip()
            if not path:
                continue
            out.append({
                "path": path, "type": str(self.query_one(f"#ref-{row}-type", Select).value),
                "weight": self._number(row, "weight"),
                "stop": self._number(row, "stop"),
                "hash": self._hashes.get(row),
                "model": self._models.get(row),
            })
        return out

    def _number(self, row: int, name: str) -> str | None:
        """The weight or stop typed in ``row`` (None: empty, the type's default), checked."""
        text = self._input(row, name).value.strip()
        if not text:
            return None
        try:
            setting_value(name, text)
        except RequestError as exc:
            raise RequestError(f"ref-{row}-{name}", f"Reference {row + 1}: {exc.message}") from None
        return text

    def placed(self, exc: RequestError) -> RequestError:
        """``exc`` as the error of the row whose file it names (the service numbers the references given, not
        the rows), else as it is."""
        if exc.field != FIELD:
            return exc
        named = [(-len(path), row) for row in range(MAX_IMAGE_PROMPTS)
                 for path in self._spellings(row) if path and path in exc.message]
        if not named:
            return exc
        row = min(named)[1]  # the longest path named (a.png is in b/a.png's message too), on its first row
        message = re.sub(r"^\d+ \(\w+\): ", "", exc.message)  # the service's number counts the references given
        return RequestError(f"ref-{row}-path", f"Reference {row + 1}: {message}")

    def _spellings(self, row: int) -> tuple[str, str]:
        """Row ``row``'s path as typed and as the service may name it (absolute)."""
        path = self._input(row, "path").value.strip()
        return path, absolute(path)

    def fill(self, prompts: list[dict]) -> None:
        """Show ``prompts`` (as from a request's ``to_dict``); rows beyond them are emptied."""
        self._hashes.clear()
        self._models.clear()
        for row in range(MAX_IMAGE_PROMPTS):
            prompt = prompts[row] if row < len(prompts) else {}
            self._input(row, "path").value = prompt.get("path", "")
            kind = prompt.get("type")
            self.query_one(f"#ref-{row}-type", Select).value = kind if kind in TYPES else "image"  # not the row's last
            self._input(row, "weight").value = _number(prompt.get("weight"))
            self._input(row, "stop").value = _number(prompt.get("stop"))
            if prompt:
                self._hashes[row] = prompt.get("hash")
                self._models[row] = prompt.get("model")

    @on(Input.Changed)
    def _path_edited(self, event: Input.Changed) -> None:
        """A row's path edited: its file is hashed anew when queued (a changed file is no longer refused)."""
        self._hashes.pop(_row(event.input.id, "path"), None)

    @on(Select.Changed)
    def _type_changed(self, event: Select.Changed) -> None:
        """A row's type changed: the model it named is of the old type."""
        self._models.pop(_row(event.select.id, "type"), None)


def _row(box_id: str | None, name: str) -> int | None:
    """The row whose ``name`` box has the id ``box_id``."""
    return next((row for row in range(MAX_IMAGE_PROMPTS) if box_id == f"ref-{row}-{name}"), None)
