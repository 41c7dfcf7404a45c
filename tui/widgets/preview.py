"""An image drawn with half-block cells (rich-pixels), scaled to the widget with LANCZOS.

rich-pixels resizes with nearest-neighbour, which aliases; so the image is
first scaled with PIL's LANCZOS filter to exactly the widget's cells (one
cell = one pixel wide, two pixels tall). Strips are built in a thread and the
widget only blits them, so a frame costs the event loop almost nothing.
"""

from __future__ import annotations

import io
import time
from functools import partial
from pathlib import Path
from typing import Callable

from PIL import Image
from rich.color import Color, ColorSystem
from rich.console import COLOR_SYSTEMS, Console
from rich.segment import Segment
from rich.style import Style
from rich_pixels import HalfcellRenderer, Pixels
from textual import work
from textual.geometry import Region
from textual.strip import Strip
from textual.widget import Widget
from textual.worker import get_current_worker

from tui.text import notify


def fit(image_size: tuple[int, int], cells: tuple[int, int]) -> tuple[int, int]:
    """Pixel size (w, h) of the image scaled to fit ``cells`` (h even), keeping its aspect ratio."""
    iw, ih = image_size
    cw, ch = cells
    scale = min(cw / iw, 2 * ch / ih)
    w = max(1, min(cw, round(iw * scale)))
    h = max(2, min(2 * ch, round(ih * scale / 2) * 2))
    return w, h


class HalfBlockRenderer(HalfcellRenderer):
    """rich-pixels' half-cell renderer, faster: each cell's style is built from its two pixels
    (the stock renderer parses an "rgb(…) on rgb(…)" string per cell, 3/4 of its time), and
    ``between_rows`` is called after each row (the preview thread waits there while a key is pending).
    """

    def __init__(self, between_rows: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.between_rows = between_rows

    def render(self, image: Image.Image, resize: tuple[int, int] | None) -> list[Segment]:
        rgb = image.convert("RGB")
        width, height = resize or rgb.size
        height += height % 2
        if (width, height) != rgb.size:
            rgb = rgb.resize((width, height), Image.Resampling.NEAREST)
        data = rgb.tobytes()
        colors = [Color.from_rgb(*data[i:i + 3]) for i in range(0, len(data), 3)]
        segments: list[Segment] = []
        for top in range(0, len(colors), 2 * width):
            upper, lower = colors[top:top + width], colors[top + width:top + 2 * width]
            segments += [Segment("▄", Style.from_color(lo, up)) for up, lo in zip(upper, lower)]
            segments.append(Segment("\n"))
            if self.between_rows is not None:
                self.between_rows()
        return segments


def half_block_lines(image: Image.Image, cells: tuple[int, int], color_system: ColorSystem | None = None,
                     between_rows: Callable[[], None] | None = None) -> list[list[Segment]]:
    """Lines of half-block segments showing ``image`` fitted into ``cells`` (width, height).

    With ``color_system``, each cell's escape codes are rendered here too (Textual caches them on the
    style), so that the event loop, which paints the frame, only joins strings. ``between_rows`` is
    called after each row of both passes.
    """
    small = image.convert("RGB").resize(fit(image.size, cells), Image.Resampling.LANCZOS)
    pixels = Pixels.from_image(small, renderer=HalfBlockRenderer(between_rows))
    console = Console(file=io.StringIO(), color_system="truecolor", width=small.width + 1, legacy_windows=False)
    lines = [line for line in Segment.split_lines(console.render(pixels)) if line]
    if color_system is not None:
        for line in lines:
            for segment in line:
                Strip.render_ansi(segment.style, color_system)
            if between_rows is not None:
                between_rows()
    return lines


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
        if self.source is not None and self._cells_for() != self._cells:
            self._draw(self.source, self._cells_for(), self._color_system())

    @work(thread=True, exclusive=True, group="preview", exit_on_error=False)
    def _draw(self, source: Image.Image | str | Path, cells: tuple[int, int],
              color_system: ColorSystem | None) -> None:
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
        self._cells = cells
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
