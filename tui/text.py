"""Untrusted text in Textual widgets: shown as typed, never read as markup, control characters visible.

Textual 8 reads a plain ``str`` as content markup in Static/Label, option and select labels,
SelectionList options and notifications, and DataTable reads ``str`` cells as Rich markup: a
prompt with ``[/]`` crashes the app and ``[sks]`` vanishes. ``textual.markup.escape`` is no cure
(``[$accent]``, ``[B]`` and ``[ bold]`` are still read as tags). Textual also sends control
characters to the terminal as they are, in every widget (Log only replaces U+0000-U+0014).

So text that came from a user, a file, an image, a model or an exception goes through here:

- :func:`plain` for Static, Label, Option, Select and SelectionList labels (a Textual ``Content``);
- :func:`cell` for DataTable cells (a Rich ``Text``: DataTable measures Rich renderables);
- :func:`markup` where Textual takes only markup (the command palette's help line);
- :func:`notify` for notifications;
- :class:`TextInput` and :class:`TextEditor` instead of Input and TextArea: they draw a control
  character as one symbol (``␛``), so the cursor stays where the text says it is.
"""

from __future__ import annotations

import re

from rich.highlighter import Highlighter
from rich.text import Text
from textual.app import App
from textual.content import Content
from textual.notifications import SeverityLevel
from textual.widget import Widget
from textual.widgets import Input, TextArea

from backend.safetext import CONTROL, cut, one_line, visible

NOTIFY_MAX = 400  # characters of a notification's or an inline error's message; more would cover the screen
LONG_WORD = 96  # characters of a word (a path) an inline error shows whole; a longer one is cut in its middle
_LONG_WORD = re.compile(rf"\S{{{LONG_WORD + 1},}}")
# One-cell symbols for the controls in editable text: Unicode's control pictures (U+2400-U+2421)
# for C0 and DEL, the replacement character for the others (C1, bidirectional controls). A newline is
# one of them: a text box is one line (a TextEditor draws each line on its own).
_PICTURES = {code: chr(0x2400 + code) for code in range(0x20)} | {0x7F: "\u2421"}
_PICTURED = re.compile(f"{CONTROL.pattern}|\n")


def plain(text: object) -> Content:
    """``text`` as widget content: as typed, control characters visible."""
    return Content(visible(text))


def cell(text: object) -> Text:
    """``text`` as a DataTable cell: as typed, control characters visible, newlines as ``\\n`` (a cell is one
    line: the rest of a name with a newline was hidden)."""
    return Text(one_line(text))


def markup(text: object) -> str:
    """``text`` as content markup that reads as typed: control characters visible, every ``[`` escaped
    (Textual 8 reads ``\\[`` as a plain ``[`` and a backslash before anything else as itself)."""
    return visible(text).replace("[", "\\[")


def notify(node: Widget | App, message: object | list[object], *, title: str = "",
           severity: SeverityLevel = "information", timeout: float | None = None) -> None:
    """Notify with ``message`` shown as text on one line (a list: a line each; a newline in them as ``\\n``) and
    ``title``, cut to ``NOTIFY_MAX`` characters (a path of 10,000 would fill the screen)."""
    text = "\n".join(map(one_line, message)) if isinstance(message, list) else one_line(message)
    node.notify(cut(text, NOTIFY_MAX), title=one_line(title), severity=severity, timeout=timeout, markup=False)


def line(text: object, most: int = NOTIFY_MAX) -> str:
    """``text`` on one line (newlines written as ``\\n``) cut to ``most`` characters, each word longer than
    ``LONG_WORD`` cut in its middle: an inline error is one short line, and the reason after a long path stays in
    sight."""
    return cut(_LONG_WORD.sub(_middle, one_line(text)), most)


def _middle(match: re.Match[str]) -> str:
    word, half = match.group(), LONG_WORD // 2
    return f"{word[:half - 1]}…{word[-half:]}"


def _picture(match: re.Match[str]) -> str:
    return _PICTURES.get(ord(match.group()), "\ufffd")


def pictures(text: str) -> str:
    """``text`` with each control character and newline replaced by one symbol (same length, so cursors stay
    right)."""
    return _PICTURED.sub(_picture, text)


class _ControlPictures(Highlighter):
    """Input's hook on the text it draws: control characters become symbols (same length)."""

    def highlight(self, text: Text) -> None:
        text.plain = pictures(text.plain)


class TextInput(Input):
    """An Input that draws control characters in its value as symbols (its value is unchanged)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("highlighter", _ControlPictures())
        super().__init__(*args, **kwargs)


class TextEditor(TextArea):
    """A TextArea that draws control characters in its text as symbols (its text is unchanged)."""

    def get_line(self, line_index: int) -> Text:
        return Text(pictures(self.document.get_line(line_index)), end="", no_wrap=True)
