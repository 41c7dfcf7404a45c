"""Data files that ship inside a package (styles, presets, wildcards) and the user's own in the config dir."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from backend import locations, user_files
from backend.safetext import one_line

log = logging.getLogger("dreamtty.datafiles")
_said: set[str] = set()


@dataclass(frozen=True)
class DataFile:
    """One data file: ``label`` names it in messages (``shipped:anime.yaml`` or the user's path)."""

    stem: str
    suffix: str
    label: str
    path: Path | None  # None for shipped files read through importlib.resources
    _resource: object = None

    def read_text(self) -> str:
        """The file's text; a UTF-8 byte-order mark (A1111 writes one in ``styles.csv``) is dropped. A user's
        file must be a regular file of at most 16 MiB (``user_files.RefusedFile`` otherwise)."""
        if self.path is not None:
            return user_files.read_text(self.path, encoding="utf-8-sig")
        return self._resource.read_text(encoding="utf-8-sig")  # type: ignore[attr-defined]


def user_dir(kind: str) -> Path:
    """``<config dir>/<kind>``: where the user's presets are saved, and their styles and wildcards by default."""
    return locations.config_dir() / kind


def user_dirs(kind: str) -> list[Path]:
    """The folders searched for the user's files: the config's ``paths.<kind>`` list for styles and
    wildcards (``<config dir>/<kind>`` by default), ``<config dir>/<kind>`` otherwise."""
    from backend import config

    return config.load().folders(kind) if kind in config.FOLDER_KINDS else [user_dir(kind)]


def data_files(package: str, kind: str, suffixes: tuple[str, ...], recursive: bool = False) -> list[DataFile]:
    """Shipped files of ``package`` first, then the user's ``<config dir>/<kind>`` files, each sorted by name.
    A user's entry that is not a regular file (a FIFO, a dangling link) is listed too: reading it says why it
    is refused, where passing over it would call the name unknown. A folder that cannot be listed is said."""
    shipped = sorted(
        (p for p in resources.files(package).iterdir() if p.name.endswith(suffixes)), key=lambda p: p.name
    )
    out = [DataFile(_stem(p.name, suffixes), _suffix(p.name, suffixes), f"shipped:{p.name}", None, p) for p in shipped]
    pattern = "**/*" if recursive else "*"
    for folder in user_dirs(kind):
        if not folder.is_dir():
            continue
        try:
            os.listdir(folder)  # glob passes over a folder it cannot list, in silence
        except OSError as exc:
            _say_once(f"{folder}: cannot list: {exc.strerror or exc}; its {kind} are not found")
            continue
        for path in sorted(folder.glob(pattern)):
            if not path.is_dir() and path.name.lower().endswith(suffixes):  # Sd15.YAML too
                stem = path.relative_to(folder).as_posix()
                out.append(DataFile(_stem(stem, suffixes), _suffix(path.name, suffixes), str(path), path))
    return out


def _suffix(name: str, suffixes: tuple[str, ...]) -> str:
    """Which of ``suffixes`` (lower case) ``name`` ends with, in any case."""
    return next(s for s in suffixes if name.lower().endswith(s))


def _stem(name: str, suffixes: tuple[str, ...]) -> str:
    return name[: -len(_suffix(name, suffixes))]


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning("dreamtty: warning: %s", one_line(message))  # a path may hold ESC
