"""Find usable training images in a folder and decode them as 8-bit RGB (PIL only, no torch).

Non-images, corrupt files, tiny images, broken links and special files are skipped with a
warning naming each file; hidden files and sub-folders are ignored; an error is raised when
none is left. Every place that trains on an image decodes it with ``open_rgb``.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from backend.errors import RequestError
from backend.input_images import open_quietly
from backend.safetext import first_line

if TYPE_CHECKING:
    import numpy as np

MIN_SIDE = 32  # absolute floor, pixels
FEW_IMAGES = 3  # below this, warn: 3-20 photos of the subject work best


@dataclass
class ImageScan:
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class ImageProblem(ValueError):
    """Why a file cannot be trained on; ``str()`` is a short phrase such as "broken link"."""


def min_side(resolution: int) -> int:
    """Shortest side worth training on: upscaling more than 4x gives mush."""
    return max(MIN_SIDE, resolution // 4)


def _full_scale(mode: str, values: np.ndarray) -> float:
    """The value that means white in a high-bit-depth grey image."""
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(values.max())
    if mode == "F":
        return 1.0 if peak <= 1 else 255.0
    return 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak  # "I": 8, 16 or more bits of data


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit, 32-bit and float greys are scaled, not clipped, to 0..255."""
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img.convert("RGB")
    import numpy as np  # here: the TUI imports this module and starts faster without numpy
    values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
    scaled = np.clip(np.rint(values * (255.0 / _full_scale(img.mode, values))), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """Decode ``path`` upright (EXIF orientation) as 8-bit RGB."""
    with open_quietly(path) as raw:
        return to_rgb(ImageOps.exif_transpose(raw))


def _file_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file (found without opening it: never reads a device or fifo)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "broken link" if path.is_symlink() else "missing"
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else f"cannot read ({exc.strerror})"
    return None if stat.S_ISREG(mode) else "not a regular file"


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of the decoded image at ``path``; ImageProblem when it cannot be trained on."""
    problem = _file_problem(path)
    if problem:
        raise ImageProblem(problem)
    try:
        with open_quietly(path) as img:
            img.verify()  # checks the file structure (e.g. PNG checksums)
        with open_rgb(path) as img:  # decodes as training will: catches truncated data
            return img.size
    except UnidentifiedImageError:
        raise ImageProblem("not an image") from None
    except Image.DecompressionBombError:
        raise ImageProblem("image too large to decode safely") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"corrupt image ({first_line(exc, 80)})") from None


def _problem(path: Path, smallest: int) -> str | None:
    """Why ``path`` cannot be used, or None when it is a good image."""
    try:
        width, height = check_image(path)
    except ImageProblem as exc:
        return str(exc)
    if min(width, height) < smallest:
        return f"too small ({width}x{height}; needs at least {smallest} px on the short side)"
    return None


def check_folder(folder: str | Path) -> Path:
    """``folder`` (the instance images) as a path, or a RequestError when it is missing or not a folder."""
    path = Path(os.path.expanduser(folder))
    if not os.path.exists(path):  # os.path's test reads an unusable path (too long a name) as missing
        raise RequestError("instance_dir", f"{folder} does not exist")
    if not os.path.isdir(path):
        raise RequestError("instance_dir", f"{folder} is not a folder")
    return path


def scan_images(folder: str | Path, resolution: int) -> ImageScan:
    """Usable images in ``folder`` (sorted), with a warning per skipped file and when there are few."""
    path = check_folder(folder)
    visible = [p for p in path.iterdir() if not p.name.startswith(".")]
    entries = sorted(p for p in visible if not p.is_dir())
    if not entries:
        what = "holds only folders, which are not read" if visible else "is empty"
        raise RequestError("instance_dir", f"{folder} {what}; put 3-20 photos of the subject there")
    scan, skipped = ImageScan(), []
    smallest = min_side(resolution)
    for entry in entries:
        problem = _problem(entry, smallest)
        if problem:
            skipped.append(f"{entry.name}: {problem}")
            scan.warnings.append(f"instance_dir: skipping {entry.name}: {problem}")
        else:
            scan.files.append(entry)
    if not scan.files:
        listed = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise RequestError("instance_dir", f"{folder} has no usable images ({listed})")
    if len(scan.files) < FEW_IMAGES:
        count = len(scan.files)
        scan.warnings.append(f"instance_dir: only {count} usable image{'s' if count > 1 else ''}; "
                             "3-20 photos of the subject work best")
    return scan
