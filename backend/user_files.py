"""Files that users name (input images, the config, presets, styles, ...), read within limits and written whole.

A path may name a device (``/dev/zero`` never ends), a FIFO (a read waits for a writer forever) or
a huge file: read whole, each would hang a thread or exhaust memory. :func:`open_regular` refuses
what is not a regular file before opening it (so a FIFO is never opened), opens without blocking and
checks again what it opened (the path may have been replaced meanwhile); :func:`read_bytes` then reads
at most ``limit`` bytes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from backend.errors import RequestError

MAX_TEXT_BYTES = 16 * 2**20  # a config, preset, style, wildcard or parameters file


class RefusedFile(OSError):
    """A path that is not a regular file, or a file larger than allowed; ``str()`` is ``PATH is ...``."""

    def __str__(self) -> str:
        return f"{self.filename} {self.strerror}"


def open_regular(path: str | os.PathLike, limit: int = sys.maxsize) -> BinaryIO:
    """The regular file at ``path`` opened for reading in binary: RefusedFile when it is something else
    or over ``limit`` bytes, OSError when it cannot be opened. For readers that read only a part (an
    image's metadata, a model's header)."""
    _check(os.stat(path), path, limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    fh = os.fdopen(fd, "rb")
    try:
        _check(os.fstat(fd), path, limit)
    except OSError:
        fh.close()
        raise
    return fh


def read_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file at ``path``: RefusedFile when it is something else or over ``limit``
    bytes, OSError when it cannot be read."""
    with open_regular(path, limit) as fh:
        data = fh.read(limit + 1)  # a file that grew since fstat (or a /proc file, size 0) is cut here
    if len(data) > limit:
        raise RefusedFile(errno.EFBIG, f"is over {_mib(limit)}", os.fspath(path))
    return data


def read_text(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES, encoding: str = "utf-8") -> str:
    """:func:`read_bytes` decoded; UnicodeDecodeError when it is not text in ``encoding``."""
    return read_bytes(path, limit).decode(encoding)


def read_error(field: str, path: str | os.PathLike, exc: OSError, wanted: str = "a file") -> RequestError:
    """The one-line error naming ``field`` for ``exc``, raised opening or reading ``path`` (``wanted``: what
    to give instead of a folder)."""
    return RequestError(field, read_problem(path, exc, wanted))


def read_problem(path: str | os.PathLike, exc: OSError, wanted: str = "a file") -> str:
    """Why ``path`` could not be read (``exc``), in words: "... is missing", "... is a folder; give ...", ..."""
    if isinstance(exc, FileNotFoundError):
        return f"{path} is missing"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a folder; give {wanted}"
    if isinstance(exc, RefusedFile):
        return f"{path} {exc.strerror}"
    return f"cannot read {path}: {exc.strerror or exc}"


@contextlib.contextmanager
def replacing(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """A temp path beside ``path`` for the block to write (ending in ``.tmp``, which no listing of presets or
    styles takes; with ``keep_suffix`` in ``path``'s suffix, which PIL saves by); when the block ends, it replaces
    ``path`` in one rename, so readers never see half a file. On an error (a full disk) the temp file is removed
    and ``path`` is left as it was."""
    target = Path(path)
    tmp = target.with_name(f".{target.name[:64]}.{uuid.uuid4().hex[:12]}.tmp" + (target.suffix if keep_suffix else ""))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` through a temp file and a rename: readers never see half a file, and
    a failed write (disk full) leaves the old file as it was, with no temp file. A link is written where it
    points (a dotfiles link stays); what is there and is not a regular file (a FIFO, a folder) is refused
    (RefusedFile, IsADirectoryError), not opened, and a read-only file is not replaced (PermissionError). The
    existing file's permissions are kept. Returns the path written."""
    target = os.path.realpath(path)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    if info is not None:
        _check(info, target, sys.maxsize)
        if not info.st_mode & 0o222 or not os.access(target, os.W_OK):  # the rename would replace it anyway
            raise PermissionError(errno.EACCES, "is read-only", target)
    with replacing(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        if info is not None:
            os.chmod(tmp, stat.S_IMODE(info.st_mode))
    return target


def _check(info: os.stat_result, path: str | os.PathLike, limit: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", os.fspath(path))
    if not stat.S_ISREG(info.st_mode):
        raise RefusedFile(errno.EINVAL, "is not a regular file", os.fspath(path))
    if info.st_size > limit:
        raise RefusedFile(errno.EFBIG, f"is {_mib(info.st_size)}; allowed up to {_mib(limit)}", os.fspath(path))


def _mib(size: int) -> str:
    return f"{round(size / 2**20, 1):g} MiB"


def file_sha256(path: str | os.PathLike, start: int = 0) -> str:
    """The SHA-256 (hex) of the file at ``path`` from byte ``start`` on, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open_regular(path) as fh:
        fh.seek(start)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
