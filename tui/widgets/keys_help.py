"""The keys panel (F12): Textual's, except that tab reaches its list of keys, which then scrolls by keyboard
(arrows, page keys, home, end): on the Queue screen the list is longer than the screen. Hidden while its list
has focus, it gives focus back to the widget that had it when the panel was shown."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import HelpPanel, KeyPanel, Markdown


class ScrollingKeyPanel(KeyPanel, can_focus=True):
    """The list of keys; focused, it lists its own scrolling keys, then the screen's and the app's. Not a
    Textual system widget, which tab passes over."""

    DEFAULT_CLASSES = ""


class KeysHelp(HelpPanel):
    """The help panel with a :class:`ScrollingKeyPanel`; ``focused``: the widget focused as it is shown."""

    def __init__(self, focused: Widget | None) -> None:
        super().__init__()
        self.focused_before = focused

    def compose(self) -> ComposeResult:
        yield Markdown(id="widget-help")
        yield ScrollingKeyPanel(id="keys-help")

    async def hide(self) -> None:
        """Remove the panel; if its list had focus, focus goes back to the widget focused before (still there)."""
        focused = self.screen.focused
        had_focus = focused is not None and self in focused.ancestors
        await self.remove()
        if had_focus and self.focused_before is not None and self.focused_before.is_attached:
            self.focused_before.focus()
