"""Wildcards ``__name__`` (a seeded line of ``name.txt``) and arrays ``[[a, b, c]]`` (element i for image i).

Wildcard files: the shipped ``wildcards/*.txt`` and the user's
``<config dir>/wildcards/**/*.txt`` (a subfolder makes ``__folder/name__``;
the user's file wins over a shipped one of the same name). One option per line;
blank lines and lines starting with ``#`` are skipped; a file that cannot be read
as UTF-8 text is reported once (a logged warning) and skipped.
"""

from __future__ import annotations

import logging
import random
import re

from backend import user_files
from backend.errors import RequestError
from backend.prompting.datafiles import data_files, user_dir, user_dirs
from backend.safetext import one_line

MAX_DEPTH = 16
MAX_CHARS = 20_000  # longest text one wildcard may expand to (nested picks included)
MAX_PICKS = 1_000  # most wildcard picks in one prompt
log = logging.getLogger("dreamtty.wildcards")
_skipped: dict[str, str] = {}  # wildcard name -> why its file was skipped (this process)
WILDCARD = re.compile(r"__([A-Za-z0-9][\w\-/.]*?)__")
ARRAY = re.compile(r"\[\[([^\[\]]*,[^\[\]]*)\]\]")


def load_wildcards() -> dict[str, list[str]]:
    """Wildcard name (lower case) -> its options."""
    table: dict[str, list[str]] = {}
    for file in data_files("wildcards", "wildcards", (".txt",), recursive=True):
        try:
            text = file.read_text()
        except OSError as exc:
            _skip(file.stem.lower(), user_files.read_problem(file.label, exc))
            continue
        except UnicodeError:
            _skip(file.stem.lower(), f"{file.label} is not UTF-8 text")
            continue
        lines = (line.strip() for line in text.splitlines())
        table[file.stem.lower()] = [line for line in lines if line and not line.startswith("#")]
    return table


def _skip(name: str, reason: str) -> None:
    """Remember why wildcard ``name`` is missing (its use names the reason); warn once per process."""
    if _skipped.get(name) != reason:
        _skipped[name] = reason
        log.warning("dreamtty: warning: %s; wildcard file skipped", one_line(reason))  # a path may hold ESC


def expand_wildcards(
    text: str, table: dict[str, list[str]], rng: random.Random, field: str
) -> tuple[str, list[dict]]:
    """Replace every ``__name__`` (recursively, up to MAX_DEPTH) with a line picked by ``rng``.

    Raises RequestError naming the wildcard that nests too deep, makes more than MAX_PICKS
    picks or expands to more than MAX_CHARS characters (files that include each other
    several times grow exponentially).
    """
    picks: list[dict] = []

    def expand(part: str, depth: int) -> str:
        def pick(match: re.Match) -> str:
            name = match.group(1)
            if depth >= MAX_DEPTH:
                raise RequestError(field, f"wildcards nest deeper than {MAX_DEPTH} levels at __{name}__; "
                                          "does a wildcard file include itself?")
            options = table.get(name.lower())
            if options is None and name.lower() in _skipped:
                raise RequestError(field, f"wildcard __{name}__: {_skipped[name.lower()]}")
            if options is None:
                raise RequestError(field, f"unknown wildcard __{name}__; add {name}.txt to {_first_folder()}")
            if not options:
                raise RequestError(field, f"wildcard __{name}__ has no lines")
            if len(picks) >= MAX_PICKS:
                raise RequestError(field, f"more than {MAX_PICKS} wildcard picks at __{name}__; "
                                          "do wildcard files include each other many times?")
            choice = rng.choice(options)
            picks.append({"field": field, "name": name, "pick": choice})
            expanded = expand(choice, depth + 1)
            if len(expanded) > MAX_CHARS:
                raise RequestError(field, f"wildcard __{name}__ expands to more than {MAX_CHARS} characters; "
                                          "do wildcard files include each other many times?")
            return expanded

        return WILDCARD.sub(pick, part)

    return expand(text, 0), picks


def expand_arrays(text: str, index: int, field: str) -> tuple[str, list[dict]]:
    """Replace each ``[[a, b, c]]`` (at least one comma) with element ``index % n``."""
    choices: list[dict] = []

    def choose(match: re.Match) -> str:
        options = [o.strip() for o in match.group(1).split(",")]
        choice = options[index % len(options)]
        choices.append({"field": field, "options": options, "pick": choice})
        return choice

    return ARRAY.sub(choose, text), choices


def _first_folder() -> str:
    """Where a new wildcard file goes: the first wildcards folder searched (``paths.wildcards``, DREAMTTY_WILDCARDS)."""
    return str(next(iter(user_dirs("wildcards")), user_dir("wildcards")))
