"""A widget showing an image in half-block cells (``tui.half_blocks``), re-fitted on resize.

Strips are built in a thread and the widget only blits them, so a frame costs the event loop almost
nothing. PIL and rich-pixels are imported by that thread, at the first image: not before the first frame.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from rich.color import ColorSystem
from rich.console import COLOR_SYSTEMS
from rich.segment import Segment
from textual import work
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual.worker import get_current_worker

from tui.text import notify

if TYPE_CHECKING:
    from PIL import Image


BANDS = 4  # a frame is swapped in over this many screen refreshes
ROW_YIELD = 0.001  # seconds the preview thread sleeps after each row, so the event loop is not slowed


class ImagePreview(Widget):
    """Shows the latest image given to :meth:`show`, centred, re-fitted on resize."""

    DEFAULT_CSS = """
    ImagePreview { height: 1fr; width: 1fr; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.source: Image.Image | str | Path | None = None  # what was last given to show()
        self.limit: tuple[int, int] | None = None  # at most this many cells (width, height) for the current image
        self.frames = 0  # frames drawn so far
        self._lines: list[Strip] = []
        self._cells = (0, 0)
        self._laid_out = (0, 0)  # the widget's size the frame was centred in
        self._generation = 0  # frames started; a band of an older frame is dropped

    def show(self, image: Image.Image | str | Path | None, limit: tuple[int, int] | None = None) -> None:
        """Draw ``image`` (a PIL image or the path of one) in at most ``limit`` cells; None clears."""
        self.source, self.limit = image, limit
        if image is None:
            self._lines, self._generation = [], self._generation + 1
            self.refresh()
        else:
            self._draw(image, self._cells_for(), self._color_system())

    def _color_system(self) -> ColorSystem | None:
        return COLOR_SYSTEMS.get(self.app.console.color_system or "")

    def _cells_for(self) -> tuple[int, int]:
        width, height = self.size.width, self.size.height
        if self.limit is not None:
            return min(width, self.limit[0]), min(height, self.limit[1])
        return width, height

    def on_resize(self) -> None:
        if self.source is not None and (self._cells_for(), tuple(self.size)) != (self._cells, self._laid_out):
            self._draw(self.source, self._cells_for(), self._color_system())  # re-fitted, or centred anew

    @work(thread=True, exclusive=True, group="preview", exit_on_error=False)
    def _draw(self, source: Image.Image | str | Path, cells: tuple[int, int],
              color_system: ColorSystem | None) -> None:
        from PIL import Image

        from tui.half_blocks import half_block_lines

        if cells[0] < 1 or cells[1] < 1:
            return  # not laid out yet: on_resize draws it
        if isinstance(source, (str, Path)):
            try:
                with Image.open(source) as opened:
                    image = opened.convert("RGB")
            except OSError as exc:
                self.app.call_from_thread(notify, self, f"cannot show {source}: {exc}", severity="error")
                return
        else:
            image = source
        lines = half_block_lines(image, cells, color_system, self._between_rows)
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._set_lines, source, image, lines, cells)

    def _between_rows(self) -> None:
        """In the preview thread: wait while a key is painted, and leave the GIL to the event loop a while."""
        self.app.key_gate.wait()
        time.sleep(ROW_YIELD)

    def _set_lines(self, source: object, image: Image.Image, lines: list[list[Segment]],
                   cells: tuple[int, int]) -> None:
        if source is not self.source:
            return  # a newer image was given meanwhile
        self.source = image  # keep the decoded image for redraws on resize
        width, height = self.size.width, self.size.height
        pad_left = (width - max((Segment.get_line_length(x) for x in lines), default=0)) // 2
        pad_top = (height - len(lines)) // 2
        style = self.rich_style
        blank = Strip.blank(width, style)
        strips = [Strip([Segment(" " * pad_left, style), *line]).extend_cell_length(width, style) for line in lines]
        frame = [blank] * pad_top + strips + [blank] * max(0, height - pad_top - len(strips))
        self._cells, self._laid_out = cells, (width, height)
        self._generation += 1
        self._paint_band(self._generation, frame, 0)

    def _paint_band(self, generation: int, frame: list[Strip], band: int) -> None:
        """Swap in one of ``BANDS`` horizontal bands of ``frame`` per screen refresh, none while a key is painted.

        Painting a whole frame of unique truecolor cells costs the event loop 20-40 ms here
        (filters and escape codes); in bands, a key pressed meanwhile is painted between them.
        """
        if generation != self._generation:
            return  # a newer frame has started
        if wait := self.app.key_gate.remaining():
            self.set_timer(wait, partial(self._paint_band, generation, frame, band))
            return  # a key is being painted: it goes first
        rows = -(-len(frame) // BANDS)
        start, end = band * rows, min(len(frame), (band + 1) * rows)
        if len(self._lines) != len(frame):
            self._lines = [Strip.blank(self.size.width, self.rich_style)] * len(frame)
        self._lines[start:end] = frame[start:end]
        self.refresh(Region(0, start, self.size.width, end - start))
        if end < len(frame):
            self.call_after_refresh(self._paint_band, generation, frame, band + 1)
        else:
            self.frames += 1

    def render_line(self, y: int) -> Strip:
        if y < len(self._lines):
            return self._lines[y]
        return Strip.blank(self.size.width, self.rich_style)
