"""A small modal that saves the Generate form as a user preset."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label

from backend.errors import RequestError
from backend.prompting.datafiles import user_dir
from backend.prompting.presets import NAME_MAX, PresetInfo, save_preset
from tui.text import TextInput
from tui.widgets.field import Field
from tui.widgets.footer import KeysFooter

SUFFIXES = (".yaml", ".yml")  # a name typed with one is taken without it


def preset_name(typed: str) -> str:
    """The preset name for what was typed: stripped, without a ``.yaml``/``.yml`` ending."""
    name = typed.strip()
    suffix = next((s for s in SUFFIXES if name.lower().endswith(s)), "")
    return name[:len(name) - len(suffix)]


class SavePresetDialog(ModalScreen[Path | None]):
    """Asks for a name (and an optional description), writes the preset and dismisses with its path.

    Enter saves, escape cancels (dismisses with None). A name that is taken (in any case, as presets are
    matched) asks first: enter again with the same name overwrites the user's file (or hides the shipped
    preset of that name).
    """

    DEFAULT_CSS = """
    SavePresetDialog { align: center middle; }
    #save-preset {
        width: 64; max-width: 100%; height: auto; padding: 1 2; border: thick $primary; background: $surface;
    }
    #save-preset > Label { text-style: bold; margin-bottom: 1; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    AUTO_FOCUS = "#preset-name"

    def __init__(self, request: dict, presets: list[PresetInfo]) -> None:
        super().__init__()
        self.request = request
        self.taken = {p.name.lower(): p for p in presets}
        self.confirmed: str | None = None  # the taken name the user was asked about

    def compose(self) -> ComposeResult:
        with Vertical(id="save-preset"):
            yield Label("Save the form as a preset (enter saves, escape cancels)")
            yield Field("Name", TextInput(placeholder="letters, digits, - _ .", compact=True, id="preset-name"),
                        names=("preset",), hint=f"written to {user_dir('presets')}/NAME.yaml (at most {NAME_MAX} "
                                                "characters; a .yaml ending is dropped)")
            yield Field("Description", TextInput(placeholder="optional", compact=True, id="preset-description"))
        yield KeysFooter()  # the dialog's keys, not the screen's under it

    @property
    def name_field(self) -> Field:
        return self.query_one(Field)

    @on(Input.Changed, "#preset-name")
    def _name_changed(self) -> None:
        self.confirmed = None
        self.name_field.set_error(None)

    @on(Input.Submitted)
    def _save(self) -> None:
        name = preset_name(self.query_one("#preset-name", Input).value)
        self.query_one("#preset-name", Input).focus()
        if not name:
            self.name_field.set_error("type a name: letters, digits, '-', '_' or '.'")
            return
        if self._ask_first(name):
            return
        description = self.query_one("#preset-description", Input).value.strip()
        try:
            path = save_preset(name, self.request, description)
        except RequestError as exc:  # a name not allowed, or a file that cannot be written
            self.name_field.set_error(exc.message)
            return
        self.dismiss(path)

    def _ask_first(self, name: str) -> bool:
        """Whether ``name`` is taken and not yet confirmed: then say so under the name (enter again confirms)."""
        taken = self.taken.get(name.lower())
        if taken is None or self.confirmed == name.lower():
            return False
        self.confirmed = name.lower()
        shipped = taken.source.startswith("shipped:")
        what, verb = (f"{taken.name!r} is a shipped preset", "replace") if shipped else (f"{taken.source} exists",
                                                                                          "overwrite")
        self.name_field.set_error(f"{what}; enter again to {verb} it with the form, or change the name")
        return True

    def action_cancel(self) -> None:
        self.dismiss(None)
