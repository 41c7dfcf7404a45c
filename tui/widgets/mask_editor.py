"""The mask editor: a modal screen where the user paints, on the image drawn in half-blocks, the part
that inpaint repaints; by keyboard (a brush moved with arrows or hjkl), or with the mouse where the
terminal sends mouse events. How cells map to image pixels: :mod:`tui.mask`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image
from rich.color import Color
from rich.segment import Segment
from textual import events, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Label, Static

from backend.errors import DreamttyError, RequestError
from backend.input_images import read_image, read_mask
from backend.jobkinds.inpaint import MAX_FEATHER, InpaintRequest
from tui import keymap
from tui.half_blocks import half_block_row
from tui.mask import Mask, Mapping, block, cell_pixels, disc, line, preview_size
from tui.text import plain
from tui.widgets.footer import KeysFooter

BIG_STEP = 8  # preview pixels a shifted move goes
FEATHER_STEP = 4
MAX_RADIUS = 32
# The mask overlay: diagonal stripes of two reds at MASK_ALPHA, seen on any picture (a red one too).
MASK_TINTS = np.array([[255, 40, 40], [70, 0, 0]], dtype=np.float32)
MASK_ALPHA = 0.6
BRUSH_TINT = np.array([255, 230, 0], dtype=np.float32)
SELECTION_TINT = np.array([0, 200, 255], dtype=np.float32)
PENS = (None, True, False)  # pen up, painting, erasing


class MaskResult(NamedTuple):
    path: Path  # the saved mask, white = repaint
    feather: int  # pixels over which the repainted area fades in (the inpaint request's ``feather``)


def read_for_editing(image: str, mask: str | None) -> tuple[Image.Image, np.ndarray | None]:
    """The image as a job reads it (oriented, RGB; RequestError("image") when it cannot be used) and the
    mask to start from: ``mask`` when it is a usable mask of that image, else None. Reads files: call
    it in a thread."""
    source = read_image(image)
    if source.size[1] < 2:  # a cell shows two pixel rows, and the preview is never taller than the image
        raise RequestError("image", f"{image} is {source.size[0]}x{source.size[1]}: the mask editor needs at least "
                                    "2 pixel rows; give a box instead")
    try:
        start = read_mask(mask, source.size)[0] if mask else None
    except RequestError:
        start = None  # a missing or blank mask: start from none (the Mask field says why when queueing)
    return source.image, start


def open_mask_editor(node: Widget, image: str, mask: str | None, feather: int,
                     failed: Callable[[DreamttyError], None], done: Callable[[MaskResult], None]) -> None:
    """Read ``image`` (and the ``mask`` to start from) in a thread, then open the editor on it, saving under
    the app's ``masks_dir``: ``done`` gets the saved mask, ``failed`` the error when the image cannot be used."""

    def read() -> None:
        try:
            picture, start = read_for_editing(image, mask)
        except DreamttyError as exc:
            node.app.call_from_thread(failed, exc)
            return
        node.app.call_from_thread(push, picture, start)

    def push(picture: Image.Image, start: np.ndarray | None) -> None:
        editor = MaskEditor(picture, Path(image).name, node.app.masks_dir, start, feather)
        node.app.push_screen(editor, closed)

    def closed(result: MaskResult | None) -> None:
        if result is not None:  # else cancelled
            done(result)

    node.run_worker(read, thread=True, exclusive=True, group="mask-editor", exit_on_error=False)


def _rescaled(point: tuple[int, int], old: tuple[int, int], new: tuple[int, int]) -> tuple[int, int]:
    """A preview pixel moved to the same place of a preview of another size."""
    return min(point[0] * new[0] // old[0], new[0] - 1), min(point[1] * new[1] // old[1], new[1] - 1)


class MaskCanvas(Widget):
    """The image's preview, centred, with the mask overlaid in red stripes, the brush in yellow and the
    rectangle being selected in blue. Cursor and brush are in preview pixels."""

    DEFAULT_CSS = "MaskCanvas { width: 1fr; height: 1fr; }"

    class Changed(Message):
        """The mask, the brush or the selection changed."""

    def __init__(self, image: Image.Image, mask: np.ndarray | None, id: str | None = None) -> None:
        super().__init__(id=id)
        self.image = image
        self.mask = Mask(image.size, start=mask)
        self.cursor = (0, 0)
        self.radius = 2
        self.pen: bool | None = None  # True paints and False erases where the brush moves
        self.anchor: tuple[int, int] | None = None  # a rectangle's first corner
        self.drag: bool | None = None  # the mouse button held: True paints, False erases
        self._base: np.ndarray | None = None  # the preview's pixels (h, w, 3)
        self._tint: np.ndarray | None = None  # the mask's colour at each preview pixel (h, w, 3)
        self._strips: dict[int, Strip] = {}
        self._scaling = False  # a preview of another size is being made: edits wait for it
        self._wanted: tuple[int, int] | None = None  # the preview size last asked for (an older one may come late)

    @property
    def ready(self) -> bool:
        """Whether the preview is drawn at the current size (the brush works in its pixels)."""
        return self._base is not None and not self._scaling

    # -- geometry --------------------------------------------------------------
    def on_resize(self) -> None:
        size = preview_size(self.image.size, (self.size.width, self.size.height))
        if self._base is None or size != self.mask.preview_size:
            self._scaling, self._wanted = True, size
            self._scale(size)
        else:  # the same preview, centred anew
            self.changed()

    @work(thread=True, exclusive=True, group="mask-preview", exit_on_error=False)
    def _scale(self, size: tuple[int, int]) -> None:
        """The preview's pixels and the mask's mapping onto them (a full pass over a large mask: no edit is made
        meanwhile)."""
        base = np.asarray(self.image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
        self.app.call_from_thread(self._scaled, base, self.mask.mapping(size))

    def _scaled(self, base: np.ndarray, mapping: Mapping) -> None:
        if mapping.size != self._wanted:
            return  # made for a size the canvas had before a later resize (a thread is not stopped)
        old, size = self.mask.preview_size, mapping.size
        self.mask.use(mapping)
        self._base, self._scaling = base, False
        rows, columns = np.mgrid[0:size[1], 0:size[0]]
        self._tint = MASK_TINTS[(rows + columns) // 2 % 2]
        if old is None:
            self.cursor = (size[0] // 2, size[1] // 2)
        else:  # the same places on the image
            self.cursor = _rescaled(self.cursor, old, size)
            self.anchor = None if self.anchor is None else _rescaled(self.anchor, old, size)
        self.changed()

    @property
    def offset(self) -> tuple[int, int]:
        """Cells (columns, rows) left of and above the centred preview."""
        width, height = self.mask.preview_size
        return max(0, (self.size.width - width) // 2), max(0, (self.size.height - height // 2) // 2)

    # -- editing ---------------------------------------------------------------
    def move(self, dx: int, dy: int) -> None:
        """Move the brush by (dx, dy) preview pixels; with the pen down, paint or erase along the way."""
        if not self.ready:
            return
        width, height = self.mask.preview_size
        start = self.cursor
        self.cursor = (min(max(start[0] + dx, 0), width - 1), min(max(start[1] + dy, 0), height - 1))
        if self.pen is not None:
            self.mask.paint(line(start, self.cursor), self.radius, self.pen)
        self.changed()

    def stroke(self, value: bool) -> None:
        """Paint (or erase) under the brush, or the whole rectangle being selected (which ends it)."""
        if not self.ready:
            return
        if self.anchor is not None:
            self.mask.fill_rectangle(self.anchor, self.cursor, value)
            self.anchor = None
        else:
            self.mask.paint([self.cursor], self.radius, value)
        self.changed()

    def edit(self, change: Callable[[Mask], None]) -> None:
        """Apply ``change`` to the mask (once the preview is ready)."""
        if self.ready:
            change(self.mask)
            self.changed()

    def changed(self) -> None:
        self._strips.clear()
        self.refresh()
        self.post_message(self.Changed())

    # -- mouse -----------------------------------------------------------------
    def _pixels_at(self, event: events.MouseEvent) -> list[tuple[int, int]] | None:
        ox, oy = self.offset
        width, height = self.mask.preview_size
        column, row = event.x - ox, event.y - oy
        if not (0 <= column < width and 0 <= row < height // 2):
            return None
        return list(cell_pixels(column, row))

    def _drag_to(self, event: events.MouseEvent) -> None:
        if self.drag is None or not self.ready:
            return
        pixels = self._pixels_at(event)
        if pixels is None:
            return
        self.cursor = pixels[0]
        self.mask.paint(pixels, self.radius, self.drag)
        self.changed()

    def on_mouse_down(self, event: events.MouseDown) -> None:
        self.drag = event.button != 3  # the right button erases
        self.capture_mouse()
        self._drag_to(event)

    def on_mouse_move(self, event: events.MouseMove) -> None:
        self._drag_to(event)

    def on_mouse_up(self, event: events.MouseUp) -> None:
        self.drag = None
        self.release_mouse()

    # -- drawing ---------------------------------------------------------------
    def _frame(self) -> np.ndarray:
        """The preview's pixels with the mask, the selection and the brush blended in (h, w, 3 bytes)."""
        frame = self._base.copy()
        alpha = (self.mask.coverage() * MASK_ALPHA)[..., None]
        frame = frame * (1 - alpha) + self._tint * alpha
        width, height = self.mask.preview_size
        if self.anchor is not None:
            (x0, x1), (y0, y1) = sorted((self.anchor[0], self.cursor[0])), sorted((self.anchor[1], self.cursor[1]))
            frame[y0:y1 + 1, x0:x1 + 1] = frame[y0:y1 + 1, x0:x1 + 1] * 0.6 + SELECTION_TINT * 0.4
        x, y = self.cursor
        for dx, dy in disc(self.radius):
            if 0 <= x + dx < width and 0 <= y + dy < height:
                frame[y + dy, x + dx] = frame[y + dy, x + dx] * 0.4 + BRUSH_TINT * 0.6
        return np.clip(frame + 0.5, 0, 255).astype(np.uint8)

    def render_line(self, y: int) -> Strip:
        if self._base is None:
            return Strip.blank(self.size.width, self.rich_style)
        if not self._strips:
            self._strips = self._render_strips()
        return self._strips.get(y) or Strip.blank(self.size.width, self.rich_style)

    def _render_strips(self) -> dict[int, Strip]:
        frame = self._frame()
        ox, oy = self.offset
        style = self.rich_style
        strips = {}
        for row in range(frame.shape[0] // 2):
            upper, lower = ([Color.from_rgb(*p) for p in pixels.tolist()] for pixels in frame[2 * row:2 * row + 2])
            cells = half_block_row(upper, lower)
            strips[oy + row] = Strip([Segment(" " * ox, style), *cells]).extend_cell_length(self.size.width, style)
        return strips


class MaskEditor(ModalScreen[MaskResult | None]):
    """Paint a mask on ``image`` (starting from ``mask``); enter saves it under ``folder`` and dismisses with
    a :class:`MaskResult`, escape dismisses with None. An empty or full mask is refused in one line."""

    DEFAULT_CSS = """
    MaskEditor { background: $surface; }
    #mask-editor { height: 1fr; padding: 0 1; }
    #mask-title { text-style: bold; }
    #mask-status { height: 2; color: $text-muted; }  /* fixed heights: the canvas keeps its size as they change */
    #mask-error { height: 1; color: $error; }
    #mask-keys { height: auto; color: $text-muted; }
    """
    BINDINGS = keymap.bindings(keymap.MASK_KEYS)

    def __init__(self, image: Image.Image, name: str, folder: Path, mask: np.ndarray | None = None,
                 feather: int = InpaintRequest.feather) -> None:
        super().__init__()
        self.image = image
        self.image_name = name
        self.folder = folder
        self.start = mask
        self.feather = feather

    def compose(self) -> ComposeResult:
        with Vertical(id="mask-editor"):
            yield Label(plain(f"Mask for {self.image_name}: red stripes are repainted"), id="mask-title")
            yield MaskCanvas(self.image, self.start, id="mask-canvas")
            yield Static("", id="mask-status")
            yield Static("", id="mask-error")
            yield Static(plain(self._keys_help()), id="mask-keys")
        yield KeysFooter()

    def _keys_help(self) -> str:
        """Every key of the editor, as the user's keymap has them: moves first, then the rest."""
        key = self.app.key_for
        moves = [key(f"mask.{d}") for d in ("left", "right", "up", "down")]
        far = [key(f"mask.far_{d}") for d in ("left", "right", "up", "down")]
        far_text = "shift" if far == [f"shift+{m}" for m in moves] else "/".join(far)
        rest = [f"{key(k.id)} {k.description.lower()}" for k in keymap.MASK_KEYS if not k.action.startswith("move")]
        return " · ".join([f"{'/'.join(moves)} move ({far_text}: {BIG_STEP})", *rest])

    @property
    def canvas(self) -> MaskCanvas:
        return self.query_one(MaskCanvas)

    def on_mask_canvas_changed(self) -> None:
        self._show_status()

    def _show_status(self, error: str = "") -> None:
        canvas = self.canvas
        if not canvas.ready:
            return
        x, y = canvas.cursor
        width, height = canvas.mask.preview_size
        image_w, image_h = canvas.mask.image_size
        pen = {None: "up", True: "painting", False: "erasing"}[canvas.pen]
        at = block(x, image_w, width).start, block(y, image_h, height).start
        parts = [f"brush at {at[0]},{at[1]} px", f"size {2 * canvas.radius + 1}",
                 f"pen {pen}", f"feather {self.feather} px", f"{canvas.mask.share():.1%} masked"]
        if canvas.anchor is not None:
            parts.append("rectangle: paint or erase fills it")
        self.query_one("#mask-status", Static).update(plain(" · ".join(parts)))
        self.query_one("#mask-error", Static).update(plain(error))

    # -- actions ---------------------------------------------------------------
    def action_move(self, dx: int, dy: int) -> None:
        self.canvas.move(dx, dy)

    def action_move_far(self, dx: int, dy: int) -> None:
        self.canvas.move(dx * BIG_STEP, dy * BIG_STEP)

    def action_stroke(self, value: bool) -> None:
        self.canvas.stroke(value)

    def action_pen(self) -> None:
        canvas = self.canvas
        canvas.pen = PENS[(PENS.index(canvas.pen) + 1) % len(PENS)]
        if canvas.pen is not None:
            canvas.stroke(canvas.pen)
        else:
            canvas.changed()

    def action_brush(self, step: int) -> None:
        self.canvas.radius = min(max(self.canvas.radius + step, 0), MAX_RADIUS)
        self.canvas.changed()

    def action_rectangle(self) -> None:
        canvas = self.canvas
        canvas.anchor = None if canvas.anchor is not None else canvas.cursor
        canvas.changed()

    def action_invert(self) -> None:
        self.canvas.edit(Mask.invert)

    def action_clear(self) -> None:
        self.canvas.edit(Mask.clear)

    def action_feather(self, step: int) -> None:
        self.feather = min(max(self.feather + step * FEATHER_STEP, 0), MAX_FEATHER)
        self._show_status()

    def action_apply(self) -> None:
        mask = self.canvas.mask
        self._save(Mask(mask.image_size, start=mask.pixels))  # a copy: painting may go on meanwhile

    def action_cancel(self) -> None:
        self.dismiss(None)

    @work(thread=True, exclusive=True, group="mask-save", exit_on_error=False)
    def _save(self, mask: Mask) -> None:
        try:
            path = mask.save(self.folder)
        except RequestError as exc:
            self.app.call_from_thread(self._show_status, exc.message)
        except OSError as exc:
            message = f"cannot write the mask in {self.folder}: {exc.strerror or exc}"
            self.app.call_from_thread(self._show_status, message)
        else:
            self.app.call_from_thread(self.dismiss, MaskResult(path, self.feather))
