"""Numbers, switches and text from text, YAML, JSON or a form, checked the same way everywhere.

Each parser takes the field name and raises a one-line RequestError naming it.
"""

from __future__ import annotations

import decimal
import json
import math
import os
import re
from collections.abc import Callable

from backend.errors import RequestError
from backend.safetext import cut, visible

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_WHOLE = re.compile(r"\s*[-+]?([0-9]+)\s*")
MAX_DIGITS = 100  # more is out of range for every field (and int() refuses more than 4300)
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800", or a byte of a non-UTF-8 argument (surrogateescape)


MAX_SHOWN = 200  # characters of a value quoted in an error: what is allowed comes after it, and must show


def shown(value: object) -> str:
    """``value`` as an error quotes it: text in quotes, anything else as JSON writes it (``true``, ``null``,
    ``[1, 2]``), since a JSON or YAML body wrote it that way (Python's ``True`` and ``None`` would puzzle);
    cut to :data:`MAX_SHOWN` characters."""
    if isinstance(value, (str, float)):  # a float as typed: nan, inf (JSON would write NaN, Infinity)
        text = repr(value)
    else:
        try:  # JSON escapes C0 only: C1 and bidirectional controls are written out as repr() would
            text = visible(json.dumps(value, ensure_ascii=False, allow_nan=True, default=str))
        except (TypeError, ValueError):  # circular: a YAML alias of itself
            text = repr(value)
    return cut(text, MAX_SHOWN)


def kind_of(value: object) -> str:
    """What JSON or YAML calls ``value``'s type, for "expected text, got ...": "a list", "a mapping", "a number",
    "text", or the value itself for true, false and null."""
    if isinstance(value, bool) or value is None:
        return shown(value)
    for types, name in ((str, "text"), ((int, float), "a number"), ((list, tuple), "a list"), (dict, "a mapping")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def is_whole(value: object) -> bool:
    """Whether ``value`` is an int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is an int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


Shape = object  # a type, a predicate, [Shape] (a list of it) or {key: Shape} (a record with those keys)


def shape_fault(value: object, shape: Shape, where: str = "") -> str | None:
    """None when ``value`` (as JSON gives it) has ``shape``; else the path of the first part that has not
    (``workers[0].ready``; ``where`` for ``value`` itself)."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return where
        parts = ((value.get(key), inner, f"{where}.{key}".lstrip(".")) for key, inner in shape.items())
    elif isinstance(shape, list):
        if not isinstance(value, list):
            return where
        parts = ((item, shape[0], f"{where}[{i}]") for i, item in enumerate(value))
    else:
        return None if (isinstance(value, shape) if isinstance(shape, type) else shape(value)) else where
    return next((bad for part in parts if (bad := shape_fault(*part)) is not None), None)


def optional(shape: Shape) -> Callable[[object], bool]:
    """``shape``, or None."""
    return lambda value: value is None or shape_fault(value, shape) is None


def _ascii_text(name: str, value: object, said: str = "") -> None:
    """RequestError unless a text ``value`` is ASCII: ``int()`` and ``float()`` read "٣" (another script's digit)
    as 3, where every option of the CLI refuses it. ``said`` ends the message (what is allowed)."""
    if isinstance(value, str) and not value.isascii():
        raise RequestError(name, f"{shown(value)} is not a number (write it in ASCII digits){said}")


def plain_float(value: object) -> float:
    """``float()``, refusing text that is not ASCII ("٣" is 3 to ``float()``) or holds the ``_`` of Python's digit
    grouping ("1_0" is 10): a slip, not a number. ValueError then."""
    _plain(value)
    return float(value)  # type: ignore[arg-type]


def _plain(value: object) -> None:
    if isinstance(value, str) and ("_" in value or not value.isascii()):
        raise ValueError(value)


def to_int(name: str, value: object) -> int:
    """An int, or a float or text holding a whole number (ASCII digits)."""
    if is_whole(value):
        return value
    _ascii_text(name, value)
    whole = _WHOLE.fullmatch(value) if isinstance(value, str) else None
    if whole and len(whole[1]) > MAX_DIGITS:
        raise RequestError(name, f"a number of {len(whole[1])} digits is out of range")
    if whole:
        return int(value)  # exact, where a float would round a large number
    if isinstance(value, str):
        return _whole_text(name, value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise RequestError(name, f"{shown(value)} is not a whole number")


def _whole_text(name: str, text: str) -> int:
    """The whole number ``text`` writes with a fraction or an exponent ("2.50e1", "1e3"), read exactly: a float
    rounds 1e30 to 1000000000000000019884624838656."""
    try:
        number = plain_float(text)  # the forms taken: ASCII digits, no "1_0"
    except ValueError:
        number = math.nan
    if math.isnan(number) or (math.isinf(number) and not any(c.isdigit() for c in text)):  # "nan", "inf"
        raise RequestError(name, f"{shown(text)} is not a whole number")
    try:
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:  # an exponent past Decimal's: "1e9999999999999999999", "1e-9999999999999999999"
        exact = None
    if (exact is None and math.isinf(number)) or (exact and exact.adjusted() >= MAX_DIGITS):
        raise RequestError(name, f"{shown(text)} is out of range")
    if exact is None or exact != exact.to_integral_value():  # "1.0000000000000000001" is whole as a float only
        raise RequestError(name, f"{shown(text)} is not a whole number")
    return int(exact)


def to_float(name: str, value: object, allowed: str = "") -> float:
    """A finite float from a number or text (ASCII digits); the error says ``allowed`` (a range) when given."""
    said = f"; allowed {allowed}" if allowed else ""
    _ascii_text(name, value, said)
    try:
        if isinstance(value, bool):
            raise TypeError
        out = plain_float(value)
    except OverflowError:  # an int beyond float's range
        out = math.inf
    except (TypeError, ValueError):
        raise RequestError(name, f"{shown(value)} is not a number{said}") from None
    if not math.isfinite(out):
        raise RequestError(name, f"{shown(value)} is not a finite number{said}")
    return out + 0.0  # -0 is 0: metadata and A1111's text said "-0.0"


def to_bool(name: str, value: object) -> bool:
    """A real boolean, or the text true/false, yes/no, on/off, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RequestError(name, f"{shown(value)} is not true or false")


def check_text(name: str, value: object, nul: bool = False) -> None:
    """Every text in ``value`` (nested in lists and mappings too) must be valid UTF-8 and, unless ``nul``,
    hold no NUL (no file name can). Raises RequestError(name) otherwise."""
    _check_text(name, value, nul, set())


def _check_text(name: str, value: object, nul: bool, seen: set[int]) -> None:
    """:func:`check_text`, visiting each list or mapping once: YAML aliases can share one node so often
    (a "billion laughs" file) that a walk of every path through them would never end."""
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        if bad:
            raise RequestError(name, f"is not valid UTF-8 text ({_code_point(bad.group())} at character "
                                     f"{bad.start() + 1}); give text, and paths, in UTF-8")
        if not nul and "\0" in value:
            raise RequestError(name, f"holds a NUL character (at character {value.index(chr(0)) + 1}); "
                                     "no path or name may hold one")
        return
    if not isinstance(value, (dict, list, tuple)) or id(value) in seen:
        return
    seen.add(id(value))
    items = [x for pair in value.items() for x in pair] if isinstance(value, dict) else value
    for item in items:
        _check_text(name, item, nul, seen)


def _code_point(char: str) -> str:
    """A surrogate as the byte it stands for (Python's surrogateescape) or as its code point."""
    code = ord(char)
    return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"


def absolute(path: str) -> str:
    """``path`` made absolute (``~`` expanded), so a job run or reproduced elsewhere finds the same file."""
    return os.path.abspath(os.path.expanduser(path)) if path else path
