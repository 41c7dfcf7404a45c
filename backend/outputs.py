"""Saving images: dated folders, atomic writes (temp file + link), never overwriting."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from backend import metadata
from backend.errors import DreamttyError, RequestError
from backend.values import check_text

SAVING = ".saving"  # under an outputs folder: the images being written, as temp files


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


def check_out_dir(out: Path, create: bool = True) -> None:
    """Raise a one-line error unless images can be saved under ``out`` today (before queueing).

    Creates today's folder and a probe file in it, as saving will: permission bits and
    ``os.access`` do not tell (root, read-only or virtual file systems such as /sys). Without
    ``create`` (a dry run) nothing is left behind: the probe is made in the nearest folder that exists.
    """
    check_text("out", str(out))  # the queue records each image's path as UTF-8 text
    if os.path.exists(out) and not os.path.isdir(out):
        raise RequestError("out", f"{out} is a file; give a folder")
    folder = day_folder(out)
    probes = [_nearest_folder(folder), _nearest_folder(out / SAVING)]  # names what is in the way
    if create:
        check_writable(folder)
        check_writable(out / SAVING)
        probes = [folder]
    for probe in probes:
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
        except OSError as exc:
            raise DreamttyError(f"out: cannot write in {probe}: {exc.strerror}") from None


def _nearest_folder(path: Path) -> Path:
    """The nearest folder that exists on the way to ``path`` (itself, else a parent): where making ``path``
    would start. DreamttyError("out") when what is there is no folder (a file, a dangling link, a loop)."""
    for found in (path, *path.parents):
        try:
            os.lstat(found)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # not there: a parent may be, or is the fault
                continue
            raise DreamttyError(f"out: cannot create {path}: {exc.strerror}") from None  # a name too long, ...
        if not found.is_dir():
            raise DreamttyError(f"out: cannot create {path}: {found} is not a folder")
        return found
    raise DreamttyError(f"out: cannot create {path}: no folder on its way exists")  # a working folder removed


@functools.cache
def umask() -> int:
    """This process's umask (reading it means setting it: once, before any worker thread writes files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_image(image: Image.Image, meta: dict, out_root: Path, now: dt.datetime | None = None, tag: str = "image",
               record: Callable[[Path], None] = lambda path: None) -> Path:
    """Write ``image`` with its metadata as ``out_root/YYYY-MM-DD/HHMMSS-SEED.png``.

    The PNG is written to a temp file in ``out_root/.saving``, flushed to disk, then linked to a name that
    does not exist yet; on any error no partial file is left. ``record`` (the queue's record of the image) runs
    before the temp file goes: one of ``tag`` that a killed process left behind names an image it saved but
    may not have recorded (``settle``).
    """
    now = now or dt.datetime.now()
    folder = day_folder(out_root, now)
    check_writable(folder)
    check_writable(out_root / SAVING)
    stem = f"{now.strftime('%H%M%S')}-{meta['request']['seed']}"
    # no *.png until complete; the name says where it goes
    fd, tmp = tempfile.mkstemp(prefix=f"{tag}.{folder.name}.{stem}.", suffix=".part", dir=out_root / SAVING)
    try:
        target = _write_and_link(fd, Path(tmp), image, meta, folder, stem)
        record(target)
        return target
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_and_link(fd: int, tmp: Path, image: Image.Image, meta: dict, folder: Path, stem: str) -> Path:
    """Write the PNG to ``tmp`` (open as ``fd``) and link it to the first free name ``folder/stem[-N].png``."""
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())  # mkstemp makes 0600: a picture is shared as the user's files are
            image.save(fh, format="PNG", pnginfo=metadata.png_info(meta))
            fh.flush()
            os.fsync(fh.fileno())
        for n in range(10_000):
            target = folder / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
            try:
                _link(tmp, target)
                return target
            except FileExistsError:
                continue
        raise DreamttyError(f"out: no free file name for {stem} in {folder}")
    except OSError as exc:
        raise DreamttyError(f"out: cannot save image in {folder}: {exc.strerror or exc}") from None


def _link(tmp: Path, target: Path) -> None:
    """Give the complete file ``tmp`` the name ``target`` if that is free (FileExistsError otherwise). A file system
    without hard links (FAT, exFAT, some network mounts) takes the name first, then the file is renamed onto it:
    ``tmp`` is gone then, and an image saved by a process killed before it recorded it is not :func:`settle`\ d."""
    try:
        os.link(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask()))
        os.replace(tmp, target)


def settle(out_root: Path, tag: str, record: Callable[[Path], None]) -> int:
    """Record each image saved under ``tag`` by a process killed before it recorded it, oldest first; how many.

    Such an image's temp file is left in ``out_root/.saving`` linked to its name. A temp file of ``tag`` goes
    once its image is recorded, or at once when it was never linked (that image is made again).
    """
    try:
        temps = sorted((p.stat().st_mtime, p) for p in (out_root / SAVING).glob(f"{tag}.*.part"))
    except OSError:  # the folder is gone, or unreadable: nothing to find
        return 0
    count = 0
    for _, tmp in temps:
        _, day, stem, *_ = tmp.name.split(".")
        with contextlib.suppress(OSError):
            if tmp.stat().st_nlink > 1:
                for path in (out_root / day).glob(f"{stem}*.png"):
                    if os.path.samefile(path, tmp):
                        record(path)
                        count += 1
        tmp.unlink(missing_ok=True)
    return count
