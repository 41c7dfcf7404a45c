"""A1111 attention syntax: ``(word:1.3)``, ``(word)`` = x1.1, ``[word]`` = /1.1, ``\\(`` escapes, ``BREAK``.

Pure text -> weighted fragments; the encoder (backend.engine.conditioning)
turns them into per-token weights. The rules are those documented for the
AUTOMATIC1111 web UI ("Attention/emphasis"); unlike it, unbalanced brackets are
an error here instead of being applied to the rest of the prompt. Prompt editing
(``[a:b:10]``, ``[a|b]``) is resolved before, into the text of each step
(backend.prompting.editing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backend.errors import RequestError

UP = 1.1  # "(word)"
DOWN = 1 / 1.1  # "[word]"
MAX_WEIGHT = 100.0  # a fragment's weight (nested brackets multiplied) must lie in -MAX_WEIGHT..MAX_WEIGHT

_TOKEN = re.compile(
    r"""
    (?P<escape>\\[\\()\[\]])
  | (?P<weight>:\s*(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*\))
  | (?P<open>[(\[])
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Fragment:
    """A run of text with one weight; ``is_break`` marks a BREAK (start a new 75-token chunk)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


def parse_weights(text: str, field: str = "prompt", in_range: bool = True) -> list[Fragment]:
    """Split ``text`` into weighted fragments; adjacent equal weights are merged.

    Raises RequestError(field, ...) naming the column of an unbalanced bracket or, with ``in_range``, of a
    weight outside -MAX_WEIGHT..MAX_WEIGHT (also after nested brackets multiply).
    """
    pieces: list[list] = []  # [text, weight] pairs, weights multiplied in place
    stack: list[tuple[str, int, int]] = []  # (bracket, column, first piece index)
    for match in _TOKEN.finditer(text):
        kind, col = match.lastgroup, match.start() + 1
        if kind == "escape":
            pieces.append([match.group()[1], 1.0])
        elif kind == "text":
            pieces.append([match.group(), 1.0])
        elif kind == "open":
            stack.append((match.group(), col, len(pieces)))
        else:
            closing = ")" if kind == "weight" else match.group()
            if not stack:
                raise RequestError(field, f"unmatched {closing!r} at column {col}; escape it as \\{closing}")
            bracket, opened, first = stack.pop()
            if {"(": ")", "[": "]"}[bracket] != closing:
                raise RequestError(field, f"{bracket!r} at column {opened} is closed by {closing!r} at column {col}")
            factor = float(match.group("number")) if kind == "weight" else (UP if bracket == "(" else DOWN)
            for piece in pieces[first:]:
                piece[1] *= factor
                if in_range:
                    _check_weight(piece[1], col, field)
    if stack:
        bracket, opened, _ = stack[-1]
        closing = {"(": ")", "[": "]"}[bracket]
        raise RequestError(field, f"{bracket!r} at column {opened} is never closed; add {closing!r} or escape it")
    return _merge(_split_breaks(pieces))


def _check_weight(weight: float, col: int, field: str) -> None:
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:  # also False for nan
        raise RequestError(field, f"weight {weight:g} at column {col} is out of range; "
                                  f"allowed -{MAX_WEIGHT:g}..{MAX_WEIGHT:g} (nested brackets multiply)")


def _split_breaks(pieces: list[list]) -> list[Fragment]:
    out: list[Fragment] = []
    for text, weight in pieces:
        for i, part in enumerate(_BREAK.split(text)):
            if i:
                out.append(Fragment("", 1.0, is_break=True))
            if part:
                out.append(Fragment(part, weight))
    return out


def _merge(fragments: list[Fragment]) -> list[Fragment]:
    out: list[Fragment] = []
    for frag in fragments:
        if out and not frag.is_break and not out[-1].is_break and out[-1].weight == frag.weight:
            out[-1] = Fragment(out[-1].text + frag.text, frag.weight)
        else:
            out.append(frag)
    return out


def is_plain(text: str) -> bool:
    """True when ``text`` has no weights, escapes or BREAK (it encodes as written)."""
    fragments = parse_weights(text)
    return not fragments or (len(fragments) == 1 and fragments[0] == Fragment(text))
