"""Find usable training images in a folder (PIL only, no torch).

Non-images, corrupt files and tiny images are skipped with a warning naming each file;
an error is raised when none is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from backend.errors import RequestError

MIN_SIDE = 32  # absolute floor, pixels


@dataclass
class ImageScan:
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def min_side(resolution: int) -> int:
    """Shortest side worth training on: upscaling more than 4x gives mush."""
    return max(MIN_SIDE, resolution // 4)


def _problem(path: Path, smallest: int) -> str | None:
    """Why ``path`` cannot be used, or None when it is a good image."""
    try:
        with Image.open(path) as img:
            img.verify()  # checks the file structure without decoding all pixels
        with Image.open(path) as img:
            img.load()  # decodes: catches truncated data
            width, height = img.size
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt image ({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})"
    except Image.DecompressionBombError:
        return "image too large to decode safely"
    if min(width, height) < smallest:
        return f"too small ({width}x{height}; needs at least {smallest} px on the short side)"
    return None


def check_folder(folder: str | Path, field_name: str = "instance_dir") -> Path:
    """``folder`` as a path, or a RequestError when it is missing or not a folder."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise RequestError(field_name, f"{folder} does not exist")
    if not path.is_dir():
        raise RequestError(field_name, f"{folder} is not a folder")
    return path


def scan_images(folder: str | Path, resolution: int, field_name: str = "instance_dir") -> ImageScan:
    """Usable images in ``folder`` (sorted), with a warning per skipped file."""
    path = check_folder(folder, field_name)
    entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not entries:
        raise RequestError(field_name, f"{folder} is empty; put 3-20 photos of the subject there")
    scan, skipped = ImageScan(), []
    smallest = min_side(resolution)
    for entry in entries:
        problem = _problem(entry, smallest)
        if problem:
            skipped.append(f"{entry.name}: {problem}")
            scan.warnings.append(f"{field_name}: skipping {entry.name}: {problem}")
        else:
            scan.files.append(entry)
    if not scan.files:
        listed = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        raise RequestError(field_name, f"{folder} has no usable images ({listed})")
    return scan
