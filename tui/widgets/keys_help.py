"""The keys panel (F12): Textual's, except that tab reaches its list of keys, which then scrolls by keyboard
(arrows, page keys, home, end): on the Queue screen the list is longer than the screen."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import HelpPanel, KeyPanel, Markdown


class ScrollingKeyPanel(KeyPanel, can_focus=True):
    """The list of keys; focused, it lists its own scrolling keys, then the screen's and the app's. Not a
    Textual system widget, which tab passes over."""

    DEFAULT_CLASSES = ""


class KeysHelp(HelpPanel):
    """The help panel with a :class:`ScrollingKeyPanel`."""

    def compose(self) -> ComposeResult:
        yield Markdown(id="widget-help")
        yield ScrollingKeyPanel(id="keys-help")
