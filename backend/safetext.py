"""Text from users, files, images and models, made safe to print on a terminal.

A terminal obeys the control characters in what it is sent: ESC starts escape sequences (reset
the screen, write the clipboard with OSC 52, ...), and so do the C1 codes (U+009B is a CSI on
its own). Bidirectional overrides (U+202E) make text read differently from what it is. So every
such character of untrusted text is written out visibly instead, as ``\\x1b`` or ``\\u202e``.
"""

from __future__ import annotations

import re

# C0 controls except tab and newline, DEL, C1 controls, the Unicode bidirectional controls (ALM, LRM/RLM,
# LRE..RLO, LRI..PDI), the line and paragraph separators (a line break to splitlines() and JavaScript), the
# invisible characters that join nothing (zero width space, word joiner, invisible operators, BOM: "fo\u200bx.png"
# read as "fox.png"; the joiners U+200C/U+200D stay, for scripts and emoji) and lone surrogates (from JSON's
# "\ud800" or undecodable bytes: no UTF-8 encoder writes them).
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060-\u2064"
                     "\u2066-\u2069\ufeff\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object) -> str:
    """``str(text)`` with each control character (see ``CONTROL``) written as ``\\xNN`` or ``\\uNNNN``."""
    return CONTROL.sub(_escape, str(text))


def one_line(text: object) -> str:
    """:func:`visible`, with newlines and tabs written as ``\\n`` and ``\\t`` too: an error or a warning that
    names a path holding a newline stays on one line, and a tab in a name is not read as spaces (or a column)."""
    return visible(text).replace("\n", "\\n").replace("\t", "\\t")


MAX_LINE = 2000  # characters of an error line: a value echoed in it may be a megabyte long


def error_line(text: object, most: int = MAX_LINE) -> str:
    """:func:`one_line`, cut to ``most`` characters in the middle: the end says why (a long value echoed in it is
    cut, not the reason after it)."""
    line = one_line(text)
    if len(line) <= most:
        return line
    tail = most // 2
    return f"{line[:most - tail - len(_CUT)]}{_CUT}{line[-tail:]}"


_CUT = " … (cut) … "


def summary(text: object, most: int) -> str:
    """``text`` on one line (each run of white space one space), cut to ``most`` characters with "…"."""
    return cut(" ".join(str(text).split()), most)


def cut(text: str, most: int) -> str:
    """``text`` cut to ``most`` characters, its end "…"."""
    return text if len(text) <= most else text[:most - 1] + "…"


def cut_line(text: object, most: int) -> str:
    """``text`` as :func:`one_line` writes it, cut to ``most`` characters with "…", never inside an escape
    (``\\u200`` of a cut ``\\u200b`` reads as another character)."""
    line = one_line(text)
    if len(line) <= most:
        return line
    kept = ""
    for char in str(text):
        shown = one_line(char)
        if len(kept) + len(shown) > most - 1:
            break
        kept += shown
    return kept + "…"


def first_line(exc: BaseException, most: int = 300, empty: str | None = None) -> str:
    """The first line of ``exc``'s message, cut to ``most`` characters (a library's error quoted in one of ours:
    the rest is a traceback's worth of detail); ``empty`` when it has none (None: its type's name)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:most] if lines else type(exc).__name__ if empty is None else empty
