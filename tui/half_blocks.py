"""Images as lines of half-block cells (rich-pixels), scaled with LANCZOS.

rich-pixels resizes with nearest-neighbour, which aliases; so the image is first scaled with PIL's
LANCZOS filter to exactly the cells (one cell = one pixel wide, two pixels tall).
"""

from __future__ import annotations

import io
from typing import Callable

from PIL import Image
from rich.color import Color, ColorSystem
from rich.console import Console
from rich.segment import Segment
from rich.style import Style
from rich_pixels import HalfcellRenderer, Pixels
from textual.strip import Strip


def fit(image_size: tuple[int, int], cells: tuple[int, int]) -> tuple[int, int]:
    """Pixel size (w, h) of the image scaled to fit ``cells`` (h even), keeping its aspect ratio."""
    iw, ih = image_size
    cw, ch = cells
    scale = min(cw / iw, 2 * ch / ih)
    w = max(1, min(cw, round(iw * scale)))
    h = max(2, min(2 * ch, round(ih * scale / 2) * 2))
    return w, h


def half_block_row(upper: list[Color], lower: list[Color]) -> list[Segment]:
    """Two rows of pixels as one row of cells: a lower half block in the lower pixel's colour, on the upper's."""
    return [Segment("▄", Style.from_color(lo, up)) for up, lo in zip(upper, lower)]


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
            segments += half_block_row(colors[top:top + width], colors[top + width:top + 2 * width])
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
