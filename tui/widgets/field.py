"""A labelled form field with an inline error line under it (all of its text shown as text, not markup),
and the compact controls the forms put in fields."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.content import Content
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Input, Label, Select, Static

from tui.text import TextInput, line, plain


class Field(Vertical):
    """Label + widgets + error. ``names`` are the request fields whose errors show here."""

    DEFAULT_CSS = """
    Field { height: auto; margin: 0 0 1 0; }
    Field > .field-label { color: $text-muted; }
    Field > .field-hint { color: $text-muted; height: auto; }
    Field:focus-within > .field-label { color: $accent; text-style: bold; }
    Field > .field-error { color: $error; height: auto; display: none; }
    Field.-invalid > .field-error { display: block; }
    Field.-invalid > .field-label { color: $error; }
    """

    def __init__(self, label: str, *widgets: Widget, names: tuple[str, ...] = (), hint: str = "",
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.label = label
        self.widgets = widgets
        self.names = names
        self.hint = hint

    def compose(self) -> ComposeResult:
        label = Label(plain(self.label), classes="field-label")
        label.display = bool(self.label)  # a group of fields: its error under them all
        yield label
        yield from self.widgets
        hint = Static(plain(self.hint), classes="field-hint")
        hint.display = bool(self.hint)
        yield hint
        yield Static("", classes="field-error")

    @property
    def error(self) -> str:
        return str(self.query_one(".field-error", Static).content) if self.has_class("-invalid") else ""

    def set_error(self, message: str | None) -> None:
        """Show ``message`` under the field, on one line (None: no error); a hint that says the same is hidden
        meanwhile (a model's problem: shown once)."""
        self.query_one(".field-error", Static).update(Content(line(message or "")))
        self.set_class(bool(message), "-invalid")
        self._show_hint()

    def set_hint(self, text: str) -> None:
        self.hint = text
        self.query_one(".field-hint", Static).update(Content(line(text)))  # a model's problem echoes a path
        self._show_hint()

    def _show_hint(self) -> None:
        self.query_one(".field-hint", Static).display = bool(self.hint) and line(self.hint) != self.error


def field_input(id: str, value: str = "", placeholder: str = "", **kwargs) -> Input:
    """A compact text box for a form field (control characters drawn as symbols)."""
    return TextInput(value, placeholder=placeholder, compact=True, id=id, **kwargs)


def field_select(id: str, options: list[tuple[str, str]], value: str | None = None, prompt: str = "") -> Select:
    """A compact select; with ``value`` it cannot be blank, else blank shows ``prompt``."""
    if value is None:
        return Select(options, prompt=prompt, compact=True, id=id)
    return Select(options, value=value, allow_blank=False, compact=True, id=id)
