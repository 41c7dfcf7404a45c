"""Input images and masks of the image-input kinds: read, checked and converted with PIL only (no torch).

The same reader runs at submission (so a bad file is refused before anything is queued) and in
the worker (which uses the pixels). What it does with each kind of file:

- missing, a folder, not a regular file (a device, a FIFO), unreadable, not an image, truncated or
  damaged: a one-line RequestError;
- larger than :data:`MAX_PIXELS` (also PIL's decompression-bomb guard) or :data:`MAX_BYTES`: refused;
- EXIF orientation: applied, so the picture is used the way viewers show it;
- animated (GIF, APNG, WebP): the first frame, with a warning;
- 16-bit (and a TIFF's 32-bit) channels: reduced to 8 bits, with a warning;
- grey, palette, CMYK, YCbCr: converted to RGB (CMYK with a warning: without colour management
  its colours may shift);
- transparency: composited on **white** (as most viewers show a transparent image and as Fooocus
  does), with a warning. A mask's transparency counts as black (keep), so a stroke painted on a
  transparent layer is the mask.

A mask is white (or any value above 127) where the image is repainted and black where it is kept. A
mask of another size than its image is resized (nearest neighbour) with a warning; an all-black or
all-white mask is refused. Every file's content hash (:func:`content_hash`) is recorded in the
request at submission, so a job that runs later, or ``reproduce``, can tell that a file changed.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import warnings as pywarnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from backend import user_files
from backend.errors import RequestError
from backend.safetext import first_line, one_line

if TYPE_CHECKING:
    import numpy as np  # imported where masks are made: not on the CLI's or the TUI's start path

MAX_PIXELS = 8192 * 8192  # an input image's pixels (its width times height)
MAX_BYTES = 512 * 1024 * 1024  # an input file's size
HASH_DIGITS = 12


@dataclass
class InputImage:
    """An input image (RGB) or mask (bool array, True = repaint), with what was done to read it."""

    path: str
    hash: str
    image: Image.Image  # RGB, orientation applied
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def content_hash(data: bytes) -> str:
    """Short SHA-256 of a file's bytes, as recorded in requests and image metadata."""
    return hashlib.sha256(data).hexdigest()[:HASH_DIGITS]


def _read_bytes(path: str, field_name: str) -> bytes:
    if not path:
        raise RequestError(field_name, "is empty; give an image file")
    try:
        return user_files.read_bytes(os.path.expanduser(path), MAX_BYTES)
    except OSError as exc:
        raise user_files.read_error(field_name, path, exc, "an image file") from None


def _check_hash(path: str, field_name: str, data: bytes, expected: str | None) -> str:
    digest = content_hash(data)
    if expected and digest != expected:
        raise RequestError(field_name, f"{path} changed since the job was made (hash {digest}, recorded {expected})")
    return digest


@contextmanager
def open_quietly(source) -> Iterator[Image.Image]:
    """``Image.open(source)`` (a path or a file), with PIL's DecompressionBombWarning (two lines on
    stderr) silenced while in use: images between PIL's pixel limit (about 89 MP) and twice that are
    the user's own (100 MP cameras exist). Beyond twice the limit PIL still raises DecompressionBombError."""
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pywarnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": said where the image is used
        with Image.open(source) as img:
            yield img


# What PIL raises for a file it cannot open or decode (UnidentifiedImageError is an OSError).
UNREADABLE = (Image.DecompressionBombWarning, Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError,
              IndexError, KeyError, TypeError, struct.error)  # the last four: a GIF or TIFF cut short


def unreadable(field_name: str, path: object, exc: BaseException) -> RequestError:
    """The one-line error for an image PIL could not open or decode (``exc``, one of UNREADABLE)."""
    if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        return RequestError(field_name, f"{path} is too large to decode safely; allowed up to "
                                        f"{MAX_PIXELS / 1e6:.0f} megapixels")
    if isinstance(exc, UnidentifiedImageError):  # its text names PIL's file object, not the path
        return RequestError(field_name, f"{path} is not an image PIL can read (PNG, JPEG, WebP, ...)")
    return RequestError(field_name, f"{path} is truncated or damaged: {first_line(exc, empty='cannot decode')}")


def _open(path: str, field_name: str, data: bytes) -> tuple[Image.Image, list[str]]:
    """The first frame, fully decoded, oriented; warnings for what was dropped."""
    notes: list[str] = []
    try:
        with pywarnings.catch_warnings(record=True) as caught:  # PIL's "Corrupt EXIF data": a note, never stderr
            pywarnings.simplefilter("always", UserWarning)
            pywarnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise RequestError(field_name,
                                   f"{path} is {width}x{height}; allowed up to {MAX_PIXELS / 1e6:.0f} megapixels")
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                img.seek(0)
                notes.append(f"{path} is animated ({frames} frames): the first frame is used")
            depth = _deep_channels(img)
            if depth:
                notes.append(f"{path} has {depth} channels: reduced to 8 bits")
            unsigned = _unsigned_32(img)
            img.load()
            if unsigned:  # Pillow holds them as signed: half the range would wrap below zero (black)
                img = _eight_bit(img, unsigned=True)
            ImageOps.exif_transpose(img, in_place=True)
        notes += [f"{path}: {one_line(first_line(w.message))} (its orientation may not be applied)"
                  for w in caught if issubclass(w.category, UserWarning)]
        return img, notes
    except RequestError:
        raise
    except UNREADABLE as exc:
        raise unreadable(field_name, path, exc) from None


def _deep_channels(img: Image.Image) -> str | None:
    """How deep a channel is when deeper than 8 bits (read before loading): a 16-bit PNG opens as
    I;16 or I (grey) or RGB, with a raw mode like RGB;16B in its tile; a TIFF may hold 32-bit ints (I)
    or floats (F)."""
    for tile in getattr(img, "tile", None) or []:
        args = tile.args
        if ";16" in str(args if isinstance(args, str) else (args or ("",))[0]):
            return "16-bit"
    return {"I": "32-bit integer", "F": "32-bit float"}.get(img.mode, "16-bit" if img.mode.startswith("I;16") else None)


def _unsigned_32(img: Image.Image) -> bool:
    """Whether ``img`` (not yet loaded) holds unsigned 32-bit integers (a TIFF's; Pillow's raw modes I;32 and
    I;32N, where the signed ones are I;32S and I;32BS)."""
    modes = (tile.args if isinstance(tile.args, str) else (tile.args or ("",))[0] for tile in img.tile or [])
    return img.mode == "I" and any(str(m).startswith("I;32") and "S" not in str(m) for m in modes)


STRIP_ROWS = 1024  # rows converted at a time: an 8192-wide strip of float32 is 32 MB


def _eight_bit(img: Image.Image, unsigned: bool = False) -> Image.Image:
    """Grey 16-bit, 32-bit integer and float images as 8-bit grey, scaled from their range (0..65535; 32-bit
    integers above that: 0..2³¹-1, or 0..2³²-1 when ``unsigned``; floats of 0..1; 0..255 when no value is
    above) with what lies outside clipped (NaN: black), a strip of rows at a time: a 67-megapixel scan costs
    its pixels and a strip, not eight bytes a pixel."""
    import numpy as np

    values = np.asarray(img).view(np.uint32) if unsigned else np.asarray(img)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    brightest = float(finite.max(initial=0))
    top = 65535.0 if img.mode.startswith("I;16") or brightest > 255 else 255.0
    if img.mode == "I" and brightest > 65535:
        top = float(2**32 - 1 if unsigned else 2**31 - 1)
    if img.mode == "F" and brightest <= 1.0:
        top = 1.0
    grey = np.empty(values.shape, dtype=np.uint8)
    for row in range(0, values.shape[0], STRIP_ROWS):
        strip = values[row:row + STRIP_ROWS].astype(np.float32) * np.float32(255 / top)
        grey[row:row + STRIP_ROWS] = np.clip(np.round(np.nan_to_num(strip, copy=False)), 0, 255)
    return Image.fromarray(grey, "L")


def _has_transparency(img: Image.Image) -> bool:
    """Whether some pixel is less than opaque: a palette's transparent colour counts where a pixel has it, and
    LAB's "A" band is a colour, not alpha."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return False
    return img.getchannel("A").getextrema()[0] < 255


def _to_rgb(img: Image.Image, path: str, background: tuple[int, int, int], notes: list[str], say_alpha: bool) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        img = _eight_bit(img)
    if img.mode == "CMYK":
        notes.append(f"{path} is CMYK: converted to RGB without colour management (colours may shift)")
    if _has_transparency(img):
        if say_alpha:
            notes.append(f"{path} has transparency: composited on white")
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba)  # blends by the alpha channel, as alpha_composite on an opaque canvas
        return canvas
    return img if img.mode == "RGB" else img.convert("RGB")


# Images decoded at once: a service checks each submission's inputs in a thread of its own, and a
# 67-megapixel input costs about half a GB while it is decoded and converted.
_DECODING = threading.BoundedSemaphore(2)


def read_image(path: str, field_name: str = "image", expected_hash: str | None = None) -> InputImage:
    """The image at ``path`` as RGB; RequestError(field_name) when it cannot be used or changed."""
    data = _read_bytes(path, field_name)
    digest = _check_hash(path, field_name, data, expected_hash)
    with _DECODING:
        img, notes = _open(path, field_name, data)
        return InputImage(path, digest, _to_rgb(img, path, (255, 255, 255), notes, say_alpha=True), notes)


def read_mask(path: str, size: tuple[int, int], expected_hash: str | None = None) -> tuple[np.ndarray, InputImage]:
    """The mask at ``path`` for an image of ``size``: a bool array (True = repaint), and the file read."""
    data = _read_bytes(path, "mask")
    digest = _check_hash(path, "mask", data, expected_hash)
    with _DECODING:
        img, notes = _open(path, "mask", data)
        grey = _to_rgb(img, path, (0, 0, 0), notes, say_alpha=False).convert("L")
    notes = [f"mask: {note}" for note in notes]  # said beside the input image's own
    what = path
    if grey.size != size:
        notes.append(f"mask: {path} is {grey.width}x{grey.height}: resized to the image's {size[0]}x{size[1]}")
        grey = grey.resize(size, Image.Resampling.NEAREST)
        what = f"{path} resized to the image's {size[0]}x{size[1]}"  # its few white pixels may be gone
    import numpy as np

    mask = np.asarray(grey) > 127
    check_mask(mask, what)
    return mask, InputImage(path, digest, grey, notes)


def check_mask(mask: np.ndarray, what: str) -> None:
    """RequestError("mask") for a mask that repaints nothing or everything."""
    if not mask.any():
        raise RequestError("mask", f"{what} is all black: nothing to repaint (white = repaint, black = keep)")
    if mask.all():
        raise RequestError("mask", f"{what} is all white: every pixel would be repainted; use vary for that")


def box_mask(box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The mask of rectangle ``box`` = (x, y, w, h) on an image of ``size``; RequestError("box") when it lies outside."""
    x, y, w, h = box
    width, height = size
    if w <= 0 or h <= 0:
        raise RequestError("box", f"{w}x{h} is empty; give X,Y,W,H with W and H > 0")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise RequestError("box", f"{x},{y},{w},{h} is not inside the {width}x{height} image")
    if (w, h) == size:
        raise RequestError("box", f"{x},{y},{w},{h} is the whole {width}x{height} image: every pixel would be "
                                  "repainted; use vary for that")
    import numpy as np

    mask = np.zeros((height, width), dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask
