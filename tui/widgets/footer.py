"""The footer of every screen: Textual's, which also tells the app when the first frame is whole."""

from __future__ import annotations

from textual.widgets import Footer


class KeysFooter(Footer):
    """Textual's Footer draws its keys one refresh after the screen; once they are on the terminal the app's
    first frame is whole, and ``app.first_frame_shown`` starts the work the first frame did without."""

    async def recompose(self) -> None:
        await super().recompose()
        shown = getattr(self.app, "first_frame_shown", None)
        if self.children and shown is not None:
            self.call_after_refresh(self.call_after_refresh, shown)
