"""Saving images: dated folders, atomic writes (temp file + link), never overwriting."""

from __future__ import annotations

import datetime as dt
import functools
import os
import tempfile
from pathlib import Path

from PIL import Image

from backend import metadata
from backend.errors import DreamttyError, RequestError


def check_writable(out_dir: Path) -> None:
    """Raise a one-line error when images cannot be written under ``out_dir``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DreamttyError(f"out: cannot create {out_dir}: {exc.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise DreamttyError(f"out: {out_dir} is not writable")


def day_folder(out_root: Path, now: dt.datetime | dt.date | None = None) -> Path:
    """Where the images of ``now`` (default today) go: ``out_root/YYYY-MM-DD``."""
    return out_root / (now or dt.date.today()).strftime("%Y-%m-%d")


def check_out_dir(out: Path) -> None:
    """Raise a one-line error unless images can be saved under ``out`` today (before queueing).

    Creates today's folder and a probe file in it, as saving will: permission bits and
    ``os.access`` do not tell (root, read-only or virtual file systems such as /sys).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise RequestError("out", f"{out} is a file; give a folder")
    folder = day_folder(out)
    check_writable(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DreamttyError(f"out: cannot write in {folder}: {exc.strerror}") from None


@functools.cache
def _umask() -> int:
    """This process's umask (reading it means setting it: once, before any worker thread writes files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_image(image: Image.Image, meta: dict, out_root: Path, now: dt.datetime | None = None) -> Path:
    """Write ``image`` with its metadata as ``out_root/YYYY-MM-DD/HHMMSS-SEED.png``.

    The PNG is written to a temp file, flushed to disk, then linked to a name
    that does not exist yet; on any error no partial file is left.
    """
    now = now or dt.datetime.now()
    folder = day_folder(out_root, now)
    check_writable(folder)
    stem = f"{now.strftime('%H%M%S')}-{meta['request']['seed']}"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)  # no *.png until complete
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: a picture is shared as the user's files are
            image.save(fh, format="PNG", pnginfo=metadata.png_info(meta))
            fh.flush()
            os.fsync(fh.fileno())
        for n in range(10_000):
            target = folder / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise DreamttyError(f"out: no free file name for {stem} in {folder}")
    except OSError as exc:
        raise DreamttyError(f"out: cannot save image in {folder}: {exc.strerror or exc}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
