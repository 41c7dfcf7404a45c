"""The Generate screen's "Input image" section: an image to work on, the operation (none, vary, upscale,
inpaint, outpaint) and its settings, read as request fields for the request builder and filled from a
request.

Each control's id is ``in-`` plus the request field it holds, and each operation reads exactly the
fields its request type adds to :class:`~backend.request.GenerateRequest`, so a field added to a kind
needs a control here (the form's round-trip test fails until it has one). Settings shown for some
operations only carry ``for-<kind>`` classes. Reference images (image prompts) go in rows of their own,
one widget per image, under the image row.
"""

from __future__ import annotations

from dataclasses import fields

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, Input, Select
from textual.widgets.select import InvalidSelectValueError

from backend import jobkinds, library
from backend.errors import RequestError
from backend.jobkinds.image_input import ImageInputRequest
from backend.jobkinds.inpaint import MODES, InpaintRequest
from backend.jobkinds.outpaint import SIDES
from backend.jobkinds.upscale import LANCZOS, SCALES, spandrel_installed
from backend.request import GenerateRequest
from backend.values import to_int
from tui.suggest import ChoiceSuggester, PathSuggester
from tui.text import plain
from tui.widgets.field import Field, field_input, field_select

NONE = "generate"  # the operation "none": text to image
IMAGE_KINDS = {k.name: k for k in jobkinds.KINDS.values() if issubclass(k.request_type, ImageInputRequest)}
_COMMON = {f.name for f in fields(GenerateRequest)}
_HASHES = {"image_hash": "image", "mask_hash": "mask"}  # recorded hashes: kept until their file's path is edited
_EVERY_KIND = " ".join(f"for-{name}" for name in IMAGE_KINDS)


def own_fields(kind: type[GenerateRequest]) -> list[str]:
    """The fields ``kind`` adds to GenerateRequest's."""
    return [f.name for f in fields(kind) if f.name not in _COMMON]


def default_of(kind: type[GenerateRequest], name: str) -> object:
    return next(f.default for f in fields(kind) if f.name == name)


def _format(value: object) -> str:
    """A request field's value as a text box holds it (what the request builder reads back)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


class InputImageSection(Vertical):
    """The image, the operation and its settings (see the module's docstring)."""

    DEFAULT_CSS = """
    InputImageSection { height: auto; }
    InputImageSection #in-edit-mask { margin-left: 1; }
    InputImageSection .mask-row { height: auto; }
    InputImageSection .mask-row > Input { width: 1fr; }
    """

    def __init__(self, mask_key: str, id: str | None = None) -> None:
        super().__init__(id=id)
        self.mask_key = mask_key  # shown on the Edit mask button
        self._hashes: dict[str, str | None] = {}  # file field -> its recorded hash (see read)
        self._painted: dict[str, str] = {}  # mask painted in the editor -> the image it was painted on

    def compose(self) -> ComposeResult:
        operations = [("none (text to image)", NONE), *((k.label, k.name) for k in IMAGE_KINDS.values())]
        with Horizontal(classes="row"):
            yield Field("Image", field_input("in-image", placeholder="path, or a gallery image (→ completes)",
                                             suggester=PathSuggester()), names=("image", "image_hash"))
            yield Field("Operation", field_select("in-operation", operations, NONE), names=("kind",))
        with Horizontal(classes=f"row op-setting {_EVERY_KIND}"):
            yield Field("Strength", field_input("in-strength"), names=("strength",))
            yield Field("Feather", field_input("in-feather"), names=("feather",), hint="px of soft edge",
                        classes="op-setting for-inpaint for-outpaint")
            yield Field("Keep inputs", Checkbox("copy", compact=True, id="in-keep_inputs"), names=("keep_inputs",),
                        hint="for reproduce")
        with Horizontal(classes="row op-setting for-upscale"):
            yield Field("Scale", field_select("in-scale", [(f"{s:g}×", f"{s:g}") for s in SCALES], "2"),
                        names=("scale",))
            yield Field("Upscaler", field_input("in-upscaler", placeholder="first found, or lanczos",
                                                suggester=ChoiceSuggester([LANCZOS])), names=("upscaler",))
            yield Field("Fast", Checkbox("upscaler only", compact=True, id="in-fast"), names=("fast",))
        with Horizontal(classes="row op-setting for-inpaint"):
            edit = Button(plain(f"Edit mask ({self.mask_key})"), compact=True, id="in-edit-mask")  # a user's key
            yield Field("Mask", Horizontal(field_input("in-mask", placeholder="white = repaint"), edit,
                                           classes="mask-row"), names=("mask", "mask_hash"))
        with Horizontal(classes="row op-setting for-inpaint"):
            yield Field("Box", field_input("in-box", placeholder="X,Y,W,H"), names=("box",), hint="instead of a mask")
            yield Field("Mode", field_select("in-mode", [(m, m) for m in MODES], InpaintRequest.mode), names=("mode",))
            yield Field("Context", field_input("in-context", placeholder="the mode's"), names=("context",),
                        hint="0..1 of the image")
        with Horizontal(classes="row op-setting for-outpaint"):
            for side in SIDES:
                names = (side, "outpaint") if side == SIDES[0] else (side,)  # "nothing to add" shows under Left
                yield Field(f"Add {side}", field_input(f"in-{side}", placeholder="0 px"), names=names)

    def on_mount(self) -> None:
        self.show_operation(NONE)
        self._load_upscalers()

    def _load_upscalers(self) -> None:
        self.run_worker(self._list_upscalers, thread=True, exclusive=True, group="upscalers", exit_on_error=False)

    def _list_upscalers(self) -> None:
        names = [*sorted(library.names("upscaler"), key=str.lower), LANCZOS] if spandrel_installed() else [LANCZOS]
        self.app.call_from_thread(setattr, self.query_one("#in-upscaler", Input).suggester, "choices", names)

    # -- what is chosen ----------------------------------------------------------
    @property
    def operation(self) -> str:
        return str(self.query_one("#in-operation", Select).value)

    @property
    def image(self) -> str:
        return self.query_one("#in-image", Input).value.strip()

    @property
    def mask(self) -> str:
        return self.query_one("#in-mask", Input).value.strip()

    def mask_to_edit(self) -> str | None:
        """The Mask the editor starts from: not one painted for another image (a mask typed in is taken)."""
        mask = self.mask
        return mask if mask and self._painted.get(mask, self.image) == self.image else None

    def feather(self) -> int:
        """The inpaint feather typed (or its default when none or not a whole number)."""
        try:
            return to_int("feather", self.query_one("#in-feather", Input).value.strip())
        except RequestError:
            return InpaintRequest.feather

    def show_operation(self, kind: str) -> None:
        """Show the settings of operation ``kind`` (a job kind's name), with its defaults as placeholders."""
        for widget in self.query(".op-setting"):
            widget.display = widget.has_class(f"for-{kind}")
        focused = self.screen.focused if self.is_attached else None
        if focused is not None and any(not node.display for node in focused.ancestors_with_self):
            self.query_one("#in-operation").focus()  # keys typed would go to a setting now hidden
        if kind in IMAGE_KINDS:
            request_type = IMAGE_KINDS[kind].request_type
            self.query_one("#in-strength", Input).placeholder = request_type.strength_hint()
            if "feather" in own_fields(request_type):
                self.query_one("#in-feather", Input).placeholder = f"{default_of(request_type, 'feather')}"

    def set_gallery(self, paths: list[str]) -> None:
        """The gallery's images (newest first), completed first in the Image field."""
        self.query_one("#in-image", Input).suggester.choices = list(paths)

    def add_to_gallery(self, path: str) -> None:
        self.query_one("#in-image", Input).suggester.choices.insert(0, path)

    # -- request fields ------------------------------------------------------------
    def read(self) -> tuple[type[GenerateRequest], dict]:
        """The request type of the chosen operation and its fields as the request builder takes them (texts;
        empty = the kind's default). A hash recorded with a job (filled from its image) is kept until the user
        edits its file's path or the operation: then the file is used as it is now."""
        if self.operation not in IMAGE_KINDS:
            return GenerateRequest, {}
        kind = IMAGE_KINDS[self.operation].request_type
        values: dict = {}
        for name in own_fields(kind):
            if name in _HASHES:
                values[name] = self._hashes.get(_HASHES[name])
            else:
                values[name] = self._value(name)
        return kind, values

    def _value(self, name: str) -> object:
        widget = self.query_one(f"#in-{name}")
        if isinstance(widget, Input):
            return widget.value.strip()
        return str(widget.value) if isinstance(widget, Select) else widget.value

    def fill(self, kind: str, data: dict) -> None:
        """Show a request of job kind ``kind`` (``data``: its fields, as from ``to_dict``); text to image
        (or an unknown kind) sets the operation to none and leaves the image's fields as they are."""
        operation = kind if kind in IMAGE_KINDS else NONE
        self.query_one("#in-operation", Select).value = operation
        if operation != NONE:
            for name in own_fields(IMAGE_KINDS[operation].request_type):
                if name in _HASHES:
                    self._hashes[_HASHES[name]] = data.get(name)
                elif name in data:
                    self._set(name, data[name])
        self.show_operation(operation)

    @on(Input.Changed, "#in-image, #in-mask")
    def _file_edited(self, event: Input.Changed) -> None:
        """A path edited: its file is hashed anew when queued (a changed file is no longer refused)."""
        self._hashes.pop(event.input.id.removeprefix("in-"), None)

    @on(Select.Changed, "#in-operation")
    def _operation_edited(self) -> None:
        self._hashes.clear()

    def _set(self, name: str, value: object) -> None:
        widget = self.query_one(f"#in-{name}")
        if isinstance(widget, Checkbox):
            widget.value = bool(value)
            return
        try:
            widget.value = _format(value)
        except InvalidSelectValueError:  # a value the list does not offer (another version's): left as it is
            pass

    def use_mask(self, path: str, feather: int) -> None:
        """A mask painted in the editor: inpaint with it (instead of a box) and its feather."""
        self._painted[path] = self.image
        self.query_one("#in-operation", Select).value = "inpaint"
        self._set("mask", path)
        self._set("box", None)
        self._set("feather", feather)
        self.show_operation("inpaint")
