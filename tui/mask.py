"""An inpaint mask painted on a scaled preview of its image, kept and saved at the image's own size.

Coordinates. The image, ``W×H`` pixels, is shown scaled to a preview of ``w×h`` pixels
(:func:`preview_size`: never enlarged, ``h`` even) drawn in half-block cells: a cell is one column and
two preview pixel rows, the upper pixel the cell's background and the lower one the foreground of
``▄``. So:

- cell (column ``c``, row ``r``) shows preview pixels ``(c, 2r)`` and ``(c, 2r + 1)``;
- image pixel ``(x, y)`` belongs to preview pixel ``(x·w // W, y·h // H)``;
- preview pixel ``(px, py)`` covers the image pixels ``x`` in ``[⌈px·W/w⌉, ⌈(px+1)·W/w⌉)`` and ``y`` in
  ``[⌈py·H/h⌉, ⌈(py+1)·H/h⌉)`` (every image pixel belongs to exactly one preview pixel).

The brush paints preview pixels, and each one painted sets its whole block of image pixels: what is
painted is what is shown. The saved mask is a PNG of the image's size, white where inpaint repaints.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from backend.input_images import check_mask, content_hash


def preview_size(image_size: tuple[int, int], cells: tuple[int, int]) -> tuple[int, int]:
    """The preview's pixel size (w, h): the image scaled to fit ``cells`` (columns, rows of two pixels), its
    aspect kept, never enlarged (so every preview pixel covers at least one image pixel), ``h`` even."""
    (iw, ih), (cw, ch) = image_size, cells
    scale = min(1.0, cw / iw, 2 * ch / ih)
    return max(1, min(cw, int(iw * scale))), max(2, min(2 * ch, int(ih * scale) // 2 * 2))


def preview_index(size: int, preview: int) -> np.ndarray:
    """For each of ``size`` image pixels along one axis, the preview pixel it belongs to (``x·w // W``)."""
    return np.arange(size) * preview // size


def block(index: int, size: int, preview: int) -> range:
    """The image pixels along one axis that preview pixel ``index`` covers: ``[⌈i·W/w⌉, ⌈(i+1)·W/w⌉)``."""
    return range(-(-index * size // preview), -(-(index + 1) * size // preview))


def cell_pixels(column: int, row: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two preview pixels (x, y) a half-block cell shows: upper, then lower."""
    return (column, 2 * row), (column, 2 * row + 1)


def disc(radius: int) -> list[tuple[int, int]]:
    """Offsets (dx, dy) of a round brush: every pixel within ``radius`` of the centre (0: one pixel)."""
    return [(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
            if dx * dx + dy * dy <= radius * radius + radius]  # + radius: round, not diamond-like, at small sizes


def line(start: tuple[int, int], end: tuple[int, int]) -> list[tuple[int, int]]:
    """The pixels from ``start`` to ``end`` (both included), one step at a time along the longer axis."""
    (x0, y0), (x1, y1) = start, end
    steps = max(abs(x1 - x0), abs(y1 - y0))
    if steps == 0:
        return [start]
    return [(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)) for i in range(steps + 1)]


@dataclass(frozen=True)
class Mapping:
    """How a mask's pixels map onto a preview of ``size``, and how much of each preview pixel is masked."""

    size: tuple[int, int]  # (w, h)
    columns: np.ndarray  # the preview column of each image column (x·w // W)
    rows: np.ndarray
    counts: np.ndarray  # image pixels per preview pixel (h, w)
    coverage: np.ndarray  # the share of each preview pixel's block that is masked, 0..1 (h, w)


class Mask:
    """A mask of an ``image_size`` image (True = repaint), edited through a preview (:attr:`preview_size`).

    An edit touches only the image pixels under it, and the coverage of each preview pixel (which the
    editor draws) is kept up to date as it goes: a large image costs a full pass only for a new preview
    size (:meth:`mapping`, which can run in a thread while no edit is made)."""

    def __init__(self, image_size: tuple[int, int], preview_size: tuple[int, int] | None = None,
                 start: np.ndarray | None = None) -> None:
        width, height = image_size
        self.pixels = np.zeros((height, width), dtype=bool) if start is None else np.array(start, dtype=bool)
        self._map: Mapping | None = None
        if preview_size is not None:
            self.preview_size = preview_size

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def preview_size(self) -> tuple[int, int] | None:
        return None if self._map is None else self._map.size

    @preview_size.setter
    def preview_size(self, size: tuple[int, int]) -> None:
        self.use(self.mapping(size))

    def mapping(self, size: tuple[int, int]) -> Mapping:
        """The mapping onto a preview of ``size`` (w, h), with the coverage of the mask as it is now."""
        (width, height), (w, h) = self.image_size, size
        starts_x = [block(i, width, w).start for i in range(w)]
        starts_y = [block(i, height, h).start for i in range(h)]
        counts = np.outer(np.diff([*starts_y, height]), np.diff([*starts_x, width]))
        sums = np.add.reduceat(np.add.reduceat(self.pixels, starts_y, axis=0, dtype=np.int64), starts_x, axis=1)
        return Mapping(size, preview_index(width, w), preview_index(height, h), counts, sums / np.maximum(counts, 1))

    def use(self, mapping: Mapping) -> None:
        """Edit through ``mapping`` from now on (the terminal was resized: the mask stays, the mapping changes)."""
        self._map = mapping

    def set_preview_pixels(self, corner: tuple[int, int], painted: np.ndarray, value: bool) -> None:
        """Set (or clear) the image pixels of each preview pixel that is True in ``painted``, a bool array whose
        first element is preview pixel ``corner`` (x, y)."""
        (x0, y0), (ph, pw), (width, height), (w, h) = corner, painted.shape, self.image_size, self._map.size
        left, right = block(x0, width, w).start, block(x0 + pw - 1, width, w).stop
        top, bottom = block(y0, height, h).start, block(y0 + ph - 1, height, h).stop
        blocks = painted[np.ix_(self._map.rows[top:bottom] - y0, self._map.columns[left:right] - x0)]
        self.pixels[top:bottom, left:right][blocks] = value
        self._map.coverage[y0:y0 + ph, x0:x0 + pw][painted] = float(value)

    def paint(self, points: list[tuple[int, int]], radius: int, value: bool = True) -> None:
        """Paint (or erase) a round brush of ``radius`` preview pixels at each of ``points``."""
        width, height = self.preview_size
        touched = {(x + dx, y + dy) for x, y in points for dx, dy in disc(radius)
                   if 0 <= x + dx < width and 0 <= y + dy < height}
        if not touched:
            return
        xs, ys = [x for x, _ in touched], [y for _, y in touched]
        painted = np.zeros((max(ys) - min(ys) + 1, max(xs) - min(xs) + 1), dtype=bool)
        painted[np.array(ys) - min(ys), np.array(xs) - min(xs)] = True
        self.set_preview_pixels((min(xs), min(ys)), painted, value)

    def fill_rectangle(self, corner: tuple[int, int], other: tuple[int, int], value: bool = True) -> None:
        """Set (or clear) the preview pixels of the rectangle between two corners (both included)."""
        width, height = self.preview_size
        (x0, x1), (y0, y1) = sorted((corner[0], other[0])), sorted((corner[1], other[1]))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width - 1, x1), min(height - 1, y1)
        if x0 <= x1 and y0 <= y1:
            self.set_preview_pixels((x0, y0), np.ones((y1 - y0 + 1, x1 - x0 + 1), dtype=bool), value)

    def invert(self) -> None:
        np.logical_not(self.pixels, out=self.pixels)
        np.subtract(1.0, self._map.coverage, out=self._map.coverage)

    def clear(self) -> None:
        self.pixels[:] = False
        self._map.coverage[:] = 0.0

    def coverage(self) -> np.ndarray:
        """The share of each preview pixel's block that is masked, 0..1 (h×w floats)."""
        return self._map.coverage

    def share(self) -> float:
        """The share of the image that is masked, 0..1."""
        return float((self._map.coverage * self._map.counts).sum() / self.pixels.size)

    def png(self) -> bytes:
        """The mask as a PNG: white (255) where inpaint repaints, black elsewhere."""
        out = io.BytesIO()
        Image.fromarray(self.pixels.astype(np.uint8) * 255, "L").save(out, format="PNG")
        return out.getvalue()

    def save(self, folder: Path) -> Path:
        """Write the mask as ``folder/<content hash>.png`` (once per content, atomically) and return its path.

        RequestError("mask") for an all-black or all-white mask (inpaint refuses them); OSError when the
        folder cannot be written."""
        check_mask(self.pixels, "the painted mask")
        data = self.png()
        path = folder / f"{content_hash(data)}.png"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return path
